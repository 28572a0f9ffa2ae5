"""Turn a teacher's beam search over the training source into a sequence-level KD corpus.

    python scripts/distilled_corpus.py --generate-log train.generate.log \
        --source subword/train.en --target subword/train.de --out-prefix distilled/train \
        --src en --tgt de [--union] [--max-length-ratio 3]

Reads the teacher's subword hypotheses (``H-`` lines of ``fairseq-generate --gen-subset train`` without
``--post-process``; or with ``--hypotheses``, a file of one hypothesis per line in corpus order, as
``fairseq-kd-translate --subwords`` writes it) in corpus order and writes ``OUT_PREFIX.SRC`` /
``OUT_PREFIX.TGT``. From an n-best list
(``fairseq-generate --nbest N``) ``--select`` keeps per sentence the teacher's best hypothesis (``first``)
or the one closest to the reference by sentence BLEU (``bestbleu``: Kim & Rush's Seq-Inter, Bergamot's
bestbleu) or chrF (``bestchrf``), scored on subword pieces. Degenerate outputs
are set aside first, and a sentence with none left dropped: empty hypotheses, those whose length ratio to
the source lies outside [1 / max-length-ratio, max-length-ratio], and repetition loops (``looping``), which
a student trained on them learns to produce and then fails to stop (``--keep-loops`` keeps them). With
``--union`` the original pairs are kept as well (Kim & Rush, 2016 found both useful).
"""
import argparse
import os
import sys

from sacrebleu.metrics import BLEU, CHRF

from generate_log import nbest_in_corpus_order

# sentence-level scores of subword pieces against the subword reference
SELECTORS = {"bestbleu": BLEU(tokenize="none", effective_order=True), "bestchrf": CHRF()}


def select(nbest, reference, how):
    """The hypothesis of ``nbest`` (best first) to keep: the first, or the highest scoring against
    ``reference`` (ties: the teacher's order)."""
    if how == "first":
        return nbest[0]
    return max(nbest, key=lambda hypothesis: SELECTORS[how].sentence_score(hypothesis, [reference]).score)


def looping(pieces, longest=4):
    """Whether ``pieces`` repeat themselves at once: one piece three times in a row, or a sequence of 2 to
    ``longest`` pieces twice ("▁dabei ▁dabei ▁dabei", "e b ett e b ett"). On Multi30k's German references
    this matches 0.06 % of sentences; on an undertrained teacher's greedy outputs, 11 %."""
    for n in range(1, longest + 1):
        times = 3 if n == 1 else 2
        for start in range(len(pieces) - times * n + 1):
            if all(pieces[start:start + n] == pieces[start + k * n:start + (k + 1) * n] for k in range(1, times)):
                return True
    return False


def keep(source, hypothesis, max_length_ratio, keep_loops):
    src_len, pieces = len(source.split()), hypothesis.split()
    return (len(pieces) > 0 and 1 / max_length_ratio <= len(pieces) / max(src_len, 1) <= max_length_ratio
            and (keep_loops or not looping(pieces)))


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--generate-log", help="fairseq-generate's output over the training source")
    teacher.add_argument("--hypotheses", help="the teacher's best hypothesis of each source line, in subword pieces")
    parser.add_argument("--source", required=True, help="subword source text, one sentence per line")
    parser.add_argument("--target", required=True, help="subword original targets (used with --union)")
    parser.add_argument("--out-prefix", required=True)
    parser.add_argument("--src", required=True)
    parser.add_argument("--tgt", required=True)
    parser.add_argument("--union", action="store_true", help="keep the original pairs too")
    parser.add_argument("--max-length-ratio", type=float, default=3.0)
    parser.add_argument("--keep-loops", action="store_true",
                        help="keep repetition loops (for comparison, or a teacher of a few updates that only loops)")
    parser.add_argument("--select", choices=["first", *SELECTORS], default="first",
                        help="which hypothesis of an n-best list to keep (default: the teacher's best)")
    args = parser.parse_args()
    if args.max_length_ratio < 1:
        parser.error(f"--max-length-ratio must be >= 1, got {args.max_length_ratio}")

    sources, targets = read_lines(args.source), read_lines(args.target)
    if len(sources) != len(targets):
        parser.error(f"{args.source} has {len(sources)} lines but {args.target} has {len(targets)}")
    if args.hypotheses:
        if args.select != "first":
            sys.exit(f"fairseq_kd: error: --select {args.select} chooses from an n-best list, which --hypotheses"
                     " does not hold: give fairseq-generate's --generate-log (with --nbest)")
        hypotheses = read_lines(args.hypotheses)
        if len(hypotheses) != len(sources):
            sys.exit(f"fairseq_kd: error: {args.hypotheses} has {len(hypotheses)} lines but {args.source} has"
                     f" {len(sources)}: translate the whole --source, one line for each line")
        nbests = [[hypothesis] for hypothesis in hypotheses]
    else:
        nbests = nbest_in_corpus_order(args.generate_log, sources)

    pairs = []
    for source, nbest, target in zip(sources, nbests, targets):
        # the degenerate hypotheses out before the choice: a looping best must not cost a sentence whose
        # other hypotheses are fine
        fine = [h for h in nbest if keep(source, h, args.max_length_ratio, args.keep_loops)]
        if fine:
            pairs.append((source, select(fine, target, args.select)))
    dropped = len(sources) - len(pairs)
    if not pairs:
        sys.exit(f"fairseq_kd: error: all {len(sources)} teacher outputs are degenerate (empty, too long or short,"
                 " or looping), so there is no sequence-level KD corpus; train the teacher longer")
    if args.union:
        pairs += list(zip(sources, targets))
    os.makedirs(os.path.dirname(os.path.abspath(args.out_prefix)), exist_ok=True)
    with open(f"{args.out_prefix}.{args.src}", "w", encoding="utf-8") as fs, open(
        f"{args.out_prefix}.{args.tgt}", "w", encoding="utf-8"
    ) as ft:
        for source, target in pairs:
            fs.write(source + "\n")
            ft.write(target + "\n")
    print(
        f"[distill] {len(sources)} teacher outputs, {dropped} dropped as degenerate, "
        f"{len(pairs)} pairs written{' (with the originals)' if args.union else ''}"
    )


if __name__ == "__main__":
    main()
