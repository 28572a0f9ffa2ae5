"""Knowledge-distillation math as pure tensor functions (no fairseq imports).

Shapes: ``N`` target positions (batch and time flattened), ``V`` vocabulary, ``K`` teachers or top-k
entries. Every function works in float32 whatever the input dtype, so losses stay stable under fp16/bf16.

The teacher distribution at temperature ``T`` is ``softmax(log p_teacher / T)``, where ``p_teacher`` is the
(weighted, probability-averaged) teacher distribution at T = 1. For a single teacher this is the usual
``softmax(z_teacher / T)``; defining it from log-probabilities lets the full distribution, its top-k and a
top-k cache share one formula.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


def ensemble_lprobs(lprobs_teachers: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Log of the weighted average of teacher probabilities.

    Args:
        lprobs_teachers: K tensors ``(..., V)`` of teacher log-probabilities.
        weights: ``(K,)`` non-negative weights summing to 1, or ``(K, ...)`` per position (each position's
            K weights summing to 1).
    Returns:
        ``(..., V)`` log-probabilities of ``sum_k weights[k] * p_k``.
    """
    if len(lprobs_teachers) == 1:
        return lprobs_teachers[0].float()
    stacked = torch.stack([lp.float() for lp in lprobs_teachers], dim=0)
    log_w = weights.float().log().to(stacked.device)
    log_w = log_w.reshape(*log_w.shape, *([1] * (stacked.dim() - log_w.dim())))
    return torch.logsumexp(stacked + log_w, dim=0)


def confidence_weights(lprobs_reference_teachers: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-position teacher weights proportional to each teacher's fixed weight times its probability of
    the reference token: the teachers that predict the reference best count most there.

    Args:
        lprobs_reference_teachers: ``(K, ...)`` each teacher's log-probability of the reference token.
        weights: ``(K,)`` fixed non-negative weights summing to 1.
    Returns:
        ``(K, ...)`` weights, summing to 1 over K at every position.
    """
    log_w = weights.float().log().to(lprobs_reference_teachers.device)
    log_w = log_w.reshape(-1, *([1] * (lprobs_reference_teachers.dim() - 1)))
    return torch.softmax(lprobs_reference_teachers.float() + log_w, dim=0)


def mixture_nll(lprobs_reference_teachers: torch.Tensor, weight_logits: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the reference tokens under the teacher mixture with weights
    ``softmax(weight_logits)``; minimising it over ``weight_logits`` learns the weights that best explain
    the data.

    Args:
        lprobs_reference_teachers: ``(K, N)`` each teacher's log-probability of the reference token.
        weight_logits: ``(K,)`` learnable logits of the teacher weights.
    Returns:
        ``(N,)`` loss per position.
    """
    log_w = F.log_softmax(weight_logits.float(), dim=0).unsqueeze(-1)
    return -torch.logsumexp(lprobs_reference_teachers.float() + log_w, dim=0)


def topk_lprobs(lprobs_teacher: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` most probable tokens per position.

    Args:
        lprobs_teacher: ``(N, V)`` teacher log-probabilities.
    Returns:
        ``(values, ids)``, both ``(N, k)``: log-probabilities (not renormalised) and token ids.
    """
    return lprobs_teacher.float().topk(k, dim=-1)


def lprobs_at_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` in float32.

    Args:
        logits: ``(N, V)`` logits, or log-probabilities at T = 1 (a constant shift per row does not matter).
    Returns:
        ``(N, V)`` log-probabilities at temperature ``T``.
    """
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kd_kl_loss(
    lprobs_student_t: torch.Tensor, lprobs_teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-position ``T^2 * KL(teacher_T || student_T)`` over the full vocabulary.

    The gradient w.r.t. the student logits is ``T * (p_student_T - p_teacher_T)``; the ``T^2`` keeps the
    gradient scale independent of ``T`` (Hinton et al., 2015).

    Args:
        lprobs_student_t: ``(N, V)`` student log-probabilities at temperature T,
            ``lprobs_at_temperature(lprobs_student, T)``. At T = 1 they are the log-probabilities the
            cross-entropy term has already computed, so KD adds no second softmax over the vocabulary.
        lprobs_teacher: ``(N, V)`` teacher log-probabilities at T = 1.
    Returns:
        ``(N,)`` loss per position.
    """
    lprobs_teacher_t = lprobs_teacher.float()
    if temperature != 1.0:
        lprobs_teacher_t = lprobs_at_temperature(lprobs_teacher_t, temperature)
    kl = (lprobs_teacher_t.exp() * (lprobs_teacher_t - lprobs_student_t.float())).sum(dim=-1)
    return kl * temperature**2


def kd_topk_kl_loss(
    lprobs_student_t: torch.Tensor,
    topk_lprobs_teacher: torch.Tensor,
    topk_ids_teacher: torch.Tensor,
    temperature: float,
    renormalise_student: bool = False,
) -> torch.Tensor:
    """Per-position ``T^2 * KL(q_T || student_T)`` where ``q_T`` is the teacher's top-k, renormalised.

    ``q_T = softmax(topk_lprobs_teacher / T)`` over the k kept tokens. By default the student keeps its
    full softmax, so it is pushed towards the teacher's top-k and away from everything else: at T > 1,
    where the teacher's own distribution would spread over the tail, that asks for a zero tail at T.
    ``renormalise_student`` compares ``q_T`` with the student's distribution renormalised over the same
    k tokens instead, leaving the tail to the cross-entropy term. Both equal ``kd_kl_loss`` when k = V.

    Args:
        lprobs_student_t: ``(N, V)`` student log-probabilities at temperature T (see ``kd_kl_loss``).
        topk_lprobs_teacher: ``(N, k)`` teacher log-probabilities at T = 1 (any constant shift is fine).
        topk_ids_teacher: ``(N, k)`` token ids of those entries.
        renormalise_student: compare over the k tokens only.
    Returns:
        ``(N,)`` loss per position.
    """
    lprobs_student_t = lprobs_student_t.float().gather(-1, topk_ids_teacher)
    if renormalise_student:
        lprobs_student_t = lprobs_student_t - torch.logsumexp(lprobs_student_t, dim=-1, keepdim=True)
    lprobs_teacher_t = lprobs_at_temperature(topk_lprobs_teacher, temperature)
    kl = (lprobs_teacher_t.exp() * (lprobs_teacher_t - lprobs_student_t)).sum(dim=-1)
    return kl * temperature**2


def kd_mi_loss(
    lprobs_student_t: torch.Tensor,
    lprobs_teacher: torch.Tensor,
    temperature: float,
    num_negatives: int,
    ids_teacher: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-position ``T^2 *`` InfoNCE loss: the mutual-information variant of the KD term.

    A critic scores student position ``i`` against the teacher distribution ``q_T`` of position ``j`` by
    ``f(i, j) = sum_v q_T(j, v) * log p_student_T(i, v)``, the negative cross-entropy. Each position is
    contrasted with the teachers of the ``M`` positions that follow it in the flattened batch (wrapping
    round; mostly other tokens of the same sentence)::

        loss_i = T^2 * (logsumexp_{m=0..M} f(i, i+m) - f(i, i))

    so ``log(M + 1) - loss / T^2`` is a lower bound on the mutual information between the student's and
    the teacher's distributions at a position (van den Oord et al., 2018; Tian et al., 2020, CRD). Its
    positive term is the cross-entropy of KL distillation; the other terms push the student away from the
    distributions the teacher gives other positions, and the loss fades once the student's predictions
    identify their own position's teacher. With all teacher rows equal it is ``T^2 * log(M + 1)``.

    Args:
        lprobs_student_t: ``(N, V)`` student log-probabilities at temperature T, non-padding rows only
            (the rows are each other's negatives).
        lprobs_teacher: ``(N, V)`` teacher log-probabilities at T = 1, or ``(N, k)`` top-k entries.
        num_negatives: ``M``, capped at ``N - 1``.
        ids_teacher: ``(N, k)`` the token ids of top-k entries; None for a full distribution.
    Returns:
        ``(N,)`` loss per position.
    """
    student = lprobs_student_t.float()
    if student.size(0) == 0:  # no distilled position in the batch (e.g. every pair's KD switched off)
        return student.new_zeros(0)
    probs_teacher_t = lprobs_at_temperature(lprobs_teacher, temperature).exp()
    scores = []
    for shift in range(min(num_negatives, student.size(0) - 1) + 1):  # shift 0: the position's own teacher
        probs = probs_teacher_t.roll(-shift, dims=0)
        lprobs = student if ids_teacher is None else student.gather(-1, ids_teacher.roll(-shift, dims=0))
        scores.append((probs * lprobs).sum(dim=-1))
    scores = torch.stack(scores, dim=-1)
    return (torch.logsumexp(scores, dim=-1) - scores[:, 0]) * temperature**2


SCHEDULES = ("constant", "linear", "exponential", "cosine")


def scheduled_value(schedule: str, start: float, final: float, num_updates: int, schedule_updates: int) -> float:
    """A hyper-parameter annealed from ``start`` at update 0 to ``final`` at ``schedule_updates``, held
    there afterwards. A pure function of the update count, so a resumed run continues the schedule exactly.

    ``linear`` interpolates; ``exponential`` interpolates geometrically (needs ``start, final > 0``);
    ``cosine`` follows half a cosine, flat at both ends; ``constant`` stays at ``start``.
    """
    if schedule == "constant":
        return start
    progress = min(num_updates / schedule_updates, 1.0)
    if schedule == "linear":
        return start + (final - start) * progress
    if schedule == "exponential":
        return start * (final / start) ** progress
    if schedule == "cosine":
        return final + (start - final) * (1.0 + math.cos(math.pi * progress)) / 2.0
    raise ValueError(f"unknown schedule {schedule!r}, expected one of {', '.join(SCHEDULES)}")


def select_hardest(nll_student: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
    """Batch-level selective KD (Wang et al., 2021): the ``ceil(rate * n)`` positions with the highest
    student cross-entropy among the ``n`` positions in ``mask``.

    Args:
        nll_student: ``(N,)`` student negative log-likelihood of the reference token.
        mask: ``(N,)`` bool, the positions that may be selected (not padding).
    Returns:
        ``(N,)`` bool, the selected positions.
    """
    count = math.ceil(rate * int(mask.sum()) - 1e-9)  # rate * n is often a float a hair above an integer
    scores = nll_student.detach().float().masked_fill(~mask, float("-inf"))
    selected = torch.zeros_like(mask)
    selected[scores.topk(count).indices] = True
    return selected


def select_above_quantile(nll_student: torch.Tensor, mask: torch.Tensor, rate: float, recent_nll: torch.Tensor) -> torch.Tensor:
    """Global-level selective KD (Wang et al., 2021): the positions in ``mask`` whose student
    cross-entropy is at least the ``1 - rate`` quantile of ``recent_nll``, the losses of recent tokens.

    Args:
        nll_student: ``(N,)`` student negative log-likelihood of the reference token.
        mask: ``(N,)`` bool, the positions that may be selected (not padding).
        recent_nll: ``(Q,)`` recent per-token losses, ``Q > 0``.
    Returns:
        ``(N,)`` bool, the selected positions.
    """
    threshold = torch.quantile(recent_nll.float(), 1.0 - rate)
    return mask & (nll_student.detach().float() >= threshold)


def push_recent(recent_nll: torch.Tensor, nll_new: torch.Tensor, size: int) -> torch.Tensor:
    """First-in first-out queue of the last ``size`` per-token losses: ``(Q,)`` + ``(M,)`` -> ``(min(Q + M, size),)``."""
    return torch.cat([recent_nll.to(nll_new.device), nll_new.detach().float()])[-size:]


def mutual_kl_loss(lprobs_a_t: torch.Tensor, lprobs_b_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Deep mutual learning: per-position ``T^2 * (KL(b_T || a_T) + KL(a_T || b_T))``, each peer's
    distribution a fixed (detached) target for the other, so peer a's gradient is ``T * (p_a_T - p_b_T)``
    and peer b's the reverse. Symmetric in a and b.

    Args:
        lprobs_a_t: ``(N, V)`` peer a's log-probabilities at temperature T.
        lprobs_b_t: ``(N, V)`` peer b's log-probabilities at temperature T.
    Returns:
        ``(N,)`` loss per position.
    """
    a, b = lprobs_a_t.float(), lprobs_b_t.float()
    target_a, target_b = a.detach(), b.detach()
    kl_to_b = (target_b.exp() * (target_b - a)).sum(dim=-1)
    kl_to_a = (target_a.exp() * (target_a - b)).sum(dim=-1)
    return (kl_to_b + kl_to_a) * temperature**2


HIDDEN_DISTANCES = ("mse", "cosine")


def kd_hidden_loss(hidden_student: torch.Tensor, hidden_teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-position distance between a student layer's hidden states (projected to the teacher's width
    when the widths differ) and the mapped teacher layer's.

    Args:
        hidden_student: ``(N, C)`` student hidden states, in the teacher's width C.
        hidden_teacher: ``(N, C)`` teacher hidden states.
        distance: ``mse``, the mean squared difference over the C channels, or ``cosine``, 1 - cosine
            similarity.
    Returns:
        ``(N,)`` loss per position.
    """
    student, teacher = hidden_student.float(), hidden_teacher.float()
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    return (student - teacher).pow(2).mean(dim=-1)


def self_relation_lprobs(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM-style relations of a layer's positions: ``log_softmax(h h^T / sqrt(C))`` over the real
    positions of the same sentence.

    Args:
        hidden: ``(B, T, C)`` hidden states.
        mask: ``(B, T)`` True at real (non-padding) positions.
    Returns:
        ``(B, T, T)``: row t is position t's log-distribution over the sentence's positions.
    """
    with torch.autocast(hidden.device.type, enabled=False):  # autocast would run the product in 16 bits
        hidden = hidden.float()
        scores = hidden @ hidden.transpose(1, 2) / math.sqrt(hidden.size(-1))
        return F.log_softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)


def kd_relation_loss(hidden_student: torch.Tensor, hidden_teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(teacher relations || student relations)``: each position's distribution over
    the positions of its sentence (``self_relation_lprobs``) matched to the teacher's. Relations are
    T x T whatever the width, so no projection is needed between layers of different widths.

    Args:
        hidden_student: ``(B, T, C_student)``; hidden_teacher: ``(B, T, C_teacher)``.
        mask: ``(B, T)`` True at real positions.
    Returns:
        ``(B, T)`` loss per position, 0 at padding.
    """
    lprobs_student = self_relation_lprobs(hidden_student, mask)
    lprobs_teacher = self_relation_lprobs(hidden_teacher, mask)
    # padded keys have probability 0 on both sides: drop their -inf - -inf before it meets the product
    difference = (lprobs_teacher - lprobs_student).masked_fill(~mask.unsqueeze(1), 0.0)
    kl = (lprobs_teacher.exp() * difference).sum(dim=-1)
    return kl.masked_fill(~mask, 0.0)


ATTENTION_DISTANCES = ("kl", "mse")


def match_heads(lprobs_teacher: torch.Tensor, student_heads: int) -> torch.Tensor:
    """The teacher's attention log-probabilities ``(B, H_teacher, T, S)`` brought to the student's head
    count: groups of H_teacher / H_student consecutive teacher heads averaged (in probability), or each
    teacher head repeated for H_student / H_teacher student heads.

    Returns:
        ``(B, H_student, T, S)`` log-probabilities.
    """
    teacher_heads = lprobs_teacher.size(1)
    if teacher_heads == student_heads:
        return lprobs_teacher
    if teacher_heads % student_heads == 0:
        group = teacher_heads // student_heads
        grouped = lprobs_teacher.unflatten(1, (student_heads, group))
        return torch.logsumexp(grouped, dim=2) - math.log(group)
    if student_heads % teacher_heads == 0:
        return lprobs_teacher.repeat_interleave(student_heads // teacher_heads, dim=1)
    raise ValueError(
        f"the student's {student_heads} attention heads and the teacher's {teacher_heads} do not divide one"
        " another, so heads cannot be matched"
    )


def kd_attention_loss(
    lprobs_student: torch.Tensor, lprobs_teacher: torch.Tensor, key_mask: torch.Tensor, distance: str
) -> torch.Tensor:
    """Per-query distance between the student's attention distributions and the teacher's (heads
    matched by ``match_heads``), averaged over heads.

    Args:
        lprobs_student: ``(B, H_student, T, S)`` attention log-probabilities.
        lprobs_teacher: ``(B, H_teacher, T, S)``.
        key_mask: ``(B, S)`` True at real keys.
        distance: ``kl``, KL(teacher || student) summed over keys, or ``mse``, the squared difference of the
            probabilities summed over keys.
    Returns:
        ``(B, T)`` loss per query position.
    """
    lprobs_student = lprobs_student.float()
    lprobs_teacher = match_heads(lprobs_teacher.float(), lprobs_student.size(1))
    padded = ~key_mask[:, None, None, :]
    if distance == "mse":
        terms = (lprobs_teacher.exp() - lprobs_student.exp()).pow(2)
    else:
        # keys masked out (padding, future positions) have probability 0 on both sides: drop their
        # -inf - -inf before it meets the product
        difference = (lprobs_teacher - lprobs_student).masked_fill(~lprobs_teacher.isfinite(), 0.0)
        terms = lprobs_teacher.exp() * difference
    return terms.masked_fill(padded, 0.0).sum(dim=-1).mean(dim=1)
