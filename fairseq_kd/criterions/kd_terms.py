"""The parts ``kd_label_smoothed_cross_entropy`` combines: schedules, token selection, the word-level KD
term and the intermediate-layer terms. Each checks its own options and declares the keys it logs
(``LOGGED``: key -> ``"bits"``, a loss per target token in bits like fairseq's, or ``"per_token"``, a
value averaged over target tokens); the math is in ``fairseq_kd.kd_losses``."""
import logging
import math
import os
from contextlib import nullcontext

import torch

from fairseq_kd.errors import FairseqKDError
from fairseq_kd.features import ATTENTIONS, attention_heads, layer_counts, layer_outputs, layer_widths, parse_layer_map, side_mask
from fairseq_kd.kd_losses import (
    kd_attention_loss,
    kd_hidden_loss,
    kd_kl_loss,
    kd_mi_loss,
    kd_relation_loss,
    kd_topk_kl_loss,
    push_recent,
    scheduled_value,
    select_above_quantile,
    select_hardest,
)

logger = logging.getLogger(__name__)


class Schedule:
    """A KD option that follows the update count: ``--kd-NAME`` held constant, or annealed to
    ``--kd-NAME-final`` over ``updates`` updates by ``--kd-NAME-schedule`` and final after."""

    def __init__(self, name, kind, start, final, updates, valid, valid_text):
        kind = str(kind)
        if not valid(start):
            raise FairseqKDError(f"--kd-{name} must be {valid_text}, got {start}")
        if kind == "constant":
            if final is not None:
                raise FairseqKDError(
                    f"--kd-{name}-final {final} has no effect with --kd-{name}-schedule constant;"
                    f" choose --kd-{name}-schedule linear, exponential or cosine, or drop --kd-{name}-final"
                )
        elif final is None:
            raise FairseqKDError(f"--kd-{name}-schedule {kind} needs --kd-{name}-final, the value to anneal to")
        elif not valid(final):
            raise FairseqKDError(f"--kd-{name}-final must be {valid_text}, got {final}")
        elif kind == "exponential" and (start <= 0 or final <= 0):
            raise FairseqKDError(
                f"--kd-{name}-schedule exponential needs --kd-{name} and --kd-{name}-final > 0, got {start} and"
                f" {final}; use linear or cosine to reach 0"
            )
        elif updates <= 0:
            raise FairseqKDError(
                f"--kd-{name}-schedule {kind} needs to know when to end: set --kd-schedule-updates N"
                " (or --max-update N, its default)"
            )
        self.kind, self.start, self.final, self.updates = kind, start, final, updates

    def at(self, num_updates):
        return scheduled_value(self.kind, self.start, self.final, num_updates, self.updates)

    @property
    def largest(self):
        return max(self.start, self.final or 0.0)


class TokenSelection:
    """Selective KD (--kd-selection): which real target positions get the KD term. 'batch' keeps the
    --kd-selection-rate of each batch with the highest student cross-entropy; 'global' those above the
    quantile of the last --kd-selection-queue-size training tokens' losses (per worker process)."""

    def __init__(self, kind, rate, queue_size):
        if not 0.0 < rate <= 1.0:
            raise FairseqKDError(f"--kd-selection-rate must be in (0, 1], got {rate}")
        if not 0 < queue_size <= 2**24:  # torch.quantile takes at most 2^24 values
            raise FairseqKDError(f"--kd-selection-queue-size must be in [1, {2**24}], got {queue_size}")
        self.kind, self.rate, self.queue_size = str(kind), rate, queue_size
        self.recent_nll = torch.empty(0)

    def __call__(self, lprobs, target, mask, training):
        """The positions of ``mask`` ``(N,)`` to distil, given the student's ``lprobs`` ``(N, V)``."""
        if self.kind == "none":
            return mask
        nll_student = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if self.kind == "batch" or not mask.any():
            return select_hardest(nll_student, mask, self.rate)
        if training:  # the queue learns from training batches only
            self.recent_nll = push_recent(self.recent_nll, nll_student[mask], self.queue_size)
        recent = self.recent_nll if self.recent_nll.numel() else nll_student[mask]
        return select_above_quantile(nll_student, mask, self.rate, recent)


class WordKD:
    """Word-level KD per target position (--kd-loss): ``T^2 KL(teacher_T || student_T)`` over the
    teacher's full distribution or its top k (--kd-topk, or the cache's k; --kd-topk-student), or an
    InfoNCE bound."""

    LOGGED = {"kd_loss": "bits", "kd_alpha": "per_token", "kd_temperature": "per_token", "kd_distilled": "per_token"}

    def __init__(self, cfg, teachers, vocab_size, padding_idx, ignore_prefix_size):
        if not 0 <= cfg.kd_topk <= vocab_size:
            raise FairseqKDError(
                f"--kd-topk must be between 0 (full distribution) and the vocabulary size {vocab_size},"
                f" got {cfg.kd_topk}"
            )
        if teachers.cache_k is not None and cfg.kd_topk != teachers.cache_k:
            raise FairseqKDError(
                f"--teacher-topk-cache holds the teachers' top-{teachers.cache_k}, so pass --kd-topk"
                f" {teachers.cache_k} (got {cfg.kd_topk}), or rebuild the cache with fairseq-kd-build-cache"
                f" --topk {cfg.kd_topk}"
            )
        if cfg.kd_mi_negatives <= 0:
            raise FairseqKDError(f"--kd-mi-negatives must be > 0, got {cfg.kd_mi_negatives}")
        if str(cfg.kd_loss) == "mi" and cfg.max_tokens:
            check_mi_memory(cfg.kd_mi_negatives, cfg.max_tokens, cfg.kd_topk or vocab_size)
        self.renormalise = str(cfg.kd_topk_student) == "renormalised"
        if self.renormalise and (cfg.kd_topk == 0 or str(cfg.kd_loss) != "kl"):
            raise FairseqKDError(
                "--kd-topk-student renormalised compares the teacher's top k with the student over the same k"
                " tokens: it needs --kd-loss kl and --kd-topk > 0 (or a top-k cache)"
            )
        self.k, self.loss, self.negatives = cfg.kd_topk, str(cfg.kd_loss), cfg.kd_mi_negatives
        self.padding_idx, self.prefix = padding_idx, ignore_prefix_size

    @property
    def asks_for_a_zero_tail(self):
        """A top-k target against the student's full softmax: the tokens outside the k get no mass."""
        return bool(self.k) and self.loss == "kl" and not self.renormalise

    def __call__(self, lprobs_student_t, teacher, target, temperature):
        """``(N,)``: the term at each of the N target positions, from the student's log-probabilities at
        temperature T ``(N, V)`` and the batch's ``TeacherOutput``."""
        values, ids = (None if t is None else t[:, self.prefix:].reshape(target.numel(), -1)
                       for t in teacher.distribution(self.k))
        if self.loss == "mi":
            # only the distilled positions serve as each other's negatives: not padding, nor positions weighted 0
            # (a language token, a pair without a teacher or with its KD switched off)
            real = target.ne(self.padding_idx)
            if teacher.position_weights is not None:
                real &= teacher.position_weights[:, self.prefix:].reshape(-1).to(target.device).gt(0)
            loss = lprobs_student_t.new_zeros(target.shape, dtype=torch.float)
            loss[real] = kd_mi_loss(lprobs_student_t[real], values[real], temperature, self.negatives,
                                    None if ids is None else ids[real])
            return loss
        if ids is None:
            return kd_kl_loss(lprobs_student_t, values, temperature)
        return kd_topk_kl_loss(lprobs_student_t, values, ids, temperature, self.renormalise)


class LayerKD(torch.nn.Module):
    """Intermediate-layer KD between --kd-hidden-map layer pairs of the student and the one teacher run
    online: hidden states (through a learned projection per pair where widths differ, trained with the
    student and kept in the criterion), relations between the hidden states of a sentence's tokens, and
    attention distributions. Off (``active`` False) when all three weights are 0."""

    LOGGED = {"kd_hidden_loss": "per_token", "kd_relation_loss": "per_token", "kd_attn_loss": "per_token"}

    def __init__(self, cfg, teachers, student, padding_idx):
        super().__init__()
        self.weights = {"kd_hidden_loss": cfg.kd_hidden_weight, "kd_relation_loss": cfg.kd_relation_weight,
                        "kd_attn_loss": cfg.kd_attn_weight}
        for key, weight in self.weights.items():
            if not 0 <= weight < math.inf:
                raise FairseqKDError(f"--{key[:-5].replace('_', '-')}-weight must be >= 0 and finite, got {weight}")
        self.hidden_distance, self.attn_distance = str(cfg.kd_hidden_distance), str(cfg.kd_attn_distance)
        self.padding_idx = padding_idx
        self.pairs = []
        self.active = any(self.weights.values())
        if not self.active:
            return
        teacher = teachers.layer_teacher
        if teacher is None or student.layers is None:
            raise FairseqKDError(
                "--kd-hidden-weight/--kd-relation-weight/--kd-attn-weight distil the layers of one teacher run"
                f" online into a Transformer student: give exactly one --teacher-path checkpoint (got"
                f" {len(teachers.models)}; a --teacher-topk-cache holds no hidden states, and a multilingual student"
                " has a teacher per language pair)"
            )
        if student.layer_drop:
            raise FairseqKDError(
                "intermediate-layer KD pairs fixed student layers with teacher layers, and"
                f" --encoder-layerdrop/--decoder-layerdrop ({student.layer_drop:g}) skip student layers at random:"
                " set them to 0"
            )
        teacher_widths = layer_widths(teacher, "teacher")
        self.pairs = parse_layer_map(cfg.kd_hidden_map, student.layers, layer_counts(teacher, "teacher"))
        if self.weights["kd_attn_loss"] > 0:
            check_heads(student.heads, attention_heads(teacher))
            if student.recomputes_layers:
                raise FairseqKDError(
                    "--kd-attn-weight reads the student's attention in the first pass of its layers, which"
                    " --checkpoint-activations/--offload-activations run without gradients (the term would be"
                    " logged and never learned): drop those options, or set --kd-attn-weight 0"
                )
        logger.info("intermediate-layer KD, student layer <- teacher layer (0-based): "
                    + "; ".join(f"{side} {s} <- {t}" for side, s, t in self.pairs))
        if self.weights["kd_hidden_loss"] > 0:
            self.projections = torch.nn.ModuleList(
                torch.nn.Identity() if student.widths[side] == teacher_widths[side]
                else torch.nn.Linear(student.widths[side], teacher_widths[side])
                for side, _, _ in self.pairs
            )

    @property
    def needs_attention(self):
        return self.weights["kd_attn_loss"] > 0

    def capture(self, model):
        """The student's layers during the forward passes inside the block (nothing when off)."""
        return layer_outputs(model, self.needs_attention) if self.active else nullcontext({})

    def forward(self, student_layers, teacher_layers, sample):
        """``{key: (term, weight)}`` of each active term, summed over the layer pairs and real positions."""
        terms = {key: 0.0 for key, weight in self.weights.items() if weight > 0}
        for i, (side, student, teacher) in enumerate(self.pairs):
            mask = side_mask(sample, side, self.padding_idx)
            hidden_student, hidden_teacher = student_layers[side][student], teacher_layers[side][teacher]
            if "kd_hidden_loss" in terms:
                projected = self.projections[i](hidden_student[mask])
                terms["kd_hidden_loss"] += kd_hidden_loss(projected, hidden_teacher[mask], self.hidden_distance).sum()
            if "kd_relation_loss" in terms:
                terms["kd_relation_loss"] += kd_relation_loss(hidden_student, hidden_teacher, mask).sum()
            if "kd_attn_loss" in terms:
                for name in (name for name, (attention_side, _) in ATTENTIONS.items() if attention_side == side):
                    keys = side_mask(sample, "dec" if name == "dec_self" else "enc", self.padding_idx)
                    per_query = kd_attention_loss(student_layers[name][student], teacher_layers[name][teacher],
                                                  keys, self.attn_distance)
                    terms["kd_attn_loss"] += per_query[mask].sum()
        return {key: (term, self.weights[key]) for key, term in terms.items()}


def check_mi_memory(negatives, max_tokens, width):
    """--kd-loss mi keeps, for the backward pass, one (tokens x width) copy of the teacher distributions per
    negative: refuse a batch whose copies would not fit in half of the device's memory."""
    estimate = (min(negatives, max_tokens - 1) + 1) * max_tokens * width * 4
    if torch.cuda.is_available():
        memory, where = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "GPU"
    else:
        memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    if estimate > memory / 2:
        raise FairseqKDError(
            f"--kd-loss mi with --kd-mi-negatives {negatives}, --max-tokens {max_tokens} and {width} teacher"
            f" entries per token needs about {estimate / 2**30:.0f} GiB per batch, more than half of this"
            f" machine's {memory / 2**30:.0f} GiB {where}; lower --kd-mi-negatives or --max-tokens, or distil the"
            " top k (--kd-topk)"
        )


def check_heads(student_heads, teacher_heads):
    """Attention KD matches heads by averaging groups or repeating: one count must divide the other."""
    for side in student_heads:
        small, large = sorted((student_heads[side], teacher_heads[side]))
        if large % small:
            raise FairseqKDError(
                f"--kd-attn-weight: the student's {side} attention has {student_heads[side]} heads and the"
                f" teacher's {teacher_heads[side]}; one count must divide the other for heads to be averaged in"
                " groups or repeated (set --encoder/--decoder-attention-heads), or drop --kd-attn-weight"
            )
