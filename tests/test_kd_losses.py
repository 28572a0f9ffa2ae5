"""Identities of the pure KD functions on tiny hand-made tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_kd.kd_losses import (
    SCHEDULES,
    confidence_weights,
    ensemble_lprobs,
    kd_kl_loss,
    kd_mi_loss,
    kd_topk_kl_loss,
    lprobs_at_temperature,
    mixture_nll,
    mutual_kl_loss,
    push_recent,
    scheduled_value,
    select_above_quantile,
    select_hardest,
    topk_lprobs,
)


def test_kl_is_zero_when_student_equals_teacher():
    logits = torch.randn(5, 7)
    lprobs_student_t = lprobs_at_temperature(logits, 2.0)
    assert torch.allclose(kd_kl_loss(lprobs_student_t, F.log_softmax(logits, -1), 2.0), torch.zeros(5), atol=1e-6)


def test_kl_matches_hand_computation():
    logits_student = torch.tensor([[0.0, 1.0, 2.0]])
    lprobs_teacher = torch.tensor([[0.5, 0.25, 0.25]]).log()
    temperature = 2.0
    p_teacher_t = torch.tensor([0.5, 0.25, 0.25]).sqrt()  # p^(1/T), renormalised below
    p_teacher_t = p_teacher_t / p_teacher_t.sum()
    p_student_t = torch.tensor([0.0, 0.5, 1.0]).exp()
    p_student_t = p_student_t / p_student_t.sum()
    expected = temperature**2 * (p_teacher_t * (p_teacher_t / p_student_t).log()).sum()
    lprobs_student_t = lprobs_at_temperature(logits_student, temperature)
    assert kd_kl_loss(lprobs_student_t, lprobs_teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_gradient_is_t_times_probability_difference(temperature):
    logits_student = torch.randn(4, 6, requires_grad=True)
    logits_teacher = torch.randn(4, 6)
    lprobs_student_t = lprobs_at_temperature(logits_student, temperature)
    kd_kl_loss(lprobs_student_t, F.log_softmax(logits_teacher, -1), temperature).sum().backward()
    expected = temperature * (
        F.softmax(logits_student.detach() / temperature, -1) - F.softmax(logits_teacher / temperature, -1)
    )
    assert torch.allclose(logits_student.grad, expected, atol=1e-6)


def test_loss_is_float32_for_half_inputs():
    lprobs = F.log_softmax(torch.randn(3, 5), -1).half()
    assert kd_kl_loss(lprobs, lprobs, 1.0).dtype == torch.float32
    assert kd_topk_kl_loss(lprobs, *topk_lprobs(lprobs, 2), 2.0).dtype == torch.float32


def test_topk_with_full_vocabulary_equals_full_kl():
    logits_student, logits_teacher = torch.randn(4, 6), torch.randn(4, 6)
    lprobs_teacher = F.log_softmax(logits_teacher, -1)
    values, ids = topk_lprobs(lprobs_teacher, 6)
    lprobs_student_t = lprobs_at_temperature(logits_student, 2.0)
    assert torch.allclose(
        kd_topk_kl_loss(lprobs_student_t, values, ids, 2.0), kd_kl_loss(lprobs_student_t, lprobs_teacher, 2.0), atol=1e-5
    )


def test_topk_renormalises_the_kept_tokens():
    # teacher 0.6 / 0.3 / 0.1 -> top-2 keeps 2/3 and 1/3
    lprobs_teacher = torch.tensor([[0.6, 0.3, 0.1]]).log()
    logits_student = torch.tensor([[1.0, 0.0, -1.0]])
    values, ids = topk_lprobs(lprobs_teacher, 2)
    assert ids.tolist() == [[0, 1]]
    lprobs_student = F.log_softmax(logits_student, -1)
    q = torch.tensor([2 / 3, 1 / 3])
    expected = (q * (q.log() - lprobs_student[0, :2])).sum()
    assert kd_topk_kl_loss(lprobs_student, values, ids, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_topk_with_renormalised_student_compares_over_the_kept_tokens_only():
    lprobs_teacher = F.log_softmax(torch.randn(4, 6), -1)
    logits_student = torch.randn(4, 6)
    values, ids = topk_lprobs(lprobs_teacher, 2)
    lprobs_student_t = lprobs_at_temperature(logits_student, 2.0)
    loss = kd_topk_kl_loss(lprobs_student_t, values, ids, 2.0, renormalise_student=True)
    # the KL of two distributions over the same 2 tokens
    kept_student = F.log_softmax(logits_student.gather(-1, ids) / 2.0, -1)
    kept_teacher = F.log_softmax(values / 2.0, -1)
    expected = (kept_teacher.exp() * (kept_teacher - kept_student)).sum(-1) * 4.0
    assert torch.allclose(loss, expected, atol=1e-5)
    # the student's other tokens do not move it, where they move the full-softmax comparison
    tail = torch.ones_like(logits_student).scatter(-1, ids, 0.0) * 3.0
    lprobs_tail_t = lprobs_at_temperature(logits_student + tail, 2.0)
    assert torch.allclose(kd_topk_kl_loss(lprobs_tail_t, values, ids, 2.0, renormalise_student=True), loss, atol=1e-5)
    assert not torch.allclose(kd_topk_kl_loss(lprobs_tail_t, values, ids, 2.0), kd_topk_kl_loss(lprobs_student_t, values, ids, 2.0))
    # over the whole vocabulary it is the full KL
    values_all, ids_all = topk_lprobs(lprobs_teacher, 6)
    assert torch.allclose(kd_topk_kl_loss(lprobs_student_t, values_all, ids_all, 2.0, renormalise_student=True),
                          kd_kl_loss(lprobs_student_t, lprobs_teacher, 2.0), atol=1e-5)


def test_ensemble_is_the_weighted_probability_average():
    lp_a, lp_b = F.log_softmax(torch.randn(2, 3, 5), -1), F.log_softmax(torch.randn(2, 3, 5), -1)
    averaged = ensemble_lprobs([lp_a, lp_b], torch.tensor([0.25, 0.75]))
    assert torch.allclose(averaged.exp(), 0.25 * lp_a.exp() + 0.75 * lp_b.exp(), atol=1e-6)
    assert torch.allclose(ensemble_lprobs([lp_a], torch.tensor([1.0])), lp_a)


def test_temperature_one_teacher_is_the_teacher():
    # T = 1: KL(teacher || student) written out directly
    logits_student, lprobs_teacher = torch.randn(3, 4), F.log_softmax(torch.randn(3, 4), -1)
    lprobs_student = F.log_softmax(logits_student, -1)
    expected = (lprobs_teacher.exp() * (lprobs_teacher - lprobs_student)).sum(-1)
    assert torch.allclose(kd_kl_loss(lprobs_student, lprobs_teacher, 1.0), expected, atol=1e-6)
    cold = lprobs_at_temperature(logits_student, 1e-3)
    assert not math.isnan(kd_kl_loss(cold, lprobs_teacher, 1e-3).sum().item())


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("start, final", [(4.0, 1.0), (0.1, 0.9)])
def test_schedules_run_monotonically_from_start_to_final(schedule, start, final):
    values = [scheduled_value(schedule, start, final, n, 100) for n in range(0, 131)]
    assert values[0] == pytest.approx(start)
    assert values[100] == pytest.approx(start if schedule == "constant" else final)
    assert values[100:] == [values[100]] * 31  # held after the schedule ends
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(step * (final - start) >= 0 for step in steps)


def test_schedule_midpoints():
    assert scheduled_value("linear", 4.0, 1.0, 50, 100) == pytest.approx(2.5)
    assert scheduled_value("cosine", 4.0, 1.0, 50, 100) == pytest.approx(2.5)
    assert scheduled_value("cosine", 4.0, 1.0, 25, 100) == pytest.approx(1.0 + 3.0 * (1 + math.cos(math.pi / 4)) / 2)
    assert scheduled_value("exponential", 4.0, 1.0, 50, 100) == pytest.approx(2.0)  # geometric mean


@pytest.mark.parametrize("rate, count", [(0.1, 3), (0.3, 9), (0.5, 15), (0.51, 16), (1.0, 30)])
def test_batch_selection_takes_the_exact_fraction_of_hardest_tokens(rate, count):
    torch.manual_seed(0)
    nll = torch.rand(40) * 5
    mask = torch.ones(40, dtype=torch.bool)
    mask[30:] = False
    nll[30:] = 100.0  # padding with the highest loss must still never be chosen
    selected = select_hardest(nll, mask, rate)
    assert int(selected.sum()) == count  # ceil(rate * 30 tokens), 0.3 * 30 = 9.000000000000002 included
    assert not selected[30:].any()
    if count < 30:
        assert nll[selected].min() >= nll[mask & ~selected].max()


def test_global_selection_uses_the_quantile_of_recent_losses():
    nll = torch.arange(10, dtype=torch.float)
    mask = torch.ones(10, dtype=torch.bool)
    mask[9] = False
    # recent losses 0..99: the top 20 % are those >= 79.2
    selected = select_above_quantile(nll * 10, mask, 0.2, torch.arange(100, dtype=torch.float))
    assert selected.tolist() == [False] * 8 + [True, False]  # 80 is selected, 90 is padding
    # against its own batch, the rate is the fraction selected
    selected = select_above_quantile(nll, mask, 0.5, nll[mask])
    assert selected.tolist() == [False] * 4 + [True] * 5 + [False]


def test_recent_loss_queue_keeps_the_last_entries():
    queue = push_recent(torch.empty(0), torch.tensor([1.0, 2.0, 3.0]), size=4)
    queue = push_recent(queue, torch.tensor([4.0, 5.0]), size=4)
    assert queue.tolist() == [2.0, 3.0, 4.0, 5.0]


def test_ensemble_with_weights_per_position():
    lp_a, lp_b = F.log_softmax(torch.randn(2, 3, 5), -1), F.log_softmax(torch.randn(2, 3, 5), -1)
    w_a = torch.rand(2, 3)
    averaged = ensemble_lprobs([lp_a, lp_b], torch.stack([w_a, 1 - w_a]))
    expected = w_a.unsqueeze(-1) * lp_a.exp() + (1 - w_a).unsqueeze(-1) * lp_b.exp()
    assert torch.allclose(averaged.exp(), expected, atol=1e-6)


def test_confidence_weights_follow_the_reference_probability():
    # teacher a gives the reference 0.6, teacher b 0.2, with fixed weights 0.5 / 0.5 -> 0.75 / 0.25
    reference = torch.tensor([[0.6], [0.2]]).log()
    weights = confidence_weights(reference, torch.tensor([0.5, 0.5]))
    assert torch.allclose(weights, torch.tensor([[0.75], [0.25]]))
    # fixed weights 0.2 / 0.8 -> 0.12 : 0.16
    weights = confidence_weights(reference, torch.tensor([0.2, 0.8]))
    assert torch.allclose(weights, torch.tensor([[0.12 / 0.28], [0.16 / 0.28]]))
    # teachers equally sure of every reference: the fixed weights, at every position
    same = torch.randn(1, 4).expand(3, 4)
    assert torch.allclose(confidence_weights(same, torch.tensor([0.2, 0.3, 0.5])),
                          torch.tensor([0.2, 0.3, 0.5]).unsqueeze(-1).expand(3, 4))


def test_mixture_nll_and_its_gradient_favour_the_better_teacher():
    reference = torch.tensor([[0.6, 0.5], [0.2, 0.1]]).log()
    logits = torch.zeros(2, requires_grad=True)
    loss = mixture_nll(reference, logits)
    assert torch.allclose(loss, -torch.tensor([0.4, 0.3]).log())
    loss.sum().backward()
    assert logits.grad[0] < 0 < logits.grad[1]  # gradient descent raises teacher a's weight


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mutual_kl_is_symmetric_and_each_peer_learns_from_the_other(temperature):
    logits_a = torch.randn(4, 6, requires_grad=True)
    logits_b = torch.randn(4, 6, requires_grad=True)
    a_t, b_t = lprobs_at_temperature(logits_a, temperature), lprobs_at_temperature(logits_b, temperature)
    loss = mutual_kl_loss(a_t, b_t, temperature)
    assert torch.allclose(loss, mutual_kl_loss(b_t, a_t, temperature))
    assert torch.allclose(mutual_kl_loss(a_t, a_t, temperature), torch.zeros(4), atol=1e-6)
    loss.sum().backward()
    p_a, p_b = a_t.detach().exp(), b_t.detach().exp()
    assert torch.allclose(logits_a.grad, temperature * (p_a - p_b), atol=1e-6)
    assert torch.allclose(logits_b.grad, temperature * (p_b - p_a), atol=1e-6)


def test_mi_loss_is_log_of_candidates_when_teacher_rows_are_alike():
    """Every candidate teacher is the same distribution: nothing to tell apart, loss = T^2 log(M + 1)."""
    lprobs_student_t = lprobs_at_temperature(torch.randn(6, 5), 2.0)
    lprobs_teacher = F.log_softmax(torch.randn(1, 5), -1).expand(6, 5)
    loss = kd_mi_loss(lprobs_student_t, lprobs_teacher, 2.0, num_negatives=3)
    assert torch.allclose(loss, torch.full((6,), 4 * math.log(4)), atol=1e-5)
    # M is capped at N - 1: 6 rows give at most 5 negatives
    assert torch.allclose(kd_mi_loss(lprobs_student_t, lprobs_teacher, 2.0, 50), torch.full((6,), 4 * math.log(6)))
    # a batch without a distilled position (every pair's KD switched off) has nothing to contrast
    assert kd_mi_loss(lprobs_student_t[:0], lprobs_teacher[:0], 2.0, 3).shape == (0,)


def test_mi_loss_matches_hand_computation():
    lprobs_student = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]]).log()
    probs_teacher = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    # f(i, j) = sum_v q(j, v) log p(i, v); row 0's candidates are teachers 0 and 1 (M = 1), row 2's 2 and 0
    f = probs_teacher @ lprobs_student.T  # f[j, i]
    expected = torch.stack([torch.logsumexp(torch.stack([f[i, i], f[(i + 1) % 3, i]]), 0) - f[i, i] for i in range(3)])
    assert torch.allclose(kd_mi_loss(lprobs_student, probs_teacher.log(), 1.0, 1), expected, atol=1e-6)


def test_mi_topk_with_full_vocabulary_equals_full_mi():
    lprobs_student_t = lprobs_at_temperature(torch.randn(4, 6), 1.5)
    lprobs_teacher = F.log_softmax(torch.randn(4, 6), -1)
    values, ids = topk_lprobs(lprobs_teacher, 6)
    full = kd_mi_loss(lprobs_student_t, lprobs_teacher, 1.5, 2)
    assert torch.allclose(kd_mi_loss(lprobs_student_t, values, 1.5, 2, ids), full, atol=1e-5)


def test_mi_gradient_is_the_contrastive_formula():
    """d loss_i / d log p(i, .) = -(1 - w_i0) q(i, .) + sum_{m>0} w_im q(i+m, .), w = softmax over candidates."""
    lprobs_student = F.log_softmax(torch.randn(5, 4), -1).requires_grad_()
    probs_teacher = F.softmax(torch.randn(5, 4), -1)
    kd_mi_loss(lprobs_student, probs_teacher.log(), 1.0, 2).sum().backward()
    candidates = torch.stack([probs_teacher.roll(-m, 0) for m in range(3)], 1)  # (N, M+1, V)
    w = torch.softmax((candidates * lprobs_student.detach().unsqueeze(1)).sum(-1), -1)  # (N, M+1)
    expected = (w.unsqueeze(-1) * candidates).sum(1) - candidates[:, 0]
    assert torch.allclose(lprobs_student.grad, expected, atol=1e-6)
