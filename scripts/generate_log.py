"""Read fairseq-generate's output back in corpus order."""
import re
import sys

# the token a multilingual task puts before the source, in fairseq's two styles (__en__, [en_XX])
LANGUAGE_TOKEN = re.compile(r"__\w+__|\[\w+\]")


def error(message):
    sys.exit(f"fairseq_kd: error: {message}")


def same_source(printed, source):
    """Whether fairseq printed ``source`` (subword pieces) as ``printed``: piece for piece, except that it
    prints a piece outside the dictionary as <unk>, and a multilingual task's language token before it."""
    printed, source = printed.split(), source.split()
    if len(printed) == len(source) + 1 and LANGUAGE_TOKEN.fullmatch(printed[0]):
        printed = printed[1:]
    return len(printed) == len(source) and all(p in (s, "<unk>") for p, s in zip(printed, source))


def nbest_in_corpus_order(generate_log, sources):
    """The subword hypotheses (``H-`` lines) of each line of ``sources``, by sentence id, best first
    (fairseq's order with --nbest). fairseq-generate prints sentences in length-sorted batches, so ids are
    used, not line order. The log must hold every id of ``sources`` and no other, and print each one's
    source (``S-``) as ``sources`` has it: a log of another corpus or split, or one decoded with
    --post-process (detokenized text), is refused."""
    hyps, printed = {}, {}
    with open(generate_log, encoding="utf-8") as f:
        for line in f:
            if line.startswith(("H-", "S-")):
                fields = line.rstrip("\n").split("\t")
                index = int(fields[0][2:])
                if line[0] == "S":
                    printed[index] = fields[1] if len(fields) > 1 else ""
                else:
                    hyps.setdefault(index, []).append(fields[2] if len(fields) > 2 else "")
    missing = sorted(set(range(len(sources))) - set(hyps))
    if missing:
        error(f"{generate_log} has no hypothesis for {len(missing)} sentences (first: {missing[0]})")
    beyond = sorted(set(hyps) - set(range(len(sources))))
    if beyond:
        error(f"{generate_log} translates sentence {beyond[-1]}, but the source has {len(sources)} lines: give the"
              " log of fairseq-generate over this source")
    for index, source in enumerate(sources):
        if not same_source(printed.get(index, ""), source):
            error(f"{generate_log}: sentence {index} was {printed.get(index)!r}, not {source!r} as in the source:"
                  " give the log of fairseq-generate over this source, decoded without --post-process")
    return [hyps[i] for i in range(len(sources))]
