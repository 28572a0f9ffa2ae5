"""End to end through the console scripts, as a user runs them: stock fairseq teacher -> KD student ->
fairseq-generate with BLEU; checkpoint loading under torch's weights_only; bad inputs."""
import os
import pickle
import re

import pytest
import torch

import fairseq_kd  # noqa: F401  (torch.load of fairseq checkpoints below relies on its allowlist)
from conftest import PLUGIN, REPO, TINY_TRANSFORMER, TRAIN_FLAGS, binarize, run, write_parallel

STUDENT = ["--arch", "transformer_student_tiny", *TINY_TRANSFORMER]


def train_student(data_bin, save_dir, *extra, expect_ok=True):
    return run(
        "fairseq-train", data_bin, "--user-dir", PLUGIN, *STUDENT, *TRAIN_FLAGS, "--save-dir", save_dir,
        "--criterion", "kd_label_smoothed_cross_entropy", "--label-smoothing", "0.1", *extra,
        expect_ok=expect_ok,
    )


def sacrebleu_of(generate_output):
    return float(re.search(r"Generate test with beam=\d+: BLEU = ([\d.]+)", generate_output).group(1))


@pytest.fixture(scope="module")
def kd_student(data_bin, teacher, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("kd_student")
    proc = train_student(
        data_bin, save_dir, "--task", "translation_distillation", "--teacher-path", teacher,
        "--kd-alpha", "0.5", "--kd-temperature", "2", "--max-epoch", "6", "--dropout", "0",
        "--eval-bleu", "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
    )
    return save_dir, proc.stdout + proc.stderr


def test_kd_training_logs_each_term(kd_student):
    _, log = kd_student
    train = [line for line in log.splitlines() if "| train |" in line]
    valid = [line for line in log.splitlines() if "| valid |" in line]
    assert train and valid
    for line in (train[-1], valid[-1]):
        for field in ("loss", "nll_loss", "kd_loss", "ppl"):
            assert re.search(rf"\| {field} [\d.]+", line), (field, line)
    assert re.search(r"\| bleu [\d.]+", valid[-1])


def test_schedules_and_selection_from_the_command_line(data_bin, teacher, tmp_path):
    proc = train_student(
        data_bin, tmp_path, "--task", "translation_distillation", "--teacher-path", teacher, "--max-update", "6",
        "--kd-alpha", "0.9", "--kd-alpha-schedule", "cosine", "--kd-alpha-final", "0.1", "--kd-schedule-updates", "4",
        "--kd-selection", "global", "--kd-selection-rate", "0.3",
    )
    steps = [line for line in proc.stdout.splitlines() if "train_inner" in line]
    alphas = [float(re.search(r"kd_alpha=([\d.]+)", line).group(1)) for line in steps]
    distilled = [float(re.search(r"kd_distilled=([\d.]+)", line).group(1)) for line in steps]
    assert alphas == [0.9, 0.783, 0.5, 0.217, 0.1, 0.1]  # 0.1 + 0.8 * (1 + cos(pi * n / 4)) / 2
    # the first batch fills the queue alone: its top 30 % are distilled. Later batches are judged against
    # the queue of earlier, higher losses as the student learns, so fewer of their tokens pass
    assert 0.25 <= distilled[0] <= 0.35 and all(d < 0.25 for d in distilled[1:]), distilled


def test_mutual_information_kd_from_the_command_line(data_bin, teacher, tmp_path):
    proc = train_student(
        data_bin, tmp_path, "--task", "translation_distillation", "--teacher-path", teacher, "--max-update", "4",
        "--kd-loss", "mi", "--kd-mi-negatives", "7", "--kd-topk", "4",
    )
    steps = [line for line in proc.stdout.splitlines() if "train_inner" in line]
    kd = [float(re.search(r"kd_loss=([\d.]+)", line).group(1)) for line in steps]
    # in bits; log2(8) = 3 when the student cannot yet tell its position's teacher from the 7 others
    assert len(kd) == 4 and all(0.5 < value < 6 for value in kd), kd


def test_intermediate_layer_kd_from_the_command_line(data_bin, teacher, tmp_path):
    """Every term at once, the student started from the teacher; its checkpoint decodes with stock
    fairseq-generate."""
    proc = train_student(
        data_bin, tmp_path, "--task", "translation_distillation", "--teacher-path", teacher, "--max-update", "4",
        "--arch", "transformer", "--init-student-from-teacher", "first", "--kd-hidden-weight", "0.5",
        "--kd-hidden-distance", "cosine", "--kd-relation-weight", "1", "--kd-attn-weight", "1",
        "--kd-hidden-map", "enc:0-0;dec:0-0",
    )
    log = proc.stdout + proc.stderr
    assert "student initialised from the teacher" in log
    assert "intermediate-layer KD, student layer <- teacher layer (0-based): enc 0 <- 0; dec 0 <- 0" in log
    steps = [line for line in proc.stdout.splitlines() if "train_inner" in line]
    assert len(steps) == 4 and all(f"{term}=" in line for line in steps for term in ("kd_hidden_loss", "kd_relation_loss", "kd_attn_loss"))
    generated = run("fairseq-generate", data_bin, "--user-dir", PLUGIN, "--path", tmp_path / "checkpoint_last.pt",
                    "--cpu", "--max-tokens", "2000", "--beam", "2")
    assert "Generate test with beam=2" in generated.stdout + generated.stderr


def test_learned_teacher_weights_train_and_are_saved(data_bin, teacher, weak_teacher, tmp_path):
    proc = train_student(
        data_bin, tmp_path, "--task", "translation_distillation", "--teacher-path", f"{teacher}:{weak_teacher}",
        "--teacher-weighting", "learned", "--max-update", "4",
    )
    steps = [line for line in proc.stdout.splitlines() if "train_inner" in line]
    weights = [float(re.search(r"teacher_weight_0=([\d.]+)", line).group(1)) for line in steps]
    assert weights[0] == 0.5 and weights[-1] > 0.5 and all("teacher_mix_nll=" in line for line in steps), steps
    criterion_state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu")["criterion"]
    assert list(criterion_state) == ["teacher_weight_logits"]


def test_learned_teacher_weights_start_afresh_from_a_model_trained_without_them(data_bin, teacher, weak_teacher,
                                                                                tmp_path):
    train_student(data_bin, tmp_path / "plain", "--task", "translation_distillation", "--teacher-path", teacher,
                  "--max-update", "2")
    learned = ("--task", "translation_distillation", "--teacher-path", f"{teacher}:{weak_teacher}",
               "--teacher-weighting", "learned")
    # fairseq loads the criterion's parameters from the model it fine-tunes, which has none
    proc = train_student(data_bin, tmp_path / "learned", *learned, "--max-update", "2",
                         "--finetune-from-model", tmp_path / "plain" / "checkpoint_last.pt")
    assert "holds no criterion state for these KD options (teacher_weight_logits)" in proc.stdout + proc.stderr
    saved = torch.load(tmp_path / "learned" / "checkpoint_last.pt", map_location="cpu")["criterion"]["teacher_weight_logits"]
    resumed = train_student(data_bin, tmp_path / "learned", *learned, "--max-update", "3")
    first = next(line for line in resumed.stdout.splitlines() if "train_inner" in line)
    assert float(re.search(r"teacher_weight_0=([\d.]+)", first).group(1)) == round(saved.softmax(0)[0].item(), 3)


def test_mutual_learning_peers_decode_with_stock_generate(data_bin, teacher, tmp_path):
    proc = train_student(
        data_bin, tmp_path, "--task", "translation_distillation", "--arch", "transformer_mutual_student_tiny",
        "--kd-alpha", "0.5", "--max-epoch", "6", "--dropout", "0",
    )
    train = [line for line in proc.stdout.splitlines() if "| train |" in line][-1]
    assert re.search(r"\| peer_nll_loss [\d.]+", train) and re.search(r"\| kd_loss [\d.]+", train), train
    hypotheses, scores = {}, {}
    for peer in ("a", "b"):
        run("python", REPO / "scripts" / "extract_peer.py", tmp_path / "checkpoint_last.pt", "--peer", peer,
            "--out", tmp_path / f"peer_{peer}.pt")
        assert torch.load(tmp_path / f"peer_{peer}.pt", map_location="cpu")["args"].arch == "transformer"
    for name in ("checkpoint_last", "peer_a", "peer_b"):
        out = run("fairseq-generate", data_bin, "--user-dir", PLUGIN, "--path", tmp_path / f"{name}.pt", "--cpu",
                  "--beam", "2", "--scoring", "sacrebleu", "--max-tokens", "2000")
        hypotheses[name] = sorted(line for line in out.stdout.splitlines() if line.startswith("H-"))
        scores[name] = sacrebleu_of(out.stdout + out.stderr)
    assert hypotheses["checkpoint_last"] == hypotheses["peer_a"]  # the mutual model decodes as peer a
    assert hypotheses["peer_a"] != hypotheses["peer_b"]
    assert scores["peer_a"] > 5 and scores["peer_b"] > 5, scores  # as the KD student above; chance is ~1
    refused = run("python", REPO / "scripts" / "extract_peer.py", teacher, "--peer", "b", "--out", tmp_path / "x.pt",
                  expect_ok=False)
    assert "not a transformer_mutual one" in refused.stderr and "Traceback" not in refused.stderr
    refused = run("python", REPO / "scripts" / "extract_peer.py", tmp_path / "checkpoint_last.pt", "--peer", "b",
                  "--out", tmp_path / "checkpoint_last.pt", expect_ok=False)
    assert "exists; choose a new file" in refused.stderr and "Traceback" not in refused.stderr


def test_student_decodes_with_stock_generate(data_bin, teacher, kd_student):
    save_dir, _ = kd_student
    scores = {}
    for name, checkpoint in (("teacher", teacher), ("student", save_dir / "checkpoint_best.pt")):
        proc = run(
            "fairseq-generate", data_bin, "--user-dir", PLUGIN, "--path", checkpoint, "--cpu",
            "--beam", "2", "--scoring", "sacrebleu", "--max-tokens", "2000",
        )
        scores[name] = sacrebleu_of(proc.stdout + proc.stderr)
    # the toy task is learnable: both must translate far better than chance (BLEU ~1)
    assert scores["teacher"] > 50, scores
    assert 5 < scores["student"] <= 100, scores


def test_student_checkpoint_holds_no_teacher(data_bin, kd_student, tmp_path):
    save_dir, _ = kd_student
    train_student(data_bin, tmp_path, "--kd-alpha", "0", "--max-epoch", "1")
    kd = torch.load(save_dir / "checkpoint_last.pt")
    plain = torch.load(tmp_path / "checkpoint_last.pt")
    assert not [key for key in kd["model"] if "teacher" in key]
    assert {k: v.shape for k, v in kd["model"].items()} == {k: v.shape for k, v in plain["model"].items()}
    # Config text and logged metrics differ; the weights and optimizer state must not.
    for part in ("model", "last_optimizer_state"):
        assert tensor_bytes(kd[part]) == tensor_bytes(plain[part]), part


def tensor_bytes(obj):
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def test_stock_generate_needs_the_plugin_to_load_checkpoints(data_bin, teacher):
    """torch >= 2.6 refuses fairseq checkpoints under weights_only; importing the plugin allowlists them."""
    without = run("fairseq-generate", data_bin, "--path", teacher, "--cpu", "--max-tokens", "2000", expect_ok=False)
    assert without.returncode != 0 and "Unsupported global" in without.stderr
    run("fairseq-generate", data_bin, "--path", teacher, "--cpu", "--max-tokens", "2000", "--user-dir", PLUGIN)


def test_weights_only_still_refuses_other_globals(tmp_path):
    torch.save({"payload": os.system}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(tmp_path / "evil.pt")


@pytest.fixture(scope="module")
def other_dict_bin(tmp_path_factory):
    """Data binarized with a different dictionary than the teacher's."""
    root = tmp_path_factory.mktemp("other")
    write_parallel(root, seed=1, vocab=14)
    return binarize(root, root / "bin")


@pytest.fixture(scope="module")
def corrupt_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("corrupt") / "teacher.pt"
    path.write_bytes(b"this is not a checkpoint")
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--teacher-path", "{missing}"], "--teacher-path: no such file"),
        (["--teacher-path", "{corrupt}"], "cannot read"),
        (["--teacher-path", "{teacher}", "--data", "{other}"], "differs from the data's"),
        (["--teacher-path", "{teacher}", "--kd-alpha", "1.5"], "--kd-alpha must be in [0, 1], got 1.5"),
        (["--teacher-path", "{teacher}", "--kd-alpha", "-0.1"], "--kd-alpha must be in [0, 1]"),
        (["--teacher-path", "{teacher}", "--kd-temperature", "0"], "--kd-temperature must be > 0"),
        (["--teacher-path", "{teacher}", "--kd-topk", "-1"], "--kd-topk must be between 0"),
        (["--teacher-path", "{teacher}", "--kd-topk", "100000"], "--kd-topk must be between 0"),
        (["--teacher-path", "{teacher}:{teacher}", "--teacher-weights", "1"], "has 1 values but"),
        (["--teacher-path", "{teacher}", "--teacher-weights", "-1"], "must be non-negative"),
        (["--kd-alpha", "0.5"], "needs a teacher"),
        (["--teacher-path", "{teacher}", "--arch", "transformer_mutual_student_tiny"], "trains two peers"),
    ],
)
def test_bad_input_gives_one_clear_error(data_bin, teacher, other_dict_bin, corrupt_checkpoint, tmp_path, flags, message):
    values = dict(missing=tmp_path / "nope.pt", corrupt=corrupt_checkpoint, teacher=teacher, other=other_dict_bin)
    flags = [flag.format(**values) for flag in flags]
    data = flags.pop(flags.index("--data") + 1) if "--data" in flags else data_bin
    flags = [f for f in flags if f != "--data"]
    proc = train_student(
        data, tmp_path / "ckpt", "--task", "translation_distillation", "--max-epoch", "1", *flags, expect_ok=False
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fairseq_kd: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
