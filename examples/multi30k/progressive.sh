#!/usr/bin/env bash
# Progressive distillation: the teacher of a run.sh work directory distils into the first architecture of
# PROGRESSION, that model into the next, and so on, each stage by word-level KD (from a top-k cache of the
# previous model, or online with KD_TOPK=0) with run.sh's student budget; every model is scored, and the
# last one is compared with run.sh's student-word-kd, distilled directly from the teacher.
#
# Usage: bash examples/multi30k/run.sh && bash examples/multi30k/progressive.sh   (same settings for both)
#   PROGRESSION="transformer_student_small $STUDENT_ARCH"   the compression schedule, largest first, ending in
#                          run.sh's students; a checkpoint file in it is a link trained elsewhere, used as it is
#   ...and every setting of run.sh (WORK, CONFIG, STUDENT_UPDATES, KD_ALPHA, KD_TEMPERATURE, KD_TOPK, ...)
set -euo pipefail

. "$(dirname "$0")/common.sh"

PROGRESSION=${PROGRESSION:-transformer_student_small $STUDENT_ARCH}

require_stages teacher student-word-kd evaluate-teacher evaluate-student-word-kd
require_current_students student-word-kd

last=${PROGRESSION##* }
if [ "$last" != "$STUDENT_ARCH" ]; then
    echo "error: PROGRESSION ends in $last, but run.sh's students are STUDENT_ARCH=$STUDENT_ARCH; end it there to compare" >&2
    exit 1
fi

# the stages are named by architecture: another chain in the same WORK would silently reuse them
if [ -f "$WORK/progressive.chain" ] && [ "$(cat "$WORK/progressive.chain")" != "$PROGRESSION" ]; then
    echo "error: $WORK holds the chain PROGRESSION=\"$(cat "$WORK/progressive.chain")\"; give that one, or another WORK" >&2
    exit 1
fi
echo "$PROGRESSION" > "$WORK/progressive.chain"

previous=$WORK/teacher/$CHECKPOINT
names=()
for arch in $PROGRESSION; do
    if [ -f "$arch" ]; then  # a model trained elsewhere: the next link's teacher as it is
        previous=$arch
        continue
    fi
    name=progressive-$arch
    names+=("$name")
    if [ "$KD_TOPK" -gt 0 ]; then
        stage "cache-$name" "$WORK/cache-$name.log" build_cache "$DATA" "$WORK/cache-$name" "$previous"
    fi
    word_kd_flags "$WORK/cache-$name" "$previous"
    stage "$name" "$WORK/$name.log" train_student "$name" "$DATA" --arch "$arch" "${KD_FLAGS[@]}"
    stage "evaluate-$name" "$WORK/results/$name.log" evaluate "$name" "$WORK/$name/$CHECKPOINT"
    previous=$WORK/$name/$CHECKPOINT
done

echo "[progressive table] $WORK/results/progressive.md, $WORK/results/progressive.json"
table "$WORK/results/progressive" teacher student-word-kd "${names[@]}"
