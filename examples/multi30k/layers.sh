#!/usr/bin/env bash
# Intermediate-layer distillation: run.sh's student trained with word-level KD from the teacher run
# online, then with each intermediate-layer term added (hidden states, attention, relations), the same
# budget each; and a student of the teacher's width trained the same way, WIDE_UPDATES updates, from random
# weights and from the teacher's layers (--init-student-from-teacher). Every model is validated every
# VALIDATE_EVERY updates (the convergence table: valid NLL by update) and scored on test and valid (the
# results table).
#
# Usage: bash examples/multi30k/run.sh && bash examples/multi30k/layers.sh   (same settings for both)
#   HIDDEN_WEIGHT=1 ATTN_WEIGHT=1 RELATION_WEIGHT=1   the weight of each intermediate-layer term
#   WIDE_ARCH="transformer_student_small --encoder-layers 3"   the student of the teacher's width
#   INIT_LAYERS=alternate   which teacher layers it starts from (--init-student-from-teacher)
#   WIDE_UPDATES=n          the wide students' budget (default: STUDENT_UPDATES)
#   VALIDATE_EVERY=100      updates between validations
#   ...and every setting of run.sh (WORK, CONFIG, STUDENT_UPDATES, KD_ALPHA, KD_TEMPERATURE, KD_TOPK, ...)
set -euo pipefail

. "$(dirname "$0")/common.sh"

HIDDEN_WEIGHT=${HIDDEN_WEIGHT:-1}
ATTN_WEIGHT=${ATTN_WEIGHT:-1}
RELATION_WEIGHT=${RELATION_WEIGHT:-1}
WIDE_ARCH=${WIDE_ARCH:-transformer_student_small --encoder-layers 3}
INIT_LAYERS=${INIT_LAYERS:-alternate}
WIDE_UPDATES=${WIDE_UPDATES:-$STUDENT_UPDATES}
VALIDATE_EVERY=${VALIDATE_EVERY:-100}
TEACHER=$WORK/teacher/$CHECKPOINT

require_stages teacher evaluate-teacher

# word-level KD from the teacher run online: the intermediate-layer terms need its hidden states
read -r -a WIDE_ARCH <<< "$WIDE_ARCH"
LOGIT_KD=(--teacher-path "$TEACHER" --kd-alpha "$KD_ALPHA" --kd-temperature "$KD_TEMPERATURE" --kd-topk "$KD_TOPK"
    --validate-interval-updates "$VALIDATE_EVERY")
# the flags of each run, a bash array per name ('-' replaced by '_')
layers_logit=()
layers_hidden=(--kd-hidden-weight "$HIDDEN_WEIGHT")
layers_attention=(--kd-attn-weight "$ATTN_WEIGHT")
layers_relation=(--kd-relation-weight "$RELATION_WEIGHT")
layers_wide_random=(--arch "${WIDE_ARCH[@]}")
layers_wide_init=(--arch "${WIDE_ARCH[@]}" --init-student-from-teacher "$INIT_LAYERS")
NAMES=(layers-logit layers-hidden layers-attention layers-relation layers-wide-random layers-wide-init)

for name in "${NAMES[@]}"; do
    declare -n flags=${name//-/_}
    updates=$([[ $name == layers-wide-* ]] && echo "$WIDE_UPDATES" || echo "$STUDENT_UPDATES")
    STUDENT_UPDATES=$updates stage "$name" "$WORK/$name.log" train_student "$name" "$DATA" "${LOGIT_KD[@]}" "${flags[@]}"
done
mkdir -p "$WORK/results"
for name in "${NAMES[@]}"; do
    stage "evaluate-$name" "$WORK/results/$name.log" evaluate "$name" "$WORK/$name/$CHECKPOINT"
done

echo "[layers tables] $WORK/layers.md, $WORK/results/layers.json"
{
    table "$WORK/results/layers" teacher "${NAMES[@]}"
    echo
    work_files %s.log "${NAMES[@]}"
    python "$ROOT/scripts/valid_curve.py" --every "$VALIDATE_EVERY" "${FILES[@]}"
} | tee "$WORK/layers.md"
