"""Score a fairseq-generate log against raw references with sacrebleu; write one JSON record.

    python scripts/score.py --name student --generate-log gen.log --reference raw/test.de \
        --checkpoint ckpt.pt --decode-seconds 42 --out results/student.json

The log must come from ``fairseq-generate ... --post-process sentencepiece`` (or ``subword_nmt``), whose
``D-<id>`` lines hold detokenized hypotheses; they are put back in corpus order before scoring.
"""
import argparse
import json
import os
import sys

import torch
from sacrebleu.metrics import BLEU, CHRF

import fairseq_kd  # noqa: F401  (lets torch.load read fairseq checkpoints)


def hypotheses_in_corpus_order(generate_log, num_lines):
    hyps = {}
    with open(generate_log, encoding="utf-8") as f:
        for line in f:
            if line.startswith("D-"):
                tag, _score, text = (line.rstrip("\n").split("\t") + [""])[:3]
                hyps[int(tag[2:])] = text
    missing = sorted(set(range(num_lines)) - set(hyps))
    if missing:
        sys.exit(f"error: {generate_log} has no hypothesis for {len(missing)} sentences (first: {missing[0]})")
    return [hyps[i] for i in range(num_lines)]


def count_parameters(checkpoint):
    """Parameters of the saved model, counting tied (shared) tensors once."""
    state = torch.load(checkpoint, map_location="cpu")["model"]
    # fairseq also saves one-element "<module>.version" tensors, which are not parameters
    tensors = [t for key, t in state.items() if not key.endswith(".version")]
    unique = {t.untyped_storage().data_ptr(): t.numel() for t in tensors}
    return sum(unique.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--generate-log", required=True)
    parser.add_argument("--reference", required=True, help="raw (detokenized) reference text, one per line")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--decode-seconds", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    with open(args.reference, encoding="utf-8") as f:
        refs = [line.rstrip("\n") for line in f]
    hyps = hypotheses_in_corpus_order(args.generate_log, len(refs))
    bleu, chrf = BLEU(), CHRF()
    record = {
        "name": args.name,
        "checkpoint": args.checkpoint,
        "params": count_parameters(args.checkpoint),
        "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "decode_seconds": args.decode_seconds,
        "threads": torch.get_num_threads(),
        "sentences": len(refs),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{args.name}: BLEU {record['bleu']} chrF {record['chrf']} ({record['params']:,} parameters)")


if __name__ == "__main__":
    main()
