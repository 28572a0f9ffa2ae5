"""What every distillation task adds to its fairseq task, and what the KD criterion may rely on:

- ``teachers``: the ``Teachers`` it owns (empty without --teacher-path/--teacher-topk-cache);
- ``student``: a ``Student`` describing the model ``build_model`` built (None before);
- ``num_updates``: the update count of the latest training step, which the criterion's schedules follow;
- ``kd_schedule_end``: the update at which they end, which the criterion sets and the task keeps in its
  checkpoints (``saved_kd_schedule_end``): every resume of a run keeps its first run's end;
- ``teachers_sha256``: the teachers' checkpoints by content, kept in its checkpoints: a resume with other
  teachers is refused like one with other options (``resumed_state``).

Its checkpoints also hold fairseq-train's early-stopping count (--patience), which fairseq keeps only in
memory: a resumed run stops where the uninterrupted one would have.
"""
import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from fairseq import utils

from fairseq_kd.checkpoints import (check_binarized, damaged_binarized, raised_reading_binarized, read_resumed_checkpoint,
                                   resumed_checkpoint_path, saved_task_state)
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.features import attention_heads, layer_counts, layer_drop, layer_widths, recomputes_layers
from fairseq_kd.models.transformer_mutual import TransformerMutualModel
from fairseq_kd.teachers import Teachers

logger = logging.getLogger(__name__)


def cpu_has_bf16_kernels():
    """Whether torch's bfloat16 matrix products run on oneDNN's kernels on this CPU."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_cpu_bf16(cpu_bf16, cpu):
    """Refuse --cpu-bf16 where it cannot help: off the CPU (fairseq has --bf16/--amp there), and on a CPU
    without bfloat16 matrix kernels (oneDNN's need AVX-512; on an AVX2-only CPU torch falls back to a
    reference matrix product, measured 32x slower than float32: BENCHMARKS.md)."""
    if not cpu_bf16:
        return
    if not cpu:
        raise FairseqKDError("--cpu-bf16 autocasts CPU computations; add --cpu, or on a GPU use fairseq's --bf16 or --amp")
    if not cpu_has_bf16_kernels():
        raise FairseqKDError(
            "--cpu-bf16: this CPU has no bfloat16 matrix kernels (they need AVX-512), so autocast would make"
            " training many times slower, not faster; drop --cpu-bf16"
        )


@dataclass
class Student:
    """The student as the criterion's terms see it: whether it is a pair of mutual-learning peers, and
    its encoder and decoder layer counts, widths and attention heads, the probability of skipping a layer in
    training (None for models without fairseq Transformer layer stacks), and whether its layers run twice
    (activation checkpointing)."""

    mutual: bool
    layers: Optional[Dict[str, int]] = None
    widths: Optional[Dict[str, int]] = None
    heads: Optional[Dict[str, int]] = None
    layer_drop: Optional[float] = None
    recomputes_layers: bool = False  # --checkpoint-activations


class DistillationTaskMixin:
    """Mixed into a fairseq task before it (``class T(DistillationTaskMixin, TranslationTask)``); the task's
    ``__init__`` sets ``self.teachers`` (``Teachers`` or ``PairTeachers``), its options have
    ``init_student_from_teacher`` and ``cpu_bf16``, and it defines ``teachers_sha256``."""

    teachers: Teachers
    student: Optional[Student] = None
    num_updates: int = 0
    kd_schedule_end: Optional[int] = None
    teacher_mixture: Optional[list] = None  # [weights, weighting] of the teachers' distributions, where mixed

    @property
    def options(self):
        """The task's options: its dataclass config, or an argparse-based task's ``args``."""
        return self.args if self.cfg is None else self.cfg

    def resumed_settings(self):
        """The task's options that a resumed run must keep ({name: value}), which the criterion checks with
        its own (``checkpoints.check_resumed_settings``)."""
        return {}

    @functools.cached_property
    def teachers_sha256(self):
        """The sha256 of each teacher checkpoint (of a cache: those it was built from); empty without
        teachers."""
        raise NotImplementedError

    def resumed_state(self):
        """What a resumed run must find again that its options do not say ({name: value}), kept in the
        checkpoints: the teachers by content, since a retrained teacher under the same path (or the cache of
        another) would continue the run with another teacher, and their mixture (a cache holds the one it was
        built with). A cache and the teachers it was built from, mixed alike, are the same teachers."""
        state = {"teachers": self.teachers_sha256} if self.teachers_sha256 else {}
        if self.teacher_mixture is not None:
            state["teacher_mixture"] = self.teacher_mixture
        return state

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        """fairseq's, with damaged binarized files refused before training reaches them."""
        try:
            super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        except Exception as e:
            if not raised_reading_binarized(e):
                raise
            raise damaged_binarized(f"cannot read split '{split}' of {self.options.data}", e) from None
        check_binarized(self.datasets[split])

    def build_criterion(self, cfg, **kwargs):  # kwargs: from_checkpoint, which legacy (argparse) tasks lack
        """fairseq's. In fairseq-train (which builds the criterion before it resumes), the checkpoint it is
        about to resume from is read first: one torch cannot read is refused in one line, whatever the
        criterion, where fairseq would stop with a traceback."""
        o = self.options
        if fairseq_train_early_stopping() is not None:  # fairseq-train, not fairseq-validate
            path = resumed_checkpoint_path(o.save_dir, o.restore_file, o.checkpoint_suffix, o.continue_once)
            if os.path.isfile(path):
                read_resumed_checkpoint(path)
        return super().build_criterion(cfg, **kwargs)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        mutual = isinstance(model, TransformerMutualModel)
        if mutual and self.teachers:
            raise FairseqKDError(
                "--arch transformer_mutual* trains two peers that teach each other, without a teacher;"
                " drop --teacher-path/--teacher-topk-cache, or use another --arch"
            )
        if hasattr(model, "encoder") and hasattr(model.encoder, "layers"):  # a fairseq Transformer
            self.student = Student(mutual, layer_counts(model, "student"), layer_widths(model, "student"),
                                   attention_heads(model), layer_drop(model, "student"),
                                   recomputes_layers(model, "student"))
        else:
            self.student = Student(mutual)
        if self.options.init_student_from_teacher != "none" and not from_checkpoint:
            self.teachers.init_student(model, self.options.init_student_from_teacher)
        return model

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's train step; with --cpu-bf16 its forward pass under bfloat16 autocast (the backward
        pass outside it, as torch recommends)."""
        self.num_updates = update_num
        if not self.options.cpu_bf16:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        model.train()
        model.set_num_updates(update_num)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:
            loss *= 0
        optimizer.backward(loss)
        return loss, sample_size, logging_output

    def get_checkpoint_dict(self):
        """What fairseq saves for the task in each checkpoint (``extra_state[task class name]``)."""
        state = self.resumed_state()
        if self.kd_schedule_end is not None:
            state["kd_schedule_end"] = self.kd_schedule_end
        early_stopping = fairseq_train_early_stopping()
        if early_stopping is not None and hasattr(early_stopping, "best"):
            state["early_stopping"] = {"best": early_stopping.best, "num_runs": early_stopping.num_runs}
        return {type(self).__name__: state} if state else {}

    @classmethod
    def saved_kd_schedule_end(cls, checkpoint):
        """The ``kd_schedule_end`` a checkpoint (its state dict) kept, or None."""
        return saved_task_state(checkpoint, cls.__name__).get("kd_schedule_end")

    def set_checkpoint_dict(self, state):
        """Restores a resumed run's early-stopping count, but only where fairseq restored the best score
        beside it: --reset-meters and --reset-optimizer start both afresh. A run that had stopped early (the
        count at --patience) ends here, as it ended before: fairseq-train would train an epoch before it
        looked at the count again, and could find a new best that the uninterrupted run never trained."""
        from fairseq import checkpoint_utils  # imported by its caller: here already loaded

        early_stopping = fairseq_train_early_stopping()
        restored_best = hasattr(checkpoint_utils.save_checkpoint, "best")
        if early_stopping is not None and restored_best and "early_stopping" in state:
            early_stopping.best = state["early_stopping"]["best"]
            early_stopping.num_runs = state["early_stopping"]["num_runs"]
            if 0 < self.options.patience <= early_stopping.num_runs:
                logger.info(f"this run stopped early: no better validation for {early_stopping.num_runs} runs"
                            f" (--patience {self.options.patience}); nothing to train")
                sys.exit(0)

    def valid_step(self, sample, model, criterion):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.options.cpu_bf16):
            return super().valid_step(sample, model, criterion)

    def max_positions(self):
        """The base task's length limits within every teacher's, so that fairseq drops from training (and
        refuses in validation) the pairs a teacher run online cannot read."""
        return utils.resolve_max_positions(super().max_positions(), *(t.max_positions() for t in self.teachers.models))


def fairseq_train_early_stopping():
    """fairseq-train's ``should_stop_early``, which keeps the best validation score and the validations since
    in attributes of itself (None outside fairseq-train: nothing to save or restore). ``python -m
    fairseq_cli.train`` runs the module as ``__main__``."""
    for module in (sys.modules.get("__main__"), sys.modules.get("fairseq_cli.train")):
        if getattr(getattr(module, "__spec__", None), "name", None) == "fairseq_cli.train":
            return getattr(module, "should_stop_early", None)
    return None
