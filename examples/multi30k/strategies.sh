#!/usr/bin/env bash
# Distillation strategies against plain word-level KD: run.sh's student, same data and budget, trained with
# a temperature schedule, an alpha schedule, selective KD (batch and global), the mutual-information loss,
# two teachers (fixed, confidence and learned weights) and deep mutual learning (two students, no teacher);
# every model scored on test and valid; one table with run.sh's no-KD and word-KD students, and one of the
# students' final valid NLL, with learning curves beside them.
#
# Usage: bash examples/multi30k/run.sh && bash examples/multi30k/strategies.sh   (same settings for both)
#   STRATEGIES="..."       which of them to train (default: all, in the order of the table)
#   SECOND_TEACHER=ckpt    the multi-teacher runs' second teacher (default: one trained here like run.sh's
#                          teacher, with another seed)
#   TEMPERATURE_START=2    the temperature schedule: cosine from it down to KD_TEMPERATURE
#   ALPHA_START=0.9 ALPHA_FINAL=0.1   the alpha schedule: linear between them
#   SELECTION_RATE=0.5     the fraction of target tokens selective KD distils
#   DML_ARCH=transformer_mutual_student_tiny   two peers of run.sh's student architecture (default: the
#                          transformer_mutual_* of STUDENT_ARCH)
#   ...and every setting of run.sh (WORK, CONFIG, STUDENT_UPDATES, KD_ALPHA, KD_TEMPERATURE, KD_TOPK, ...)
set -euo pipefail

. "$(dirname "$0")/common.sh"

ALL=(strategy-temperature-cosine strategy-alpha-linear strategy-selective-batch strategy-selective-global
    strategy-mi strategy-two-teachers strategy-two-teachers-confidence strategy-two-teachers-learned strategy-dml)
read -r -a STRATEGIES <<< "${STRATEGIES:-${ALL[*]}}"
TEMPERATURE_START=${TEMPERATURE_START:-2}
ALPHA_START=${ALPHA_START:-0.9}
ALPHA_FINAL=${ALPHA_FINAL:-0.1}
SELECTION_RATE=${SELECTION_RATE:-0.5}
DML_ARCH=${DML_ARCH:-${STUDENT_ARCH/#transformer_student/transformer_mutual_student}}
TEACHER=$WORK/teacher/$CHECKPOINT

require_stages teacher evaluate-teacher evaluate-student-no-kd evaluate-student-word-kd
require_current_students student-no-kd student-word-kd
for name in "${STRATEGIES[@]}"; do
    if [[ " ${ALL[*]} " != *" $name "* ]]; then
        echo "error: STRATEGIES names '$name'; choose from: ${ALL[*]}" >&2
        exit 1
    fi
done

if [[ " ${STRATEGIES[*]} " == *" strategy-dml "* ]] && ! python - "$DML_ARCH" <<'CHECK'
import sys
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq_kd.models.transformer_mutual import TransformerMutualModel
sys.exit(ARCH_MODEL_REGISTRY.get(sys.argv[1]) is not TransformerMutualModel)
CHECK
then
    echo "error: DML_ARCH '$DML_ARCH' is not a transformer_mutual architecture; set DML_ARCH to the" \
        "transformer_mutual_* of STUDENT_ARCH=$STUDENT_ARCH (e.g. transformer_mutual_student_tiny)" >&2
    exit 1
fi
if [[ " ${STRATEGIES[*]} " == *" strategy-two-teachers"* ]] && [ -z "${SECOND_TEACHER:-}" ]; then
    # the teacher's command with the next seed: another initialisation and batch order
    SEED=$((SEED + 1)) stage teacher-2 "$WORK/teacher-2.log" train_teacher "$WORK/teacher-2"
fi
TEACHERS=$TEACHER:${SECOND_TEACHER:-$WORK/teacher-2/$CHECKPOINT}

# the strategies that only change the criterion distil from run.sh's cache (or teacher)
word_kd_flags "$WORK/cache"
KD=("${KD_FLAGS[@]}")
# the flags of each strategy, a bash array per strategy (name with '-' replaced by '_')
strategy_temperature_cosine=("${KD[@]}" --kd-temperature "$TEMPERATURE_START" --kd-temperature-schedule cosine
    --kd-temperature-final "$KD_TEMPERATURE" "${KD_SCHEDULE_FLAGS[@]}")
strategy_alpha_linear=("${KD[@]}" --kd-alpha "$ALPHA_START" --kd-alpha-schedule linear --kd-alpha-final "$ALPHA_FINAL"
    "${KD_SCHEDULE_FLAGS[@]}")
strategy_selective_batch=("${KD[@]}" --kd-selection batch --kd-selection-rate "$SELECTION_RATE")
strategy_selective_global=("${KD[@]}" --kd-selection global --kd-selection-rate "$SELECTION_RATE")
strategy_mi=("${KD[@]}" --kd-loss mi)
word_kd_flags "$WORK/cache-two-teachers" "$TEACHERS"
strategy_two_teachers=("${KD_FLAGS[@]}")
word_kd_flags "$WORK/cache-two-teachers-confidence" "$TEACHERS"
strategy_two_teachers_confidence=("${KD_FLAGS[@]}")
if [ "$KD_TOPK" -eq 0 ]; then strategy_two_teachers_confidence+=(--teacher-weighting confidence); fi
# learned weights train with the student, so the teachers run online
strategy_two_teachers_learned=(--teacher-path "$TEACHERS" --teacher-weighting learned --kd-alpha "$KD_ALPHA"
    --kd-temperature "$KD_TEMPERATURE" --kd-topk "$KD_TOPK")
strategy_dml=(--arch "$DML_ARCH" --kd-alpha "$KD_ALPHA" --kd-temperature "$KD_TEMPERATURE")
# the two-teacher mixtures cached here (a cache holds the confidence-weighted mixture it was built with)
cache_strategy_two_teachers=()
cache_strategy_two_teachers_confidence=(--teacher-weighting confidence)

for name in "${STRATEGIES[@]}"; do
    declare -n flags=${name//-/_}
    if [ "$KD_TOPK" -gt 0 ] && declare -p "cache_${name//-/_}" &> /dev/null; then
        declare -n cache_flags=cache_${name//-/_}
        stage "cache-${name#strategy-}" "$WORK/cache-${name#strategy-}.log" \
            build_cache "$DATA" "$WORK/cache-${name#strategy-}" "$TEACHERS" "${cache_flags[@]}"
    fi
    stage "$name" "$WORK/$name.log" train_student "$name" "$DATA" "${flags[@]}"
done
# deep mutual learning yields two students: each peer is written out as a plain checkpoint (beside the
# training's directory, whose files the stage records hold) and scored; a stage stopped after the
# extraction extracts again
evaluate_peer() {  # NAME PEER
    local peer=$WORK/$1-$2.pt
    cmd rm -f "$peer"
    cmd python "$ROOT/scripts/extract_peer.py" "$WORK/$1/$CHECKPOINT" --peer "$2" --out "$peer"
    evaluate "$1-$2" "$peer"
}
mkdir -p "$WORK/results"
scored=()
for name in "${STRATEGIES[@]}"; do
    if [ "$name" = strategy-dml ]; then
        for peer in a b; do
            stage "evaluate-$name-$peer" "$WORK/results/$name-$peer.log" evaluate_peer "$name" "$peer"
            scored+=("$name-$peer")
        done
    else
        stage "evaluate-$name" "$WORK/results/$name.log" evaluate "$name" "$WORK/$name/$CHECKPOINT"
        scored+=("$name")
    fi
done

echo "[strategies tables] $WORK/strategies.md, $WORK/results/strategies.json, learning curves $WORK/strategies-curves.png"
{
    table "$WORK/results/strategies" teacher student-no-kd student-word-kd "${scored[@]}"
    echo
    # the students' own valid NLL after the last update (of peer a for deep mutual learning)
    work_files %s.log student-no-kd student-word-kd "${STRATEGIES[@]}"
    python "$ROOT/scripts/valid_curve.py" --every "$STUDENT_UPDATES" --plot "$WORK/strategies-curves.png" "${FILES[@]}"
} | tee "$WORK/strategies.md"
