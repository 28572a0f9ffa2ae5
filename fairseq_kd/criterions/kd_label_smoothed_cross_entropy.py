import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II

from fairseq_kd.errors import FairseqKDError
from fairseq_kd.features import (
    ATTENTIONS,
    attention_heads,
    layer_counts,
    layer_outputs,
    layer_widths,
    parse_layer_map,
    side_mask,
)
from fairseq_kd.kd_losses import (
    ATTENTION_DISTANCES,
    HIDDEN_DISTANCES,
    SCHEDULES,
    kd_attention_loss,
    kd_hidden_loss,
    kd_kl_loss,
    kd_mi_loss,
    kd_relation_loss,
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

logger = logging.getLogger(__name__)

SELECTIONS = ("none", "batch", "global")
KD_LOSSES = ("kl", "mi")


@dataclass
class KDLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    kd_alpha: float = field(
        default=0.5,
        metadata={
            "help": "weight of the distillation term, in [0, 1]: loss = (1 - alpha) * label-smoothed CE"
            " + alpha * T^2 * KL(teacher_T || student_T)"
        },
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "softmax temperature T (> 0) of teacher and student in the distillation term"},
    )
    kd_topk: int = field(
        default=0,
        metadata={
            "help": "distil only the teacher's K most probable tokens per position, renormalised;"
            " 0 uses the full distribution"
        },
    )
    kd_loss: ChoiceEnum(KD_LOSSES) = field(
        default="kl",
        metadata={
            "help": "the distillation term: 'kl', T^2 * KL(teacher_T || student_T); 'mi', an InfoNCE lower bound"
            " on the mutual information between student and teacher distributions, other target positions of"
            " the batch as negatives (see fairseq_kd.kd_losses.kd_mi_loss)"
        },
    )
    kd_mi_negatives: int = field(
        default=15, metadata={"help": "--kd-loss mi: target positions each position is contrasted with (> 0)"}
    )
    kd_alpha_schedule: ChoiceEnum(SCHEDULES) = field(
        default="constant",
        metadata={"help": "anneal alpha from --kd-alpha to --kd-alpha-final over --kd-schedule-updates updates"},
    )
    kd_alpha_final: Optional[float] = field(
        default=None, metadata={"help": "alpha at the end of --kd-alpha-schedule, in [0, 1]"}
    )
    kd_temperature_schedule: ChoiceEnum(SCHEDULES) = field(
        default="constant",
        metadata={
            "help": "anneal T from --kd-temperature to --kd-temperature-final over --kd-schedule-updates updates"
        },
    )
    kd_temperature_final: Optional[float] = field(
        default=None, metadata={"help": "T at the end of --kd-temperature-schedule, > 0"}
    )
    kd_schedule_updates: int = field(
        default=0,
        metadata={"help": "updates over which the schedules run, values staying final after; 0: --max-update"},
    )
    kd_selection: ChoiceEnum(SELECTIONS) = field(
        default="none",
        metadata={
            "help": "selective KD: distil only the target tokens on which the student's cross-entropy is highest;"
            " 'batch': the top --kd-selection-rate of each batch, 'global': those above the (1 - rate) quantile"
            " of the last --kd-selection-queue-size tokens' losses"
        },
    )
    kd_selection_rate: float = field(
        default=0.5, metadata={"help": "fraction of target tokens that get the KD term, in (0, 1]"}
    )
    kd_selection_queue_size: int = field(
        default=30000,
        metadata={"help": "tokens in the queue of recent losses of --kd-selection global (per worker process)"},
    )
    kd_hidden_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight (>= 0) of hidden-state KD: the distance between the hidden states of each student"
            " layer and its --kd-hidden-map teacher layer, through a learned projection when widths differ"
        },
    )
    kd_hidden_distance: ChoiceEnum(HIDDEN_DISTANCES) = field(
        default="mse", metadata={"help": "hidden-state KD distance: mean squared error or 1 - cosine similarity"}
    )
    kd_relation_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight (>= 0) of relation KD: KL between the teacher's and the student's token-to-token"
            " relations, softmax(h h^T / sqrt(C)) within each sentence, of --kd-hidden-map layer pairs"
        },
    )
    kd_attn_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight (>= 0) of attention KD: the distance between the attention distributions (encoder"
            " self, decoder self and cross) of --kd-hidden-map layer pairs, teacher heads averaged in groups (or"
            " repeated) when the head counts differ"
        },
    )
    kd_attn_distance: ChoiceEnum(ATTENTION_DISTANCES) = field(
        default="kl", metadata={"help": "attention KD distance: KL(teacher || student) or squared error, per query"}
    )
    kd_hidden_map: str = field(
        default="uniform",
        metadata={
            "help": "student-teacher layer pairs of the intermediate-layer terms: 'uniform' (student layer i of"
            " L_S with teacher layer round((i + 1) * L_T / L_S) - 1, on encoder and decoder) or explicit 0-based"
            " pairs like 'enc:0-1,1-3;dec:0-5'"
        },
    )
    max_update: int = II("optimization.max_update")


@register_criterion("kd_label_smoothed_cross_entropy", dataclass=KDLabelSmoothedCrossEntropyCriterionConfig)
class KDLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy plus word-level KD from the teacher log-probabilities that
    ``translation_distillation`` puts in ``sample["teacher_lprobs"]`` (or the cached top-k in
    ``sample["teacher_topk"]``), with optional alpha/T schedules and selective KD."""

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        kd_alpha,
        kd_temperature,
        kd_topk,
        kd_loss="kl",
        kd_mi_negatives=15,
        kd_alpha_schedule="constant",
        kd_alpha_final=None,
        kd_temperature_schedule="constant",
        kd_temperature_final=None,
        kd_schedule_updates=0,
        kd_selection="none",
        kd_selection_rate=0.5,
        kd_selection_queue_size=30000,
        kd_hidden_weight=0.0,
        kd_hidden_distance="mse",
        kd_relation_weight=0.0,
        kd_attn_weight=0.0,
        kd_attn_distance="kl",
        kd_hidden_map="uniform",
        max_update=0,
        ignore_prefix_size=0,
        report_accuracy=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if not 0.0 <= kd_alpha <= 1.0:
            raise FairseqKDError(f"--kd-alpha must be in [0, 1], got {kd_alpha}")
        if not 0 < kd_temperature < math.inf:
            raise FairseqKDError(f"--kd-temperature must be > 0 and finite, got {kd_temperature}")
        vocab_size = len(task.target_dictionary)
        if not 0 <= kd_topk <= vocab_size:
            raise FairseqKDError(
                f"--kd-topk must be between 0 (full distribution) and the vocabulary size {vocab_size}, got {kd_topk}"
            )
        cache_k = getattr(task, "topk_cache_k", None)
        has_teacher = getattr(task, "teachers", None) or cache_k is not None or getattr(task, "mutual_learning", False)
        if max(kd_alpha, kd_alpha_final or 0.0) > 0 and not has_teacher:
            raise FairseqKDError(
                f"--kd-alpha {kd_alpha} needs a teacher, but the task has none: use --task translation_distillation"
                " --teacher-path TEACHER.pt (or --teacher-topk-cache DIR, or a peer: --arch transformer_mutual),"
                " or set --kd-alpha 0"
            )
        if cache_k is not None and kd_topk != cache_k:
            raise FairseqKDError(
                f"--teacher-topk-cache holds the teachers' top-{cache_k}, so pass --kd-topk {cache_k}"
                f" (got {kd_topk}), or rebuild the cache with fairseq-kd-build-cache --topk {kd_topk}"
            )
        if str(kd_loss) == "mi" and getattr(task, "mutual_learning", False):
            raise FairseqKDError(
                "--kd-loss mi distils a teacher; deep mutual learning (--arch transformer_mutual*) uses the"
                " symmetric KL between its peers: drop --kd-loss mi"
            )
        if kd_mi_negatives <= 0:
            raise FairseqKDError(f"--kd-mi-negatives must be > 0, got {kd_mi_negatives}")
        kd_schedule_updates = kd_schedule_updates or max_update
        check_schedule("alpha", kd_alpha_schedule, kd_alpha, kd_alpha_final, kd_schedule_updates,
                       lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        check_schedule("temperature", kd_temperature_schedule, kd_temperature, kd_temperature_final,
                       kd_schedule_updates, lambda v: 0 < v < math.inf, "> 0 and finite")
        if not 0.0 < kd_selection_rate <= 1.0:
            raise FairseqKDError(f"--kd-selection-rate must be in (0, 1], got {kd_selection_rate}")
        if kd_selection_queue_size <= 0:
            raise FairseqKDError(f"--kd-selection-queue-size must be > 0, got {kd_selection_queue_size}")
        self.kd_topk = kd_topk
        self.kd_loss = str(kd_loss)
        self.kd_mi_negatives = kd_mi_negatives
        self.alpha_schedule = (str(kd_alpha_schedule), kd_alpha, kd_alpha_final)
        self.temperature_schedule = (str(kd_temperature_schedule), kd_temperature, kd_temperature_final)
        self.kd_schedule_updates = kd_schedule_updates
        self.kd_selection = str(kd_selection)
        self.kd_selection_rate = kd_selection_rate
        self.kd_selection_queue_size = kd_selection_queue_size
        self.recent_nll = torch.empty(0)  # --kd-selection global: losses of the last tokens, this process only
        if getattr(task.cfg, "teacher_weighting", "fixed") == "learned":
            # trained by fairseq's optimizer with the student and saved in its checkpoints' criterion state
            self.teacher_weight_logits = torch.nn.Parameter(task.teacher_weights.clamp_min(1e-4).log())
        self.kd_hidden_weight = kd_hidden_weight
        self.kd_hidden_distance = str(kd_hidden_distance)
        self.kd_relation_weight = kd_relation_weight
        self.kd_attn_weight = kd_attn_weight
        self.kd_attn_distance = str(kd_attn_distance)
        self.layer_pairs = self.build_layer_pairs(task, kd_hidden_map)
        self.set_num_updates(0)

    def build_layer_pairs(self, task, layer_map):
        """The (side, student layer, teacher layer) pairs of the intermediate-layer terms, and for
        hidden-state KD between different widths a projection per pair, trained with the student and kept
        in the criterion (fairseq-generate never needs it). None when those terms are off."""
        weights = {"--kd-hidden-weight": self.kd_hidden_weight, "--kd-relation-weight": self.kd_relation_weight,
                   "--kd-attn-weight": self.kd_attn_weight}
        for name, weight in weights.items():
            if not 0 <= weight < math.inf:
                raise FairseqKDError(f"{name} must be >= 0 and finite, got {weight}")
        if not any(weights.values()):
            return None
        teachers = getattr(task, "teachers", [])
        if len(teachers) != 1:
            raise FairseqKDError(
                "--kd-hidden-weight/--kd-relation-weight/--kd-attn-weight distil the layers of one teacher run"
                " online:"
                f" give exactly one --teacher-path checkpoint (got {len(teachers)}; a --teacher-topk-cache holds"
                " no hidden states)"
            )
        teacher_layers, teacher_widths = layer_counts(teachers[0], "teacher"), layer_widths(teachers[0], "teacher")
        pairs = parse_layer_map(layer_map, task.student_layers, teacher_layers)
        if self.kd_attn_weight > 0:
            check_heads(task.student_heads, attention_heads(teachers[0]))
        logger.info(
            "intermediate-layer KD, student layer <- teacher layer (0-based): "
            + "; ".join(f"{side} {student} <- {teacher}" for side, student, teacher in pairs)
        )
        if self.kd_hidden_weight > 0:
            self.hidden_projections = torch.nn.ModuleList(
                torch.nn.Identity()
                if task.student_widths[side] == teacher_widths[side]
                else torch.nn.Linear(task.student_widths[side], teacher_widths[side])
                for side, _, _ in pairs
            )
        return pairs

    def layer_losses(self, layers_student, sample):
        """``(hidden, relation, attention)``: the hidden-state, relation and attention KD terms summed over
        the layer pairs and their real positions (None for a term that is off)."""
        hidden = relation = attention = None
        for i, (side, student, teacher) in enumerate(self.layer_pairs):
            mask = side_mask(sample, side, self.padding_idx)
            hidden_student = layers_student[side][student]
            hidden_teacher = sample["teacher_layers"][side][teacher]
            if self.kd_hidden_weight > 0:
                projected = self.hidden_projections[i](hidden_student[mask])
                term = kd_hidden_loss(projected, hidden_teacher[mask], self.kd_hidden_distance).sum()
                hidden = term if hidden is None else hidden + term
            if self.kd_relation_weight > 0:
                term = kd_relation_loss(hidden_student, hidden_teacher, mask).sum()
                relation = term if relation is None else relation + term
            if self.kd_attn_weight > 0:
                for name in (name for name, (attention_side, _) in ATTENTIONS.items() if attention_side == side):
                    keys = side_mask(sample, "dec" if name == "dec_self" else "enc", self.padding_idx)
                    per_query = kd_attention_loss(layers_student[name][student], sample["teacher_layers"][name][teacher],
                                                  keys, self.kd_attn_distance)
                    term = per_query[mask].sum()
                    attention = term if attention is None else attention + term
        return hidden, relation, attention

    def set_num_updates(self, num_updates):
        """Called by ``translation_distillation`` before every training step: alpha and T follow the
        update count, so a resumed run continues its schedules exactly."""
        self.kd_alpha = scheduled_value(*self.alpha_schedule, num_updates, self.kd_schedule_updates)
        self.kd_temperature = scheduled_value(*self.temperature_schedule, num_updates, self.kd_schedule_updates)

    def forward(self, model, sample, reduce=True):
        capture = self.layer_pairs is not None and "teacher_layers" in sample
        with layer_outputs(model, self.kd_attn_weight > 0) if capture else nullcontext() as layers_student:
            net_output = model(**sample["net_input"])
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        ls_loss, nll_loss = label_smoothed_nll_loss(
            lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=reduce
        )
        loss = ls_loss
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample["target"].size(0) if self.sentence_avg else sample["ntokens"],
        }
        peer_output = net_output[1].get("peer_output") if isinstance(net_output[1], dict) else None
        if peer_output is not None:  # deep mutual learning: both peers' cross-entropies, KL both ways
            lprobs_peer, _ = self.get_lprobs_and_target(model.peer, peer_output, sample)
            peer_ls_loss, peer_nll_loss = label_smoothed_nll_loss(
                lprobs_peer, target, self.eps, ignore_index=self.padding_idx, reduce=reduce
            )
            ls_loss = ls_loss + peer_ls_loss
            logging_output["peer_nll_loss"] = peer_nll_loss.data
            kd_loss = mutual_kl_loss(self.lprobs_t(net_output, lprobs), self.lprobs_t(peer_output, lprobs_peer),
                                     self.kd_temperature)
        elif "teacher_lprobs" in sample or "teacher_topk" in sample:
            kd_loss = self.teacher_kd_loss(net_output, lprobs, target, sample)
        else:
            kd_loss = None
        if kd_loss is not None:
            kd_loss, distilled = self.select_and_sum(kd_loss, lprobs, target, model.training, reduce)
            loss = (1.0 - self.kd_alpha) * ls_loss + self.kd_alpha * kd_loss
            logging_output["loss"] = loss.data
            logging_output["kd_loss"] = kd_loss.data
            # token-weighted, so that the logs stay summable across workers
            logging_output["kd_alpha"] = self.kd_alpha * sample["ntokens"]
            logging_output["kd_temperature"] = self.kd_temperature * sample["ntokens"]
            logging_output["kd_distilled"] = distilled
        if capture:
            for name, weight, term in zip(("kd_hidden_loss", "kd_relation_loss", "kd_attn_loss"),
                                          (self.kd_hidden_weight, self.kd_relation_weight, self.kd_attn_weight),
                                          self.layer_losses(layers_student, sample)):
                if term is not None:
                    loss = loss + weight * term
                    logging_output[name] = term.data
            logging_output["loss"] = loss.data
        if "teacher_weights" in sample:  # several teachers: their mean weight per target token
            nonpad = sample["target"].ne(self.padding_idx)
            for k, weights in enumerate(sample["teacher_weights"]):
                logging_output[f"teacher_weight_{k}"] = weights[nonpad].sum().data
        if hasattr(self, "teacher_weight_logits") and "teacher_lprobs_reference" in sample:
            nonpad = sample["target"].ne(self.padding_idx)
            mix_nll = mixture_nll(sample["teacher_lprobs_reference"][:, nonpad], self.teacher_weight_logits).sum()
            # its gradient reaches only the teacher weights; logged apart from the student's loss
            loss = loss + mix_nll
            logging_output["teacher_mix_nll"] = mix_nll.data
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.item()
            logging_output["total"] = total.item()
        return loss, logging_output["sample_size"], logging_output

    def lprobs_t(self, net_output, lprobs):
        """A model's ``(N, V)`` log-probabilities at the current T: at T = 1 its cross-entropy term's
        ``lprobs`` as they are, so KD adds no second softmax over the vocabulary."""
        if self.kd_temperature == 1.0:
            return lprobs
        logits = net_output[0][:, self.ignore_prefix_size :, :]
        return lprobs_at_temperature(logits.reshape(-1, logits.size(-1)), self.kd_temperature)

    def teacher_kd_loss(self, net_output, lprobs, target, sample):
        """``(N,)`` KD term per target position (--kd-loss). The teacher side is the full distribution
        (``teacher_lprobs``, cut to its top-k with --kd-topk) or a cached top-k (``teacher_topk``);
        ``lprobs`` are the student's, from the cross-entropy term."""
        lprobs_student_t = self.lprobs_t(net_output, lprobs)
        if "teacher_topk" in sample:
            values, ids = (t[:, self.ignore_prefix_size :, :].reshape(-1, self.kd_topk) for t in sample["teacher_topk"])
        else:
            lprobs_teacher = sample["teacher_lprobs"][:, self.ignore_prefix_size :, :]
            lprobs_teacher = lprobs_teacher.reshape(-1, lprobs_teacher.size(-1))
            values, ids = topk_lprobs(lprobs_teacher, self.kd_topk) if self.kd_topk > 0 else (lprobs_teacher, None)
        if self.kd_loss == "mi":
            # padding positions must not serve as negatives: the loss runs on the real tokens only
            real = target.ne(self.padding_idx)
            loss = lprobs_student_t.new_zeros(target.shape, dtype=torch.float)
            loss[real] = kd_mi_loss(lprobs_student_t[real], values[real], self.kd_temperature, self.kd_mi_negatives,
                                    None if ids is None else ids[real])
            return loss
        if ids is None:
            return kd_kl_loss(lprobs_student_t, values, self.kd_temperature)
        return kd_topk_kl_loss(lprobs_student_t, values, ids, self.kd_temperature)

    def select_and_sum(self, kd_loss, lprobs, target, training, reduce=True):
        """``(loss, distilled)``: the per-position KD loss ``(N,)`` with padding and the tokens not chosen
        by --kd-selection set to 0, summed unless ``reduce`` is False, and the number of tokens distilled."""
        distil = target.ne(self.padding_idx)
        if self.kd_selection != "none":
            nll_student = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            distil = self.select_tokens(nll_student, distil, training)
        kd_loss = kd_loss.masked_fill(~distil, 0.0)
        return (kd_loss.sum() if reduce else kd_loss.unsqueeze(-1)), distil.sum().data

    def select_tokens(self, nll_student, mask, training):
        """The positions of ``mask`` that get the KD term under --kd-selection. The global queue learns
        only from training batches, and each worker process keeps its own."""
        if self.kd_selection == "batch" or not mask.any():
            return select_hardest(nll_student, mask, self.kd_selection_rate)
        if training:
            self.recent_nll = push_recent(self.recent_nll, nll_student[mask], self.kd_selection_queue_size)
        recent = self.recent_nll if self.recent_nll.numel() else nll_student[mask]
        return select_above_quantile(nll_student, mask, self.kd_selection_rate, recent)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)

        def per_token(key):
            return sum(log.get(key, 0) for log in logging_outputs) / ntokens

        keys = {key for log in logging_outputs for key in log}
        for key in ("kd_loss", "teacher_mix_nll", "peer_nll_loss"):  # in bits, like fairseq's losses
            if key in keys:
                metrics.log_scalar(key, per_token(key) / math.log(2), ntokens, round=3)
        for key in sorted(keys):
            # per target token, though the encoder's terms sum over source positions
            if key in ("kd_alpha", "kd_temperature", "kd_distilled", "kd_hidden_loss", "kd_relation_loss",
                       "kd_attn_loss") \
                    or key.startswith("teacher_weight_"):
                metrics.log_scalar(key, per_token(key), ntokens, round=3)


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


def check_schedule(name, schedule, start, final, schedule_updates, valid, valid_text):
    """Refuse a schedule that cannot run as asked, naming the option to fix."""
    schedule = str(schedule)
    if schedule == "constant":
        if final is not None:
            raise FairseqKDError(
                f"--kd-{name}-final {final} has no effect with --kd-{name}-schedule constant;"
                f" choose --kd-{name}-schedule linear, exponential or cosine, or drop --kd-{name}-final"
            )
        return
    if final is None:
        raise FairseqKDError(f"--kd-{name}-schedule {schedule} needs --kd-{name}-final, the value to anneal to")
    if not valid(final):
        raise FairseqKDError(f"--kd-{name}-final must be {valid_text}, got {final}")
    if schedule == "exponential" and (start <= 0 or final <= 0):
        raise FairseqKDError(
            f"--kd-{name}-schedule exponential needs --kd-{name} and --kd-{name}-final > 0, got {start} and {final};"
            " use linear or cosine to reach 0"
        )
    if schedule_updates <= 0:
        raise FairseqKDError(
            f"--kd-{name}-schedule {schedule} needs to know when to end: set --kd-schedule-updates N"
            " (or --max-update N, its default)"
        )
