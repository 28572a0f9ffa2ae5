"""Reading the fairseq-train logs the recipes write: a stage appends a resumed run, and a run started again
from scratch, to the same log."""
import os


def current_run(log):
    """The lines of a training log from its last fresh start on (none for a missing log)."""
    if not os.path.isfile(log):
        return []
    with open(log, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    starts = [i for i, line in enumerate(lines) if "No existing checkpoint found" in line]
    return lines[starts[-1]:] if starts else lines
