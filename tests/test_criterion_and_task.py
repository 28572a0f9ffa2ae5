"""The criterion and task in-process, on a real batch of the tiny data."""
import math

import pytest
import torch
from fairseq import options, tasks
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from conftest import PLUGIN, TINY_TRANSFORMER
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.tasks import distillation
from fairseq_kd.kd_losses import kd_kl_loss, kd_mi_loss, lprobs_at_temperature
from fairseq_kd.teachers import parse_weights


def build(data_bin, *extra):
    """(task, student, criterion) exactly as fairseq-train would build them from these flags."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [str(data_bin), "--user-dir", PLUGIN, "--task", "translation_distillation", "--arch",
         "transformer_student_tiny", *TINY_TRANSFORMER, "--cpu", "--criterion", "kd_label_smoothed_cross_entropy",
         "--label-smoothing", "0.1", "--dropout", "0", *map(str, extra)],
    )
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(0)  # where fairseq-train seeds: before the task (and its teachers), then the model
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return task, model, task.build_criterion(cfg.criterion)


def first_batch(task, split="valid"):
    task.load_dataset(split)
    dataset = task.dataset(split)
    return dataset.collater([dataset[i] for i in range(8)])


def teacher_output(task, model, sample):
    """What the criterion receives from the task's teachers for ``sample`` (``Teachers.predict``)."""
    return task.teachers.predict(sample, model)


def fix_teacher_output(task, output):
    """From now on the task's teachers say ``output`` about every batch."""
    task.teachers.predict = lambda *args, **kwargs: output


def test_alpha_zero_equals_label_smoothed_cross_entropy(data_bin, teacher):
    task, model, criterion = build(data_bin, "--teacher-path", teacher, "--kd-alpha", 0)
    sample = first_batch(task)
    reference = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    loss_ref, size_ref, log_ref = reference(model, sample)
    loss, size, log = criterion(model, sample)
    assert size == size_ref
    assert torch.equal(loss, loss_ref)
    assert torch.equal(log["nll_loss"], log_ref["nll_loss"])
    assert log["kd_loss"] > 0  # still measured and logged at alpha = 0


def test_loss_combines_terms_and_ignores_padding(data_bin, teacher):
    task, model, criterion = build(data_bin, "--teacher-path", teacher, "--kd-alpha", 0.3, "--kd-temperature", 2)
    sample = first_batch(task)
    pad = sample["target"].eq(task.target_dictionary.pad())
    assert pad.any(), "the batch must contain padding for this test to mean anything"
    loss, _, log = criterion(model, sample)
    ls_only, _, _ = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(model, sample)
    assert loss.item() == pytest.approx(0.7 * ls_only.item() + 0.3 * log["kd_loss"].item(), rel=1e-5)
    # garbage teacher distributions at padded positions change nothing
    teacher = teacher_output(task, model, sample)
    teacher.lprobs[pad] = torch.log_softmax(torch.randn_like(teacher.lprobs[pad]) * 10, -1)
    fix_teacher_output(task, teacher)
    loss_garbage, _, _ = criterion(model, sample)
    assert torch.allclose(loss_garbage, loss)


@pytest.mark.parametrize("temperature", [1, 2])
@pytest.mark.parametrize("student", [(), ("--adaptive-softmax-cutoff", 16)], ids=["softmax", "adaptive-softmax"])
def test_kd_term_is_the_kl_to_the_student_logits(data_bin, teacher, temperature, student):
    # at T = 1 the criterion reuses the cross-entropy's log-probabilities; both paths must give the KL
    # computed directly from the student's logits (an adaptive softmax has no logits over the vocabulary:
    # from its distribution)
    task, model, criterion = build(data_bin, "--teacher-path", teacher, "--kd-temperature", temperature, *student)
    sample = first_batch(task)
    _, _, log = criterion(model, sample)
    net_output = model(**sample["net_input"])
    scores = model.get_normalized_probs(net_output, log_probs=True) if student else net_output[0]
    kl = kd_kl_loss(lprobs_at_temperature(scores.flatten(0, 1), temperature),
                    teacher_output(task, model, sample).lprobs.flatten(0, 1), temperature)
    expected = kl[sample["target"].flatten().ne(task.target_dictionary.pad())].sum()
    assert log["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_is_frozen_in_eval_mode_and_outside_the_student(data_bin, teacher):
    task, model, criterion = build(data_bin, "--teacher-path", teacher, "--kd-alpha", 0.5)
    (teacher_model,) = task.teachers.models
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    class Backward:  # the slice of fairseq's optimizer interface that train_step uses
        def backward(self, loss):
            loss.backward()

    sample = first_batch(task, "train")
    task.train_step(sample, model, criterion, Backward(), update_num=1)
    optimizer.step()
    assert not any(m.training for m in teacher_model.modules())
    assert not any(p.requires_grad or p.grad is not None for p in teacher_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher_model.state_dict().items())
    assert not any("teacher" in key for key in model.state_dict())
    assert {id(p) for p in model.parameters()}.isdisjoint({id(p) for p in teacher_model.parameters()})


def test_pairs_longer_than_a_teacher_reads_are_left_to_fairseqs_length_filter(data_bin, teacher, tmp_path):
    """A teacher of fewer positions than the student (here its config's limit lowered): the task's limits,
    which fairseq filters training data and refuses validation data by, are the teacher's."""
    state = torch.load(teacher, map_location="cpu")
    state["cfg"]["model"].max_source_positions, state["cfg"]["model"].max_target_positions = 9, 7
    short = tmp_path / "short_teacher.pt"
    torch.save(state, short)
    assert build(data_bin, "--teacher-path", short)[0].max_positions() == (9, 7)
    assert build(data_bin, "--teacher-path", teacher)[0].max_positions() == (1024, 1024)


def test_teacher_ensemble_weights(data_bin, teacher):
    task, model, _ = build(data_bin, "--teacher-path", f"{teacher}:{teacher}", "--teacher-weights", "1,3")
    assert task.teachers.weights.tolist() == [0.25, 0.75]
    sample = first_batch(task)
    single = build(data_bin, "--teacher-path", teacher)[0]
    # two copies of one teacher average to that teacher
    assert torch.allclose(teacher_output(task, model, sample).lprobs, teacher_output(single, model, sample).lprobs,
                          atol=1e-5)


def test_teacher_weights_beyond_float32_range_still_sum_to_one():
    # normalised in float32 these were [nan, 0] and [0, 0]
    assert parse_weights("1e39,1", 2).tolist() == pytest.approx([1.0, 1e-39], rel=1e-3)
    assert parse_weights("1e308,1e308", 2).tolist() == [0.5, 0.5]


def test_the_student_starts_from_the_same_weights_with_or_without_a_teacher(data_bin, teacher):
    _, with_teacher, _ = build(data_bin, "--teacher-path", teacher)
    _, without, _ = build(data_bin, "--kd-alpha", 0)
    assert all(torch.equal(a, b) for a, b in zip(with_teacher.state_dict().values(), without.state_dict().values()))


def test_without_teacher_the_task_is_translation(data_bin):
    task, model, criterion = build(data_bin, "--kd-alpha", 0)
    assert not task.teachers
    sample = first_batch(task)
    assert teacher_output(task, model, sample) is None
    _, _, log = task.valid_step(sample, model, criterion)
    assert "kd_loss" not in log


def test_topk_over_the_whole_vocabulary_equals_the_full_distribution(data_bin, teacher):
    task, model, full = build(data_bin, "--teacher-path", teacher, "--kd-alpha", 1, "--kd-temperature", 2)
    vocab_size = len(task.target_dictionary)
    sample = first_batch(task)
    _, _, log_full = full(model, sample)
    for k, student, same in ((vocab_size, "full", True), (vocab_size, "renormalised", True), (2, "full", False),
                             (2, "renormalised", False)):
        topk = build(data_bin, "--teacher-path", teacher, "--kd-alpha", 1, "--kd-temperature", 2, "--kd-topk", k,
                     "--kd-topk-student", student)[2]
        _, _, log_topk = topk(model, sample)
        assert torch.isclose(log_topk["kd_loss"], log_full["kd_loss"], rtol=1e-4) == same, (k, student)


@pytest.mark.parametrize("student, warned", [("full", True), ("renormalised", False)])
def test_topk_at_a_temperature_above_one_warns_unless_the_student_is_renormalised(data_bin, teacher, caplog, student,
                                                                                   warned):
    build(data_bin, "--teacher-path", teacher, "--kd-topk", 4, "--kd-temperature", 2, "--kd-topk-student", student)
    assert ("--kd-topk-student renormalised" in caplog.text) == warned


@pytest.mark.parametrize("flags", [[], ["--kd-topk", "4", "--kd-loss", "mi"]])
def test_renormalised_student_needs_a_topk_kl_term(data_bin, teacher, flags):
    with pytest.raises(FairseqKDError, match="--kd-topk-student renormalised .* needs --kd-loss kl and --kd-topk > 0"):
        build(data_bin, "--teacher-path", teacher, "--kd-topk-student", "renormalised", *flags)



@pytest.mark.parametrize("selection", ["batch", "global"])
def test_selective_kd_distils_only_the_hardest_tokens(data_bin, teacher, selection):
    task, model, everything = build(data_bin, "--teacher-path", teacher, "--kd-temperature", 2)
    selective = build(data_bin, "--teacher-path", teacher, "--kd-temperature", 2, "--kd-selection", selection,
                      "--kd-selection-rate", 0.25)[2]
    sample = first_batch(task)
    _, _, log_all = everything(model, sample)
    model.train()  # only training batches feed the global queue: here it holds exactly this batch
    _, _, log = selective(model, sample)
    ntokens = sample["ntokens"]
    assert log_all["kd_distilled"] == ntokens
    if selection == "batch":
        assert log["kd_distilled"] == math.ceil(0.25 * ntokens)
    else:  # tokens at or above the 75 % quantile of this batch's losses
        assert 0.2 * ntokens < log["kd_distilled"] < 0.3 * ntokens
    assert 0 < log["kd_loss"] < log_all["kd_loss"]


def test_schedules_follow_the_update_count(data_bin, teacher):
    task, model, criterion = build(
        data_bin, "--teacher-path", teacher, "--kd-alpha", 0.9, "--kd-alpha-schedule", "linear", "--kd-alpha-final", 0.1,
        "--kd-temperature", 4, "--kd-temperature-schedule", "exponential", "--kd-temperature-final", 1,
        "--kd-schedule-updates", 100,
    )
    sample = first_batch(task)
    for update, alpha, temperature in ((0, 0.9, 4.0), (50, 0.5, 2.0), (100, 0.1, 1.0), (150, 0.1, 1.0)):
        task.num_updates = update  # what train_step records before each update
        _, _, log = criterion(model, sample)
        assert log["kd_alpha"] / sample["ntokens"] == pytest.approx(alpha)
        assert log["kd_temperature"] / sample["ntokens"] == pytest.approx(temperature)


@pytest.mark.parametrize("topk", [0, 4])
def test_mi_term_runs_on_the_real_tokens_only(data_bin, teacher, topk):
    task, model, criterion = build(data_bin, "--teacher-path", teacher, "--kd-loss", "mi", "--kd-temperature", 2,
                                   "--kd-topk", topk)
    sample = first_batch(task)
    real = sample["target"].ne(task.target_dictionary.pad())
    assert not real.all(), "the batch must contain padding for this test to mean anything"
    loss, _, log = criterion(model, sample)
    logits = model(**sample["net_input"])[0][real]
    teacher = teacher_output(task, model, sample)
    lprobs_teacher = teacher.lprobs[real]
    ids = None
    if topk:
        lprobs_teacher, ids = lprobs_teacher.topk(topk, dim=-1)
    expected = kd_mi_loss(lprobs_at_temperature(logits, 2), lprobs_teacher, 2, 15, ids).sum()
    assert log["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # padded positions are neither distilled nor anyone's negatives
    teacher.lprobs[~real] = torch.log_softmax(torch.randn_like(teacher.lprobs[~real]) * 10, -1)
    fix_teacher_output(task, teacher)
    assert torch.allclose(criterion(model, sample)[0], loss)


@pytest.mark.parametrize("flags, message", [
    (["--kd-loss", "mi"], "drop --kd-loss mi"),
    (["--kd-topk", "4"], "drop --kd-topk"),
    # the peers learn from each other only in the KD criterion, which a distillation task hands the student
    (["--task", "translation"], "got --task translation --criterion kd_label_smoothed_cross_entropy: only peer a"),
    (["--criterion", "label_smoothed_cross_entropy"], "got --task translation_distillation --criterion label_smoothed"),
])
def test_teacher_options_are_refused_for_mutual_learning(data_bin, flags, message):
    with pytest.raises(FairseqKDError, match=message):
        build(data_bin, "--arch", "transformer_mutual_student_tiny", *flags)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kd-temperature-schedule", "linear"], "needs --kd-temperature-final"),
        (["--kd-alpha-final", "0.2"], "--kd-alpha-final 0.2 has no effect with --kd-alpha-schedule constant"),
        (["--kd-alpha-schedule", "exponential", "--kd-alpha-final", "0"], "exponential needs --kd-alpha and"),
        (["--kd-alpha-schedule", "linear", "--kd-alpha-final", "2"], "--kd-alpha-final must be in [0, 1]"),
        (["--kd-temperature-schedule", "cosine", "--kd-temperature-final", "1", "--max-update", "0"],
         "needs to know when to end: set --kd-schedule-updates N"),
        (["--kd-selection", "batch", "--kd-selection-rate", "0"], "--kd-selection-rate must be in (0, 1]"),
        (["--kd-selection", "global", "--kd-selection-queue-size", "0"], "--kd-selection-queue-size must be in [1, 16777216]"),
        # torch.quantile refuses more values: training would stop once the queue held them
        (["--kd-selection", "global", "--kd-selection-queue-size", str(2**24 + 1)], "must be in [1, 16777216], got 16777217"),
        (["--kd-alpha-schedule", "linear", "--kd-alpha-final", "0.1", "--kd-schedule-updates=-5"],
         "--kd-schedule-updates must be >= 0 (0: --max-update), got -5"),
        (["--kd-loss", "mi", "--kd-mi-negatives", "0"], "--kd-mi-negatives must be > 0"),
        # an option of a term left off
        (["--kd-selection-rate", "0.3"], "--kd-selection-rate 0.3 has no effect without --kd-selection batch or"),
        (["--kd-selection", "batch", "--kd-selection-queue-size", "9"], "queue-size 9 has no effect without --kd-selection global"),
        (["--kd-mi-negatives", "7"], "--kd-mi-negatives 7 has no effect without --kd-loss mi"),
        (["--kd-schedule-updates", "100"], "--kd-schedule-updates 100 has no effect without --kd-alpha-schedule or"),
        (["--kd-hidden-distance", "cosine", "--kd-attn-weight", "1"], "cosine has no effect without --kd-hidden-weight > 0"),
        (["--kd-attn-distance", "mse", "--kd-hidden-weight", "1"], "mse has no effect without --kd-attn-weight > 0"),
        (["--kd-hidden-map", "enc:0-0"], "--kd-hidden-map enc:0-0 has no effect without --kd-hidden-weight, --kd-relation"),
        # not-a-number and infinity fail every range check
        (["--kd-temperature", "nan"], "--kd-temperature must be > 0 and finite, got nan"),
        (["--kd-temperature", "inf"], "--kd-temperature must be > 0 and finite, got inf"),
        (["--kd-temperature-schedule", "linear", "--kd-temperature-final", "inf", "--max-update", "9"],
         "--kd-temperature-final must be > 0 and finite"),
        (["--kd-alpha", "nan"], "--kd-alpha must be in [0, 1], got nan"),
        (["--kd-hidden-weight", "nan"], "--kd-hidden-weight must be >= 0 and finite, got nan"),
        (["--kd-relation-weight", "inf"], "--kd-relation-weight must be >= 0 and finite, got inf"),
        (["--kd-hidden-weight", "1", "--decoder-layerdrop", "0.2"], "--decoder-layerdrop (0.2) skip student layers"),
        # the attention is read in the layers' first pass, which activation checkpointing runs without gradients
        (["--kd-attn-weight", "1", "--checkpoint-activations"], "--offload-activations run without gradients"),
        (["--teacher-path", "{teacher}:{teacher}", "--teacher-weights", "nan,1"], "must be non-negative and finite"),
        (["--init-student-from-teacher", "first", "--arch", "transformer", "--encoder-attention-heads", "4",
          "--decoder-attention-heads", "4"], "the student's attention heads {'enc': 4, 'dec': 4} differ"),
    ],
)
def test_impossible_strategy_options_are_refused(data_bin, teacher, flags, message):
    flags = [flag.format(teacher=teacher) for flag in flags]
    with pytest.raises(FairseqKDError) as error:
        build(data_bin, "--teacher-path", teacher, *flags)
    assert message in str(error.value)


def test_per_position_losses_are_refused(data_bin, teacher):
    """The layer and teacher-mixture terms are sums over the batch: a loss per position would repeat them."""
    task, model, criterion = build(data_bin, "--teacher-path", teacher)
    with pytest.raises(ValueError, match=r"summed loss only \(reduce=True\)"):
        criterion(model, first_batch(task), reduce=False)


def test_confidence_weighting_favours_the_teacher_that_predicts_the_reference(data_bin, teacher, weak_teacher):
    task, model, criterion = build(data_bin, "--teacher-path", f"{teacher}:{weak_teacher}",
                                   "--teacher-weighting", "confidence")
    sample = first_batch(task)
    weights = teacher_output(task, model, sample).weights
    assert torch.allclose(weights.sum(0), torch.ones_like(weights[0]))
    _, _, log = criterion(model, sample)
    assert log["teacher_weight_0"] / sample["ntokens"] > 0.8  # the trained teacher, against the noisy one
    # teachers that agree everywhere: the fixed mixture
    same = build(data_bin, "--teacher-path", f"{teacher}:{teacher}", "--teacher-weighting", "confidence")[0]
    fixed = build(data_bin, "--teacher-path", teacher)[0]
    assert torch.allclose(teacher_output(same, model, sample).lprobs, teacher_output(fixed, model, sample).lprobs,
                          atol=1e-5)


def test_learned_weighting_trains_towards_the_better_teacher(data_bin, teacher, weak_teacher):
    task, model, criterion = build(data_bin, "--teacher-path", f"{teacher}:{weak_teacher}",
                                   "--teacher-weighting", "learned")
    logits = criterion.teacher_weight_logits
    assert [name for name, _ in criterion.named_parameters()] == ["teacher_weight_logits"]
    optimizer = torch.optim.SGD(criterion.parameters(), lr=0.01)

    class Backward:  # the slice of fairseq's optimizer interface that train_step uses
        def backward(self, loss):
            loss.backward()

    before = torch.softmax(logits.detach(), 0)[0].item()
    for update in range(3):
        used = torch.softmax(logits.detach(), 0)[0].item()  # the mixture this step distils from
        optimizer.zero_grad()
        _, _, log = task.train_step(first_batch(task, "train"), model, criterion, Backward(), update_num=update)
        optimizer.step()
    after = torch.softmax(logits.detach(), 0)[0].item()
    assert before == pytest.approx(0.5) and after > before
    assert log["teacher_weight_0"] / log["ntokens"] == pytest.approx(used)
    assert "teacher_mix_nll" in log


@pytest.mark.parametrize("weighting", ["confidence", "learned"])
def test_weighting_needs_several_teachers(data_bin, teacher, weighting):
    with pytest.raises(FairseqKDError, match="weighs several teachers, but --teacher-path names 1"):
        build(data_bin, "--teacher-path", teacher, "--teacher-weighting", weighting)


class Backward:
    """What fairseq's optimizer does in a train step, without one."""

    def backward(self, loss):
        loss.backward()


def test_cpu_bf16_runs_the_forward_pass_in_bfloat16_and_keeps_float32_gradients(data_bin, teacher, monkeypatch):
    monkeypatch.setattr(distillation, "cpu_has_bf16_kernels", lambda: True)  # any CPU runs it, fast or not
    def train_step(*flags):
        task, model, criterion = build(data_bin, "--teacher-path", teacher, "--kd-alpha", 0.5, *flags)
        dtypes = []
        model.decoder.output_projection.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
        loss, _, _ = task.train_step(first_batch(task, "train"), model, criterion, Backward(), 0)
        return loss, dtypes, model
    loss, dtypes, model = train_step("--cpu-bf16")
    loss_fp32, dtypes_fp32, _ = train_step()
    assert dtypes == [torch.bfloat16] and dtypes_fp32 == [torch.float32]
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(loss_fp32.item(), rel=0.02)
    assert all(p.grad.dtype == torch.float32 and p.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_cpu_bf16_needs_the_cpu_and_its_bfloat16_kernels(data_bin, monkeypatch):
    def setup(*flags):
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, [str(data_bin), "--user-dir", PLUGIN, "--task", "translation_distillation",
                                                    "--arch", "transformer_student_tiny", "--cpu-bf16", *flags])
        tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    monkeypatch.setattr(distillation, "cpu_has_bf16_kernels", lambda: True)
    with pytest.raises(FairseqKDError, match="--cpu-bf16 autocasts CPU computations; add --cpu"):
        setup()
    setup("--cpu")
    # an AVX2-only CPU: torch's fallback bfloat16 matrix product, 32x slower than float32 here
    monkeypatch.setattr(distillation, "cpu_has_bf16_kernels", lambda: False)
    with pytest.raises(FairseqKDError, match="--cpu-bf16: this CPU has no bfloat16 matrix kernels"):
        setup("--cpu")
