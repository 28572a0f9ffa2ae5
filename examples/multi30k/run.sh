#!/usr/bin/env bash
# End-to-end distillation on Multi30k: data -> teacher -> sequence-level KD corpus and top-k teacher caches
# -> one student architecture trained four ways (no KD, word-level KD, sequence-level KD, both) with the
# same budget -> sacrebleu on test and valid -> the best student (by valid BLEU) exported to CTranslate2
# int8 and scored the same way -> results table and learning curves. Re-running skips finished stages and
# runs a stopped one again (training resumes from its last checkpoint, its log appended); a failed stage
# names its log.
#
# Usage: bash examples/multi30k/run.sh            quick configuration: every stage in about 20 minutes on a
#                                                   2-core CPU (10k pairs, short budgets, bfloat16 autocast)
#        CONFIG=full bash examples/multi30k/run.sh  the budget of the README's measurements
#        CONFIG=converged bash examples/multi30k/run.sh  every model until its valid BLEU stops improving
#                          (PATIENCE=10 epochs without a new best), the best checkpoint by valid BLEU used after
#   WORK=dir               where everything goes (default: ./work/multi30k-SRC-TGT-CONFIG)
#   MULTI30K_DIR=dir       local copy of Multi30k data/task1/raw (default: ../shared/data/multi30k when it
#                          exists, else the files are downloaded)
#   SRC=en TGT=de          any two of en, de, fr, cs
#   SUBWORDS=spm|bpe       sentencepiece (default) or subword-nmt BPE
#   TEACHER_UPDATES=n STUDENT_UPDATES=n MAX_TOKENS=n TRAIN_SENTENCES=n WARMUP_UPDATES=n LR=x DISTILL_BEAM=n BEAM=n
#                          override the configuration: budgets, batch size, training-set prefix (0: all),
#                          learning-rate warm-up and peak, the teacher beam that builds the sequence-level KD
#                          corpus, the evaluation beam
#   CPU_BF16=0|1|auto      train under bfloat16 autocast on the CPU (--cpu-bf16; quick: auto, 1 where the CPU has
#                          bfloat16 kernels (AVX-512), else 0; full, converged: 0)
#   DISTILL_UNION=1        keep the original training pairs beside the distilled ones
#   DISTILL_KEEP_LOOPS=1   keep the teacher's repetition loops in the distilled corpus (dropped by default)
#   DISTILL_NBEST=n DISTILL_SELECT=first|bestbleu|bestchrf   the teacher's n-best list (n <= DISTILL_BEAM) and which
#                          hypothesis per sentence the corpus keeps: the teacher's best, or the closest to the
#                          reference by sentence BLEU (Seq-Inter) or chrF
#   DISTILL_BACKEND=ctranslate2   translate the training source with the teacher exported to CTranslate2
#                          (float32; the teacher's best translation alone) instead of fairseq-generate: faster
#   STUDENT_ARCH=transformer_student_tiny STUDENT_DROPOUT=0.1  the students' architecture and dropout (quick:
#                          transformer_student_tiny_dec2 and 0)
#   SEED=1                 the random seed of every training (seeds.sh measures what another one changes)
#   VOCAB_SIZE=8000        joint subword vocabulary size (quick: 4000)
#   KD_ALPHA, KD_TEMPERATURE  word-level KD weight and temperature
#   KD_TOPK=8              word-level KD from a cache of the teacher's top-k (built once); 0 runs the
#                          teacher online on every batch with its full distribution
#   KD_TOPK_STUDENT=full   the top-k target against the student's full softmax, or 'renormalised': against the
#                          student over the same k tokens (for KD_TEMPERATURE > 1: README, step 7)
#   DEVICE_FLAGS="--cpu"   set to "" on a GPU machine; not part of a stage's record, so a work directory can move
#                          between machines (a teacher trained on a CPU, students on a GPU) and go on, copied
#                          to the same path with its file times (rsync -a): the records hold both
#
# Each stage records its command lines and the files they read (WORK/.stage-NAME); re-running with other
# settings stops at the first stage they change, naming the change.
set -euo pipefail

. "$(dirname "$0")/common.sh"

stage prepare "$WORK/prepare.log" prepare_data

stage teacher "$WORK/teacher.log" train_teacher "$WORK/teacher"

stage distill "$WORK/distill.log" distill_corpus

if [ "$KD_TOPK" -gt 0 ]; then
    stage cache "$WORK/cache.log" build_cache "$DATA" "$WORK/cache"
    stage cache-distilled "$WORK/cache-distilled.log" build_cache "$DISTILLED/data-bin" "$WORK/cache-distilled"
fi
# no KD, word-level KD, sequence-level KD, both (student_data in common.sh)
for name in "${RUN_STUDENTS[@]}"; do
    student_data "$name"
    stage "$name" "$WORK/$name.log" train_student "$name" "${STUDENT_DATA[@]}"
done

mkdir -p "$WORK/results"
for name in teacher "${RUN_STUDENTS[@]}"; do
    stage "evaluate-$name" "$WORK/results/$name.log" evaluate "$name" "$WORK/$name/$CHECKPOINT"
done

# deployment: the best student as an int8 CTranslate2 model, scored the same way
BEST=$(best_student "${RUN_STUDENTS[@]}")
DEPLOYED=$BEST-ct2-int8
stage "export-$DEPLOYED" "$WORK/export-$DEPLOYED.log" export_model "$WORK/$BEST/$CHECKPOINT" "$WORK/$DEPLOYED"
stage "evaluate-$DEPLOYED" "$WORK/results/$DEPLOYED.log" evaluate "$DEPLOYED" "$WORK/$DEPLOYED"

echo "[table] $WORK/results.md, $WORK/results.json"
table "$WORK/results" teacher "${RUN_STUDENTS[@]}" "$DEPLOYED"
echo "[learning curves] $WORK/results-curves.png"
work_files %s.log teacher "${RUN_STUDENTS[@]}"
python "$ROOT/scripts/valid_curve.py" --every "$STUDENT_UPDATES" --plot "$WORK/results-curves.png" "${FILES[@]}"
