#!/usr/bin/env bash
# End-to-end word-level distillation on Multi30k: data -> teacher -> students with and without KD ->
# sacrebleu scores -> results table. Re-running skips finished stages; a failed stage names its log.
#
# Usage: bash examples/multi30k/run.sh          (quick configuration, about 20 minutes on 2 CPU cores)
#   WORK=dir               where everything goes (default: ./work/multi30k-SRC-TGT)
#   MULTI30K_DIR=dir       local copy of Multi30k data/task1/raw (default: ../shared/data/multi30k when it
#                          exists, else the files are downloaded)
#   TEACHER_UPDATES=n STUDENT_UPDATES=n   training budgets (quick defaults below; see README for larger runs)
#   DEVICE_FLAGS="--cpu"   set to "" on a GPU machine
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SRC=${SRC:-en}
TGT=${TGT:-de}
WORK=${WORK:-$ROOT/work/multi30k-$SRC-$TGT}
TEACHER_UPDATES=${TEACHER_UPDATES:-200}
STUDENT_UPDATES=${STUDENT_UPDATES:-200}
STUDENT_ARCH=${STUDENT_ARCH:-transformer_student_tiny}
KD_ALPHA=${KD_ALPHA:-0.5}
KD_TEMPERATURE=${KD_TEMPERATURE:-1}
DEVICE_FLAGS=${DEVICE_FLAGS---cpu}
BEAM=5
if [ -z "${MULTI30K_DIR:-}" ] && [ -d "$ROOT/../shared/data/multi30k" ]; then
    MULTI30K_DIR=$ROOT/../shared/data/multi30k
fi
export MULTI30K_DIR
DATA=$WORK/data-bin
OPTIM_FLAGS="--optimizer adam --adam-betas (0.9,0.98) --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 300 --clip-norm 1.0"
BATCH_FLAGS="--max-tokens 4096 --seed 1"
LOG_FLAGS="--no-epoch-checkpoints --log-format simple --log-interval 50"
TEACHER_FLAGS="--arch transformer --share-all-embeddings --encoder-layers 3 --decoder-layers 3
    --encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
    --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.2"
STUDENT_FLAGS="--arch $STUDENT_ARCH --share-all-embeddings --dropout 0.1"

mkdir -p "$WORK"

# stage NAME LOG COMMAND...: run once; show training/validation summaries; stop with the log's name on failure
stage() {
    local name=$1 log=$2
    shift 2
    if [ -f "$WORK/.done-$name" ]; then
        echo "[$name] finished earlier, skipping"
        return
    fi
    echo "[$name] running, log: $log"
    if ! "$@" 2>&1 | tee "$log" | awk '/\| (train|valid) \||^\[|error|BLEU/ { print "    " $0; fflush() }'; then
        echo "error: stage '$name' failed; see $log" >&2
        exit 1
    fi
    touch "$WORK/.done-$name"
}

train_student() {  # NAME EXTRA_FLAGS...
    local name=$1
    shift
    fairseq-train "$DATA" --user-dir "$ROOT/fairseq_kd" --task translation_distillation \
        $STUDENT_FLAGS \
        --criterion kd_label_smoothed_cross_entropy --label-smoothing 0.1 "$@" \
        $OPTIM_FLAGS \
        $BATCH_FLAGS --max-update "$STUDENT_UPDATES" $DEVICE_FLAGS \
        $LOG_FLAGS --save-dir "$WORK/$name"
}

evaluate() {  # NAME CHECKPOINT
    local name=$1 checkpoint=$2 start=$EPOCHREALTIME
    fairseq-generate "$DATA" --user-dir "$ROOT/fairseq_kd" --path "$checkpoint" \
        --gen-subset test --beam "$BEAM" --max-tokens 8000 --post-process sentencepiece $DEVICE_FLAGS \
        > "$WORK/results/$name.generate.log"
    python "$ROOT/scripts/score.py" --name "$name" --checkpoint "$checkpoint" \
        --generate-log "$WORK/results/$name.generate.log" --reference "$WORK/raw/test.$TGT" \
        --decode-seconds "$(awk "BEGIN { print $EPOCHREALTIME - $start }")" --out "$WORK/results/$name.json"
}

stage prepare "$WORK/prepare.log" bash "$ROOT/scripts/prepare-multi30k.sh" "$WORK" "$SRC" "$TGT"

stage teacher "$WORK/teacher.log" fairseq-train "$DATA" \
    $TEACHER_FLAGS \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
    $OPTIM_FLAGS \
    $BATCH_FLAGS --max-update "$TEACHER_UPDATES" $DEVICE_FLAGS \
    $LOG_FLAGS --save-dir "$WORK/teacher"

stage student-no-kd "$WORK/student-no-kd.log" train_student student-no-kd --kd-alpha 0
stage student-word-kd "$WORK/student-word-kd.log" train_student student-word-kd \
    --teacher-path "$WORK/teacher/checkpoint_last.pt" --kd-alpha "$KD_ALPHA" --kd-temperature "$KD_TEMPERATURE"

mkdir -p "$WORK/results"
for name in teacher student-no-kd student-word-kd; do
    stage "evaluate-$name" "$WORK/results/$name.log" evaluate "$name" "$WORK/$name/checkpoint_last.pt"
done

echo "[table] $WORK/results.md, $WORK/results.json"
python "$ROOT/scripts/results_table.py" --json "$WORK/results.json" \
    "$WORK/results/teacher.json" "$WORK/results/student-no-kd.json" "$WORK/results/student-word-kd.json" \
    | tee "$WORK/results.md"
