#!/usr/bin/env bash
# Create or reuse .venv and install everything smolt needs. Sourced by scripts/distill.sh and scripts/test.sh.
# Fast on a second run: a stamp of the dependency files decides whether pip runs at all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"

# --- system packages: speech synthesis for the toy benchmark, Java for METEOR / PTB tokenizer / SPICE ---
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v flite >/dev/null 2>&1 || missing+=(flite)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] missing system packages: ${missing[*]}" >&2
    echo "[setup] install them first, e.g.: sudo apt-get install ${missing[*]}" >&2
    echo "[setup] (espeak-ng and flite synthesise the toy benchmark's speech; Java runs METEOR and SPICE)" >&2
    exit 1
  fi
fi

# --- Python environment ---
stamp_src=$(cat pyproject.toml scripts/setup_env.sh third_party/msclap_unavailable/pyproject.toml \
  third_party/msclap_unavailable/msclap/__init__.py | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.smolt-stamp" 2>/dev/null)" = "$stamp_src" ]; then
  return 0 2>/dev/null || exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
echo "[setup] installing Python dependencies (first run takes a few minutes)"
# torch first and exactly, so that nothing later pulls another build.
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[dev]"
# aac-metrics' own dependencies would pull msclap -> torchaudio (no build for torch 2.13) and downgrade
# transformers. Install it alone, with the small stand-in for msclap (CLAP metrics are unavailable).
"${PIP[@]}" install --no-deps "aac-metrics==0.5.5" ./third_party/msclap_unavailable
"$VENV/bin/python" -c "from common.cli import quiet_third_party_logs; quiet_third_party_logs(); import torch, transformers, aac_metrics; assert torch.__version__.startswith('2.13.0')"
echo "$stamp_src" >"$VENV/.smolt-stamp"
echo "[setup] environment ready: $VENV"
