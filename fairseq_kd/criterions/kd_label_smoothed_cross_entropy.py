import math
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
from fairseq_kd.kd_losses import (
    SCHEDULES,
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
        max_update=0,
        ignore_prefix_size=0,
        report_accuracy=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if not 0.0 <= kd_alpha <= 1.0:
            raise FairseqKDError(f"--kd-alpha must be in [0, 1], got {kd_alpha}")
        if kd_temperature <= 0:
            raise FairseqKDError(f"--kd-temperature must be > 0, got {kd_temperature}")
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
                       kd_schedule_updates, lambda v: v > 0, "> 0")
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
        self.set_num_updates(0)

    def set_num_updates(self, num_updates):
        """Called by ``translation_distillation`` before every training step: alpha and T follow the
        update count, so a resumed run continues its schedules exactly."""
        self.kd_alpha = scheduled_value(*self.alpha_schedule, num_updates, self.kd_schedule_updates)
        self.kd_temperature = scheduled_value(*self.temperature_schedule, num_updates, self.kd_schedule_updates)

    def forward(self, model, sample, reduce=True):
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
            if key in ("kd_alpha", "kd_temperature", "kd_distilled") or key.startswith("teacher_weight_"):
                metrics.log_scalar(key, per_token(key), ntokens, round=3)


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
