#!/usr/bin/env bash
# How far two trainings of the same student lie apart when only the random seed changes (initialisation,
# dropout, batch order): run.sh's students trained again with other seeds in the same work directory, each
# scored like run.sh's. One table with every run, and per student the test BLEU of each seed (run.sh's seed
# included), their mean and spread: rows of the other tables that differ by less are the same result.
#
# Usage: CONFIG=converged bash examples/multi30k/run.sh && CONFIG=converged bash examples/multi30k/seeds.sh
#   SEEDS="2"              the other seeds (each an integer >= 1, not run.sh's SEED)
#   SEED_STUDENTS="student-no-kd student-seq-kd"   which of run.sh's students to train again
#   ...and every setting of run.sh (WORK, CONFIG, SEED, ...)
set -euo pipefail

. "$(dirname "$0")/common.sh"

read -r -a SEEDS <<< "${SEEDS:-2}"
read -r -a SEED_STUDENTS <<< "${SEED_STUDENTS:-student-no-kd student-seq-kd}"
for seed in "${SEEDS[@]}"; do
    if ! [[ $seed =~ ^[0-9]+$ ]] || [ "$seed" -lt 1 ] || [ "$seed" -eq "$SEED" ]; then
        echo "error: SEEDS must be integers >= 1 other than run.sh's SEED ($SEED), got '$seed'" >&2
        exit 1
    fi
done
for name in "${SEED_STUDENTS[@]}"; do
    if [[ " ${RUN_STUDENTS[*]} " != *" $name "* ]]; then
        echo "error: SEED_STUDENTS names '$name'; choose from: ${RUN_STUDENTS[*]}" >&2
        exit 1
    fi
done
require_stages teacher evaluate-teacher $(printf "evaluate-%s " "${SEED_STUDENTS[@]}")
require_current_students "${SEED_STUDENTS[@]}"

runs=()
for name in "${SEED_STUDENTS[@]}"; do
    student_data "$name"
    for seed in "${SEEDS[@]}"; do
        SEED=$seed stage "$name-seed$seed" "$WORK/$name-seed$seed.log" \
            train_student "$name-seed$seed" "${STUDENT_DATA[@]}"
        stage "evaluate-$name-seed$seed" "$WORK/results/$name-seed$seed.log" \
            evaluate "$name-seed$seed" "$WORK/$name-seed$seed/$CHECKPOINT"
        runs+=("$name-seed$seed")
    done
done

echo "[seeds table] $WORK/seeds.md, $WORK/results/seeds.json"
{
    table "$WORK/results/seeds" teacher "${SEED_STUDENTS[@]}" "${runs[@]}"
    echo
    python - "$WORK/results" "$SEED" "${SEEDS[*]}" "${SEED_STUDENTS[@]}" <<'SPREAD'
import json, statistics, sys
results, seed, others, students = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
def test_bleu(name):
    with open(f"{results}/{name}.json") as f:
        return json.load(f)["models"][0]["test"]["bleu"]
print(f"| test BLEU by seed | {' | '.join([seed, *others])} | mean | spread (max - min) |")
print(f"|---|{'---:|' * (len(others) + 3)}")
for name in students:
    bleu = [test_bleu(name), *(test_bleu(f"{name}-seed{s}") for s in others)]
    row = " | ".join(f"{b:.2f}" for b in bleu)
    print(f"| {name} | {row} | {statistics.mean(bleu):.2f} | {max(bleu) - min(bleu):.2f} |")
SPREAD
} | tee "$WORK/seeds.md"
