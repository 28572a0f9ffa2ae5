import math
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.logging import metrics

from fairseq_kd.errors import FairseqKDError
from fairseq_kd.kd_losses import kd_kl_loss, kd_topk_kl_loss, lprobs_at_temperature, topk_lprobs


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


@register_criterion("kd_label_smoothed_cross_entropy", dataclass=KDLabelSmoothedCrossEntropyCriterionConfig)
class KDLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy plus word-level KD from the teacher log-probabilities that
    ``translation_distillation`` puts in ``sample["teacher_lprobs"]``."""

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        kd_alpha,
        kd_temperature,
        kd_topk,
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
        if kd_alpha > 0 and not getattr(task, "teachers", None) and cache_k is None:
            raise FairseqKDError(
                f"--kd-alpha {kd_alpha} needs a teacher, but the task has none: use --task translation_distillation"
                " --teacher-path TEACHER.pt (or --teacher-topk-cache DIR), or set --kd-alpha 0"
            )
        if cache_k is not None and kd_topk != cache_k:
            raise FairseqKDError(
                f"--teacher-topk-cache holds the teachers' top-{cache_k}, so pass --kd-topk {cache_k}"
                f" (got {kd_topk}), or rebuild the cache with fairseq-kd-build-cache --topk {kd_topk}"
            )
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.kd_topk = kd_topk

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
        if "teacher_lprobs" in sample or "teacher_topk" in sample:
            kd_loss = self.compute_kd_loss(net_output, lprobs, sample, target, reduce)
            loss = (1.0 - self.kd_alpha) * ls_loss + self.kd_alpha * kd_loss
            logging_output["loss"] = loss.data
            logging_output["kd_loss"] = kd_loss.data
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.item()
            logging_output["total"] = total.item()
        return loss, logging_output["sample_size"], logging_output

    def compute_kd_loss(self, net_output, lprobs, sample, target, reduce=True):
        """T^2 * KL(teacher_T || student_T) per target token; padding positions give 0. The teacher side
        is the full distribution (``teacher_lprobs``, cut to its top-k with --kd-topk) or a cached top-k
        (``teacher_topk``). ``lprobs`` are the student's ``(N, V)`` log-probabilities from the
        cross-entropy term, reused as they are at T = 1."""
        if self.kd_temperature == 1.0:
            lprobs_student_t = lprobs
        else:
            logits_student = net_output[0][:, self.ignore_prefix_size :, :]
            logits_student = logits_student.reshape(-1, logits_student.size(-1))
            lprobs_student_t = lprobs_at_temperature(logits_student, self.kd_temperature)
        if "teacher_topk" in sample:
            values, ids = (t[:, self.ignore_prefix_size :, :].reshape(-1, self.kd_topk) for t in sample["teacher_topk"])
            kd_loss = kd_topk_kl_loss(lprobs_student_t, values, ids, self.kd_temperature)
        else:
            lprobs_teacher = sample["teacher_lprobs"][:, self.ignore_prefix_size :, :]
            lprobs_teacher = lprobs_teacher.reshape(-1, lprobs_teacher.size(-1))
            if self.kd_topk > 0:
                values, ids = topk_lprobs(lprobs_teacher, self.kd_topk)
                kd_loss = kd_topk_kl_loss(lprobs_student_t, values, ids, self.kd_temperature)
            else:
                kd_loss = kd_kl_loss(lprobs_student_t, lprobs_teacher, self.kd_temperature)
        kd_loss = kd_loss.masked_fill(target.eq(self.padding_idx), 0.0)
        return kd_loss.sum() if reduce else kd_loss.unsqueeze(-1)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        if any("kd_loss" in log for log in logging_outputs):
            kd_loss_sum = sum(log.get("kd_loss", 0) for log in logging_outputs)
            ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
            metrics.log_scalar("kd_loss", kd_loss_sum / ntokens / math.log(2), ntokens, round=3)
