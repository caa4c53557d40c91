#!/usr/bin/env bash
# GPU check: absolute TTFT, TPOT and peak memory of the quick preset's teacher and students (outputs/quick/, built
# by `bash scripts/distill.sh`) on one CUDA GPU, run as a V100 would (float16, SDPA math kernel only), under the
# careful protocol and the hackathon's (10 warm-ups, 100 runs, 10 s input cut to the Whisper window) → JSON.
#
#   bash scripts/gpu_check.sh                        # quick preset → outputs/quick/gpu_check.json (under 8 min)
#   bash scripts/gpu_check.sh --preset smoke         # the smoke preset's models (bash scripts/distill.sh --preset smoke)
#   DRY=1 bash scripts/gpu_check.sh                  # the same code on the CPU at smoke size, few repetitions
#   bash scripts/gpu_check.sh --attention eager models=[...]   # options and evaluate.yaml overrides, see --help
#
# Python: $PYTHON if set, else .venv/bin/python, else python3, the first that imports smolt's dependencies. If none
# does, it creates .venv and installs them from the package registry (torch 2.13.0, then `pip install -e .`); where
# the registry is unreachable it stops and names what is missing. GPU_CHECK_TIMEOUT (seconds, default 470) bounds
# the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

case "${1:-}" in -h|--help) sed -n '2,14p' "$0"; exec_help=1 ;; esac

usable() {  # usable PYTHON: prints nothing and fails unless it imports the check and everything it needs
  [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 && "$1" -c "import evaluation.gpu_check" 2>/dev/null
}

PY=""
for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
  if usable "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
  echo "[gpu_check] no Python here imports smolt's dependencies; installing them into $ROOT/.venv"
  BASE="${PYTHON:-python3}"
  if { [ -x "$ROOT/.venv/bin/python" ] || "$BASE" -m venv "$ROOT/.venv"; } &&
     "$ROOT/.venv/bin/python" -m pip -q --disable-pip-version-check install "torch==2.13.0" &&
     "$ROOT/.venv/bin/python" -m pip -q --disable-pip-version-check install -e "$ROOT"; then
    PY="$ROOT/.venv/bin/python"
  else
    echo "[gpu_check] could not install from the package registry. What this Python lacks:" >&2
    "$BASE" -c "import evaluation.gpu_check" 2>&1 | tail -n 1 >&2 || true
    echo "[gpu_check] install torch 2.13 (a CUDA build), transformers, torchao and smolt (pip install -e .) into" \
         "an environment, then rerun with PYTHON=/path/to/python" >&2
    exit 2
  fi
fi

if [ -n "${exec_help:-}" ]; then "$PY" -m evaluation.gpu_check --help; exit 0; fi
"$PY" - <<'PYEOF'
import torch
cuda = torch.cuda.is_available()
where = torch.cuda.get_device_name(0) if cuda else "no CUDA GPU visible"
print(f"[gpu_check] torch {torch.__version__} (CUDA {torch.version.cuda}); {where}")
PYEOF
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" -m evaluation.gpu_check "$@"
