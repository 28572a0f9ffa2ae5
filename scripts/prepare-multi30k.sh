#!/usr/bin/env bash
# Multi30k task 1 -> sentencepiece -> fairseq data-bin.
# Usage: prepare-multi30k.sh OUT_DIR [SRC] [TGT]
#   MULTI30K_DIR=dir   read the official gzipped raw files from dir instead of downloading them
#   SUBWORDS=spm|bpe   sentencepiece unigram (default) or subword-nmt BPE, joint, VOCAB_SIZE pieces/merges
#   TRAIN_SENTENCES=n  train on the first n pairs only (0, the default: all); subwords are learnt on all
set -euo pipefail

OUT=${1:?usage: prepare-multi30k.sh OUT_DIR [SRC] [TGT]}
SRC=${2:-en}
TGT=${3:-de}
VOCAB_SIZE=${VOCAB_SIZE:-8000}
SUBWORDS=${SUBWORDS:-spm}
TRAIN_SENTENCES=${TRAIN_SENTENCES:-0}
MULTI30K_DIR=${MULTI30K_DIR:-}
URL=https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
# fairseq split name -> Multi30k file prefix
declare -A SPLITS=([train]=train [valid]=val [test]=test_2016_flickr)

for lang in "$SRC" "$TGT"; do
    case "$lang" in en|de|fr|cs) ;; *) echo "error: language '$lang' is not in Multi30k task 1 (en, de, fr, cs)" >&2; exit 2 ;; esac
done
case "$SUBWORDS" in spm|bpe) ;; *) echo "error: SUBWORDS must be spm or bpe, got '$SUBWORDS'" >&2; exit 2 ;; esac
if ! [[ $VOCAB_SIZE =~ ^[0-9]+$ ]] || [ "$VOCAB_SIZE" -lt 10 ]; then
    echo "error: VOCAB_SIZE must be an integer >= 10, got '$VOCAB_SIZE'" >&2; exit 2
fi
if ! [[ $TRAIN_SENTENCES =~ ^[0-9]+$ ]]; then
    echo "error: TRAIN_SENTENCES must be an integer >= 0 (0: all), got '$TRAIN_SENTENCES'" >&2; exit 2
fi

# what the data was prepared with: another run into the same OUT_DIR reuses it only for the same settings
settings="SRC=$SRC TGT=$TGT SUBWORDS=$SUBWORDS VOCAB_SIZE=$VOCAB_SIZE TRAIN_SENTENCES=$TRAIN_SENTENCES"
if [ -f "$OUT/data-bin/.done" ]; then
    if [ "$(cat "$OUT/data-bin/.done")" != "$settings" ]; then
        echo "error: $OUT/data-bin was prepared with $(cat "$OUT/data-bin/.done"), now $settings; use another OUT_DIR" >&2
        exit 1
    fi
    echo "[prepare] $OUT/data-bin is complete, skipping"
    exit 0
fi
mkdir -p "$OUT/raw" "$OUT/subword"

echo "[prepare] raw text ($SRC-$TGT) -> $OUT/raw"
for split in "${!SPLITS[@]}"; do
    for lang in "$SRC" "$TGT"; do
        name=${SPLITS[$split]}.$lang.gz
        if [ -n "$MULTI30K_DIR" ]; then
            [ -f "$MULTI30K_DIR/$name" ] || { echo "error: $MULTI30K_DIR/$name not found; MULTI30K_DIR must hold the Multi30k data/task1/raw files" >&2; exit 2; }
            gzip -dc "$MULTI30K_DIR/$name" > "$OUT/raw/$split.$lang"
        else
            curl -fsSL "$URL/$name" | gzip -dc > "$OUT/raw/$split.$lang"
        fi
    done
done

echo "[prepare] $SUBWORDS subwords, vocabulary $VOCAB_SIZE -> $OUT/subword"
if [ "$SUBWORDS" = spm ]; then
    python "$SCRIPTS/spm.py" train --model "$OUT/subword/spm" --vocab-size "$VOCAB_SIZE" "$OUT/raw/train.$SRC" "$OUT/raw/train.$TGT"
    for split in train valid test; do for lang in "$SRC" "$TGT"; do
        python "$SCRIPTS/spm.py" encode --model "$OUT/subword/spm.model" < "$OUT/raw/$split.$lang" > "$OUT/subword/$split.$lang"
    done; done
else
    cat "$OUT/raw/train.$SRC" "$OUT/raw/train.$TGT" | subword-nmt learn-bpe -s "$VOCAB_SIZE" > "$OUT/subword/bpe.codes"
    for split in train valid test; do for lang in "$SRC" "$TGT"; do
        subword-nmt apply-bpe -c "$OUT/subword/bpe.codes" < "$OUT/raw/$split.$lang" > "$OUT/subword/$split.$lang"
    done; done
fi

if [ "$TRAIN_SENTENCES" -gt 0 ]; then
    # after learning the subwords on all of it, so a prefix keeps the full vocabulary
    echo "[prepare] keeping the first $TRAIN_SENTENCES training pairs"
    for dir in raw subword; do for lang in "$SRC" "$TGT"; do
        head -n "$TRAIN_SENTENCES" "$OUT/$dir/train.$lang" > "$OUT/$dir/train.$lang.head"
        mv "$OUT/$dir/train.$lang.head" "$OUT/$dir/train.$lang"
    done; done
fi

echo "[prepare] fairseq-preprocess (joined dictionary) -> $OUT/data-bin"
fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" \
    --trainpref "$OUT/subword/train" --validpref "$OUT/subword/valid" --testpref "$OUT/subword/test" \
    --destdir "$OUT/data-bin" --joined-dictionary --workers 2 \
    > "$OUT/preprocess.log" 2>&1 || { echo "error: fairseq-preprocess failed, see $OUT/preprocess.log" >&2; exit 1; }
echo "$settings" > "$OUT/data-bin/.done"
