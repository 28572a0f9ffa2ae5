"""Score fairseq-generate logs of the test and valid sets with sacrebleu; write one JSON record.

    python scripts/score.py --name student --checkpoint ckpt.pt \
        --test test.generate.log raw/test.de --valid valid.generate.log raw/valid.de \
        --decode-seconds 42 --out results/student.json

The logs must come from ``fairseq-generate ... --post-process sentencepiece`` (or ``subword_nmt``), whose
``D-<id>`` lines hold detokenized hypotheses; they are put back in corpus order and scored against the raw
references. ``--decode-seconds`` is the wall time of decoding the test set.
"""
import argparse
import json
import os

import torch

from fairseq_kd.evaluate import count_parameters, quality_scores  # also lets torch.load read fairseq checkpoints
from generate_log import hypotheses_in_corpus_order


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--checkpoint", required=True)
    for split in ("test", "valid"):
        parser.add_argument(f"--{split}", nargs=2, required=True, metavar=("GENERATE_LOG", "RAW_REFERENCE"))
    parser.add_argument("--decode-seconds", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    state = torch.load(args.checkpoint, map_location="cpu")["model"]
    record = {"name": args.name, "checkpoint": args.checkpoint, "params": count_parameters(state)[0]}
    for split in ("test", "valid"):
        generate_log, reference = getattr(args, split)
        with open(reference, encoding="utf-8") as f:
            refs = [line.rstrip("\n") for line in f]
        scores = quality_scores(hypotheses_in_corpus_order(generate_log, len(refs)), refs)
        record[split] = {"bleu": scores["bleu"], "chrf": scores["chrf"], "ter": scores["ter"], "sentences": len(refs)}
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
