"""Score the test and valid translations of one model with sacrebleu; write one JSON record.

    python scripts/score.py --name student --checkpoint ckpt.pt \
        --test test.generate.log raw/test.de --valid valid.generate.log raw/valid.de \
        --decode-seconds 42 --out results/student.json

By default the translations are fairseq-generate logs, from ``fairseq-generate ... --post-process
sentencepiece`` (or ``subword_nmt``), whose ``D-<id>`` lines hold detokenized hypotheses; they are put back
in corpus order. ``--format text`` reads plain detokenized text instead, a line per sentence in corpus
order (what ``fairseq-kd-translate`` writes). Both are scored against the raw references.
``--decode-seconds`` is the wall time of decoding the test set; ``--checkpoint`` gives the parameter count
(for an export, the checkpoint it came from).
"""
import argparse
import json
import os

import torch

from fairseq_kd.checkpoints import count_parameters  # also lets torch.load read fairseq checkpoints
from fairseq_kd.evaluate import quality_scores
from generate_log import hypotheses_in_corpus_order


def read_translations(path, kind, count):
    if kind == "generate":
        return hypotheses_in_corpus_order(path, count)
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if len(lines) != count:
        raise SystemExit(f"error: {path} has {len(lines)} lines, the reference {count}; translate the whole split")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--checkpoint", required=True)
    for split in ("test", "valid"):
        parser.add_argument(f"--{split}", nargs=2, required=True, metavar=("GENERATE_LOG", "RAW_REFERENCE"))
    parser.add_argument("--format", choices=["generate", "text"], default="generate",
                        help="fairseq-generate logs (default) or plain text, a line per sentence")
    parser.add_argument("--decode-seconds", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    state = torch.load(args.checkpoint, map_location="cpu")["model"]
    record = {"name": args.name, "checkpoint": args.checkpoint, "params": count_parameters(state)[0]}
    for split in ("test", "valid"):
        translations, reference = getattr(args, split)
        with open(reference, encoding="utf-8") as f:
            refs = [line.rstrip("\n") for line in f]
        scores = quality_scores(read_translations(translations, args.format, len(refs)), refs)
        record[split] = {"bleu": scores["bleu"], "length_ratio": scores["length_ratio"], "chrf": scores["chrf"],
                         "ter": scores["ter"], "sentences": len(refs)}
    record.update(
        bleu_signature=scores["bleu_signature"],
        chrf_signature=scores["chrf_signature"],
        decode_seconds=args.decode_seconds,
        threads=torch.get_num_threads(),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(
        f"[score] {args.name}: test BLEU {record['test']['bleu']} chrF {record['test']['chrf']}, "
        f"valid BLEU {record['valid']['bleu']} ({record['params']:,} parameters)"
    )


if __name__ == "__main__":
    main()
