"""One clear line, not a traceback, for mistakes a user can fix."""
import os
import sys


class FairseqKDError(ValueError):
    """A bad option, file or input; the message names the problem and the fix."""


def make_writable_directory(option, value, directory):
    """Create ``directory``, where ``option value`` writes, if it is missing; refuse one that cannot be written."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise FairseqKDError(f"{option} {value}: cannot create {directory} ({e.strerror}); choose another place") from None
    if not os.access(directory, os.W_OK):
        raise FairseqKDError(f"{option} {value}: {directory} is not writable; choose another place")


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    if issubclass(exc_type, FairseqKDError):
        print(f"fairseq_kd: error: {exc}", file=sys.stderr)
    else:
        _previous(exc_type, exc, tb)


sys.excepthook = _excepthook
