# Settings and stage functions shared by the recipes of this directory (sourced, not run); the settings are
# documented at the top of run.sh.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SRC=${SRC:-en}
TGT=${TGT:-de}
CONFIG=${CONFIG:-quick}
case "$CONFIG" in
    # a 5k-sentence prefix and small batches: minutes per stage, BLEU only a smoke signal
    quick) : "${TEACHER_UPDATES:=120}" "${STUDENT_UPDATES:=80}" "${MAX_TOKENS:=2048}" "${TRAIN_SENTENCES:=5000}" \
           "${WARMUP_UPDATES:=100}" "${DISTILL_BEAM:=1}" "${BEAM:=1}" ;;
    full) : "${TEACHER_UPDATES:=1360}" "${STUDENT_UPDATES:=1360}" "${MAX_TOKENS:=4096}" "${TRAIN_SENTENCES:=0}" \
          "${WARMUP_UPDATES:=300}" "${DISTILL_BEAM:=5}" "${BEAM:=5}" ;;
    *) echo "error: CONFIG must be quick or full, got '$CONFIG'" >&2; exit 2 ;;
esac
export TRAIN_SENTENCES
WORK=${WORK:-$ROOT/work/multi30k-$SRC-$TGT-$CONFIG}
STUDENT_ARCH=${STUDENT_ARCH:-transformer_student_tiny}
KD_ALPHA=${KD_ALPHA:-0.5}
KD_TEMPERATURE=${KD_TEMPERATURE:-1}
KD_TOPK=${KD_TOPK:-8}
SUBWORDS=${SUBWORDS:-spm}
export SUBWORDS
DISTILL_UNION=${DISTILL_UNION:-0}
DEVICE_FLAGS=${DEVICE_FLAGS---cpu}
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
case "$SUBWORDS" in
    spm) POST_PROCESS=sentencepiece SUBWORD_MODEL=(--sentencepiece-model "$WORK/subword/spm.model") ;;
    *) POST_PROCESS=subword_nmt SUBWORD_MODEL=(--bpe-codes "$WORK/subword/bpe.codes") ;;
esac
DISTILLED=$WORK/distill
OPTIM_FLAGS="--optimizer adam --adam-betas (0.9,0.98) --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates $WARMUP_UPDATES --clip-norm 1.0"
BATCH_FLAGS="--max-tokens $MAX_TOKENS --seed 1"
LOG_FLAGS="--no-epoch-checkpoints --log-format simple --log-interval 50"
TEACHER_FLAGS="--arch transformer --share-all-embeddings --encoder-layers 3 --decoder-layers 3
    --encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
    --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.2"
STUDENT_FLAGS="--arch $STUDENT_ARCH --share-all-embeddings --dropout 0.1"

mkdir -p "$WORK"

# the log lines a stage shows: fairseq's training progress and summaries, our scripts' own messages
PROGRESS='train_inner|\| (train|valid) \||\| fairseq_kd\.topk_cache \||shard [0-9]+:|^\[|error|BLEU'

# line by line as they come (mawk, Debian's awk, reads a pipe in blocks and would show them late)
show_progress() {
    local line
    while IFS= read -r line; do
        if [[ $line =~ $PROGRESS ]]; then printf '    %s\n' "$line"; fi
    done
}

# stage NAME LOG COMMAND...: run once; show its progress; stop with the log's name on failure
stage() {
    local name=$1 log=$2
    shift 2
    if [ -f "$WORK/.done-$name" ]; then
        echo "[$name] finished earlier, skipping"
        return
    fi
    echo "[$name] running, log: $log"
    if ! "$@" 2>&1 | tee "$log" | show_progress; then
        echo "error: stage '$name' failed; see $log" >&2
        exit 1
    fi
    touch "$WORK/.done-$name"
}

# require_stages NAME...: stop unless run.sh has finished these stages in $WORK
require_stages() {
    local needed
    for needed in "$@"; do
        if [ ! -f "$WORK/.done-$needed" ]; then
            echo "error: $WORK has no finished '$needed' stage; run examples/multi30k/run.sh with the same settings first" >&2
            exit 1
        fi
    done
}

# --user-dir: fairseq-train resumes from checkpoint_last.pt, which torch >= 2.6 reads only with the
# plugin's allowlist
train_teacher() {  # SAVE_DIR EXTRA_FLAGS...
    local dir=$1
    shift
    fairseq-train "$DATA" --user-dir "$ROOT/fairseq_kd" \
        $TEACHER_FLAGS \
        --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
        $OPTIM_FLAGS \
        $BATCH_FLAGS --max-update "$TEACHER_UPDATES" $DEVICE_FLAGS \
        $LOG_FLAGS --save-dir "$dir" "$@"
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
        --gen-subset "$2" --beam "$BEAM" $DECODE_FLAGS --post-process "$POST_PROCESS" $DEVICE_FLAGS
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

# the student with the best valid BLEU among those named, by their evaluate stages' score records
best_student() {  # NAME...
    python -c 'import json, sys
records = [json.load(open(f"{sys.argv[1]}/results/{name}.json")) for name in sys.argv[2:]]
print(max(records, key=lambda r: r["valid"]["bleu"])["name"])' "$WORK" "$@"
}

# a checkpoint as a CTranslate2 model directory with its subword model (fairseq-kd-export)
export_model() {  # CHECKPOINT OUT_DIR EXTRA_FLAGS...
    local checkpoint=$1 out=$2
    shift 2
    fairseq-kd-export "$checkpoint" --data "$DATA" "${SUBWORD_MODEL[@]}" --out "$out" --force "$@"
}

# an exported model translates the raw test and valid sources with the decoding settings of `decode`
evaluate_export() {  # NAME EXPORT_DIR SOURCE_CHECKPOINT
    local name=$1 model=$2 checkpoint=$3 start=$EPOCHREALTIME seconds split
    for split in test valid; do
        fairseq-kd-translate "$model" --beam "$BEAM" $LENGTH_FLAGS --batch-size 32 --threads "$(nproc)" \
            --input "$WORK/raw/$split.$SRC" --output "$WORK/results/$name.$split.txt"
        if [ "$split" = test ]; then seconds=$(awk "BEGIN { print $EPOCHREALTIME - $start }"); fi
    done
    python "$ROOT/scripts/score.py" --name "$name" --checkpoint "$checkpoint" --format text \
        --test "$WORK/results/$name.test.txt" "$WORK/raw/test.$TGT" \
        --valid "$WORK/results/$name.valid.txt" "$WORK/raw/valid.$TGT" \
        --decode-seconds "$seconds" --out "$WORK/results/$name.json"
}

# the teacher's top-k on every training and validation token, for word-level KD without the teacher
build_cache() {  # DATA_BIN OUT_DIR [TEACHER_CHECKPOINTS [EXTRA_FLAGS...]]
    local data=$1 out=$2 teachers=${3:-$WORK/teacher/checkpoint_last.pt}
    shift $(($# < 3 ? $# : 3))
    fairseq-kd-build-cache "$data" --teacher-path "$teachers" --topk "$KD_TOPK" \
        --splits train,valid --max-tokens 8000 $DEVICE_FLAGS --out "$out" "$@"
}

word_kd_flags() {  # CACHE_DIR [TEACHER_CHECKPOINT]
    echo "--kd-alpha $KD_ALPHA --kd-temperature $KD_TEMPERATURE"
    if [ "$KD_TOPK" -gt 0 ]; then
        echo "--teacher-topk-cache $1 --kd-topk $KD_TOPK"
    else
        echo "--teacher-path ${2:-$WORK/teacher/checkpoint_last.pt}"
    fi
}
