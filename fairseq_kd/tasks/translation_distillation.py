import logging
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import models, utils
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_kd.checkpoints import check_checkpoint_dictionaries, read_checkpoint
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.features import attention_heads, layer_counts, layer_outputs, layer_widths, parse_layer_selection
from fairseq_kd.kd_losses import confidence_weights, ensemble_lprobs
from fairseq_kd.models.transformer_mutual import TransformerMutualModel
from fairseq_kd.topk_cache import TopKCache, TopKCacheDataset, read_manifest

logger = logging.getLogger(__name__)

TEACHER_WEIGHTINGS = ("fixed", "confidence", "learned")


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
            " 'enc:0,2,4;dec:5' (a side left out keeps its random initialisation); widths must match. 'none'"
        },
    )
    teacher_topk_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory written by fairseq-kd-build-cache: distil from the teachers' cached top-k"
            " instead of running them (replaces --teacher-path; pass the cache's k as --kd-topk)"
        },
    )


@register_task("translation_distillation", dataclass=TranslationDistillationConfig)
class TranslationDistillationTask(TranslationTask):
    """``translation`` plus frozen teacher(s) whose log-probabilities on each batch are handed to the
    criterion as ``sample["teacher_lprobs"]`` (B x T x V, float32), or, with a top-k cache, their cached
    top-k as ``sample["teacher_topk"]`` (lprobs and ids, B x T x k).

    The teachers live on the task, not the model: they are never wrapped in DDP, never trained and never
    saved in student checkpoints.
    """

    def __init__(self, cfg: TranslationDistillationConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        if cfg.teacher_topk_cache and cfg.teacher_path:
            raise FairseqKDError("give either --teacher-path or --teacher-topk-cache, not both")
        if cfg.teacher_topk_cache and cfg.teacher_weighting != "fixed":
            raise FairseqKDError(
                f"--teacher-weighting {cfg.teacher_weighting} does not apply to --teacher-topk-cache: the cache holds"
                " the mixture chosen when it was built (fairseq-kd-build-cache --teacher-weighting confidence)"
            )
        self.topk_cache_k = read_manifest(cfg.teacher_topk_cache)["k"] if cfg.teacher_topk_cache else None
        paths = utils.split_paths(cfg.teacher_path) if cfg.teacher_path else []
        self.teachers = [self.load_teacher(path) for path in paths]
        self.teacher_weights = self.parse_teacher_weights(cfg.teacher_weights, len(paths))
        self.mutual_learning = False  # set by build_model for --arch transformer_mutual*
        if cfg.teacher_weighting != "fixed" and len(paths) < 2:
            raise FairseqKDError(
                f"--teacher-weighting {cfg.teacher_weighting} weighs several teachers, but --teacher-path names"
                f" {len(paths)}; give two or more checkpoints separated by ':', or drop --teacher-weighting"
            )

    def load_teacher(self, path):
        cfg, state = read_checkpoint(path, "--teacher-path")
        check_checkpoint_dictionaries(path, f"teacher {path}", cfg.task.data, state["model"],
                                      (self.cfg.source_lang, self.cfg.target_lang), (self.src_dict, self.tgt_dict))
        # fairseq-train seeds torch before the task loads its teachers and then builds the student: the
        # teacher's throw-away random initialisation must not draw from that seed, or the student would start
        # elsewhere than with a cache or without KD
        with torch.random.fork_rng(devices=[]):
            teacher = models.build_model(cfg.model, self, from_checkpoint=True)
        teacher.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
        teacher.requires_grad_(False).eval()
        logger.info(f"teacher {path}: {sum(p.numel() for p in teacher.parameters()):,} parameters")
        return teacher

    @staticmethod
    def parse_teacher_weights(text, num_teachers):
        if num_teachers == 0:
            if text:
                raise FairseqKDError("--teacher-weights given without --teacher-path")
            return None
        if not text:
            return torch.full((num_teachers,), 1.0 / num_teachers)
        try:
            weights = [float(w) for w in text.split(",")]
        except ValueError:
            raise FairseqKDError(f"--teacher-weights must be comma-separated numbers, got {text!r}") from None
        if len(weights) != num_teachers:
            raise FairseqKDError(
                f"--teacher-weights has {len(weights)} values but --teacher-path names {num_teachers} teachers"
            )
        if not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:
            raise FairseqKDError(f"--teacher-weights must be non-negative and finite with a positive sum, got {text!r}")
        weights = torch.tensor(weights)
        return weights / weights.sum()

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.mutual_learning = isinstance(model, TransformerMutualModel)
        if hasattr(model, "encoder") and hasattr(model.encoder, "layers"):  # for the intermediate-layer terms
            self.student_layers = layer_counts(model, "student")
            self.student_widths = layer_widths(model, "student")
            self.student_heads = attention_heads(model)
        if self.mutual_learning and (self.teachers or self.topk_cache_k is not None):
            raise FairseqKDError(
                "--arch transformer_mutual* trains two peers that teach each other, without a teacher;"
                " drop --teacher-path/--teacher-topk-cache, or use another --arch"
            )
        if self.cfg.init_student_from_teacher != "none" and not from_checkpoint:
            self.init_from_teacher(model, self.cfg.init_student_from_teacher)
        return model

    def init_from_teacher(self, model, selection):
        """Copy the first teacher's weights into a freshly built student (--init-student-from-teacher).
        A resumed run then loads its checkpoint over them."""
        if not self.teachers:
            raise FairseqKDError(
                "--init-student-from-teacher copies a teacher's weights: give the teacher with --teacher-path"
            )
        teacher = self.teachers[0]
        chosen = parse_layer_selection(selection, layer_counts(model, "student"), layer_counts(teacher, "teacher"))
        # other head counts give the same tensor shapes but split them into other heads: another function
        if attention_heads(model) != attention_heads(teacher):
            raise FairseqKDError(
                f"--init-student-from-teacher: the student's attention heads {attention_heads(model)} differ from the"
                f" teacher's {attention_heads(teacher)}; copied attention weights would be split into other heads:"
                " set --encoder/--decoder-attention-heads to the teacher's, or drop the option"
            )
        teacher_state = teacher.state_dict()
        student_state = model.state_dict()
        copied = {}
        for key, value in student_state.items():
            match = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", key)
            if match:
                side, layer, rest = match.group(1), int(match.group(2)), match.group(3)
                teacher_layer = chosen.get(side[:3], {}).get(layer)
                if teacher_layer is None:
                    continue
                teacher_key = f"{side}.layers.{teacher_layer}.{rest}"
            else:
                teacher_key = key
            if teacher_key not in teacher_state:
                continue
            if teacher_state[teacher_key].shape != value.shape:
                raise FairseqKDError(
                    f"--init-student-from-teacher: {key} is {tuple(value.shape)} in the student but"
                    f" {teacher_key} is {tuple(teacher_state[teacher_key].shape)} in the teacher; copying needs the"
                    " same widths (embedding, FFN, attention heads): choose a student architecture of the teacher's"
                    " width, or drop the option"
                )
            copied[key] = teacher_state[teacher_key]
        # a weight the student ties (e.g. --share-all-embeddings) must come from one teacher weight
        first_of_tensor = {}
        for key in copied:
            first = first_of_tensor.setdefault(student_state[key].data_ptr(), key)
            if not torch.equal(copied[first], copied[key]):
                raise FairseqKDError(
                    f"--init-student-from-teacher: the student shares one weight between {first} and {key}, but"
                    " the teacher has different weights there; train the student with the teacher's --share-*"
                    " embedding options"
                )
        model.load_state_dict({**student_state, **copied})
        logger.info(
            f"student initialised from the teacher: {len(copied)} of {len(student_state)} tensors, teacher layers"
            f" {chosen}"
        )

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch, combine, **kwargs)
        if self.cfg.teacher_topk_cache:
            cache = TopKCache(self.cfg.teacher_topk_cache, split, self.datasets[split], self.tgt_dict)
            self.datasets[split] = TopKCacheDataset(self.datasets[split], cache, self.cfg.left_pad_target)

    @torch.no_grad()
    def teacher_lprobs(self, net_input, target, device, dtype, weights=None, capture_layers=False,
                       capture_attention=False):
        """The teachers' mixture for a batch, all float32 on ``device``: ``(lprobs, weights, reference,
        layers)``, the mixture's log-probabilities ``(B, T, V)``, the weight of each teacher at each target
        position ``(K, B, T)``, each teacher's log-probability of the reference token ``(K, B, T)`` and,
        with ``capture_layers``, the first teacher's layer outputs (``features.layer_outputs``; attention too with
        ``capture_attention``), else None.
        The weights follow --teacher-weighting; ``weights`` ``(K,)`` overrides them (the criterion's
        learned weights)."""
        lprobs = []
        layers = None
        for i, teacher in enumerate(self.teachers):
            teacher.to(device=device, dtype=dtype)
            capture = capture_layers and i == 0
            with layer_outputs(teacher, capture_attention) if capture else nullcontext() as captured:
                net_output = teacher(**net_input)
            if captured is not None:
                layers = captured
            lprobs.append(teacher.get_normalized_probs(net_output, log_probs=True).float())
        target = target.to(device)
        reference = torch.stack([lp.gather(-1, target.unsqueeze(-1)).squeeze(-1) for lp in lprobs])
        if weights is None and self.cfg.teacher_weighting == "confidence":
            weights = confidence_weights(reference, self.teacher_weights)
        else:
            weights = self.teacher_weights if weights is None else weights
            weights = weights.to(device).view(-1, 1, 1).expand(-1, *target.shape)
        return ensemble_lprobs(lprobs, weights), weights, reference, layers

    def add_teacher_lprobs(self, sample, model, weights=None, capture_layers=False, capture_attention=False):
        """Put the teachers' outputs in ``sample`` for the criterion; with ``capture_layers`` also the
        teacher's per-layer hidden states (and attention) as ``sample["teacher_layers"]``."""
        if self.teachers:
            # follow the student's device and dtype (--fp16/--bf16 convert the student after the task
            # is set up)
            param = next(model.parameters())
            lprobs, weights, reference, layers = self.teacher_lprobs(
                sample["net_input"], sample["target"], param.device, param.dtype, weights, capture_layers,
                capture_attention,
            )
            sample["teacher_lprobs"] = lprobs
            if layers is not None:
                sample["teacher_layers"] = layers
            if len(self.teachers) > 1:
                sample["teacher_weights"], sample["teacher_lprobs_reference"] = weights, reference

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):  # kd_label_smoothed_cross_entropy's alpha/T schedules
            criterion.set_num_updates(update_num)
        self.add_teacher_lprobs(sample, model, self.learned_weights(criterion), *layer_capture(criterion))
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        self.add_teacher_lprobs(sample, model, self.learned_weights(criterion), *layer_capture(criterion))
        return super().valid_step(sample, model, criterion)

    def learned_weights(self, criterion):
        """--teacher-weighting learned: the criterion's current teacher weights ``(K,)``, else None."""
        if self.cfg.teacher_weighting != "learned":
            return None
        if not hasattr(criterion, "teacher_weight_logits"):
            raise FairseqKDError(
                "--teacher-weighting learned trains the weights in the criterion: use --criterion"
                " kd_label_smoothed_cross_entropy"
            )
        return torch.softmax(criterion.teacher_weight_logits.detach().float(), dim=0)


def layer_capture(criterion):
    """``(capture_layers, capture_attention)``: whether the criterion's intermediate-layer terms need the
    teacher's hidden states, and its attention."""
    return bool(getattr(criterion, "layer_pairs", None)), getattr(criterion, "kd_attn_weight", 0) > 0
