"""``translation_distillation``: fairseq's ``translation`` plus the teachers a student distils from."""
import functools
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from fairseq.dataclass import ChoiceEnum
from omegaconf import II
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_kd.checkpoints import sha256
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.tasks.distillation import DistillationTaskMixin, check_cpu_bf16
from fairseq_kd.teachers import TEACHER_WEIGHTINGS, Teachers
from fairseq_kd.topk_cache import (check_one_data_directory, check_unbucketed_targets, teacher_mixture_built_with,
                                   teachers_built_from)

@dataclass
class TranslationDistillationConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "teacher checkpoint(s), colon-separated like --path; each is loaded with its own saved"
            " config and must use this data's dictionaries. Without it the task is plain translation"
        },
    )
    teacher_weights: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated non-negative weights of the teachers' probability average"
            " (normalised to sum to 1); default: equal weights"
        },
    )
    teacher_weighting: ChoiceEnum(TEACHER_WEIGHTINGS) = field(
        default="fixed",
        metadata={
            "help": "how several teachers are averaged: 'fixed' by --teacher-weights; 'confidence' per target token,"
            " each teacher's --teacher-weights times its probability of the reference token; 'learned' by"
            " softmax(logits) trained with the criterion to maximise the mixture's likelihood of the references"
        },
    )
    init_student_from_teacher: str = field(
        default="none",
        metadata={
            "help": "start the student from the (first) teacher's weights: its embeddings, output layer and"
            " layer norms, and for each student layer a teacher layer: 'first' (teacher layers 0, 1, ...),"
            " 'alternate' (spread evenly: floor(i * L_T / L_S)) or explicit 0-based teacher layers per side like"
            " 'enc:0,2,4;dec:5' (a side left out keeps its random initialisation). A narrower student (model,"
            " FFN or attention-head width) gets them projected: the residual stream onto the embedding table's"
            " top singular directions, the strongest FFN neurons and head dimensions kept. 'none'"
        },
    )
    teacher_topk_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory written by fairseq-kd-build-cache: distil from the teachers' cached top-k"
            " instead of running them (replaces --teacher-path; pass the cache's k as --kd-topk)"
        },
    )
    cpu_bf16: bool = field(
        default=False,
        metadata={
            "help": "with --cpu: forward passes (student, teachers, loss) under torch.autocast to bfloat16, while"
            " weights, gradients and the optimizer stay float32; fairseq's own --bf16 does not run on a CPU."
            " Faster on CPUs with bfloat16 instructions (AVX-512-BF16, AMX); refused on CPUs without AVX-512"
        },
    )
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")
    continue_once: Optional[str] = II("checkpoint.continue_once")
    cpu: bool = II("common.cpu")
    patience: int = II("checkpoint.patience")


@register_task("translation_distillation", dataclass=TranslationDistillationConfig)
class TranslationDistillationTask(DistillationTaskMixin, TranslationTask):
    """``translation`` with frozen teachers (``self.teachers``, from --teacher-path or --teacher-topk-cache)
    that the ``kd_label_smoothed_cross_entropy`` criterion distils from; see ``DistillationTaskMixin``."""

    def __init__(self, cfg: TranslationDistillationConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        check_save_dir(cfg.save_dir, cfg.teacher_path)
        check_cpu_bf16(cfg.cpu_bf16, cfg.cpu)
        self.teachers = Teachers.load(cfg.teacher_path, cfg.teacher_weights, cfg.teacher_weighting, self,
                                      cfg.teacher_topk_cache)
        if cfg.teacher_topk_cache:
            check_one_data_directory(cfg.data, "--teacher-topk-cache")
            check_unbucketed_targets(cfg.num_batch_buckets)

    @functools.cached_property
    def teacher_mixture(self):
        if self.cfg.teacher_topk_cache:
            weights, weighting = teacher_mixture_built_with(self.cfg.teacher_topk_cache)
        elif self.cfg.teacher_path:  # the weighting option is a fairseq enum, which a checkpoint cannot pickle
            weights, weighting = self.teachers.weights.tolist(), str(self.teachers.weighting)
        else:
            return None
        return [[round(w, 6) for w in weights], weighting]  # float32 weights, compared as written

    @functools.cached_property
    def teachers_sha256(self):
        if self.cfg.teacher_topk_cache:
            return teachers_built_from(self.cfg.teacher_topk_cache)
        return [sha256(path) for path in utils.split_paths(self.cfg.teacher_path)] if self.cfg.teacher_path else []

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch, combine, **kwargs)
        self.datasets[split] = self.teachers.wrap_dataset(split, self.datasets[split], self.tgt_dict,
                                                          self.cfg.left_pad_target)


def check_save_dir(save_dir, teacher_paths):
    """The student's checkpoints must not land where a teacher's are: fairseq would resume from the teacher
    or overwrite it."""
    for path in utils.split_paths(teacher_paths) if teacher_paths else []:
        if os.path.realpath(os.path.dirname(path) or ".") == os.path.realpath(save_dir):
            raise FairseqKDError(
                f"--save-dir {save_dir} holds the teacher {path}: the student would resume from it and overwrite its"
                " checkpoints; give the student its own --save-dir"
            )
