"""Train a joint sentencepiece model, or encode / decode text with one.

    python scripts/spm.py train --model spm --vocab-size 8000 train.en train.de
    python scripts/spm.py encode --model spm.model < raw.txt > pieces.txt
    python scripts/spm.py decode --model spm.model < pieces.txt > raw.txt
"""
import argparse
import sys

import sentencepiece as spm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "encode", "decode"])
    parser.add_argument("inputs", nargs="*", help="training text files (train only)")
    parser.add_argument("--model", required=True, help="model prefix (train) or .model file (encode/decode)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_intermixed_args()

    if args.command == "train":
        spm.SentencePieceTrainer.train(
            input=",".join(args.inputs),
            model_prefix=args.model,
            vocab_size=args.vocab_size,
            character_coverage=1.0,
            model_type="unigram",
            input_sentence_size=1_000_000,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
        return
    sp = spm.SentencePieceProcessor(model_file=args.model)
    for line in sys.stdin:
        if args.command == "encode":
            print(" ".join(sp.encode(line.strip(), out_type=str)))
        else:
            print(sp.decode(line.split()))


if __name__ == "__main__":
    main()
