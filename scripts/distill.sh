#!/usr/bin/env bash
# smolt's main job. With no arguments it runs the embedded toy preset end to end on this machine.
#
#   bash scripts/distill.sh                      # toy preset
#   bash scripts/distill.sh --preset smoke       # same stages at smoke size (what the tests run)
#   bash scripts/distill.sh --force              # rerun stages whose outputs exist
#   bash scripts/distill.sh data.seed=1          # STAGE.key=value sets `key` in that stage's config
#
# Stages and their override prefixes: data, teacher, cache, distill, evaluate
#
# Each stage writes its outputs and resolved config under outputs/<preset>/ and is skipped when its
# output exists and its resolved config is unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PRESET=toy
FORCE=()
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --preset=*) PRESET="${1#--preset=}"; shift ;;
    --force) FORCE=(--force); shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) echo "unknown argument '$1' (expected --preset NAME, --force or key=value)" >&2; exit 2 ;;
  esac
done

CONFIGS="$ROOT/configs/$PRESET"
if [ ! -d "$CONFIGS" ]; then
  echo "unknown preset '$PRESET': no folder configs/$PRESET (have: $(ls "$ROOT/configs" | tr '\n' ' '))" >&2
  exit 2
fi

source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export PYTHONUNBUFFERED=1

for item in "${OVERRIDES[@]}"; do
  case "${item%%.*}" in
    data|teacher|cache|distill|evaluate) ;;
    *) echo "override '$item' names no stage; prefix it with one of: data teacher cache distill evaluate" >&2
       exit 2 ;;
  esac
done

stage() {  # stage PREFIX MODULE CONFIG: run one stage with the preset's config and its STAGE.key=value overrides
  local prefix="$1" module="$2" config="$3" mine=()
  for item in "${OVERRIDES[@]}"; do
    [ "${item%%.*}" = "$prefix" ] && mine+=("${item#"$prefix".}")
  done
  echo "=== [$PRESET] $prefix: python -m $module --config ${config#"$ROOT"/} ${FORCE[*]} ${mine[*]}"
  "$PY" -m "$module" --config "$config" "${FORCE[@]}" "${mine[@]}"
}

stage data toybench.generate "$CONFIGS/data.yaml"          # toy benchmark (skipped when present)
stage teacher teacher.train "$CONFIGS/teacher.yaml"         # toy teacher (trained only if missing)
stage cache teacher.cache "$CONFIGS/cache.yaml"             # teacher cache of the train split
stage distill distill.train "$CONFIGS/distill.yaml"         # distilled student
stage evaluate evaluation.run "$CONFIGS/evaluate.yaml"      # every stage on the test split
echo "=== [$PRESET] results: $ROOT/outputs/$PRESET/eval/ (comparison.json, <model>/results.json)"
