# Settings and stage functions shared by the recipes of this directory (sourced, not run); the settings are
# documented at the top of run.sh.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SRC=${SRC:-en}
TGT=${TGT:-de}
CONFIG=${CONFIG:-quick}
case "$CONFIG" in
    # about 20 minutes on a 2-core CPU: a 10k-sentence prefix, 4k subwords, a short warm-up to a higher peak
    # learning rate, bfloat16 autocast where the CPU has its kernels (auto), greedy decoding. Students of 900
    # updates underfit: without dropout and with a second decoder layer (the same parameters) they stop where a
    # 1-layer decoder runs on in loops
    quick) : "${TEACHER_UPDATES:=1200}" "${STUDENT_UPDATES:=900}" "${MAX_TOKENS:=2048}" "${TRAIN_SENTENCES:=10000}" \
           "${VOCAB_SIZE:=4000}" "${WARMUP_UPDATES:=100}" "${LR:=2e-3}" "${CPU_BF16:=auto}" "${DISTILL_BEAM:=1}" "${BEAM:=1}" \
           "${STUDENT_ARCH:=transformer_student_tiny_dec2}" "${STUDENT_DROPOUT:=0}" ;;
    full) : "${TEACHER_UPDATES:=1360}" "${STUDENT_UPDATES:=1360}" "${MAX_TOKENS:=4096}" "${TRAIN_SENTENCES:=0}" \
          "${WARMUP_UPDATES:=300}" "${LR:=1e-3}" "${CPU_BF16:=0}" "${DISTILL_BEAM:=5}" "${BEAM:=5}" ;;
    # every model trained until its valid BLEU stops improving (CONVERGE_FLAGS); budgets 0: no update limit
    converged) : "${TEACHER_UPDATES:=0}" "${STUDENT_UPDATES:=0}" "${MAX_TOKENS:=4096}" "${TRAIN_SENTENCES:=0}" \
               "${WARMUP_UPDATES:=300}" "${LR:=1e-3}" "${CPU_BF16:=0}" "${DISTILL_BEAM:=5}" "${BEAM:=5}" ;;
    *) echo "error: CONFIG must be quick, full or converged, got '$CONFIG'" >&2; exit 2 ;;
esac
WORK=${WORK:-$ROOT/work/multi30k-$SRC-$TGT-$CONFIG}
case "$WORK" in /*) ;; *) WORK=$PWD/$WORK ;; esac  # absolute: stages link files into it
STUDENT_ARCH=${STUDENT_ARCH:-transformer_student_tiny}
STUDENT_DROPOUT=${STUDENT_DROPOUT:-0.1}
KD_ALPHA=${KD_ALPHA:-0.5}
KD_TEMPERATURE=${KD_TEMPERATURE:-1}
KD_TOPK=${KD_TOPK:-8}
KD_TOPK_STUDENT=${KD_TOPK_STUDENT:-full}
SEED=${SEED:-1}
SUBWORDS=${SUBWORDS:-spm}
VOCAB_SIZE=${VOCAB_SIZE:-8000}
DISTILL_UNION=${DISTILL_UNION:-0}
DISTILL_KEEP_LOOPS=${DISTILL_KEEP_LOOPS:-0}
LOOP_FLAGS=()  # distilled_corpus.py drops the teacher's repetition loops unless told to keep them
if [ "$DISTILL_KEEP_LOOPS" = 1 ]; then LOOP_FLAGS=(--keep-loops); fi
DISTILL_NBEST=${DISTILL_NBEST:-1}
DISTILL_SELECT=${DISTILL_SELECT:-first}
DISTILL_BACKEND=${DISTILL_BACKEND:-fairseq}  # who translates the training source: fairseq-generate or CTranslate2
read -r -a DEVICE_FLAGS <<< "${DEVICE_FLAGS---cpu}"
# the teacher's translations for the sequence-level KD corpus: outputs longer than 1.2 x source + 10 subwords
# are runaway repetitions that the corpus would drop anyway. fairseq drops a last batch whose size is not a
# multiple of --required-batch-size-multiple (default 8): decoding would silently skip the longest sentences
DECODE_FLAGS=(--max-len-a 1.2 --max-len-b 10 --required-batch-size-multiple 1 --max-tokens 8000)
MULTI30K_DIR=${MULTI30K_DIR:-}  # empty: prepare downloads the official files
if [ -z "$MULTI30K_DIR" ] && [ -d "$ROOT/../shared/data/multi30k" ]; then
    MULTI30K_DIR=$ROOT/../shared/data/multi30k
fi
DATA=$WORK/data-bin
case "$SUBWORDS" in
    spm) POST_PROCESS=sentencepiece SUBWORD_MODEL=(--sentencepiece-model "$WORK/subword/spm.model") ;;
    *) POST_PROCESS=subword_nmt SUBWORD_MODEL=(--bpe-codes "$WORK/subword/bpe.codes") ;;
esac
DISTILLED=$WORK/distill
# the checkpoint every later stage uses: the last, or with CONFIG=converged the best by valid BLEU, after
# PATIENCE epochs without a new best (at most 100 epochs). 10, not 5: valid BLEU moves by about 0.5 from one
# epoch to the next; with 5, a student stopped on a plateau at epoch 30 that the same command on a GPU
# went past, 1 BLEU higher by epoch 42
CHECKPOINT=checkpoint_last.pt
CONVERGE_FLAGS=()
# KD schedules (alpha, temperature) run over the update budget; without one (converged), over
# KD_SCHEDULE_UPDATES, about 15 epochs of Multi30k by default
KD_SCHEDULE_FLAGS=()
if [ "$CONFIG" = converged ]; then
    KD_SCHEDULE_FLAGS=(--kd-schedule-updates "${KD_SCHEDULE_UPDATES:=2000}")
    CHECKPOINT=checkpoint_best.pt
    CONVERGE_FLAGS=(--max-epoch 100 --patience "${PATIENCE:-10}" --eval-bleu --eval-bleu-args '{"beam": 5}'
        --eval-bleu-remove-bpe "$POST_PROCESS" --best-checkpoint-metric bleu --maximize-best-checkpoint-metric)
fi
OPTIM_FLAGS=(--optimizer adam --adam-betas "(0.9,0.98)" --lr "$LR" --lr-scheduler inverse_sqrt
    --warmup-updates "$WARMUP_UPDATES" --clip-norm 1.0)
BATCH_FLAGS=(--max-tokens "$MAX_TOKENS")
LOG_FLAGS=(--no-epoch-checkpoints --log-format simple --log-interval 50)
TEACHER_FLAGS=(--arch transformer --share-all-embeddings --encoder-layers 3 --decoder-layers 3
    --encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
    --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.2)
STUDENT_FLAGS=(--arch "$STUDENT_ARCH" --share-all-embeddings --dropout "$STUDENT_DROPOUT")

# every setting checked before the first stage spends time on data or a teacher; prints CPU_BF16, auto
# resolved: 1 on a CPU with bfloat16 kernels (AVX-512) when training on it, else 0
CPU_BF16=$(env CONFIG="$CONFIG" TEACHER_UPDATES="$TEACHER_UPDATES" STUDENT_UPDATES="$STUDENT_UPDATES" \
    MAX_TOKENS="$MAX_TOKENS" TRAIN_SENTENCES="$TRAIN_SENTENCES" WARMUP_UPDATES="$WARMUP_UPDATES" \
    DISTILL_BEAM="$DISTILL_BEAM" BEAM="$BEAM" VOCAB_SIZE="$VOCAB_SIZE" KD_TOPK="$KD_TOPK" \
    DISTILL_NBEST="$DISTILL_NBEST" SEED="$SEED" DISTILL_SELECT="$DISTILL_SELECT" \
    DISTILL_BACKEND="$DISTILL_BACKEND" KD_ALPHA="$KD_ALPHA" KD_TEMPERATURE="$KD_TEMPERATURE" LR="$LR" \
    STUDENT_DROPOUT="$STUDENT_DROPOUT" SRC="$SRC" TGT="$TGT" KD_TOPK_STUDENT="$KD_TOPK_STUDENT" \
    SUBWORDS="$SUBWORDS" DISTILL_UNION="$DISTILL_UNION" DISTILL_KEEP_LOOPS="$DISTILL_KEEP_LOOPS" \
    CPU_BF16="$CPU_BF16" PATIENCE="${PATIENCE:-10}" KD_SCHEDULE_UPDATES="${KD_SCHEDULE_UPDATES:-1}" \
    DEVICE_FLAGS="${DEVICE_FLAGS[*]}" \
    python - "$STUDENT_ARCH" <<'CHECK'
import math, os, sys
s = os.environ  # the settings, as the shell passed them: any text is a value, never code
errors = []
def integer(name, value, least):
    if not value.isdigit() or int(value) < least:
        errors.append(f"{name} must be an integer >= {least}, got '{value}'")
updates = 0 if s["CONFIG"] == "converged" else 1  # converged: 0 is no limit
for name, value, least in (("TEACHER_UPDATES", s["TEACHER_UPDATES"], updates), ("STUDENT_UPDATES", s["STUDENT_UPDATES"], updates),
                           ("MAX_TOKENS", s["MAX_TOKENS"], 1), ("TRAIN_SENTENCES", s["TRAIN_SENTENCES"], 0),
                           ("WARMUP_UPDATES", s["WARMUP_UPDATES"], 0), ("DISTILL_BEAM", s["DISTILL_BEAM"], 1),
                           ("BEAM", s["BEAM"], 1), ("VOCAB_SIZE", s["VOCAB_SIZE"], 10), ("KD_TOPK", s["KD_TOPK"], 0),
                           ("DISTILL_NBEST", s["DISTILL_NBEST"], 1), ("PATIENCE", s["PATIENCE"], 1),
                           ("KD_SCHEDULE_UPDATES", s["KD_SCHEDULE_UPDATES"], 1), ("SEED", s["SEED"], 1)):
    integer(name, value, least)
if s["DISTILL_NBEST"].isdigit() and s["DISTILL_BEAM"].isdigit() and int(s["DISTILL_NBEST"]) > int(s["DISTILL_BEAM"]):
    errors.append(f"DISTILL_NBEST ({s['DISTILL_NBEST']}) cannot exceed DISTILL_BEAM ({s['DISTILL_BEAM']}): the beam holds the n-best list")
if s["DISTILL_SELECT"] not in ("first", "bestbleu", "bestchrf"):
    errors.append(f"DISTILL_SELECT must be first, bestbleu or bestchrf, got '{s['DISTILL_SELECT']}'")
if s["DISTILL_BACKEND"] not in ("fairseq", "ctranslate2"):
    errors.append(f"DISTILL_BACKEND must be fairseq or ctranslate2, got '{s['DISTILL_BACKEND']}'")
elif s["DISTILL_BACKEND"] == "ctranslate2" and (s["DISTILL_NBEST"] != "1" or s["DISTILL_SELECT"] != "first"):
    errors.append("DISTILL_BACKEND=ctranslate2 keeps the teacher's best translation alone; an n-best list"
                  " (DISTILL_NBEST, DISTILL_SELECT) needs DISTILL_BACKEND=fairseq")
for name, value, ok, wanted in (("KD_ALPHA", s["KD_ALPHA"], lambda v: 0 <= v <= 1, "in [0, 1]"),
                                ("KD_TEMPERATURE", s["KD_TEMPERATURE"], lambda v: 0 < v < math.inf, "> 0"),
                                ("LR", s["LR"], lambda v: 0 < v < math.inf, "> 0"),
                                ("STUDENT_DROPOUT", s["STUDENT_DROPOUT"], lambda v: 0 <= v < 1, "in [0, 1)")):
    try:
        if not ok(float(value)):
            raise ValueError
    except ValueError:
        errors.append(f"{name} must be a number {wanted}, got '{value}'")
if s["SRC"] == s["TGT"] or not {s["SRC"], s["TGT"]} <= {"en", "de", "fr", "cs"}:
    errors.append(f"SRC and TGT must be two different languages of en, de, fr, cs, got '{s['SRC']}' and '{s['TGT']}'")
if s["KD_TOPK_STUDENT"] not in ("full", "renormalised"):
    errors.append(f"KD_TOPK_STUDENT must be full or renormalised, got '{s['KD_TOPK_STUDENT']}'")
if s["SUBWORDS"] not in ("spm", "bpe"):
    errors.append(f"SUBWORDS must be spm or bpe, got '{s['SUBWORDS']}'")
for name, value in (("DISTILL_UNION", s["DISTILL_UNION"]), ("DISTILL_KEEP_LOOPS", s["DISTILL_KEEP_LOOPS"])):
    if value not in ("0", "1"):
        errors.append(f"{name} must be 0 or 1, got '{value}'")
import fairseq_kd  # noqa: F401  (registers the student architectures)
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq_kd.tasks.distillation import cpu_has_bf16_kernels
cpu = "--cpu" in s["DEVICE_FLAGS"].split()
cpu_bf16 = str(int(cpu and cpu_has_bf16_kernels())) if s["CPU_BF16"] == "auto" else s["CPU_BF16"]
if cpu_bf16 not in ("0", "1"):
    errors.append(f"CPU_BF16 must be 0, 1 or auto, got '{s['CPU_BF16']}'")
elif cpu_bf16 == "1" and not cpu:
    errors.append(f"CPU_BF16=1 autocasts CPU training; with DEVICE_FLAGS='{s['DEVICE_FLAGS']}' set CPU_BF16=0")
elif cpu_bf16 == "1" and not cpu_has_bf16_kernels():
    errors.append("CPU_BF16=1: this CPU has no bfloat16 matrix kernels (they need AVX-512), where autocast makes"
                  " training many times slower; set CPU_BF16=0")
if sys.argv[1] not in ARCH_MODEL_REGISTRY:
    students = ", ".join(sorted(a for a in ARCH_MODEL_REGISTRY if a.startswith("transformer_student")))
    errors.append(f"STUDENT_ARCH '{sys.argv[1]}' is not a fairseq architecture; e.g. {students}")
for error in errors:
    print(f"error: {error}", file=sys.stderr)
print(cpu_bf16)
sys.exit(1 if errors else 0)
CHECK
) || exit 2
# CPU_BF16=1: forward passes under bfloat16 autocast (--cpu-bf16, an option of fairseq_kd's tasks). The
# teacher trains through translation_distillation, which without a teacher trains as fairseq's translation
# does, where it needs what that task adds: --cpu-bf16, and with CONFIG=converged a patience count that
# survives a resume (stock fairseq-train restarts it)
STUDENT_BF16=() TEACHER_TASK=()
if [ "$CONFIG" = converged ]; then TEACHER_TASK=(--task translation_distillation); fi
if [ "$CPU_BF16" = 1 ]; then
    STUDENT_BF16=(--cpu-bf16) TEACHER_TASK=(--task translation_distillation --cpu-bf16)
fi

mkdir -p "$WORK"

# the log lines a stage shows: fairseq's training progress and summaries, our tools' own messages
PROGRESS='train_inner|\| (train|valid) \||\| fairseq_kd\.(build_cache|evaluate) \||shard [0-9]+:|^\[|error|BLEU'

# line by line as they come (mawk, Debian's awk, reads a pipe in blocks and would show them late), after
# PREFIX (the stage's name where stages run at once)
show_progress() {  # [PREFIX]
    local line
    while IFS= read -r line; do
        if [[ $line =~ $PROGRESS ]]; then printf '    %s%s\n' "${1:-}" "$line"; fi
    done
}

# cmd COMMAND...: a command of a stage. A stage runs its commands through cmd so that it can also be listed
# (STAGE_LIST set): its command lines, the size and time of every existing file they name (also as NAME=FILE
# or in lists, a,b and PAIR:PATH), and a checksum of the names, sizes and times of the files in every
# directory of WORK they name (the corpora, caches and exports of other stages: one rebuilt makes the stages
# that read it stale), without running anything.
cmd() {
    if [ -z "${STAGE_LIST:-}" ]; then
        # exit, not errexit: bash ignores errexit in the condition that runs a stage (stage), and the next
        # command would run on this one's missing or stale outputs
        "$@" || exit
        return
    fi
    local arg path paths
    printf '%q ' "$@" >> "$STAGE_LIST"
    printf '\n' >> "$STAGE_LIST"
    for arg in "$@"; do
        IFS=',:' read -r -a paths <<< "${arg#*=}"
        for path in "${paths[@]}"; do
            if [ -f "$path" ]; then
                echo "file $path $(stat -c '%s bytes, modified %y' "$path")" >> "$STAGE_LIST"
            elif [ -d "$path" ] && [[ $path == "$WORK"/?* ]]; then
                echo "directory $path $(find "$path" -type f -printf '%P %s %T@\n' | sort | cksum)" >> "$STAGE_LIST"
            fi
        done
    done
}

# list_stage RECORD FUNCTION ARGS...: a stage's listing (cmd) into RECORD, without DEVICE_FLAGS: where a
# stage ran is not one of its settings, so a work directory can move between a CPU and a GPU machine
list_stage() {
    local record=$1 DEVICE_FLAGS=() TRANSLATE_DEVICE_FLAGS=()
    shift
    STAGE_LIST=$record "$@" > /dev/null
}

# stage NAME LOG FUNCTION ARGS...: run a stage once, showing its progress, stopping with the log's name on
# failure. Its record, WORK/.stage-NAME, holds its listing as it finished; a later run skips the stage when
# the listing is the same and stops, naming the difference, when settings or input files have changed.
stage() {
    local name=$1 log=$2 record=$WORK/.stage-$1
    shift 2
    if [ -f "$record" ]; then
        local stale
        stale=$(stale_record "$record" "$@")
        if [ -z "$stale" ]; then
            echo "[$name] finished earlier, skipping"
            return
        fi
        echo "error: stage '$name' in $WORK ran with other settings or inputs: $stale;" \
            "use another WORK, or delete $record and the stage's outputs to run it again" >&2
        exit 1
    fi
    # a stage stopped earlier resumes its training from checkpoint_last.pt: only with the command lines it
    # started with (record.started), or the run would be two runs under one record
    rm -f "$record.now"
    list_stage "$record.now" "$@"
    grep -v -e '^file ' -e '^directory ' "$record.now" > "$record.started.now" || true
    rm "$record.now"
    if [ -f "$record.started" ] && ! cmp -s "$record.started" "$record.started.now" \
        && [ -n "$(resumed_checkpoints "$record.started.now")" ]; then
        echo "error: stage '$name' in $WORK stopped earlier under other settings: $(changes "$record.started" "$record.started.now");" \
            "its training would go on from $(resumed_checkpoints "$record.started.now" | head -1) under these: run it with" \
            "the settings it started with, or delete $record.started and the stage's outputs to start it afresh" >&2
        rm "$record.started.now"
        exit 1
    fi
    mv "$record.started.now" "$record.started"
    echo "[$name] running, log: $log"
    # appended: a stage stopped earlier runs again after its log (fairseq-train resumes from its
    # checkpoint_last.pt), so that the log keeps the whole learning curve
    if ! "$@" 2>&1 | tee -a "$log" | show_progress "${SPAWNED[$name]+[$name] }"; then
        echo "error: stage '$name' failed; see $log" >&2
        exit 1
    fi
    rm -f "$record.tmp"
    list_stage "$record.tmp" "$@"
    mv "$record.tmp" "$record"
    rm "$record.started"
}

# resumed_checkpoints LISTING: the checkpoint_last.pt files that its fairseq-train commands would resume from
resumed_checkpoints() {
    local dir
    while read -r dir; do
        eval "dir=$dir"  # as the listing quoted it (printf %q)
        if [ -f "$dir/checkpoint_last.pt" ]; then echo "$dir/checkpoint_last.pt"; fi
    done < <(grep -oE -- '--save-dir (\\ |[^ ])+' "$1" | sed 's/^--save-dir //')
}

# the stages multilingual.sh runs at once (PARALLEL=1, spawn): stage prefixes their progress with their names
declare -A SPAWNED=()

# stale_record RECORD FUNCTION ARGS...: how a stage's record differs from its listing with the settings and
# input files of now (nothing when they are the same)
stale_record() {
    local record=$1
    shift
    rm -f "$record.now"
    list_stage "$record.now" "$@"
    if ! cmp -s "$record" "$record.now"; then changes "$record" "$record.now"; fi
    rm "$record.now"
}

# what differs between two stage listings: the first changed line, as the options or words only one has
changes() {  # OLD NEW
    local old new
    old=$(diff "$1" "$2" | sed -n 's/^< //p' | head -1)
    new=$(diff "$1" "$2" | sed -n 's/^> //p' | head -1)
    if [[ $old == directory* || $new == directory* ]]; then
        old=${old:-$new}
        old=${old#directory }
        echo "the files in ${old% * *} are not those it read (rebuilt since)"
        return
    fi
    if [[ $old == file* || $new == file* ]]; then
        echo "${old:-$new} ${new:+-> now ${new#file }}"
        return
    fi
    # '--option value' as one word, so that a changed value is shown with its option
    words() { awk '{ for (i = 1; i <= NF; i++) { w = $i; if (w ~ /^--/ && i < NF && $(i + 1) !~ /^--/) w = w " " $(++i); print w } }' <<< "$1" | sort; }
    echo "it ran with $(comm -23 <(words "$old") <(words "$new") | paste -sd ' '), now $(comm -13 <(words "$old") <(words "$new") | paste -sd ' ')"
}

# require_stages NAME...: stop unless run.sh has finished these stages in $WORK
require_stages() {
    local needed
    for needed in "$@"; do
        if [ ! -f "$WORK/.stage-$needed" ]; then
            echo "error: $WORK has no finished '$needed' stage; run examples/multi30k/run.sh with the same settings first" >&2
            exit 1
        fi
    done
}

# require_current_students NAME...: stop unless run.sh's students NAME... in $WORK were trained with the
# settings and inputs of now: a table would put them beside runs made under other rules
require_current_students() {
    local name stale
    require_stages "$@"
    for name in "$@"; do
        student_data "$name"
        stale=$(stale_record "$WORK/.stage-$name" train_student "$name" "${STUDENT_DATA[@]}")
        if [ -n "$stale" ]; then
            echo "error: $name in $WORK was trained with other settings or inputs: $stale;" \
                "run examples/multi30k/run.sh with the settings of now first" >&2
            exit 1
        fi
    done
}

prepare_data() {
    cmd env SUBWORDS="$SUBWORDS" VOCAB_SIZE="$VOCAB_SIZE" TRAIN_SENTENCES="$TRAIN_SENTENCES" \
        MULTI30K_DIR="$MULTI30K_DIR" bash "$ROOT/scripts/prepare-multi30k.sh" "$WORK" "$SRC" "$TGT"
}

# --user-dir: fairseq-train resumes from checkpoint_last.pt, which torch >= 2.6 reads only with the
# plugin's allowlist
train_teacher() {  # SAVE_DIR EXTRA_FLAGS...
    local dir=$1
    shift
    cmd fairseq-train "$DATA" --user-dir "$ROOT/fairseq_kd" "${TEACHER_FLAGS[@]}" \
        --criterion label_smoothed_cross_entropy --label-smoothing 0.1 "${OPTIM_FLAGS[@]}" \
        "${BATCH_FLAGS[@]}" --seed "$SEED" --max-update "$TEACHER_UPDATES" "${CONVERGE_FLAGS[@]}" "${DEVICE_FLAGS[@]}" \
        "${LOG_FLAGS[@]}" "${TEACHER_TASK[@]}" --save-dir "$dir" "$@"
}

train_student() {  # NAME DATA_BIN EXTRA_FLAGS...
    local name=$1 data=$2
    shift 2
    cmd fairseq-train "$data" --user-dir "$ROOT/fairseq_kd" --task translation_distillation "${STUDENT_FLAGS[@]}" \
        --criterion kd_label_smoothed_cross_entropy --label-smoothing 0.1 "$@" "${OPTIM_FLAGS[@]}" \
        "${BATCH_FLAGS[@]}" --seed "$SEED" --max-update "$STUDENT_UPDATES" "${CONVERGE_FLAGS[@]}" "${DEVICE_FLAGS[@]}" \
        "${LOG_FLAGS[@]}" "${STUDENT_BF16[@]}" --save-dir "$WORK/$name"
}

# the sequence-level KD corpus in DISTILLED: the teacher beam-decodes the training source (DISTILL_BEAM,
# DISTILL_NBEST), then distilled_pairs builds the corpus
distill_corpus() {
    if [ "$DISTILL_BACKEND" = ctranslate2 ]; then
        translate_train "$WORK/teacher/$CHECKPOINT" "$DATA" "$WORK/subword/train.$SRC" "$DISTILLED" "${SUBWORD_MODEL[@]}"
    else
        decode_train "$DISTILLED"
    fi
    distilled_pairs "$DISTILLED" "${DISTILLED_TEACHER[@]}"
}
# where distill_corpus leaves the teacher's translations, as distilled_corpus.py reads them
if [ "$DISTILL_BACKEND" = ctranslate2 ]; then DISTILLED_TEACHER=(--hypotheses "$DISTILLED/hypotheses.txt")
else DISTILLED_TEACHER=(--generate-log "$DISTILLED/generate-train.txt"); fi

# DISTILL_BACKEND=ctranslate2: the teacher's best translation of each line of a subword source file, in
# subword pieces, by the teacher exported to CTranslate2 in float32 (on Multi30k's test set the same
# translations as fairseq's for 99.7 % of sentences, at 2.7x its sentences/s: BENCHMARKS.md): DIR/hypotheses.txt
translate_train() {  # CHECKPOINT DATA_BIN SOURCE DIR EXPORT_FLAGS...
    local checkpoint=$1 data=$2 source=$3 dir=$4
    shift 4
    mkdir -p "$dir"
    cmd fairseq-kd-export "$checkpoint" --data "$data" --quantization float32 --out "$dir/teacher-ct2" --force "$@"
    cmd fairseq-kd-translate "$dir/teacher-ct2" --subwords --input "$source" --output "$dir/hypotheses.txt" \
        --beam "$DISTILL_BEAM" --max-len-a 1.2 --max-len-b 10 --batch-size 64 "${TRANSLATE_DEVICE_FLAGS[@]}"
}
# where fairseq-kd-translate runs: as DEVICE_FLAGS says, on every core of this machine (not a stage setting)
if [[ " ${DEVICE_FLAGS[*]} " == *" --cpu "* ]]; then TRANSLATE_DEVICE_FLAGS=(--device cpu --threads "${OMP_NUM_THREADS:-$(nproc)}")
else TRANSLATE_DEVICE_FLAGS=(--device cuda); fi

# the teacher's translations of the training source: DIR/generate-train.txt
decode_train() {  # DIR
    mkdir -p "$1"
    cmd fairseq-generate "$DATA" --user-dir "$ROOT/fairseq_kd" --path "$WORK/teacher/$CHECKPOINT" \
        --gen-subset train --beam "$DISTILL_BEAM" --nbest "$DISTILL_NBEST" "${DECODE_FLAGS[@]}" "${DEVICE_FLAGS[@]}" \
        --results-path "$1"
}

# one hypothesis per sentence (DISTILL_SELECT) from a generate log, in corpus order and without degenerate
# ones, with the original pairs beside them if DISTILL_UNION=1, binarized with the teacher's dictionaries:
# DIR/data-bin
distilled_pairs() {  # DIR --generate-log LOG | --hypotheses FILE
    local dir=$1 union=()
    shift
    if [ "$DISTILL_UNION" = 1 ]; then union=(--union); fi
    mkdir -p "$dir"
    cmd python "$ROOT/scripts/distilled_corpus.py" "$@" \
        --source "$WORK/subword/train.$SRC" --target "$WORK/subword/train.$TGT" \
        --out-prefix "$dir/train" --src "$SRC" --tgt "$TGT" --select "$DISTILL_SELECT" "${union[@]}" "${LOOP_FLAGS[@]}"
    cmd fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" \
        --trainpref "$dir/train" --validpref "$WORK/subword/valid" --testpref "$WORK/subword/test" \
        --srcdict "$DATA/dict.$SRC.txt" --tgtdict "$DATA/dict.$TGT.txt" \
        --destdir "$dir/data-bin" --workers 2
}

# a model (checkpoint or export) on test and valid with fairseq-kd-eval, quality only, decoded as users
# decode (fairseq's default length limits: a cap would hide a model that fails to stop):
# WORK/results/NAME.json and .md, translations WORK/results/NAME.NAME.SPLIT.txt
evaluate() {  # NAME MODEL
    mkdir -p "$WORK/results"
    cmd fairseq-kd-eval "$DATA" --checkpoints "$1=$2" --split test,valid \
        --reference "$WORK/raw/test.$TGT,$WORK/raw/valid.$TGT" --post-process "$POST_PROCESS" \
        --beam "$BEAM" --no-speed --out-prefix "$WORK/results/$1"
}

# FILES: the paths WORK/TEMPLATE with each NAME for its %s, an array (a WORK path may hold spaces)
work_files() {  # TEMPLATE NAME...
    local template=$1 name file
    shift
    FILES=()
    for name in "$@"; do
        printf -v file "$template" "$name"
        FILES+=("$WORK/$file")
    done
}

# one table (OUT.md, OUT.json) of evaluated models, the first the reference
table() {  # OUT NAME...
    local out=$1
    shift
    work_files results/%s.json "$@"
    fairseq-kd-eval --merge "${FILES[@]}" --out-prefix "$out"
}

# the student with the best valid BLEU among those named, by their evaluate stages' reports
best_student() {  # NAME...
    python -c 'import json, sys
reports = {name: json.load(open(f"{sys.argv[1]}/results/{name}.json")) for name in sys.argv[2:]}
print(max(reports, key=lambda name: reports[name]["models"][0]["valid"]["bleu"]))' "$WORK" "$@"
}

# a checkpoint as a CTranslate2 model directory with its subword model (fairseq-kd-export)
export_model() {  # CHECKPOINT OUT_DIR EXTRA_FLAGS...
    local checkpoint=$1 out=$2
    shift 2
    cmd fairseq-kd-export "$checkpoint" --data "$DATA" "${SUBWORD_MODEL[@]}" --out "$out" --force "$@"
}

# the teacher's top-k on every training and validation token, for word-level KD without the teacher
build_cache() {  # DATA_BIN OUT_DIR [TEACHER_CHECKPOINTS [EXTRA_FLAGS...]]
    local data=$1 out=$2 teachers=${3:-$WORK/teacher/$CHECKPOINT}
    shift $(($# < 3 ? $# : 3))
    cmd fairseq-kd-build-cache "$data" --teacher-path "$teachers" --topk "$KD_TOPK" \
        --splits train,valid --max-tokens 8000 "${DEVICE_FLAGS[@]}" --out "$out" "$@"
}

# STUDENT_DATA: the training data and KD options of one of run.sh's four students
RUN_STUDENTS=(student-no-kd student-word-kd student-seq-kd student-seq-word-kd)
student_data() {  # NAME
    case "$1" in
        student-no-kd) STUDENT_DATA=("$DATA" --kd-alpha 0) ;;
        student-word-kd) word_kd_flags "$WORK/cache"; STUDENT_DATA=("$DATA" "${KD_FLAGS[@]}") ;;
        student-seq-kd) STUDENT_DATA=("$DISTILLED/data-bin" --kd-alpha 0) ;;
        student-seq-word-kd) word_kd_flags "$WORK/cache-distilled"; STUDENT_DATA=("$DISTILLED/data-bin" "${KD_FLAGS[@]}") ;;
    esac
}

# KD_FLAGS: the word-level KD options, from a cache of the teacher's top-k or from the teacher online
word_kd_flags() {  # CACHE_DIR [TEACHER_CHECKPOINT]
    KD_FLAGS=(--kd-alpha "$KD_ALPHA" --kd-temperature "$KD_TEMPERATURE")
    if [ "$KD_TOPK" -gt 0 ]; then
        KD_FLAGS+=(--teacher-topk-cache "$1" --kd-topk "$KD_TOPK")
        # only when set: the stage records of runs made before the option existed stay current
        if [ "$KD_TOPK_STUDENT" != full ]; then KD_FLAGS+=(--kd-topk-student "$KD_TOPK_STUDENT"); fi
    else
        KD_FLAGS+=(--teacher-path "${2:-$WORK/teacher/$CHECKPOINT}")
    fi
}
