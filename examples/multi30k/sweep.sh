#!/usr/bin/env bash
# Word-level KD sensitivity to the temperature T and the weight alpha: the run.sh student trained once per
# grid point with the same budget, from the teacher (or its top-k cache) of a run.sh work directory, each
# scored on test and valid; one table (Markdown + JSON) and a heat map of test BLEU.
#
# Usage: bash examples/multi30k/run.sh && bash examples/multi30k/sweep.sh   (same settings for both)
#   TEMPERATURES="1 2 4"   the values of T
#   ALPHAS="0.25 0.5 0.75" the values of alpha
#   SCHEDULE=constant      or linear, exponential, cosine: T anneals from each grid value to 1 over the run
#   ...and every setting of run.sh (WORK, CONFIG, STUDENT_UPDATES, KD_TOPK, ...)
set -euo pipefail

. "$(dirname "$0")/common.sh"

TEMPERATURES=${TEMPERATURES:-1 2 4}
ALPHAS=${ALPHAS:-0.25 0.5 0.75}
SCHEDULE=${SCHEDULE:-constant}

require_stages teacher $([ "$KD_TOPK" -gt 0 ] && echo cache)

schedule_flags() {  # T: SCHEDULE_FLAGS, the temperature schedule from T
    SCHEDULE_FLAGS=()
    if [ "$SCHEDULE" != constant ] && [ "$1" != 1 ]; then
        SCHEDULE_FLAGS=(--kd-temperature-schedule "$SCHEDULE" --kd-temperature-final 1 "${KD_SCHEDULE_FLAGS[@]}")
    fi
}

mkdir -p "$WORK/results"
names=()
for temperature in $TEMPERATURES; do
    for alpha in $ALPHAS; do
        name=sweep-$SCHEDULE-T$temperature-a$alpha
        names+=("$name")
        KD_ALPHA=$alpha KD_TEMPERATURE=$temperature word_kd_flags "$WORK/cache"
        schedule_flags "$temperature"
        stage "$name" "$WORK/$name.log" train_student "$name" "$DATA" "${KD_FLAGS[@]}" "${SCHEDULE_FLAGS[@]}"
        stage "evaluate-$name" "$WORK/results/$name.log" evaluate "$name" "$WORK/$name/$CHECKPOINT"
    done
done

echo "[sweep table] $WORK/sweep-$SCHEDULE.md, .json, .png"
python "$ROOT/scripts/sweep_table.py" --out "$WORK/sweep-$SCHEDULE" \
    $(for name in "${names[@]}"; do echo "$WORK/results/$name.json"; done) | tee "$WORK/sweep-$SCHEDULE.md"
