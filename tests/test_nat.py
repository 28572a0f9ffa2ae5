"""Non-autoregressive students: trained with stock fairseq's translation_lev task and nat_loss criterion on
a corpus the teacher distilled, decoded by stock fairseq-generate and by fairseq-kd-eval alike, and the
refusals of a task that does not feed them."""
import json
import re
import subprocess
import sys

import pytest

from conftest import PLUGIN, REPO, TINY_TRANSFORMER, binarize, run

NAT_FLAGS = ["--user-dir", PLUGIN, "--task", "translation_lev", "--criterion", "nat_loss", *TINY_TRANSFORMER,
             "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "300", "--cpu", "--seed", "1",
             "--log-format", "simple", "--no-epoch-checkpoints", "--data-buffer-size", "0"]  # see TRAIN_FLAGS


@pytest.fixture(scope="module")
def distilled(data_bin, teacher, tmp_path_factory):
    """The teacher's translations of the training source, binarized with its dictionaries."""
    root, text = tmp_path_factory.mktemp("distilled"), data_bin.parent
    run("fairseq-generate", data_bin, "--user-dir", PLUGIN, "--path", teacher, "--gen-subset", "train", "--beam", "2", "--cpu",
        "--max-tokens", "2000", "--required-batch-size-multiple", "1", "--results-path", root)
    subprocess.run([sys.executable, REPO / "scripts" / "distilled_corpus.py", "--generate-log",
                    root / "generate-train.txt", "--source", text / "train.src", "--target", text / "train.tgt",
                    "--out-prefix", root / "train", "--src", "src", "--tgt", "tgt"], check=True, capture_output=True)
    for split in ("valid", "test"):
        for lang in ("src", "tgt"):
            (root / f"{split}.{lang}").write_text((text / f"{split}.{lang}").read_text())
    return binarize(root, root / "bin", "--srcdict", data_bin / "dict.src.txt")  # joined: one dictionary


@pytest.mark.parametrize("arch, noise", [("cmlm_transformer_student_tiny", "random_mask"),
                                         ("nonautoregressive_transformer_student_tiny", "full_mask")])
def test_nat_student_trains_on_the_distilled_corpus_and_decodes_with_stock_fairseq(distilled, codes, tmp_path, arch,
                                                                                   noise):
    save_dir = tmp_path / "nat"
    run("fairseq-train", distilled, *NAT_FLAGS, "--arch", arch, "--noise", noise, "--max-update", "10",
        "--save-dir", save_dir)
    generated = run("fairseq-generate", distilled, "--user-dir", PLUGIN, "--task", "translation_lev", "--path",
                    save_dir / "checkpoint_last.pt", "--gen-subset", "test", "--iter-decode-max-iter", "3",
                    "--iter-decode-with-beam", "2", "--cpu", "--batch-size", "64").stdout
    assert re.search(r"Generate test with beam=\d+: BLEU4 = [\d.]+", generated)
    fairseq_output = dict(re.findall(r"^D-(\d+)\t\S+\t(.*)$", generated, re.M))
    # fairseq-kd-eval decodes the checkpoint as fairseq-generate does
    run("fairseq-kd-eval", distilled, "--checkpoints", f"nat={save_dir / 'checkpoint_last.pt'}", "--post-process",
        "none", "--iter-decode-max-iter", "3", "--iter-decode-with-beam", "2", "--no-speed", "--out-prefix",
        tmp_path / "eval")
    ours = (tmp_path / "eval.nat.test.txt").read_text().splitlines()
    assert ours == [fairseq_output[str(i)] for i in range(len(ours))]
    record = json.loads((tmp_path / "eval.json").read_text())["models"][0]
    assert 0 <= record["refinement_steps"] <= 3
    assert "| iterations |" in (tmp_path / "eval.md").read_text()
    refused = run("fairseq-kd-export", save_dir / "checkpoint_last.pt", "--data", distilled, "--bpe-codes", codes,
                  "--out", tmp_path / "ct2", expect_ok=False)
    assert "is non-autoregressive, and CTranslate2 has no decoder for it" in refused.stderr
    if noise == "random_mask":  # nor can it teach: it has no distribution over each next token
        refused = run("fairseq-train", distilled, "--user-dir", PLUGIN, "--task", "translation_distillation",
                      "--teacher-path", save_dir / "checkpoint_last.pt", "--arch", "transformer_student_tiny",
                      "--criterion", "kd_label_smoothed_cross_entropy", "--kd-alpha", "0.5", "--max-update", "1",
                      "--max-tokens", "300", "--cpu", "--save-dir", tmp_path / "student", expect_ok=False)
        assert f"fairseq_kd: error: teacher {save_dir / 'checkpoint_last.pt'}: its model (--arch {arch}) is non-autoregressive" in refused.stderr


@pytest.mark.parametrize("flags, message", [
    (["--task", "translation", "--criterion", "label_smoothed_cross_entropy"],
     "--arch cmlm_transformer_student_tiny is non-autoregressive: it trains and decodes with --task translation_lev"
     " --noise random_mask"),
    (["--noise", "random_delete"], "--arch cmlm_transformer_student_tiny trains with --noise random_mask"),
    # every target position masked: decoder inputs of the same shape, which Mask-Predict never sees
    (["--noise", "full_mask"], "--arch cmlm_transformer_student_tiny trains with --noise random_mask (its decoder inputs"
                               " made from the references that way), but the task's --noise is full_mask"),
])
def test_nat_student_refuses_a_task_that_does_not_feed_it(data_bin, tmp_path, flags, message):
    proc = run("fairseq-train", data_bin, *NAT_FLAGS, "--arch", "cmlm_transformer_student_tiny", "--max-update", "2",
               "--save-dir", tmp_path, *flags, expect_ok=False)
    assert proc.returncode != 0 and f"fairseq_kd: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr
