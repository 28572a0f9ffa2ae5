"""Bad input a user can fix ends in one `fairseq_kd: error:` line, before any work is wasted or any file
is overwritten: teachers that do not fit, resumes with other settings, memory the options would need, cache
builds and evaluations with impossible arguments."""
import re
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PLUGIN, one_error, run
from fairseq_kd.errors import FairseqKDError
from test_cli import train_student
from test_criterion_and_task import build


def test_a_save_dir_holding_the_teacher_is_refused(data_bin, teacher):
    with pytest.raises(FairseqKDError, match="holds the teacher .* give the student its own --save-dir"):
        build(data_bin, "--teacher-path", teacher, "--save-dir", teacher.parent)


def test_a_teacher_for_the_other_direction_is_refused(data_bin, teacher):
    # the toy data share one dictionary, so only the recorded languages tell the directions apart
    with pytest.raises(FairseqKDError, match="it translates src->tgt, but the data is tgt->src"):
        build(data_bin, "--teacher-path", teacher, "-s", "tgt", "-t", "src")


def damaged_teacher(teacher, tmp_path, damage):
    """A copy of the teacher checkpoint (with its dictionaries) whose state ``damage`` edits."""
    shutil.copytree(teacher.parent, tmp_path / "teacher", ignore=shutil.ignore_patterns("checkpoint_last.pt"))
    path = tmp_path / "teacher" / teacher.name
    state = torch.load(path, weights_only=False)
    damage(state)
    torch.save(state, path)
    return path


def drop_a_weight(state):
    del state["model"]["decoder.layers.0.fc1.weight"]


def drop_the_config(state):
    state["cfg"] = None
    state.pop("args", None)


def diverge(state):
    state["model"]["decoder.layers.0.fc1.weight"][0, 0] = float("nan")


def make_it_a_language_model(state):
    state["cfg"]["model"].arch = state["cfg"]["model"]._name = "transformer_lm"


@pytest.mark.parametrize("damage, message", [
    (drop_a_weight, "its weights do not fit the model its own config describes"),
    (drop_the_config, "records neither the config ('cfg') nor the arguments ('args')"),
    (make_it_a_language_model, "is not an encoder-decoder translation model"),
    (diverge, "holds weights that are not finite (decoder.layers.0.fc1.weight has NaN"),
])
def test_damaged_teachers_are_refused(data_bin, teacher, tmp_path, damage, message):
    with pytest.raises(FairseqKDError, match=re.escape(message)):
        build(data_bin, "--teacher-path", damaged_teacher(teacher, tmp_path, damage))


def halve(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged, message", [
    ("train.src-tgt.src.bin", "train.src-tgt.src.idx needs"),  # fairseq: mid-epoch
    ("train.src-tgt.tgt.idx", "cannot read split 'train' of"),
])
def test_a_training_on_damaged_binarized_data_is_refused(data_bin, teacher, tmp_path, damaged, message):
    data = tmp_path / "data"
    shutil.copytree(data_bin, data)
    halve(data / damaged)
    proc = train_student(data, tmp_path / "student", "--task", "translation_distillation", "--teacher-path", teacher,
                         "--max-update", "2", expect_ok=False)
    one_error(proc, message)
    assert not (tmp_path / "student" / "checkpoint_last.pt").exists()


def test_mutual_information_kd_that_would_not_fit_in_memory_is_refused(data_bin, teacher):
    with pytest.raises(FairseqKDError, match=r"needs about \d+ GiB per batch, more than half of this machine's"):
        build(data_bin, "--teacher-path", teacher, "--kd-loss", "mi", "--kd-mi-negatives", 100000,
              "--max-tokens", 100000)
    build(data_bin, "--teacher-path", teacher, "--kd-loss", "mi", "--max-tokens", 300)  # the defaults fit


def test_a_resume_refuses_other_kd_settings_and_keeps_its_schedule_end(data_bin, teacher, tmp_path):
    kd = ("--task", "translation_distillation", "--teacher-path", teacher, "--kd-alpha", "0.9", "--kd-alpha-schedule",
          "linear", "--kd-alpha-final", "0.1")
    train_student(data_bin, tmp_path, *kd, "--max-update", "4")
    resume = (*kd[2:], "--save-dir", tmp_path)
    with pytest.raises(FairseqKDError, match=r"other distillation settings \(--kd-alpha-final 0.1 -> 0.3\)"):
        build(data_bin, *resume[:-4], "--kd-alpha-final", 0.3, "--save-dir", tmp_path, "--max-update", 8)
    with pytest.raises(FairseqKDError, match=r"--kd-hidden-weight 0.0 -> 1.0"):
        build(data_bin, *resume, "--kd-hidden-weight", 1, "--max-update", 8)
    with pytest.raises(FairseqKDError, match=r"teachers \['[0-9a-f]{12}'\] -> \['[0-9a-f]{12}', '[0-9a-f]{12}'\];"
                                             r" teacher_mixture \[\[1.0\], 'fixed'\] -> \[\[0.5, 0.5\], 'confidence'\]"):
        build(data_bin, "--teacher-path", f"{teacher}:{teacher}", "--teacher-weighting", "confidence", *kd[4:],
              "--save-dir", tmp_path, "--max-update", 8)
    _, _, criterion = build(data_bin, *resume, "--max-update", 8)
    assert criterion.alpha.updates == 4  # the schedule ends where the first run's ended
    train_student(data_bin, tmp_path, *kd, "--max-update", "6")  # resumed once: its checkpoints say 6 updates...
    _, _, criterion = build(data_bin, *resume, "--max-update", 8)
    assert criterion.alpha.updates == 4  # ...and a second resume still ends where the first run did
    _, _, allowed = build(data_bin, *resume[:-4], "--kd-alpha-final", 0.3, "--save-dir", tmp_path,
                          "--kd-allow-changed-settings")
    assert allowed.alpha.final == 0.3
    _, _, fresh = build(data_bin, *resume[:-4], "--kd-alpha-final", 0.3, "--save-dir", tmp_path, "--reset-optimizer",
                        "--max-update", 8)
    assert fresh.alpha.updates == 8  # --reset-optimizer starts the schedules afresh
    proc = train_student(data_bin, tmp_path, *kd[:-1], "0.3", "--max-update", "8", expect_ok=False)
    assert proc.returncode != 0 and "fairseq_kd: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_a_resume_refuses_another_teacher_under_the_same_path(data_bin, teacher, tmp_path):
    # a teacher retrained into the same file: only its content tells the runs apart
    shutil.copytree(teacher.parent, tmp_path / "teacher")
    retrained = tmp_path / "teacher" / teacher.name
    kd = ("--teacher-path", retrained, "--kd-alpha", "0.5")
    train_student(data_bin, tmp_path / "student", "--task", "translation_distillation", *kd, "--max-update", "2")
    resume = (*kd, "--save-dir", tmp_path / "student", "--max-update", 4)
    build(data_bin, *resume)  # the same teacher resumes
    state = torch.load(retrained, weights_only=False)
    state["model"]["decoder.layers.0.fc1.bias"] += 0.1
    torch.save(state, retrained)
    with pytest.raises(FairseqKDError, match=r"other distillation settings \(teachers \['[0-9a-f]{12}'\] ->"
                                             r" \['[0-9a-f]{12}'\]\)"):
        build(data_bin, *resume)
    build(data_bin, *resume, "--kd-allow-changed-settings")


@pytest.mark.parametrize("kd", [True, False])  # without: a stock criterion, as the recipes train teachers
def test_a_resume_from_a_checkpoint_cut_short_names_the_intact_one(data_bin, teacher, tmp_path, kd):
    kd = ("--task", "translation_distillation",
          *(("--teacher-path", teacher) if kd else ("--criterion", "label_smoothed_cross_entropy")))
    train_student(data_bin, tmp_path, *kd, "--max-update", "2")
    halve(tmp_path / "checkpoint_last.pt")  # as a run killed while fairseq-train copies checkpoint_best.pt over it
    one_error(train_student(data_bin, tmp_path, *kd, "--max-update", "4", expect_ok=False),
              "this run cannot resume from it: copy an intact checkpoint of the run over it (checkpoint_best.pt")


def test_a_resume_refuses_another_mixture_of_the_same_teachers(data_bin, teacher, weak_teacher, tmp_path):
    """Online, and from a cache rebuilt (--force) from the same checkpoints with other weights."""
    teachers, weights = f"{teacher}:{weak_teacher}", ("--teacher-weights", "0.3,0.7")
    changed = re.escape("(teacher_mixture [[0.3, 0.7], 'fixed'] -> [[0.5, 0.5], 'fixed'])")
    online = ("--teacher-path", teachers, "--kd-alpha", "0.5", "--save-dir", tmp_path / "online")
    train_student(data_bin, tmp_path / "online", "--task", "translation_distillation", *online[:-2], *weights,
                  "--max-update", "2")
    build(data_bin, *online, *weights, "--max-update", 4)
    with pytest.raises(FairseqKDError, match=changed):
        build(data_bin, *online, "--max-update", 4)
    cache = ("fairseq-kd-build-cache", data_bin, "--teacher-path", teachers, "--topk", 4, "--out", tmp_path / "cache",
             "--cpu")
    run(*cache, *weights)
    cached = ("--teacher-topk-cache", tmp_path / "cache", "--kd-topk", 4, "--kd-alpha", "0.5",
              "--save-dir", tmp_path / "cached")
    train_student(data_bin, tmp_path / "cached", "--task", "translation_distillation", *cached[:-2], "--max-update", "2")
    run(*cache, "--force")
    with pytest.raises(FairseqKDError, match=changed):
        build(data_bin, *cached, "--max-update", 4)


def test_a_resume_with_a_checkpoint_suffix_is_checked_against_that_checkpoint(data_bin, teacher, tmp_path):
    kd = ("--teacher-path", teacher, "--kd-alpha", "0.9", "--kd-alpha-schedule", "linear", "--kd-alpha-final")
    train_student(data_bin, tmp_path, "--task", "translation_distillation", *kd, "0.1", "--checkpoint-suffix=-a",
                  "--max-update", "4")
    assert (tmp_path / "checkpoint_last-a.pt").exists() and not (tmp_path / "checkpoint_last.pt").exists()
    resume = ("--save-dir", tmp_path, "--max-update", 8)
    with pytest.raises(FairseqKDError, match=r"checkpoint_last-a.pt was trained with other distillation settings"):
        build(data_bin, *kd, "0.3", "--checkpoint-suffix=-a", *resume)
    _, _, criterion = build(data_bin, *kd, "0.1", "--checkpoint-suffix=-a", *resume)
    assert criterion.alpha.updates == 4  # the resumed run's schedule end, not --max-update's
    _, _, other = build(data_bin, *kd, "0.3", "--checkpoint-suffix=-b", *resume)
    assert other.alpha.updates == 8  # no checkpoint_last-b.pt: a fresh run


def build_cache(data_bin, teacher, out, *extra):
    return run("fairseq-kd-build-cache", data_bin, "--teacher-path", teacher, "--topk", 4, "--out", out, "--cpu",
               *extra, expect_ok=False)


@pytest.mark.parametrize("extra, message", [
    (("--splits", "valid,nosuch"), "has no split 'nosuch'"),
    (("--splits", "valid,"), "--splits must name distinct splits"),
    (("--splits", "valid", "--max-tokens", "3"), "--max-tokens 3 is smaller than the longest sentence pair"),
    (("--splits", "valid", "--num-shards", "1000", "--shard-id", "0"), "--num-shards 1000 is more than the"),
    (("--out-is-a-file",), "(File exists); choose another place"),
])
def test_impossible_cache_builds_are_refused_before_any_shard(data_bin, teacher, tmp_path, extra, message):
    out = tmp_path / "cache"
    if extra == ("--out-is-a-file",):
        out.write_text("")
        extra = ("--splits", "valid")
    one_error(build_cache(data_bin, teacher, out, *extra), message)
    assert not list(tmp_path.glob("cache/*.bin"))


def test_a_cache_of_sentences_longer_than_the_teacher_reads_is_refused(data_bin, teacher, tmp_path):
    def shorten_positions(state):
        state["cfg"]["model"].max_source_positions = 4

    proc = build_cache(data_bin, damaged_teacher(teacher, tmp_path, shorten_positions), tmp_path / "cache",
                       "--splits", "valid")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert re.search(r"sentence \d+ of 'valid' has \d+ source tokens, more than the teacher reads \(4\)", proc.stderr)
    assert not list(tmp_path.glob("cache/*.bin"))


def test_an_unknown_post_processing_is_refused_before_decoding(data_bin, teacher, tmp_path):
    proc = run("fairseq-kd-eval", data_bin, "--checkpoints", f"teacher={teacher}", "--post-process", "bogus",
               "--cpu", "--out-prefix", tmp_path / "eval", expect_ok=False)
    assert proc.returncode != 0 and "--post-process 'bogus' is not one fairseq knows" in proc.stderr
    assert "translating" not in proc.stdout and "Traceback" not in proc.stderr


def test_training_refuses_in_one_line(data_bin, teacher, tmp_path):
    """The same refusals from the command line: one line, no traceback."""
    proc = run("fairseq-train", data_bin, "--user-dir", PLUGIN, "--task", "translation_distillation", "--arch",
               "transformer_student_tiny", "--teacher-path", teacher, "--save-dir", teacher.parent, "--cpu",
               "--criterion", "kd_label_smoothed_cross_entropy", "--max-update", "1", "--max-tokens", "300",
               expect_ok=False)
    one_error(proc, "holds the teacher")


class Backward:  # the slice of fairseq's optimizer interface that train_step uses
    def backward(self, loss):
        loss.backward()


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 0.5, 1.0, 2.0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(alpha=NUMBERS, temperature=NUMBERS, topk=st.integers(-2, 40), loss=st.sampled_from(["kl", "mi"]),
       negatives=st.integers(-1, 20), alpha_schedule=st.sampled_from(["constant", "linear", "exponential", "cosine"]),
       alpha_final=st.one_of(st.none(), NUMBERS), selection=st.sampled_from(["none", "batch", "global"]),
       rate=NUMBERS, hidden=NUMBERS, schedule_updates=st.integers(-1, 10))
def test_any_kd_options_train_a_step_or_fail_in_one_line(data_bin, teacher, alpha, temperature, topk, loss, negatives,
                                                         alpha_schedule, alpha_final, selection, rate, hidden,
                                                         schedule_updates):
    """A property over the criterion's options: either a training step runs with a finite loss and
    gradients, or the options are refused with a FairseqKDError (the one-line error) before training."""
    options = {"kd-alpha": alpha, "kd-temperature": temperature, "kd-topk": topk, "kd-loss": loss,
               "kd-alpha-schedule": alpha_schedule, "kd-selection": selection, "kd-hidden-weight": hidden,
               "kd-schedule-updates": schedule_updates}
    if loss == "mi":  # each option of a term off is refused (test_criterion_and_task.py)
        options["kd-mi-negatives"] = negatives
    if selection != "none":
        options["kd-selection-rate"] = rate
    if alpha_final is not None:
        options["kd-alpha-final"] = alpha_final
    flags = ["--teacher-path", teacher, *(f"--{name}={value}" for name, value in options.items())]
    try:
        task, model, criterion = build(data_bin, *flags)
    except FairseqKDError:
        return
    task.load_dataset("train")
    dataset = task.dataset("train")
    loss_value, _, _ = task.train_step(dataset.collater([dataset[i] for i in range(8)]), model, criterion, Backward(),
                                       update_num=1)
    assert torch.isfinite(loss_value)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
