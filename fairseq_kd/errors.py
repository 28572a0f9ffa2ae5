"""One clear line, not a traceback, for mistakes a user can fix."""
import os
import sys
import warnings

# fairseq 0.12 composes its config through Hydra 1.3's deprecated API: six warnings, about 20 lines on stderr
# in every run, before the one line of an error
warnings.filterwarnings("ignore", category=UserWarning, module=r"hydra\.")
warnings.filterwarnings("ignore", message=r"\s*'config' is validated against ConfigStore schema", category=UserWarning)


class FairseqKDError(ValueError):
    """A bad option, file or input; the message names the problem and the fix."""


def one_line(error):
    """An exception's message on one line (its type where it has none), to quote inside a refusal."""
    return " ".join(str(error).split()) or type(error).__name__


def make_writable_directory(option, value, directory):
    """Create ``directory``, where ``option value`` writes, if it is missing; refuse one that cannot be written."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise FairseqKDError(f"{option} {value}: cannot create {directory} ({e.strerror}); choose another place") from None
    if not os.access(directory, os.W_OK):
        raise FairseqKDError(f"{option} {value}: {directory} is not writable; choose another place")


def overwritten_input(output, inputs):
    """The first of the files ``inputs`` that writing ``output`` would overwrite (links followed), or None."""
    if not os.path.exists(output):
        return None
    return next((path for path in inputs if os.path.isfile(path) and os.path.samefile(path, output)), None)


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    if issubclass(exc_type, FairseqKDError):
        print(f"fairseq_kd: error: {exc}", file=sys.stderr)
    else:
        _previous(exc_type, exc, tb)


sys.excepthook = _excepthook


def _unraisablehook(unraisable, _previous=sys.unraisablehook):
    # fairseq's MMapIndexedDataset.__del__ closes a memory map that its constructor opens after reading the .idx
    # file: for a damaged .idx, which the refusal names, it would add "Exception ignored in" and a traceback
    if unraisable.exc_type is AttributeError and getattr(unraisable.object, "__qualname__", "") == "MMapIndexedDataset.__del__":
        return
    _previous(unraisable)


sys.unraisablehook = _unraisablehook
