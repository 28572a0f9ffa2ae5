"""One clear line, not a traceback, for mistakes a user can fix."""
import sys


class FairseqKDError(ValueError):
    """A bad option, file or input; the message names the problem and the fix."""


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    if issubclass(exc_type, FairseqKDError):
        print(f"fairseq_kd: error: {exc}", file=sys.stderr)
    else:
        _previous(exc_type, exc, tb)


sys.excepthook = _excepthook
