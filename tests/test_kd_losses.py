"""Identities of the pure KD functions on tiny hand-made tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_kd.kd_losses import ensemble_lprobs, kd_kl_loss, kd_topk_kl_loss, lprobs_at_temperature, topk_lprobs


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
