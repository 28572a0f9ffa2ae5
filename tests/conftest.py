"""Shared fixtures: a tiny synthetic translation task, binarized, and a teacher trained on it with stock
fairseq (no plugin), all in a session temp dir."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# pytest-xdist runs one worker per core (pytest.ini): each test, and each process it starts, on one thread
os.environ.setdefault("OMP_NUM_THREADS", "1")

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
PLUGIN = str(REPO / "fairseq_kd")
# a 1+1-layer, 32-wide transformer: trains in seconds on the CPU
TINY_TRANSFORMER = (
    "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
    "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 --decoder-attention-heads 2"
).split()
# --data-buffer-size 0: no batch-prefetching daemon thread. A run that stops mid-epoch leaves it collating
# batches, and Python ends such a thread inside torch's C++ code at exit, which aborted one run of the suite
# after training had finished ("terminate called without an active exception").
TRAIN_FLAGS = (
    "--optimizer adam --lr 0.005 --max-tokens 300 --cpu --seed 1 --no-progress-bar --log-format simple "
    "--log-interval 1 --no-epoch-checkpoints --num-workers 0 --data-buffer-size 0"
).split()


def run(tool, *args, expect_ok=True, env=None):
    """Run a fairseq console script (fairseq-train, ...) from this environment; return the completed process."""
    proc = subprocess.run(
        [str(BIN / tool), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def one_error(proc, message):
    """A refusal as the plugin's tools make it: a failed exit and stderr that is one line, ``fairseq_kd: error:``
    naming the problem (``message`` in it), with no traceback or warnings around it."""
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fairseq_kd: error:") and message in lines[0], proc.stderr[-2000:]


# the recipe files take most of the suite's time: run first (pytest.ini keeps this order for pytest-xdist),
# they start at once on separate workers while the short files fill in around them
LONGEST_FIRST = ("test_multilingual_recipe.py", "test_demo.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def write_parallel(directory, seed=0, sizes=(("train", 800), ("valid", 40), ("test", 40)), vocab=12):
    """A learnable toy language pair: the target spells each source word in the other alphabet."""
    rng = random.Random(seed)
    for split, n in sizes:
        with open(directory / f"{split}.src", "w") as src, open(directory / f"{split}.tgt", "w") as tgt:
            for _ in range(n):
                words = [rng.randrange(vocab) for _ in range(rng.randint(2, 7))]
                src.write(" ".join(f"s{w}" for w in words) + "\n")
                tgt.write(" ".join(f"t{w}" for w in words) + "\n")


def binarize(text_dir, dest, *extra):
    run(
        "fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", text_dir / "train", "--validpref", text_dir / "valid", "--testpref", text_dir / "test",
        "--destdir", dest, "--joined-dictionary", "--workers", "1", *extra,
    )
    return dest


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_parallel(root)
    return binarize(root, root / "bin")


@pytest.fixture(scope="session")
def teacher(data_bin, tmp_path_factory):
    """A teacher trained with stock fairseq (no --user-dir), with --eval-bleu so that its checkpoint also
    holds the numpy metric arrays fairseq saves."""
    save_dir = tmp_path_factory.mktemp("teacher")
    run(
        "fairseq-train", data_bin, "--arch", "transformer", *TINY_TRANSFORMER, *TRAIN_FLAGS,
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-epoch", "6", "--dropout", "0",
        "--eval-bleu", "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
        "--save-dir", save_dir,
    )
    return save_dir / "checkpoint_best.pt"


@pytest.fixture(scope="session")
def weak_teacher(teacher, tmp_path_factory):
    """A second, worse teacher: the teacher's checkpoint with noise added to every weight."""
    import torch

    import fairseq_kd  # noqa: F401  (its allowlist lets torch.load read the fairseq checkpoint)

    state = torch.load(teacher, map_location="cpu")
    generator = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 0.5 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    path = tmp_path_factory.mktemp("weak_teacher") / "checkpoint_weak.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def codes(data_bin):
    """BPE codes learnt on the toy text: with this many merges every toy word is one piece, as binarized."""
    text = data_bin.parent
    proc = subprocess.run(
        [str(BIN / "subword-nmt"), "learn-bpe", "-s", "100"], input=(text / "train.src").read_text()
        + (text / "train.tgt").read_text(), capture_output=True, text=True, check=True,
    )
    path = text / "bpe.codes"
    path.write_text(proc.stdout)
    return path
