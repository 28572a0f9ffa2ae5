#!/usr/bin/env bash
# Multilingual, low-resource and cross-lingual distillation on Multi30k, which is four-way parallel (line i of
# en, de, fr and cs is the same sentence). One joint dictionary; every model, teacher or student, is trained
# by fairseq's translation_multi_simple_epoch (students by its distillation version,
# translation_multi_distillation) with the same language tokens. Three experiments, one table each:
#
#   multilingual  en-de, en-fr, en-cs: a teacher per pair; bilingual word-KD students; one multilingual student
#                 of the same size without KD, with word-level KD from the pairs' top-k caches, with
#                 sequence-level KD (the teachers' translations), with the threshold strategy (Tan et al.,
#                 2019: KD off for a pair while the student beats its teacher on validation BLEU); the
#                 word-KD student exported to CTranslate2 int8, per pair
#   low-resource  the same pairs with en-cs cut to its first LOW_RESOURCE_SIZE pairs: the bilingual en-cs
#                 word-KD student against the multilingual word-KD student; and both again with the cut
#                 pair's teacher's translations of the English of every training sentence (a low-resource
#                 pair has more source text than translations; here, the English of the other pairs)
#   pivot         a cs-de student without KD and with cross-lingual KD from the en-de teacher, which reads
#                 the English side of the same sentences
#
# Usage: bash examples/multi30k/multilingual.sh          (CONFIG=quick: minutes; CONFIG=full: hours)
#   EXPERIMENTS="multilingual low-resource pivot"   which to run
#   LOW_RESOURCE_SIZE=5000      training pairs left to en-cs in the low-resource experiment
#   THRESHOLD_INTERVAL=n        updates between two threshold comparisons (default: a fifth of the threshold
#                               student's updates)
#   THRESHOLD_MARGIN=1          BLEU by which the student must beat its teacher for KD to switch off
#   PARALLEL=1                  on a GPU: each model trains as soon as what it needs is there, many at once
#                               (the three teachers and the students without KD first, ...); the tables' training
#                               speeds are then of models sharing the machine, not comparable with each other
#   ...and run.sh's settings: WORK, CONFIG (quick or full), STUDENT_ARCH, KD_ALPHA, KD_TEMPERATURE, KD_TOPK,
#   KD_TOPK_STUDENT, VOCAB_SIZE (default 16000: four languages), TEACHER_UPDATES, STUDENT_UPDATES, MAX_TOKENS,
#   LR, CPU_BF16, DEVICE_FLAGS, DISTILL_BACKEND (ctranslate2: the teachers' translations by CTranslate2), ...
#
# STUDENT_UPDATES is per language pair: a student of three pairs trains three times as many updates as a
# bilingual one and draws its batches from each pair equally (--sampling-method uniform), so that every
# student sees each of its pairs' data as often, the cut en-cs included (the three bilingual students together
# train as long as one multilingual student).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CONFIG=${CONFIG:-quick}
WORK=${WORK:-$ROOT/work/multi30k-multilingual-$CONFIG}
VOCAB_SIZE=${VOCAB_SIZE:-16000}
if [ "$CONFIG" = converged ]; then
    echo "error: CONFIG=converged stops on valid BLEU, which translation_multi_simple_epoch does not compute;" \
        "use CONFIG=quick or full (or set TEACHER_UPDATES/STUDENT_UPDATES)" >&2
    exit 2
fi
if [ "$CONFIG" = quick ]; then  # a smoke run of every stage in minutes (run.sh's quick budgets take an hour here)
    : "${TEACHER_UPDATES:=120}" "${STUDENT_UPDATES:=80}" "${MAX_TOKENS:=2048}"
fi
. "$(dirname "$0")/common.sh"

read -r -a EXPERIMENTS <<< "${EXPERIMENTS:-multilingual low-resource pivot}"
want() { [[ " ${EXPERIMENTS[*]} " == *" $1 "* ]]; }
LOW_RESOURCE_SIZE=${LOW_RESOURCE_SIZE:-5000}
PAIRS=(en-de en-fr en-cs)
# the threshold student's run (STUDENT_UPDATES per pair) in five: four comparisons, the last a fifth before
# the end (fairseq's last update runs no check)
interval=$(( ${#PAIRS[@]} * STUDENT_UPDATES / 5 ))
THRESHOLD_INTERVAL=${THRESHOLD_INTERVAL:-$(( interval > 0 ? interval : 1 ))}
THRESHOLD_MARGIN=${THRESHOLD_MARGIN:-1}
for experiment in "${EXPERIMENTS[@]}"; do
    case "$experiment" in multilingual|low-resource|pivot) ;;
        *) echo "error: EXPERIMENTS names '$experiment'; choose from multilingual low-resource pivot" >&2; exit 2 ;; esac
done
for setting in LOW_RESOURCE_SIZE THRESHOLD_INTERVAL; do
    if ! [[ ${!setting} =~ ^[1-9][0-9]*$ ]]; then echo "error: $setting must be an integer >= 1, got '${!setting}'" >&2; exit 2; fi
done
if [ "$KD_TOPK" -lt 1 ] && { want multilingual || want low-resource; }; then
    echo "error: KD_TOPK must be >= 1: the multilingual and low-resource students distil from the teachers' top-k caches" >&2; exit 2
fi
if ! [[ $THRESHOLD_MARGIN =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "error: THRESHOLD_MARGIN must be a number >= 0, got '$THRESHOLD_MARGIN'" >&2; exit 2
fi
if [ "$DISTILL_NBEST" != 1 ] || [ "$DISTILL_SELECT" != first ] || [ "$DISTILL_UNION" != 0 ]; then
    echo "error: multilingual.sh builds its sequence-level KD corpora from each teacher's best translation alone:" \
        "drop DISTILL_NBEST, DISTILL_SELECT and DISTILL_UNION (run.sh and levers.sh use them)" >&2; exit 2
fi
PARALLEL=${PARALLEL:-0}
if [ "$PARALLEL" != 0 ] && [ "$PARALLEL" != 1 ]; then echo "error: PARALLEL must be 0 or 1, got '$PARALLEL'" >&2; exit 2; fi

# PARALLEL=1: the stages started with spawn run at once, as background jobs, each until an await names
# it. For a GPU, which the recipes' small models leave mostly idle (BENCHMARKS.md: 20 small students at once
# on an H100 trained 128 updates/s together, 6 at once 97); on a CPU of few cores they share its cores.
if [ "$PARALLEL" = 1 ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torch's default, a thread per core in every process, oversubscribes
    set -m  # each job its own process group, so that stopping the recipe stops its training processes too
    trap 'for pid in "${SPAWNED[@]}"; do kill -- "-$pid" 2> /dev/null || true; done' EXIT
    trap 'exit 130' INT TERM
fi

spawn() {  # NAME LOG FUNCTION ARGS...: stage NAME ..., in the background with PARALLEL=1
    if [ "$PARALLEL" = 1 ]; then
        SPAWNED[$1]=starting  # seen by the job: its stage prefixes its progress with its name
        stage "$@" &
        SPAWNED[$1]=$!
    else
        stage "$@"
    fi
}

await() {  # NAME...: wait for these stages (nothing to wait for unless spawned); stop if one failed
    local name
    for name in "$@"; do
        if [ -n "${SPAWNED[$name]:-}" ]; then
            wait "${SPAWNED[$name]}" || exit 1  # the stage has said why
            unset "SPAWNED[$name]"
        fi
    done
}

DATA=$WORK/data/data-bin
LOW_DATA=$WORK/data/data-bin-low-resource
SUBWORD=$WORK/data/subword
# every model marks languages the same way, so each teacher's dictionary is the student's
MULTI_FLAGS=(--lang-dict "$DATA/langs.txt" --encoder-langtok src --decoder-langtok)
# batches collated in the training process: fairseq's multilingual task builds a new loader each epoch and
# leaves the last one's worker to the garbage collector, which then waits 5 s for it to stop (per epoch,
# and again at exit; 20 short epochs took 124 s with a worker, 18 s without, the same weights)
LOADER_FLAGS=(--num-workers 0)

prepare_multilingual() {
    cmd env PAIRS="${PAIRS[*]} cs-de" LOW_RESOURCE="en-cs:$LOW_RESOURCE_SIZE" VOCAB_SIZE="$VOCAB_SIZE" \
        MULTI30K_DIR="$MULTI30K_DIR" bash "$ROOT/scripts/prepare-multi30k-multilingual.sh" "$WORK/data"
}

train_pair_teacher() {  # SAVE_DIR DATA_BIN PAIR
    # CPU_BF16=1: the distillation task, which has --cpu-bf16 and without teachers trains as fairseq's does
    local task=(--task translation_multi_simple_epoch)
    if [ "$CPU_BF16" = 1 ]; then task=(--task translation_multi_distillation --cpu-bf16); fi
    cmd fairseq-train "$2" --user-dir "$ROOT/fairseq_kd" "${task[@]}" --lang-pairs "$3" \
        "${MULTI_FLAGS[@]}" "${LOADER_FLAGS[@]}" "${TEACHER_FLAGS[@]}" --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
        "${OPTIM_FLAGS[@]}" "${BATCH_FLAGS[@]}" --seed "$SEED" --max-update "$TEACHER_UPDATES" "${DEVICE_FLAGS[@]}" \
        "${LOG_FLAGS[@]}" --save-dir "$1"
}

train_multi_student() {  # NAME DATA_BIN PAIRS EXTRA_FLAGS...
    local name=$1 data=$2 pairs=$3 commas=${3//[^,]/}  # one comma fewer than pairs: the budget is per pair
    shift 3
    cmd fairseq-train "$data" --user-dir "$ROOT/fairseq_kd" --task translation_multi_distillation --lang-pairs "$pairs" \
        "${MULTI_FLAGS[@]}" "${LOADER_FLAGS[@]}" --sampling-method uniform "${STUDENT_FLAGS[@]}" --criterion kd_label_smoothed_cross_entropy \
        --label-smoothing 0.1 "$@" "${OPTIM_FLAGS[@]}" "${BATCH_FLAGS[@]}" --seed "$SEED" \
        --max-update $(( STUDENT_UPDATES * (${#commas} + 1) )) "${DEVICE_FLAGS[@]}" "${LOG_FLAGS[@]}" \
        "${STUDENT_BF16[@]}" --save-dir "$WORK/$name"
}

# a teacher's top-k over one pair's training and validation data, for word-level KD without the teacher
build_pair_cache() {  # DATA_BIN PAIR TEACHER OUT_DIR
    cmd fairseq-kd-build-cache "$1" --user-dir "$ROOT/fairseq_kd" --task translation_multi_simple_epoch \
        --lang-pairs "$2" "${MULTI_FLAGS[@]}" --teacher-path "$3" --topk "$KD_TOPK" --splits train,valid \
        --max-tokens 8000 "${DEVICE_FLAGS[@]}" --out "$4"
}

# the sequence-level KD corpus of a pair: its teacher's translations of the training source, without the
# teacher's repetition loops: OUT_DIR/PAIR/train.SRC and .TGT
distill_pair() {  # OUT_DIR PAIR TEACHER
    local out=$1/$2 src=${2%-*} tgt=${2#*-} translations
    if [ "$DISTILL_BACKEND" = ctranslate2 ]; then
        translate_train "$3" "$DATA" "$SUBWORD/train.$src" "$out" --sentencepiece-model "$SUBWORD/spm.model" \
            --source-lang "$src" --target-lang "$tgt"
        translations=(--hypotheses "$out/hypotheses.txt")
    else
        cmd fairseq-generate "$DATA" --user-dir "$ROOT/fairseq_kd" --task translation_multi_simple_epoch \
            --lang-pairs "$2" "${MULTI_FLAGS[@]}" -s "$src" -t "$tgt" --path "$3" --gen-subset train \
            --beam "$DISTILL_BEAM" "${DECODE_FLAGS[@]}" "${DEVICE_FLAGS[@]}" --results-path "$out"
        translations=(--generate-log "$out/generate-train.txt")
    fi
    cmd python "$ROOT/scripts/distilled_corpus.py" "${translations[@]}" \
        --source "$SUBWORD/train.$src" --target "$SUBWORD/train.$tgt" --out-prefix "$out/train" --src "$src" \
        --tgt "$tgt" "${LOOP_FLAGS[@]}"
}

# the pairs' corpora binarized with the joint dictionary beside the original validation and test sets:
# OUT_DIR/data-bin
binarize_distilled() {  # OUT_DIR PAIR...
    local out=$1 pair
    shift
    mkdir -p "$out/data-bin"
    for pair in "$@"; do
        cmd fairseq-preprocess --source-lang "${pair%-*}" --target-lang "${pair#*-}" --trainpref "$out/$pair/train" \
            --validpref "$SUBWORD/valid" --testpref "$SUBWORD/test" --srcdict "$DATA/dict.en.txt" \
            --tgtdict "$DATA/dict.en.txt" --destdir "$out/data-bin" --workers 2
    done
    cmd cp "$DATA"/dict.*.txt "$DATA/langs.txt" "$out/data-bin/"
}

# the low-resource experiment's corpus: the cut en-cs teacher's translations of all the English, binarized,
# beside en-de's and en-fr's original data (linked): OUT_DIR/data-bin
binarize_low_distilled() {  # OUT_DIR
    binarize_distilled "$1" en-cs
    cmd ln -sf "$DATA"/*.en-de.* "$DATA"/*.en-fr.* "$1/data-bin/"
}

# models on one pair's test set, one fairseq-kd-eval run (fairseq's default length limits, the first model
# the reference of the retention column): WORK/results/EXPERIMENT.PAIR.json and .md
evaluate_pair() {  # EXPERIMENT DATA_BIN PAIR NAME=MODEL...
    local out=$WORK/results/$1.$3 data=$2 pair=$3
    shift 3
    cmd fairseq-kd-eval "$data" --checkpoints "$@" --split test --source-lang "${pair%-*}" --target-lang "${pair#*-}" \
        --reference "$WORK/data/raw/test.${pair#*-}" --post-process sentencepiece --beam "$BEAM" --no-speed \
        --out-prefix "$out"
}

# one table per experiment from its pairs' reports: test BLEU per pair and their average, chrF, length
# ratio, parameters, training speed, and the comparisons the experiment is for (A:B, A against B)
pair_table() {  # EXPERIMENT PAIRS MODELS PER_PAIR_MODELS COMPARISONS
    local at_once=()
    if [ "$PARALLEL" = 1 ]; then at_once=(--trained-at-once); fi
    python "$ROOT/scripts/multilingual_table.py" --work "$WORK" --experiment "$1" --pairs $2 --models $3 --per-pair $4 \
        --compare $5 "${at_once[@]}"
}

teacher() { echo "$WORK/teacher-$1/checkpoint_last.pt"; }
checkpoint() { echo "$1=$WORK/$1/checkpoint_last.pt"; }
kd=(--kd-alpha "$KD_ALPHA" --kd-temperature "$KD_TEMPERATURE")
topk=(--kd-topk "$KD_TOPK")
if [ "$KD_TOPK_STUDENT" != full ]; then topk+=(--kd-topk-student "$KD_TOPK_STUDENT"); fi
pairs=$(IFS=,; echo "${PAIRS[*]}")
caches=() paths=()
for pair in "${PAIRS[@]}"; do caches+=("$pair:$WORK/cache-$pair") paths+=("$pair:$(teacher "$pair")"); done

# in the order of what each needs (all at once with PARALLEL=1): first the teachers and the students that
# learn without one
mkdir -p "$WORK/results"
stage prepare "$WORK/prepare.log" prepare_multilingual
# the teachers the experiments need: every pair's (multilingual), en-de and en-fr beside the cut en-cs's
# (low-resource), en-de reading English (pivot)
teachers=()
for pair in "${PAIRS[@]}"; do
    if want multilingual || { want low-resource && [ "$pair" != en-cs ]; } || { want pivot && [ "$pair" = en-de ]; }; then
        teachers+=("$pair")
        spawn "teacher-$pair" "$WORK/teacher-$pair.log" train_pair_teacher "$WORK/teacher-$pair" "$DATA" "$pair"
    fi
done
if want multilingual; then
    spawn multilingual-no-kd "$WORK/multilingual-no-kd.log" train_multi_student multilingual-no-kd "$DATA" "$pairs" --kd-alpha 0
fi
if want low-resource; then
    spawn low-teacher "$WORK/low-teacher.log" train_pair_teacher "$WORK/low-teacher" "$LOW_DATA" en-cs
    spawn low-multilingual-no-kd "$WORK/low-multilingual-no-kd.log" train_multi_student low-multilingual-no-kd \
        "$LOW_DATA" "$pairs" --kd-alpha 0
fi
if want pivot; then
    spawn pivot-no-kd "$WORK/pivot-no-kd.log" train_multi_student pivot-no-kd "$DATA" cs-de --kd-alpha 0
fi
await "${teachers[@]/#/teacher-}"

# then the teachers' top-k caches and translations, and the student the teacher runs for online
cache_pairs=()
if want multilingual; then cache_pairs=("${PAIRS[@]}"); elif want low-resource; then cache_pairs=(en-de en-fr); fi
for pair in "${cache_pairs[@]}"; do
    spawn "cache-$pair" "$WORK/cache-$pair.log" build_pair_cache "$DATA" "$pair" "$(teacher "$pair")" "$WORK/cache-$pair"
done
if want multilingual; then
    for pair in "${PAIRS[@]}"; do
        spawn "distill-$pair" "$WORK/distill-$pair.log" distill_pair "$WORK/distill" "$pair" "$(teacher "$pair")"
    done
fi
if want pivot; then
    spawn pivot-kd "$WORK/pivot-kd.log" train_multi_student pivot-kd "$DATA" cs-de "${kd[@]}" \
        --teacher-paths "cs-de:$(teacher en-de)" --teacher-source-lang en
fi
if want low-resource; then
    await low-teacher
    spawn low-cache "$WORK/low-cache.log" build_pair_cache "$LOW_DATA" en-cs "$WORK/low-teacher/checkpoint_last.pt" \
        "$WORK/low-cache"
    # DATA's en-cs source: the English of every training sentence (only the cut teacher's translations of it
    # are used, not its Czech)
    spawn low-distill "$WORK/low-distill.log" distill_pair "$WORK/low-distill" en-cs "$WORK/low-teacher/checkpoint_last.pt"
fi

# then the students of the caches and of the teachers' translations
if want multilingual; then
    for pair in "${PAIRS[@]}"; do
        await "cache-$pair"
        spawn "bilingual-word-kd-$pair" "$WORK/bilingual-word-kd-$pair.log" train_multi_student "bilingual-word-kd-$pair" \
            "$DATA" "$pair" "${kd[@]}" --teacher-topk-caches "$pair:$WORK/cache-$pair" "${topk[@]}"
    done
    spawn multilingual-word-kd "$WORK/multilingual-word-kd.log" train_multi_student multilingual-word-kd "$DATA" "$pairs" \
        "${kd[@]}" --teacher-topk-caches "$(IFS=,; echo "${caches[*]}")" "${topk[@]}"
    # the same targets as the word-KD student (the caches); the teachers only score the validation data
    spawn multilingual-threshold "$WORK/multilingual-threshold.log" train_multi_student multilingual-threshold "$DATA" \
        "$pairs" "${kd[@]}" --teacher-topk-caches "$(IFS=,; echo "${caches[*]}")" "${topk[@]}" \
        --teacher-paths "$(IFS=,; echo "${paths[*]}")" --kd-threshold bleu \
        --kd-threshold-interval "$THRESHOLD_INTERVAL" --kd-threshold-margin "$THRESHOLD_MARGIN"
fi
if want low-resource; then
    await cache-en-de cache-en-fr low-cache
    spawn low-bilingual-word-kd "$WORK/low-bilingual-word-kd.log" train_multi_student low-bilingual-word-kd "$LOW_DATA" \
        en-cs "${kd[@]}" --teacher-topk-caches "en-cs:$WORK/low-cache" "${topk[@]}"
    spawn low-multilingual-word-kd "$WORK/low-multilingual-word-kd.log" train_multi_student low-multilingual-word-kd \
        "$LOW_DATA" "$pairs" "${kd[@]}" "${topk[@]}" \
        --teacher-topk-caches "en-de:$WORK/cache-en-de,en-fr:$WORK/cache-en-fr,en-cs:$WORK/low-cache"
    # sequence- and word-level KD for en-cs: its teacher's translations, and its top-k over them
    await low-distill
    stage low-distill-data "$WORK/low-distill.log" binarize_low_distilled "$WORK/low-distill"
    stage low-distill-cache "$WORK/low-distill-cache.log" build_pair_cache "$WORK/low-distill/data-bin" en-cs \
        "$WORK/low-teacher/checkpoint_last.pt" "$WORK/low-distill-cache"
    spawn low-bilingual-seq-word-kd "$WORK/low-bilingual-seq-word-kd.log" train_multi_student low-bilingual-seq-word-kd \
        "$WORK/low-distill/data-bin" en-cs "${kd[@]}" --teacher-topk-caches "en-cs:$WORK/low-distill-cache" "${topk[@]}"
    spawn low-multilingual-seq-word-kd "$WORK/low-multilingual-seq-word-kd.log" train_multi_student \
        low-multilingual-seq-word-kd "$WORK/low-distill/data-bin" "$pairs" "${kd[@]}" "${topk[@]}" \
        --teacher-topk-caches "en-de:$WORK/cache-en-de,en-fr:$WORK/cache-en-fr,en-cs:$WORK/low-distill-cache"
fi
# the sequence-level KD student after the low-resource students, which (PARALLEL=1) need not wait for the
# teachers' translations
if want multilingual; then
    await "${PAIRS[@]/#/distill-}"
    stage distill "$WORK/distill.log" binarize_distilled "$WORK/distill" "${PAIRS[@]}"
    spawn multilingual-seq-kd "$WORK/multilingual-seq-kd.log" train_multi_student multilingual-seq-kd \
        "$WORK/distill/data-bin" "$pairs" --kd-alpha 0
fi

# last, each experiment's exports, scores and table once its students are trained
if want multilingual; then
    students=(multilingual-no-kd multilingual-word-kd multilingual-seq-kd multilingual-threshold)
    await "${PAIRS[@]/#/bilingual-word-kd-}" "${students[@]}"
    for pair in "${PAIRS[@]}"; do
        spawn "export-multilingual-word-kd-$pair" "$WORK/export-multilingual-word-kd-$pair.log" cmd fairseq-kd-export \
            "$WORK/multilingual-word-kd/checkpoint_last.pt" --data "$DATA" --sentencepiece-model "$SUBWORD/spm.model" \
            --source-lang "${pair%-*}" --target-lang "${pair#*-}" --out "$WORK/multilingual-word-kd-ct2-int8-$pair" --force
    done
    for pair in "${PAIRS[@]}"; do
        models=("teacher=$(teacher "$pair")" "bilingual-word-kd=$WORK/bilingual-word-kd-$pair/checkpoint_last.pt")
        for name in "${students[@]}"; do models+=("$(checkpoint "$name")"); done
        models+=("multilingual-word-kd-ct2-int8=$WORK/multilingual-word-kd-ct2-int8-$pair")
        await "export-multilingual-word-kd-$pair"
        spawn "evaluate-multilingual-$pair" "$WORK/results/multilingual.$pair.log" evaluate_pair multilingual "$DATA" \
            "$pair" "${models[@]}"
    done
fi
if want low-resource; then
    low_students=(low-multilingual-no-kd low-multilingual-word-kd low-multilingual-seq-word-kd)
    await low-bilingual-word-kd low-bilingual-seq-word-kd "${low_students[@]}"
    for pair in "${PAIRS[@]}"; do
        models=()
        if [ "$pair" = en-cs ]; then
            models=("low-teacher=$WORK/low-teacher/checkpoint_last.pt" "$(checkpoint low-bilingual-word-kd)"
                    "$(checkpoint low-bilingual-seq-word-kd)")
        fi
        for name in "${low_students[@]}"; do models+=("$(checkpoint "$name")"); done
        spawn "evaluate-low-resource-$pair" "$WORK/results/low-resource.$pair.log" evaluate_pair low-resource "$LOW_DATA" \
            "$pair" "${models[@]}"
    done
fi
if want pivot; then
    await pivot-no-kd pivot-kd
    spawn evaluate-pivot "$WORK/results/pivot.cs-de.log" evaluate_pair pivot "$DATA" cs-de "$(checkpoint pivot-no-kd)" \
        "$(checkpoint pivot-kd)"
fi
if want multilingual; then
    await "${PAIRS[@]/#/evaluate-multilingual-}"
    pair_table multilingual "${PAIRS[*]}" "teacher bilingual-word-kd ${students[*]} multilingual-word-kd-ct2-int8" \
        "teacher bilingual-word-kd" "multilingual-word-kd:bilingual-word-kd multilingual-word-kd:multilingual-no-kd
        multilingual-seq-kd:multilingual-no-kd multilingual-threshold:multilingual-word-kd"
fi
if want low-resource; then
    await "${PAIRS[@]/#/evaluate-low-resource-}"
    pair_table low-resource "${PAIRS[*]}" "low-teacher low-bilingual-word-kd low-bilingual-seq-word-kd ${low_students[*]}" \
        "" "low-multilingual-word-kd:low-bilingual-word-kd low-multilingual-word-kd:low-multilingual-no-kd
        low-multilingual-seq-word-kd:low-bilingual-word-kd low-multilingual-seq-word-kd:low-bilingual-seq-word-kd
        low-multilingual-seq-word-kd:low-multilingual-word-kd"
fi
if want pivot; then
    await evaluate-pivot
    pair_table pivot cs-de "pivot-no-kd pivot-kd" "" pivot-kd:pivot-no-kd
fi
for experiment in "${EXPERIMENTS[@]}"; do
    echo "[$experiment table] $WORK/results/$experiment.md, .json"
    cat "$WORK/results/$experiment.md"
done
