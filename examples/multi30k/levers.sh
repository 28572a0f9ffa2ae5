#!/usr/bin/env bash
# What else moves a quarter-size student towards its teacher, each lever one change to run.sh's students,
# same data and stopping rule: the student initialised from the teacher's projected weights (narrow init),
# the same parameter count with a 2-layer decoder, sequence-level KD from the teacher's n-best list keeping
# the hypothesis closest to the reference (Seq-Inter by sentence BLEU; by chrF), from the union of original
# and distilled pairs, and word-level KD at temperature 2 with alpha annealed 0.9 -> 0.1 (from a top-k
# teacher, the student renormalised over the same k tokens: --kd-topk-student renormalised). Every model scored
# on test and valid; one table with run.sh's teacher and students, learning curves beside it.
#
# Usage: CONFIG=converged bash examples/multi30k/run.sh && CONFIG=converged bash examples/multi30k/levers.sh
#   LEVERS="..."           which of them to train (default: all, in the order of the table)
#   INIT_LAYERS=first      the teacher layers the narrow-init student starts from (--init-student-from-teacher)
#   NBEST=5                the n-best list Seq-Inter chooses from (<= DISTILL_BEAM)
#   LEVER_TEMPERATURE=2 ALPHA_START=0.9 ALPHA_FINAL=0.1   the temperature lever's settings
#   ...and every setting of run.sh (WORK, CONFIG, KD_ALPHA, KD_TEMPERATURE, KD_TOPK, KD_SCHEDULE_UPDATES, ...)
set -euo pipefail

. "$(dirname "$0")/common.sh"

ALL=(lever-narrow-init lever-dec2 lever-seq-bestbleu lever-seq-bestchrf lever-seq-union lever-temperature-alpha)
read -r -a LEVERS <<< "${LEVERS:-${ALL[*]}}"
INIT_LAYERS=${INIT_LAYERS:-first}
NBEST=${NBEST:-5}
LEVER_TEMPERATURE=${LEVER_TEMPERATURE:-2}
ALPHA_START=${ALPHA_START:-0.9}
ALPHA_FINAL=${ALPHA_FINAL:-0.1}
TEACHER=$WORK/teacher/$CHECKPOINT

require_stages teacher distill evaluate-teacher evaluate-student-no-kd evaluate-student-word-kd evaluate-student-seq-kd
require_current_students student-no-kd student-word-kd student-seq-kd
for name in "${LEVERS[@]}"; do
    if [[ " ${ALL[*]} " != *" $name "* ]]; then
        echo "error: LEVERS names '$name'; choose from: ${ALL[*]}" >&2
        exit 1
    fi
done
# lever-dec2 is one change to transformer_student_tiny: the same parameters, a second decoder layer
if [[ " ${LEVERS[*]} " == *" lever-dec2 "* ]] && [ "$STUDENT_ARCH" != transformer_student_tiny ]; then
    echo "error: lever-dec2 compares transformer_student_tiny_dec2 with run.sh's transformer_student_tiny students;" \
        "these are STUDENT_ARCH=$STUDENT_ARCH: leave lever-dec2 out of LEVERS, or use a WORK of STUDENT_ARCH=transformer_student_tiny" >&2
    exit 1
fi
if ! [[ $NBEST =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NBEST must be an integer >= 1, got '$NBEST'" >&2
    exit 1
fi
if [ "$NBEST" -gt "$DISTILL_BEAM" ]; then
    echo "error: NBEST ($NBEST) cannot exceed DISTILL_BEAM ($DISTILL_BEAM): the beam holds the n-best list" >&2
    exit 1
fi

# at T > 1 the top-k target asks the student's full softmax for a zero tail (README, step 7): the
# temperature lever compares over the top k only
KD_TOPK_STUDENT=renormalised word_kd_flags "$WORK/cache"
TEMPERATURE_KD_FLAGS=("${KD_FLAGS[@]}")
word_kd_flags "$WORK/cache"
# each lever: its training data and flags (bash arrays named after it, '-' replaced by '_')
# the projected weights come from the teacher itself, so it runs online (its top-k, as the cache holds)
lever_narrow_init=("$DATA" --teacher-path "$TEACHER" --kd-topk "$KD_TOPK"
    --kd-alpha "$KD_ALPHA" --kd-temperature "$KD_TEMPERATURE" --init-student-from-teacher "$INIT_LAYERS")
lever_dec2=("$DATA" "${KD_FLAGS[@]}" --arch transformer_student_tiny_dec2)
lever_seq_bestbleu=("$WORK/distill-bestbleu/data-bin" --kd-alpha 0)
lever_seq_bestchrf=("$WORK/distill-bestchrf/data-bin" --kd-alpha 0)
lever_seq_union=("$WORK/distill-union/data-bin" --kd-alpha 0)
lever_temperature_alpha=("$DATA" "${TEMPERATURE_KD_FLAGS[@]}" --kd-temperature "$LEVER_TEMPERATURE" --kd-alpha "$ALPHA_START"
    --kd-alpha-schedule linear --kd-alpha-final "$ALPHA_FINAL" "${KD_SCHEDULE_FLAGS[@]}")

# the corpora: the teacher's n-best list decoded once; the union reuses run.sh's decoding
if [[ " ${LEVERS[*]} " == *" lever-seq-best"* ]]; then
    DISTILL_NBEST=$NBEST stage distill-nbest "$WORK/distill-nbest.log" decode_train "$WORK/distill-nbest"
fi
for select in bestbleu bestchrf; do
    if [[ " ${LEVERS[*]} " == *" lever-seq-$select "* ]]; then
        DISTILL_SELECT=$select stage "distill-$select" "$WORK/distill-$select.log" \
            distilled_pairs "$WORK/distill-$select" --generate-log "$WORK/distill-nbest/generate-train.txt"
    fi
done
if [[ " ${LEVERS[*]} " == *" lever-seq-union "* ]]; then
    DISTILL_UNION=1 stage distill-union "$WORK/distill-union.log" \
        distilled_pairs "$WORK/distill-union" "${DISTILLED_TEACHER[@]}"
fi

mkdir -p "$WORK/results"
for name in "${LEVERS[@]}"; do
    declare -n flags=${name//-/_}
    stage "$name" "$WORK/$name.log" train_student "$name" "${flags[@]}"
    stage "evaluate-$name" "$WORK/results/$name.log" evaluate "$name" "$WORK/$name/$CHECKPOINT"
done

echo "[levers table] $WORK/levers.md, $WORK/results/levers.json, learning curves $WORK/levers-curves.png"
{
    table "$WORK/results/levers" teacher student-no-kd student-word-kd student-seq-kd "${LEVERS[@]}"
    echo
    work_files %s.log student-no-kd student-word-kd student-seq-kd "${LEVERS[@]}"
    python "$ROOT/scripts/valid_curve.py" --every "$STUDENT_UPDATES" --plot "$WORK/levers-curves.png" "${FILES[@]}"
} | tee "$WORK/levers.md"
