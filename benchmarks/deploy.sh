#!/usr/bin/env bash
# Deployment benchmark on a finished examples/multi30k/run.sh work directory: the teacher and a student in
# fairseq and exported to CTranslate2 (float32, int8, int8 with a vocabulary map), side by side in
# fairseq-kd-eval at beam 5 (quality, float32 parity, speed at batch 1/32/128), then float32 parity at
# beam 1, then fairseq's decoding time by part (benchmarks/decode_profile.py).
#
# Usage: bash benchmarks/deploy.sh
#   WORK=dir             the run.sh work directory (default: work/multi30k-en-de-full)
#   STUDENT=name         which of its students (default: student-seq-word-kd)
#   THREADS=1            threads of torch and CTranslate2
#   SPEED_SENTENCES=500  test sentences per timed pass
#   OUT=dir              where the reports go (default: benchmarks/results), as deploy-*.json/.md/.png
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$ROOT/work/multi30k-en-de-full}
STUDENT=${STUDENT:-student-seq-word-kd}
THREADS=${THREADS:-1}
SPEED_SENTENCES=${SPEED_SENTENCES:-500}
OUT=${OUT:-$ROOT/benchmarks/results}
EXPORTS=$WORK/deploy-benchmark
TEACHER_CHECKPOINT=$WORK/teacher/checkpoint_last.pt
STUDENT_CHECKPOINT=$WORK/$STUDENT/checkpoint_last.pt
for checkpoint in "$TEACHER_CHECKPOINT" "$STUDENT_CHECKPOINT"; do
    [ -f "$checkpoint" ] || { echo "error: $checkpoint not found; run examples/multi30k/run.sh first" >&2; exit 1; }
done
SUBWORD_MODEL=(--sentencepiece-model "$WORK/subword/spm.model")
[ -f "$WORK/subword/bpe.codes" ] && SUBWORD_MODEL=(--bpe-codes "$WORK/subword/bpe.codes")

export_as() {  # CHECKPOINT NAME EXTRA_FLAGS...
    local checkpoint=$1 name=$2
    shift 2
    fairseq-kd-export "$checkpoint" --data "$WORK/data-bin" "${SUBWORD_MODEL[@]}" --out "$EXPORTS/$name" --force "$@"
}
export_as "$TEACHER_CHECKPOINT" teacher-ct2-float32 --quantization float32
export_as "$TEACHER_CHECKPOINT" teacher-ct2-int8 --quantization int8
export_as "$STUDENT_CHECKPOINT" student-ct2-float32 --quantization float32
export_as "$STUDENT_CHECKPOINT" student-ct2-int8 --quantization int8
export_as "$STUDENT_CHECKPOINT" student-ct2-int8-vmap --quantization int8 --vmap

EVAL=(fairseq-kd-eval "$WORK/data-bin" --split test --reference "$WORK/raw/test.de" --post-process sentencepiece
      --threads "$THREADS" --cpu)
"${EVAL[@]}" --beam 5 --batch-sizes 1,32,128 --speed-sentences "$SPEED_SENTENCES" --repeats 3 \
    --checkpoints teacher="$TEACHER_CHECKPOINT" teacher-ct2-float32="$EXPORTS/teacher-ct2-float32" \
    teacher-ct2-int8="$EXPORTS/teacher-ct2-int8" "$STUDENT=$STUDENT_CHECKPOINT" \
    "$STUDENT-ct2-float32=$EXPORTS/student-ct2-float32" "$STUDENT-ct2-int8=$EXPORTS/student-ct2-int8" \
    "$STUDENT-ct2-int8-vmap=$EXPORTS/student-ct2-int8-vmap" --out-prefix "$OUT/deploy-beam5"
"${EVAL[@]}" --beam 1 --batch-sizes 32 --speed-sentences 32 --repeats 1 \
    --checkpoints teacher="$TEACHER_CHECKPOINT" teacher-ct2-float32="$EXPORTS/teacher-ct2-float32" \
    "$STUDENT=$STUDENT_CHECKPOINT" "$STUDENT-ct2-float32=$EXPORTS/student-ct2-float32" \
    --out-prefix "$OUT/deploy-beam1"
python "$ROOT/benchmarks/decode_profile.py" --data "$WORK/data-bin" --split test --threads "$THREADS" \
    --model teacher="$TEACHER_CHECKPOINT" --model "$STUDENT=$STUDENT_CHECKPOINT" --batch-sizes 1,32 \
    --sentences 200 --out "$OUT/decode_profile"
python "$ROOT/benchmarks/speedups.py" "$OUT/deploy-beam5.json" \
    --baselines teacher "$STUDENT" teacher-ct2-int8 --out "$OUT/deploy-speedups.md"
