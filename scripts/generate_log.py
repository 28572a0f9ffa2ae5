"""Read fairseq-generate's output back in corpus order."""
import sys


def nbest_in_corpus_order(generate_log, num_lines, kind="D"):
    """Every hypothesis of every sentence, by sentence id, best first (fairseq's order with --nbest).

    ``kind`` is ``"D"`` for detokenized lines (with ``--post-process``) or ``"H"`` for the hypotheses as
    the model's (subword) tokens. fairseq-generate prints sentences in length-sorted batches, so ids are
    used, not line order; a missing id is an error.
    """
    hyps = {}
    prefix = kind + "-"
    with open(generate_log, encoding="utf-8") as f:
        for line in f:
            if line.startswith(prefix):
                tag, _score, text = (line.rstrip("\n").split("\t") + [""])[:3]
                hyps.setdefault(int(tag[len(prefix):]), []).append(text)
    missing = sorted(set(range(num_lines)) - set(hyps))
    if missing:
        sys.exit(f"error: {generate_log} has no hypothesis for {len(missing)} sentences (first: {missing[0]})")
    return [hyps[i] for i in range(num_lines)]


def hypotheses_in_corpus_order(generate_log, num_lines, kind="D"):
    """The best hypothesis of every sentence, by sentence id (see ``nbest_in_corpus_order``)."""
    return [nbest[0] for nbest in nbest_in_corpus_order(generate_log, num_lines, kind)]
