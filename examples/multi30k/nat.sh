#!/usr/bin/env bash
# Non-autoregressive students against the autoregressive one: Mask-Predict (CMLM) and vanilla NAT students
# trained with fairseq's translation_lev task and nat_loss criterion, each on the original corpus and on
# run.sh's sequence-level KD corpus with the same budget; then one table, decoded and timed in one process:
# run.sh's best student (fairseq, and its CTranslate2 int8 export) beside the NAT students, test BLEU,
# sentences/s at batch 1 and 32, refinement iterations.
#
# Usage: bash examples/multi30k/run.sh && bash examples/multi30k/nat.sh   (same settings for both)
#   NAT_ARCHS="cmlm_transformer_student_tiny nonautoregressive_transformer_student_tiny"
#   NAT_UPDATES=n          each NAT student's budget (default: STUDENT_UPDATES; 5000 with CONFIG=converged)
#   NAT_ITERATIONS=10      refinement iterations at most (--iter-decode-max-iter; vanilla NAT stops when an
#                          iteration changes nothing)
#   NAT_LENGTHS=3          length candidates (--iter-decode-with-beam)
#   SPEED_THREADS=1        CPU threads while timing
#   ...and every setting of run.sh (WORK, CONFIG, DEVICE_FLAGS, ...)
set -euo pipefail

. "$(dirname "$0")/common.sh"

read -r -a NAT_ARCHS <<< "${NAT_ARCHS:-cmlm_transformer_student_tiny nonautoregressive_transformer_student_tiny}"
if [ "$STUDENT_UPDATES" -gt 0 ]; then NAT_UPDATES=${NAT_UPDATES:-$STUDENT_UPDATES}; else NAT_UPDATES=${NAT_UPDATES:-5000}; fi
NAT_ITERATIONS=${NAT_ITERATIONS:-10}
NAT_LENGTHS=${NAT_LENGTHS:-3}
SPEED_THREADS=${SPEED_THREADS:-1}

STUDENTS=(student-no-kd student-word-kd student-seq-kd student-seq-word-kd)
require_stages distill "${STUDENTS[@]/#/evaluate-}"
for setting in NAT_UPDATES NAT_ITERATIONS NAT_LENGTHS SPEED_THREADS; do
    if ! [[ ${!setting} =~ ^[0-9]+$ ]] || { [ "$setting" != NAT_ITERATIONS ] && [ "${!setting}" -lt 1 ]; }; then
        echo "error: $setting must be an integer >= $([ "$setting" = NAT_ITERATIONS ] && echo 0 || echo 1), got '${!setting}'" >&2
        exit 1
    fi
done
declare -A ARCH_OF_KIND=()  # a stage is named by the kind of its model (nat-cmlm-original, ...)
for arch in "${NAT_ARCHS[@]}"; do
    if [[ $arch != cmlm_* && $arch != nonautoregressive_* ]]; then
        echo "error: NAT_ARCHS names '$arch'; give cmlm_transformer* or nonautoregressive_transformer* architectures" >&2
        exit 1
    fi
    kind=${arch%%_transformer*}
    if [ -n "${ARCH_OF_KIND[$kind]:-}" ]; then
        echo "error: NAT_ARCHS names ${ARCH_OF_KIND[$kind]} and $arch, whose stages would share the names nat-$kind-*;" \
            "give one $kind architecture per run (another in another WORK)" >&2
        exit 1
    fi
    ARCH_OF_KIND[$kind]=$arch
done
# the two corpora must be binarized with one dictionary, or the comparison is of two vocabularies
for lang in "$SRC" "$TGT"; do
    if ! cmp -s "$DATA/dict.$lang.txt" "$DISTILLED/data-bin/dict.$lang.txt"; then
        echo "error: $DISTILLED/data-bin/dict.$lang.txt differs from $DATA/dict.$lang.txt: the distilled corpus was" \
            "binarized with another dictionary; rebuild it with run.sh's distill stage (fairseq-preprocess --srcdict/--tgtdict)" >&2
        exit 1
    fi
done
require_current_students "${STUDENTS[@]}"

# CMLM learns from partly masked references, vanilla NAT from fully masked ones
train_nat() {  # NAME ARCH DATA_BIN
    local noise=random_mask
    if [[ $2 == nonautoregressive_* ]]; then noise=full_mask; fi
    cmd fairseq-train "$3" --user-dir "$ROOT/fairseq_kd" --task translation_lev --noise "$noise" --arch "$2" \
        --criterion nat_loss --label-smoothing 0.1 --dropout 0.1 "${OPTIM_FLAGS[@]}" "${BATCH_FLAGS[@]}" --seed "$SEED" \
        --max-update "$NAT_UPDATES" "${DEVICE_FLAGS[@]}" "${LOG_FLAGS[@]}" --save-dir "$WORK/$1"
}

names=()
for arch in "${NAT_ARCHS[@]}"; do
    for corpus in original distilled; do
        name=nat-${arch%%_transformer*}-$corpus
        data=$DATA
        if [ "$corpus" = distilled ]; then data=$DISTILLED/data-bin; fi
        stage "$name" "$WORK/$name.log" train_nat "$name" "$arch" "$data"
        names+=("$name")
    done
done

# the autoregressive student run.sh deployed, and its export when run.sh made one
BEST=$(best_student "${STUDENTS[@]}")
models=("$BEST=$WORK/$BEST/$CHECKPOINT")
if [ -f "$WORK/.stage-export-$BEST-ct2-int8" ]; then models+=("$BEST-ct2-int8=$WORK/$BEST-ct2-int8"); fi
for name in "${names[@]}"; do models+=("$name=$WORK/$name/checkpoint_last.pt"); done

nat_table() {
    cmd fairseq-kd-eval "$DATA" --checkpoints "${models[@]}" --split test --reference "$WORK/raw/test.$TGT" \
        --post-process "$POST_PROCESS" --beam "$BEAM" --iter-decode-max-iter "$NAT_ITERATIONS" \
        --iter-decode-with-beam "$NAT_LENGTHS" --batch-sizes 1,32 --threads "$SPEED_THREADS" \
        --out-prefix "$WORK/results/nat"
}
mkdir -p "$WORK/results"
stage nat-table "$WORK/results/nat.log" nat_table
echo "[NAT table] $WORK/results/nat.md, .json"
cat "$WORK/results/nat.md"
