#!/usr/bin/env bash
# End-to-end distillation on Multi30k: data -> teacher -> sequence-level KD corpus -> one student
# architecture trained four ways (no KD, word-level KD, sequence-level KD, both) with the same budget ->
# sacrebleu on test and valid -> results table. Re-running skips finished stages; a failed stage names its log.
#
# Usage: bash examples/multi30k/run.sh            quick configuration: a smoke run of every stage on a CPU
#        CONFIG=full bash examples/multi30k/run.sh  the budget of the README's measurements (for a GPU)
#   WORK=dir               where everything goes (default: ./work/multi30k-SRC-TGT-CONFIG)
#   MULTI30K_DIR=dir       local copy of Multi30k data/task1/raw (default: ../shared/data/multi30k when it
#                          exists, else the files are downloaded)
#   TEACHER_UPDATES=n STUDENT_UPDATES=n DISTILL_BEAM=n   override the configuration's budgets and the teacher
#                          beam that builds the sequence-level KD corpus; DISTILL_UNION=1 keeps original pairs too
#   DEVICE_FLAGS="--cpu"   set to "" on a GPU machine
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SRC=${SRC:-en}
TGT=${TGT:-de}
CONFIG=${CONFIG:-quick}
case "$CONFIG" in
    quick) CONFIG_DEFAULTS=(150 100 1) ;;  # teacher updates, student updates, distillation beam
    full) CONFIG_DEFAULTS=(1360 1360 5) ;;
    *) echo "error: CONFIG must be quick or full, got '$CONFIG'" >&2; exit 2 ;;
esac
WORK=${WORK:-$ROOT/work/multi30k-$SRC-$TGT-$CONFIG}
TEACHER_UPDATES=${TEACHER_UPDATES:-${CONFIG_DEFAULTS[0]}}
STUDENT_UPDATES=${STUDENT_UPDATES:-${CONFIG_DEFAULTS[1]}}
DISTILL_BEAM=${DISTILL_BEAM:-${CONFIG_DEFAULTS[2]}}
STUDENT_ARCH=${STUDENT_ARCH:-transformer_student_tiny}
KD_ALPHA=${KD_ALPHA:-0.5}
KD_TEMPERATURE=${KD_TEMPERATURE:-1}
DISTILL_UNION=${DISTILL_UNION:-0}
DEVICE_FLAGS=${DEVICE_FLAGS---cpu}
BEAM=5
# outputs longer than 1.2 x source + 10 subwords are runaway repetitions; bounding them keeps an
# undertrained model from decoding to fairseq's default limit of 200
LENGTH_FLAGS="--max-len-a 1.2 --max-len-b 10"
# fairseq drops a last batch whose size is not a multiple of --required-batch-size-multiple (default 8):
# decoding would silently skip the longest sentences
DECODE_FLAGS="$LENGTH_FLAGS --required-batch-size-multiple 1 --max-tokens 8000"
if [ -z "${MULTI30K_DIR:-}" ] && [ -d "$ROOT/../shared/data/multi30k" ]; then
    MULTI30K_DIR=$ROOT/../shared/data/multi30k
fi
export MULTI30K_DIR
DATA=$WORK/data-bin
DISTILLED=$WORK/distill
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

train_student() {  # NAME DATA_BIN EXTRA_FLAGS...
    local name=$1 data=$2
    shift 2
    fairseq-train "$data" --user-dir "$ROOT/fairseq_kd" --task translation_distillation \
        $STUDENT_FLAGS \
        --criterion kd_label_smoothed_cross_entropy --label-smoothing 0.1 "$@" \
        $OPTIM_FLAGS \
        $BATCH_FLAGS --max-update "$STUDENT_UPDATES" $DEVICE_FLAGS \
        $LOG_FLAGS --save-dir "$WORK/$name"
}

# the teacher beam-decodes the training source; its outputs, in corpus order and without degenerate ones,
# are binarized with the teacher's dictionaries
distill_corpus() {
    mkdir -p "$DISTILLED"
    fairseq-generate "$DATA" --user-dir "$ROOT/fairseq_kd" --path "$WORK/teacher/checkpoint_last.pt" \
        --gen-subset train --beam "$DISTILL_BEAM" $DECODE_FLAGS $DEVICE_FLAGS \
        > "$DISTILLED/train.generate.log"
    python "$ROOT/scripts/distilled_corpus.py" --generate-log "$DISTILLED/train.generate.log" \
        --source "$WORK/subword/train.$SRC" --target "$WORK/subword/train.$TGT" \
        --out-prefix "$DISTILLED/train" --src "$SRC" --tgt "$TGT" $([ "$DISTILL_UNION" = 1 ] && echo --union)
    fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" \
        --trainpref "$DISTILLED/train" --validpref "$WORK/subword/valid" --testpref "$WORK/subword/test" \
        --srcdict "$DATA/dict.$SRC.txt" --tgtdict "$DATA/dict.$TGT.txt" \
        --destdir "$DISTILLED/data-bin" --workers 2
}

decode() {  # CHECKPOINT SPLIT
    fairseq-generate "$DATA" --user-dir "$ROOT/fairseq_kd" --path "$1" \
        --gen-subset "$2" --beam "$BEAM" $DECODE_FLAGS --post-process sentencepiece $DEVICE_FLAGS
}

evaluate() {  # NAME CHECKPOINT
    local name=$1 checkpoint=$2 start=$EPOCHREALTIME seconds
    decode "$checkpoint" test > "$WORK/results/$name.test.log"
    seconds=$(awk "BEGIN { print $EPOCHREALTIME - $start }")
    decode "$checkpoint" valid > "$WORK/results/$name.valid.log"
    python "$ROOT/scripts/score.py" --name "$name" --checkpoint "$checkpoint" \
        --test "$WORK/results/$name.test.log" "$WORK/raw/test.$TGT" \
        --valid "$WORK/results/$name.valid.log" "$WORK/raw/valid.$TGT" \
        --decode-seconds "$seconds" --out "$WORK/results/$name.json"
}

stage prepare "$WORK/prepare.log" bash "$ROOT/scripts/prepare-multi30k.sh" "$WORK" "$SRC" "$TGT"

stage teacher "$WORK/teacher.log" fairseq-train "$DATA" \
    $TEACHER_FLAGS \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
    $OPTIM_FLAGS \
    $BATCH_FLAGS --max-update "$TEACHER_UPDATES" $DEVICE_FLAGS \
    $LOG_FLAGS --save-dir "$WORK/teacher"

stage distill "$WORK/distill.log" distill_corpus

WORD_KD="--teacher-path $WORK/teacher/checkpoint_last.pt --kd-alpha $KD_ALPHA --kd-temperature $KD_TEMPERATURE"
stage student-no-kd "$WORK/student-no-kd.log" train_student student-no-kd "$DATA" --kd-alpha 0
stage student-word-kd "$WORK/student-word-kd.log" train_student student-word-kd "$DATA" $WORD_KD
stage student-seq-kd "$WORK/student-seq-kd.log" train_student student-seq-kd "$DISTILLED/data-bin" --kd-alpha 0
stage student-seq-word-kd "$WORK/student-seq-word-kd.log" \
    train_student student-seq-word-kd "$DISTILLED/data-bin" $WORD_KD

MODELS="teacher student-no-kd student-word-kd student-seq-kd student-seq-word-kd"
mkdir -p "$WORK/results"
for name in $MODELS; do
    stage "evaluate-$name" "$WORK/results/$name.log" evaluate "$name" "$WORK/$name/checkpoint_last.pt"
done

echo "[table] $WORK/results.md, $WORK/results.json"
python "$ROOT/scripts/results_table.py" --json "$WORK/results.json" \
    $(for name in $MODELS; do echo "$WORK/results/$name.json"; done) | tee "$WORK/results.md"
