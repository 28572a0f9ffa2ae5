"""``kd_label_smoothed_cross_entropy``: label-smoothed cross-entropy plus the distillation terms.

    loss = (1 - alpha) * CE_ls + alpha * sum_{selected tokens} KD_T + sum_l w_l * layer_l [+ mixture NLL]

``KD_T`` is word-level KD from the task's teachers (``Teachers.predict``) or, for mutual learning, from
the other peer; alpha and T follow their schedules; the layer terms and the learned teacher mixture's
likelihood are added when enabled. The parts live in ``kd_terms``, the math in ``fairseq_kd.kd_losses``.
"""
import fnmatch
import logging
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

from fairseq_kd.checkpoints import check_resumed_settings, resumed_checkpoint_path
from fairseq_kd.criterions.kd_terms import LayerKD, Schedule, TokenSelection, WordKD
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.kd_losses import ATTENTION_DISTANCES, HIDDEN_DISTANCES, SCHEDULES, lprobs_at_temperature, mixture_nll, mutual_kl_loss
from fairseq_kd.tasks.distillation import DistillationTaskMixin, Student
from fairseq_kd.teachers import Teachers

logger = logging.getLogger(__name__)

SELECTIONS = ("none", "batch", "global")
KD_LOSSES = ("kl", "mi")
# logged by mutual learning and the learned teacher mixture (the terms declare theirs)
LOGGED = {"peer_nll_loss": "bits", "teacher_mix_nll": "bits", "teacher_weight_*": "per_token"}


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
    kd_topk_student: ChoiceEnum(["full", "renormalised"]) = field(
        default="full",
        metadata={
            "help": "with --kd-topk or a top-k cache: 'full' compares the teacher's renormalised top k with the"
            " student's full softmax (pushing the student's other tokens down); 'renormalised' with the student's"
            " distribution renormalised over the same k tokens. At --kd-temperature > 1 'full' asks for a zero"
            " tail at T, which made students overrun (examples/multi30k/README.md, step 7)"
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
        metadata={"help": "tokens in the queue of recent losses of --kd-selection global (per worker process; a"
                          " resumed run fills it again from its first batches)"},
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
    kd_allow_changed_settings: bool = field(
        default=False,
        metadata={"help": "resume a run whose checkpoint was trained with other --kd-* options, logging each change"},
    )
    max_update: int = II("optimization.max_update")
    max_tokens: Optional[int] = II("dataset.max_tokens")
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")
    continue_once: Optional[str] = II("checkpoint.continue_once")
    reset_optimizer: bool = II("checkpoint.reset_optimizer")


def check_options_in_use(cfg):
    """An option set away from its default that only a term switched off reads (a forgotten --kd-selection,
    a weight left at 0) would train something else without a word: refused, as --kd-NAME-final is with a
    constant schedule."""
    layer_kd = cfg.kd_hidden_weight > 0 or cfg.kd_relation_weight > 0 or cfg.kd_attn_weight > 0
    scheduled = str(cfg.kd_alpha_schedule) != "constant" or str(cfg.kd_temperature_schedule) != "constant"
    read_only_with = {
        "kd_schedule_updates": ("--kd-alpha-schedule or --kd-temperature-schedule other than constant", scheduled),
        "kd_mi_negatives": ("--kd-loss mi", str(cfg.kd_loss) == "mi"),
        "kd_selection_rate": ("--kd-selection batch or global", str(cfg.kd_selection) != "none"),
        "kd_selection_queue_size": ("--kd-selection global", str(cfg.kd_selection) == "global"),
        "kd_hidden_distance": ("--kd-hidden-weight > 0", cfg.kd_hidden_weight > 0),
        "kd_attn_distance": ("--kd-attn-weight > 0", cfg.kd_attn_weight > 0),
        "kd_hidden_map": ("--kd-hidden-weight, --kd-relation-weight or --kd-attn-weight > 0", layer_kd),
    }
    for name, (needed, in_use) in read_only_with.items():
        value, default = getattr(cfg, name), getattr(KDLabelSmoothedCrossEntropyCriterionConfig, name)
        if not in_use and str(value) != str(default):
            option = "--" + name.replace("_", "-")
            raise FairseqKDError(f"{option} {value} has no effect without {needed}: add that, or drop {option}")


@register_criterion("kd_label_smoothed_cross_entropy", dataclass=KDLabelSmoothedCrossEntropyCriterionConfig)
class KDLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy plus KD from the teachers of a distillation task (see the module)."""

    def __init__(self, cfg: KDLabelSmoothedCrossEntropyCriterionConfig, task):
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        if cfg.kd_schedule_updates < 0:
            raise FairseqKDError(f"--kd-schedule-updates must be >= 0 (0: --max-update), got {cfg.kd_schedule_updates}")
        # any other task (e.g. translation) has no teachers: the criterion is then label-smoothed CE
        distillation = isinstance(task, DistillationTaskMixin)
        self.teachers = task.teachers if distillation else Teachers([])
        student = task.student if distillation else Student(mutual=False)
        updates = self.resumed_schedule_end(cfg)
        if distillation:  # kept in its checkpoints, so that every later resume keeps this end
            task.kd_schedule_end = updates
        self.alpha = Schedule("alpha", cfg.kd_alpha_schedule, cfg.kd_alpha, cfg.kd_alpha_final, updates,
                              lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        self.temperature = Schedule("temperature", cfg.kd_temperature_schedule, cfg.kd_temperature,
                                    cfg.kd_temperature_final, updates, lambda v: 0 < v < math.inf, "> 0 and finite")
        self.mutual = student.mutual
        if self.alpha.largest > 0 and not (self.teachers or self.mutual):
            raise FairseqKDError(
                f"--kd-alpha {cfg.kd_alpha} needs a teacher, but the task has none: give --task"
                " translation_distillation --teacher-path TEACHER.pt (or --teacher-topk-cache DIR), --task"
                " translation_multi_distillation --teacher-paths PAIR:TEACHER.pt,... (or --teacher-topk-caches), or"
                " a peer (--arch transformer_mutual*); or set --kd-alpha 0"
            )
        if str(cfg.kd_loss) == "mi" and self.mutual:
            raise FairseqKDError(
                "--kd-loss mi distils a teacher; deep mutual learning (--arch transformer_mutual*) uses the"
                " symmetric KL between its peers: drop --kd-loss mi"
            )
        if cfg.kd_topk and self.mutual:
            raise FairseqKDError(
                f"--kd-topk {cfg.kd_topk} keeps a teacher's top k; deep mutual learning (--arch transformer_mutual*)"
                " distils each peer's full distribution into the other: drop --kd-topk"
            )
        self.word_kd = WordKD(cfg, self.teachers, len(task.target_dictionary), self.padding_idx, self.ignore_prefix_size)
        if self.alpha.largest > 0 and self.teachers and self.temperature.largest > 1 and self.word_kd.asks_for_a_zero_tail:
            # at T > 1 the teacher's real distribution spreads beyond its top k
            logger.warning(
                f"--kd-temperature {self.temperature.largest:g} with the teacher's top {cfg.kd_topk}: the student's"
                " full softmax is pushed to a zero tail at T, which made students overrun in our measurements;"
                " consider --kd-topk-student renormalised (examples/multi30k/README.md, step 7)"
            )
        self.selection = TokenSelection(cfg.kd_selection, cfg.kd_selection_rate, cfg.kd_selection_queue_size)
        self.layer_kd = LayerKD(cfg, self.teachers, student, self.padding_idx)
        check_options_in_use(cfg)
        self.learned_mixture = self.teachers.weighting == "learned"
        if self.learned_mixture:
            # trained by fairseq's optimizer with the student and saved in its checkpoints' criterion state
            self.teacher_weight_logits = torch.nn.Parameter(self.teachers.weights.clamp_min(1e-4).log())

    def load_state_dict(self, state_dict, strict=True):
        """The learned teacher weights and hidden-state projections, from the checkpoint fairseq-train starts
        from. fairseq loads them from every checkpoint, --finetune-from-model's included: one written without
        them (a run without these options, or other ones under --kd-allow-changed-settings) leaves them as
        initialised, where fairseq would stop on "Cannot load model parameters"."""
        shapes = {name: value.shape for name, value in self.state_dict().items()}
        if state_dict is None or {name: value.shape for name, value in state_dict.items()} != shapes:
            logger.warning(f"the checkpoint holds no criterion state for these KD options ({', '.join(shapes)}): they"
                           " start as initialised")
            return None
        return super().load_state_dict(state_dict, strict)

    def resumed_schedule_end(self, cfg):
        """The update at which the alpha/T schedules end. A resumed run keeps the end its first run started
        with (a distillation task keeps it in the checkpoints), so that a larger --max-update extends training
        at the final values instead of stretching the schedules backwards, however often it is resumed; any
        other changed --kd-* option, one of the task's resumed_settings(), or its teachers (resumed_state()), is
        refused (checkpoints.check_resumed_settings)."""
        settings = {name: getattr(cfg, name) for name in cfg if name.startswith("kd_")
                    and name not in ("kd_allow_changed_settings", "kd_schedule_updates")}
        settings["label_smoothing"] = cfg.label_smoothing
        if cfg.kd_schedule_updates:
            settings["kd_schedule_updates"] = cfg.kd_schedule_updates
        current, task_state = {"criterion": settings}, None
        if isinstance(self.task, DistillationTaskMixin):
            current["task"] = self.task.resumed_settings()
            task_state = (type(self.task).__name__, self.task.resumed_state)
        resumed = resumed_checkpoint_path(cfg.save_dir, cfg.restore_file, cfg.checkpoint_suffix, cfg.continue_once)
        saved = check_resumed_settings(current, resumed, cfg.reset_optimizer, cfg.kd_allow_changed_settings, task_state)
        if saved is None or cfg.kd_schedule_updates:
            return cfg.kd_schedule_updates or cfg.max_update
        saved_cfg, state = saved
        kept = type(self.task).saved_kd_schedule_end(state) if isinstance(self.task, DistillationTaskMixin) else None
        return kept or saved_cfg.criterion.get("kd_schedule_updates") or saved_cfg.optimization.max_update

    def forward(self, model, sample, reduce=True):
        if not reduce:  # the layer and teacher-mixture terms are sums over the batch, not per position
            raise ValueError("kd_label_smoothed_cross_entropy gives the batch's summed loss only (reduce=True)")
        mixture_weights = torch.softmax(self.teacher_weight_logits.detach().float(), 0) if self.learned_mixture else None
        teacher = self.teachers.predict(sample, model, mixture_weights, self.layer_kd.active, self.layer_kd.needs_attention)
        with self.layer_kd.capture(model) as student_layers:
            net_output = model(**sample["net_input"])
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        position_weights = None if teacher is None else teacher.position_weights
        if position_weights is None:
            loss, nll_loss = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx)
        else:  # each position's cross-entropy is mixed into the KD term below: one pass over the vocabulary for both
            position_weights = position_weights[:, self.ignore_prefix_size :].reshape(-1).to(target.device)
            position_ce, nll_loss = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx,
                                                            reduce=False)
            loss, nll_loss = position_ce.sum(), nll_loss.sum()
        log = {
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample["target"].size(0) if self.sentence_avg else sample["ntokens"],
        }
        if self.mutual or teacher is not None:
            alpha, temperature = self.alpha.at(self.task.num_updates), self.temperature.at(self.task.num_updates)
            lprobs_t = self.lprobs_at(lprobs, temperature)
            if self.mutual:  # deep mutual learning: both peers' cross-entropies, KL both ways
                peer_loss, lprobs_peer_t, log["peer_nll_loss"] = self.peer_terms(model, net_output, sample, temperature)
                loss = loss + peer_loss
                kd = mutual_kl_loss(lprobs_t, lprobs_peer_t, temperature)
            else:
                kd = self.word_kd(lprobs_t, teacher, target, temperature)
            real = target.ne(self.padding_idx)
            distillable = real if position_weights is None else real & position_weights.gt(0)
            if position_weights is None and self.teachers.skip_language_token:  # mutual peers: not the language token
                language_token = torch.zeros_like(sample["target"], dtype=torch.bool)
                language_token[:, 0] = True
                distillable = distillable & ~language_token[:, self.ignore_prefix_size :].reshape(-1).to(real.device)
            distil = self.selection(lprobs, target, distillable, model.training)
            kd = kd.masked_fill(~distil, 0.0)
            log["kd_loss"] = kd.sum().data
            if position_weights is not None:  # each position's alpha scaled by its weight: the rest keeps its CE
                kd = position_weights * kd + (1.0 - position_weights) * position_ce.squeeze(-1)
            kd = kd.sum()
            loss = (1.0 - alpha) * loss + alpha * kd
            # token-weighted, so that the logs stay summable across workers
            distilled_share = sample["ntokens"] if position_weights is None else (position_weights * real).sum().data
            log.update(kd_alpha=alpha * distilled_share, kd_temperature=temperature * sample["ntokens"],
                       kd_distilled=distil.sum().data)
        if self.layer_kd.active:
            for key, (term, weight) in self.layer_kd(student_layers, teacher.layers, sample).items():
                loss = loss + weight * term
                log[key] = term.data
        if teacher is not None and teacher.weights is not None:  # several teachers: mean weight per token
            nonpad = sample["target"].ne(self.padding_idx)
            for k, teacher_weights in enumerate(teacher.weights):
                log[f"teacher_weight_{k}"] = teacher_weights[nonpad].sum().data
        log["loss"] = loss.data
        if self.learned_mixture and teacher is not None:
            nonpad = sample["target"].ne(self.padding_idx)
            mix_nll = mixture_nll(teacher.reference[:, nonpad], self.teacher_weight_logits).sum()
            # its gradient reaches only the teacher weights; logged apart from the student's loss
            loss = loss + mix_nll
            log["teacher_mix_nll"] = mix_nll.data
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            log.update(n_correct=n_correct.item(), total=total.item())
        return loss, log["sample_size"], log

    def peer_terms(self, model, net_output, sample, temperature):
        """Mutual learning's second peer: ``(label-smoothed CE, log-probabilities at T, NLL for the log)``."""
        peer_output = net_output[1]["peer_output"]
        lprobs_peer, target = self.get_lprobs_and_target(model.peer, peer_output, sample)
        peer_loss, peer_nll_loss = label_smoothed_nll_loss(lprobs_peer, target, self.eps, ignore_index=self.padding_idx)
        return peer_loss, self.lprobs_at(lprobs_peer, temperature), peer_nll_loss.data

    @staticmethod
    def lprobs_at(lprobs, temperature):
        """A model's ``(N, V)`` log-probabilities at temperature T, from those at T = 1 (its cross-entropy
        term's, as they are at T = 1: KD adds no second softmax over the vocabulary). Not from its logits:
        the same distribution, and the only one an adaptive softmax has."""
        return lprobs if temperature == 1.0 else lprobs_at_temperature(lprobs, temperature)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        declared = {**WordKD.LOGGED, **LayerKD.LOGGED, **LOGGED}
        for key in sorted({key for log in logging_outputs for key in log}):
            unit = next((unit for pattern, unit in declared.items() if fnmatch.fnmatchcase(key, pattern)), None)
            if unit is None:
                continue
            value = sum(log.get(key, 0) for log in logging_outputs) / ntokens
            # losses in bits, like fairseq's; the encoder's layer terms sum over source positions but are
            # shown per target token too
            metrics.log_scalar(key, value / math.log(2) if unit == "bits" else value, ntokens, round=3)
