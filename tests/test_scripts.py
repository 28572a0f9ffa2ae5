"""The scoring scripts the recipes rely on."""
import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO


def load_script(name):
    """A script of scripts/ as a module, its neighbours importable as when it runs."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hypotheses_are_put_back_in_corpus_order_from_the_log_of_their_source(tmp_path):
    log = tmp_path / "generate.log"
    # fairseq-generate prints sentences in length-sorted batches, not corpus order; a piece outside the
    # dictionary as <unk>, and a multilingual task's language token before the source
    log.write_text(
        "S-2\t__en__ ▁c\nH-2\t-0.1\t▁dr ei\nD-2\t-0.1\tdrei\nS-0\t▁a <unk>\nH-0\t-0.2\t▁eins\nD-0\t-0.2\teins\n"
        "H-0\t-0.4\t▁ein s\nS-1\t▁b\nH-1\t-0.3\t\nD-1\t-0.3\t\n"
    )
    nbest_in_corpus_order = load_script("generate_log").nbest_in_corpus_order
    assert nbest_in_corpus_order(log, ["▁a ▁ä", "▁b", "▁c"]) == [["▁eins", "▁ein s"], [""], ["▁dr ei"]]
    for sources, message in (
        (["▁a ▁ä", "▁b", "▁c", "▁d"], "has no hypothesis for 1 sentences (first: 3)"),
        (["▁a ▁ä", "▁b"], "translates sentence 2, but the source has 2 lines"),
        (["▁a ▁ä", "▁x", "▁c"], "sentence 1 was '▁b', not '▁x' as in the source"),  # another corpus
        (["▁a ▁ä", "▁b", "▁c ▁d"], "sentence 2 was '__en__ ▁c', not '▁c ▁d'"),
    ):
        with pytest.raises(SystemExit, match=re.escape(f"fairseq_kd: error: {log}") + ".*" + re.escape(message)):
            nbest_in_corpus_order(log, sources)
    # decoded with --post-process: detokenized text, not the pieces the corpus is made of
    log.write_text("S-0\tA b\nH-0\t-0.2\tEins\n")
    with pytest.raises(SystemExit, match="decoded without --post-process"):
        nbest_in_corpus_order(log, ["▁A ▁b"])


def test_distilled_corpus_restores_order_and_drops_degenerate_outputs(tmp_path):
    (tmp_path / "train.src").write_text("a b\nc d e\nf\n")
    (tmp_path / "train.tgt").write_text("A B\nC D E\nF\n")
    # out of order; sentence 1 is empty, sentence 2 far too long
    sources = "S-0\ta b\nS-1\tc d e\nS-2\tf\n"
    (tmp_path / "gen.log").write_text(sources + "H-2\t-1\tX X X X X X X\nH-0\t-1\tA2 B2\nH-1\t-1\t\n")
    common = [
        sys.executable, REPO / "scripts" / "distilled_corpus.py", "--generate-log", tmp_path / "gen.log",
        "--source", tmp_path / "train.src", "--target", tmp_path / "train.tgt", "--src", "src", "--tgt", "tgt",
    ]
    subprocess.run([*common, "--out-prefix", tmp_path / "kd" / "train"], check=True, capture_output=True)
    assert (tmp_path / "kd" / "train.src").read_text() == "a b\n"
    assert (tmp_path / "kd" / "train.tgt").read_text() == "A2 B2\n"
    subprocess.run([*common, "--out-prefix", tmp_path / "union" / "train", "--union"], check=True, capture_output=True)
    assert (tmp_path / "union" / "train.tgt").read_text() == "A2 B2\nA B\nC D E\nF\n"
    assert (tmp_path / "union" / "train.src").read_text() == "a b\na b\nc d e\nf\n"
    (tmp_path / "gen.log").write_text(sources + "H-2\t-1\tF F F\nH-0\t-1\tA A A\nH-1\t-1\tC D C D\n")  # only loops
    refused = subprocess.run([*common, "--out-prefix", tmp_path / "loops" / "train"], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.startswith("fairseq_kd: error: all 3 teacher outputs are degenerate")
    subprocess.run([*common, "--out-prefix", tmp_path / "loops" / "train", "--keep-loops"], check=True, capture_output=True)
    assert (tmp_path / "loops" / "train.tgt").read_text() == "A A A\nC D C D\nF F F\n"


def test_distilled_corpus_from_a_hypotheses_file_is_the_one_from_the_generate_log(tmp_path):
    """fairseq-kd-translate --subwords writes the hypotheses in corpus order, one per line: the same corpus
    as from fairseq-generate's log of the same hypotheses; an n-best selection or a short file is refused."""
    (tmp_path / "train.src").write_text("a b\nc d e\nf\ng h\n")
    (tmp_path / "train.tgt").write_text("A B\nC D E\nF\nG H\n")
    hypotheses = ["A2 B2", "", "X X X X X X X", "G H H H"]  # kept, empty, too long, a loop
    (tmp_path / "gen.log").write_text("S-0\ta b\nS-1\tc d e\nS-2\tf\nS-3\tg h\n" + "".join(
        f"H-{i}\t-1\t{h}\n" for i, h in reversed(list(enumerate(hypotheses)))))
    (tmp_path / "hyp.tgt").write_text("".join(h + "\n" for h in hypotheses))
    common = [sys.executable, REPO / "scripts" / "distilled_corpus.py", "--source", tmp_path / "train.src",
              "--target", tmp_path / "train.tgt", "--src", "src", "--tgt", "tgt", "--union"]
    for name, teacher in (("log", ["--generate-log", tmp_path / "gen.log"]), ("file", ["--hypotheses", tmp_path / "hyp.tgt"])):
        subprocess.run([*common, *teacher, "--out-prefix", tmp_path / name / "train"], check=True, capture_output=True)
    for lang in ("src", "tgt"):
        assert (tmp_path / "file" / f"train.{lang}").read_text() == (tmp_path / "log" / f"train.{lang}").read_text()
    assert (tmp_path / "file" / "train.tgt").read_text().startswith("A2 B2\nA B\n")
    for extra, message in ((["--hypotheses", tmp_path / "hyp.tgt", "--select", "bestbleu"], "chooses from an n-best list"),
                           (["--hypotheses", tmp_path / "train.src", "--generate-log", tmp_path / "gen.log"], "not allowed with"),
                           (["--hypotheses", tmp_path / "short"], "has 2 lines but")):
        (tmp_path / "short").write_text("A\nB\n")
        refused = subprocess.run([*common, *extra, "--out-prefix", tmp_path / "x" / "train"], capture_output=True, text=True)
        assert refused.returncode != 0 and message in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("pieces, loops", [
    ("▁Ein ▁Mann ▁spricht ▁dabei ▁dabei ▁dabei .", True),  # one piece three times
    ("▁No ten e b ett e b ett e .", True),  # three pieces twice
    ("▁auf ▁einem ▁Kuchen ▁auf ▁einem ▁Kuchen .", True),
    ("▁Eine ▁Frau ▁eine m ▁eine m ▁weißen ▁Rock .", True),  # two pieces twice: the references' rare false alarm
    ("▁Schwimm m m m er .", True),
    ("▁Ein ▁Mann ▁und ▁ein ▁Mann .", False),  # repeated, but not at once
    ("▁Das ▁Boot ▁ist ▁sehr ▁sehr ▁schnell .", False),  # one piece twice
    ("▁U - Bahn steig ▁am ▁Bahn hof", False),  # the same piece, not in a row
])
def test_repetition_loops_are_degenerate(pieces, loops):
    assert load_script("distilled_corpus").looping(pieces.split()) == loops


def test_distilled_corpus_keeps_the_hypothesis_of_an_nbest_list_closest_to_the_reference(tmp_path):
    (tmp_path / "train.src").write_text("a b c\nd e f\ng h i\n")
    (tmp_path / "train.tgt").write_text("▁das ▁ist ▁gut\n▁ein ▁rotes ▁haus\n▁ein ▁rotes ▁auto\n")
    # --nbest 2, the teacher's best first; sentence 2's best is a loop closer to the reference than the other:
    # set aside before the choice, it costs the sentence nothing
    (tmp_path / "gen.log").write_text(
        "S-1\td e f\nH-1\t-0.1\t▁ein ▁haus ▁rot\nH-1\t-0.2\t▁ein ▁rotes ▁haus\nS-0\ta b c\nH-0\t-0.1\t▁das ▁ist ▁gut\n"
        "H-0\t-0.3\t▁das ▁ist\nS-2\tg h i\nH-2\t-0.1\t▁ein ▁rotes ▁rotes ▁rotes ▁auto\nH-2\t-0.2\t▁ein ▁blaues ▁auto\n"
    )
    written = {}
    for how in ("first", "bestbleu", "bestchrf"):
        subprocess.run([sys.executable, REPO / "scripts" / "distilled_corpus.py", "--generate-log", tmp_path / "gen.log",
                        "--source", tmp_path / "train.src", "--target", tmp_path / "train.tgt", "--src", "src",
                        "--tgt", "tgt", "--select", how, "--out-prefix", tmp_path / how / "train"],
                       check=True, capture_output=True)
        written[how] = (tmp_path / how / "train.tgt").read_text().splitlines()
    assert written["first"] == ["▁das ▁ist ▁gut", "▁ein ▁haus ▁rot", "▁ein ▁blaues ▁auto"]
    assert written["bestbleu"] == written["bestchrf"] == ["▁das ▁ist ▁gut", "▁ein ▁rotes ▁haus", "▁ein ▁blaues ▁auto"]


def test_valid_curve_has_a_column_per_multiple_and_per_last_update(tmp_path):
    def log(name, points):
        lines = [f"2026-11-25 09:00:00 | INFO | valid | epoch 001 | valid on 'valid' subset | loss {nll + 1} | "
                 f"nll_loss {nll} | ppl 10.0 | wps 100 | wpb 50 | bsz 4 | num_updates {n}" for n, nll in points]
        (tmp_path / f"{name}.log").write_text("| train_inner | ignored\n" + "\n".join(lines) + "\n")
        return tmp_path / f"{name}.log"

    # epoch ends (136, 272) fall between the multiples of 100; 'short' stops at 150
    long = log("long", [(100, 9.0), (136, 8.5), (200, 7.25), (272, 6.5), (280, 6.0)])
    short = log("short", [(100, 6.0), (136, 5.5), (150, 5.0)])
    out = subprocess.run([sys.executable, REPO / "scripts" / "valid_curve.py", "--every", "100", long, short],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["| valid NLL (bits/token) at update | 100 | 150 | 200 | 280 |", "|---|---:|---:|---:|---:|",
                   "| long | 9.00 | - | 7.25 | 6.00 |", "| short | 6.00 | 5.00 | - | - |"]
    # with --eval-bleu the valid lines carry BLEU, drawn beside the NLL
    (tmp_path / "bleu.log").write_text(long.read_text().replace("| ppl", "| bleu 12.5 | ppl"))
    subprocess.run([sys.executable, REPO / "scripts" / "valid_curve.py", tmp_path / "bleu.log", short, "--plot",
                    tmp_path / "curves.png"], capture_output=True, text=True, check=True)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # runs without a common budget: each run's last validation only
    out = subprocess.run([sys.executable, REPO / "scripts" / "valid_curve.py", "--every", "0", long, short],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "| valid NLL (bits/token) at update | 150 | 280 |"
    empty = log("empty", [])
    refused = subprocess.run([sys.executable, REPO / "scripts" / "valid_curve.py", empty], capture_output=True, text=True)
    assert refused.returncode == 1 and "has no validation lines" in refused.stderr
    # a run started again from scratch appends to the log of the one before: only its own validations count
    again = tmp_path / "again.log"
    again.write_text(long.read_text() + "| INFO | fairseq.trainer | No existing checkpoint found x/checkpoint_last.pt\n"
                     + short.read_text())
    out = subprocess.run([sys.executable, REPO / "scripts" / "valid_curve.py", "--every", "100", again],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "| valid NLL (bits/token) at update | 100 | 150 |" and out[2] == "| again | 6.00 | 5.00 |"


def test_training_speed_is_the_median_interval_of_the_last_fresh_run(tmp_path):
    """A run started again from scratch appends to its log: only its lines count; a paused interval and a
    GPU's speed in fairseq's exponent notation are read as they are."""
    inner = "2026-11-27 16:00:00 | INFO | train_inner | epoch 001:     50 / 408 loss=6.1, wps={}, ups=1.4\n"
    log = tmp_path / "student.log"
    log.write_text("INFO | fairseq.trainer | No existing checkpoint found /w/checkpoint_last.pt\n"
                   + inner.format(9999.0) * 5
                   + "INFO | fairseq.trainer | No existing checkpoint found /w/checkpoint_last.pt\n"
                   + "".join(inner.format(wps) for wps in (4000.0, 12.5, 4200.0, "1.2e+06", 4100.0))
                   + "2026-11-27 16:09:00 | INFO | train | epoch 001 | loss 5.9 | wps 3000.0 | ups 1.1\n")
    table = load_script("multilingual_table")
    assert table.training_speed(log) == 4100.0
    assert table.training_speed(tmp_path / "missing.log") is None
    short = tmp_path / "short.log"  # fewer updates than one log interval: its epochs
    short.write_text("".join(f"INFO | train | epoch 00{i} | loss 5.9 | wps {wps} | ups 1.1\n" for i, wps in enumerate((10.0, 30.0, 20.0))))
    assert table.training_speed(short) == 20.0
