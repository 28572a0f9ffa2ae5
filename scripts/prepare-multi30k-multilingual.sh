#!/usr/bin/env bash
# Multi30k task 1, several language pairs -> one joint sentencepiece model -> one dictionary -> a fairseq
# data-bin per pair in one directory, as fairseq's translation_multi_simple_epoch task reads it
# (SPLIT.SRC-TGT.LANG.bin, dict.LANG.txt for every language, all the same dictionary) and langs.txt, the
# --lang-dict that gives every model the same language tokens.
# Usage: prepare-multi30k-multilingual.sh OUT_DIR
#   PAIRS="en-de en-fr en-cs"   the language pairs (Multi30k is four-way parallel: line i of every language is
#                               the same sentence, so any two of en, de, fr, cs make a pair)
#   LOW_RESOURCE="en-cs:5000"   also OUT_DIR/data-bin-low-resource: the same pairs and dictionary, these pairs'
#                               training data cut to their first N pairs (space-separated), the others linked
#   VOCAB_SIZE=16000            joint subword vocabulary over all languages' training text
#   MULTI30K_DIR=dir            read the official gzipped raw files from dir instead of downloading them
set -euo pipefail

OUT=${1:?usage: prepare-multi30k-multilingual.sh OUT_DIR}
case "$OUT" in /*) ;; *) OUT=$PWD/$OUT ;; esac  # absolute: the low-resource data-bin links to it
read -r -a PAIRS <<< "${PAIRS:-en-de en-fr en-cs}"
read -r -a LOW_RESOURCE <<< "${LOW_RESOURCE:-}"
VOCAB_SIZE=${VOCAB_SIZE:-16000}
MULTI30K_DIR=${MULTI30K_DIR:-}
URL=https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
declare -A SPLITS=([train]=train [valid]=val [test]=test_2016_flickr)

declare -A LANGS=() CUT=()
for pair in "${PAIRS[@]}"; do
    src=${pair%-*} tgt=${pair#*-}
    for lang in "$src" "$tgt"; do
        case "$lang" in en|de|fr|cs) LANGS[$lang]=1 ;;
            *) echo "error: PAIRS names '$pair'; pairs are two of en, de, fr, cs joined by '-', e.g. en-de" >&2; exit 2 ;; esac
    done
    if [ "$src" = "$tgt" ] || [ "$pair" != "$src-$tgt" ]; then
        echo "error: PAIRS names '$pair'; pairs are two different languages of en, de, fr, cs joined by '-'" >&2; exit 2
    fi
done
for item in "${LOW_RESOURCE[@]}"; do
    pair=${item%:*} n=${item#*:}
    if [[ " ${PAIRS[*]} " != *" $pair "* ]] || ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
        echo "error: LOW_RESOURCE names '$item'; give PAIR:N with a pair of PAIRS and N >= 1 training pairs" >&2; exit 2
    fi
    CUT[$pair]=$n
done
if ! [[ $VOCAB_SIZE =~ ^[0-9]+$ ]] || [ "$VOCAB_SIZE" -lt 10 ]; then
    echo "error: VOCAB_SIZE must be an integer >= 10, got '$VOCAB_SIZE'" >&2; exit 2
fi
settings="PAIRS=${PAIRS[*]} LOW_RESOURCE=${LOW_RESOURCE[*]} VOCAB_SIZE=$VOCAB_SIZE"
if [ -f "$OUT/data-bin/.done" ]; then
    if [ "$(cat "$OUT/data-bin/.done")" != "$settings" ]; then
        echo "error: $OUT/data-bin was prepared with $(cat "$OUT/data-bin/.done"), now $settings; use another OUT_DIR" >&2
        exit 1
    fi
    echo "[prepare] $OUT/data-bin is complete, skipping"
    exit 0
fi
mkdir -p "$OUT/raw" "$OUT/subword" "$OUT/data-bin"

echo "[prepare] raw text (${!LANGS[*]}) -> $OUT/raw"
for split in "${!SPLITS[@]}"; do
    for lang in "${!LANGS[@]}"; do
        name=${SPLITS[$split]}.$lang.gz
        if [ -n "$MULTI30K_DIR" ]; then
            [ -f "$MULTI30K_DIR/$name" ] || { echo "error: $MULTI30K_DIR/$name not found; MULTI30K_DIR must hold the Multi30k data/task1/raw files" >&2; exit 2; }
            gzip -dc "$MULTI30K_DIR/$name" > "$OUT/raw/$split.$lang"
        else
            curl -fsSL "$URL/$name" | gzip -dc > "$OUT/raw/$split.$lang"
        fi
    done
done

# the subwords and the dictionary from every language's full training text, so a cut pair keeps the vocabulary
echo "[prepare] joint sentencepiece, vocabulary $VOCAB_SIZE -> $OUT/subword"
raw=() subwords=()
for lang in "${!LANGS[@]}"; do raw+=("$OUT/raw/train.$lang") subwords+=("$OUT/subword/train.$lang"); done
python "$SCRIPTS/spm.py" train --model "$OUT/subword/spm" --vocab-size "$VOCAB_SIZE" "${raw[@]}"
for split in train valid test; do for lang in "${!LANGS[@]}"; do
    python "$SCRIPTS/spm.py" encode --model "$OUT/subword/spm.model" < "$OUT/raw/$split.$lang" > "$OUT/subword/$split.$lang"
done; done
cat "${subwords[@]}" > "$OUT/subword/dict-text"
fairseq-preprocess --only-source --trainpref "$OUT/subword/dict-text" --destdir "$OUT/dictionary" --dict-only \
    --workers 2 > "$OUT/preprocess.log" 2>&1 || { echo "error: fairseq-preprocess failed, see $OUT/preprocess.log" >&2; exit 1; }

binarize() {  # PAIR TRAIN_PREFIX DEST: one pair's files (fairseq-preprocess names them by pair, so all pairs
    # land in one data-bin)
    fairseq-preprocess --source-lang "${1%-*}" --target-lang "${1#*-}" --trainpref "$2" \
        --validpref "$OUT/subword/valid" --testpref "$OUT/subword/test" \
        --srcdict "$OUT/dictionary/dict.txt" --tgtdict "$OUT/dictionary/dict.txt" --destdir "$3" \
        --workers 2 >> "$OUT/preprocess.log" 2>&1 || { echo "error: fairseq-preprocess failed, see $OUT/preprocess.log" >&2; exit 1; }
}
echo "[prepare] fairseq-preprocess per pair (${PAIRS[*]}) -> $OUT/data-bin"
for pair in "${PAIRS[@]}"; do binarize "$pair" "$OUT/subword/train" "$OUT/data-bin"; done
printf '%s\n' "${!LANGS[@]}" | sort > "$OUT/data-bin/langs.txt"
if [ "${#CUT[@]}" -gt 0 ]; then
    low=$OUT/data-bin-low-resource
    echo "[prepare] low resource (${LOW_RESOURCE[*]}) -> $low"
    mkdir -p "$low"
    ln -sf "$OUT"/data-bin/{dict.*.txt,langs.txt} "$low"
    for pair in "${PAIRS[@]}"; do
        if [ -z "${CUT[$pair]:-}" ]; then
            ln -sf "$OUT/data-bin/"*".$pair."* "$low"
            continue
        fi
        prefix=$OUT/subword/train.$pair-cut
        for lang in "${pair%-*}" "${pair#*-}"; do head -n "${CUT[$pair]}" "$OUT/subword/train.$lang" > "$prefix.$lang"; done
        binarize "$pair" "$prefix" "$low"
    done
fi
echo "$settings" > "$OUT/data-bin/.done"
