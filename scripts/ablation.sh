#!/usr/bin/env bash
# Reproduce the ablation table, then the figures.
#
#   bash scripts/ablation.sh                          # toy preset: configs/toy/ablation.yaml
#   bash scripts/ablation.sh --preset smoke           # the machinery at smoke size (the tests run it)
#   bash scripts/ablation.sh 'only=["+ forward KL"]'  # key=value overrides for the ablation config
#   bash scripts/ablation.sh jobs=2                   # two row seeds at a time (2 cores: one thread each)
#
# Needs the preset's teacher, teacher cache and data: bash scripts/distill.sh --preset <preset> makes them (the
# default of distill.sh is the quick preset, not toy).
# Rows finished earlier are reused; writes paper/tables/ablation.{md,csv,tex} (toy) and paper/figures/*.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET=toy
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --preset=*) PRESET="${1#--preset=}"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
CONFIG="configs/$PRESET/ablation.yaml"
if [ ! -f "$ROOT/$CONFIG" ]; then
  echo "no ablation config for preset '$PRESET': $CONFIG does not exist" >&2
  exit 2
fi
TEACHER="outputs/$PRESET/teacher/model"
if [ -f "$ROOT/configs/$PRESET/teacher.yaml" ] && [ ! -f "$ROOT/$TEACHER/DONE" ]; then
  echo "the $PRESET ablation reads the $PRESET preset's data, teacher and teacher cache, and $TEACHER is not there:" >&2
  echo "run 'bash scripts/distill.sh --preset $PRESET' first (it makes them; the toy preset takes about 80 min)" >&2
  exit 2
fi
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export PYTHONUNBUFFERED=1
"$ROOT/.venv/bin/python" -m experiments ablation --config "$CONFIG" "${ARGS[@]}"
FIGURES=paper/figures
[ "$PRESET" = toy ] || FIGURES="outputs/$PRESET/figures"
"$ROOT/.venv/bin/python" -m experiments figures --preset "$PRESET" --out "$FIGURES"
