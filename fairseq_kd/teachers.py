"""The teachers of a distillation run and what they say about each batch.

``Teachers`` holds the frozen teacher models (loading, freezing, device and dtype, their mixture: fixed,
confidence or learned weights, the capture of the first teacher's layers) or, instead of running them, the
top-k cache built from them. The distillation task builds it and owns it; the criterion asks it for one
``TeacherOutput`` per batch through ``Teachers.predict``; ``fairseq-kd-build-cache`` writes the cache from
``Teachers.mixture``.
"""
import logging
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import utils

from fairseq_kd.checkpoints import load_model
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.features import attention_heads, layer_counts, layer_outputs, parse_layer_selection
from fairseq_kd.kd_losses import confidence_weights, ensemble_lprobs, topk_lprobs
from fairseq_kd.narrowing import narrow_state
from fairseq_kd.topk_cache import TopKCache, TopKCacheDataset, read_manifest

logger = logging.getLogger(__name__)

TEACHER_WEIGHTINGS = ("fixed", "confidence", "learned")


@dataclass
class TeacherOutput:
    """What the teachers say about one batch, aligned with ``sample["target"]`` ``(B, T)``, float32 on the
    student's device. Exactly one of ``lprobs`` and ``topk`` is set.

    - ``lprobs`` ``(B, T, V)``: the mixture's log-probabilities, from teachers run on the batch;
    - ``topk`` ``(values, ids)``, each ``(B, T, k)``: the mixture's top-k log-probabilities, from the cache;
    - ``weights`` ``(K, B, T)``: with several teachers run online, each one's weight at each position;
    - ``reference`` ``(K, B, T)``: with several teachers run online, each one's log-probability of the
      reference token;
    - ``layers``: when asked for, the first teacher's hidden states (and attention) as
      ``features.layer_outputs`` yields them;
    - ``position_weights`` ``(B, T)``: how much each target position is distilled, in [0, 1] (multilingual
      teachers: 0 where a row's language pair has no teacher or its KD is switched off, and on the target
      language token); None: every position fully.
    """

    lprobs: Optional[torch.Tensor] = None
    topk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    weights: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    layers: Optional[Dict[str, List[torch.Tensor]]] = None
    position_weights: Optional[torch.Tensor] = None

    def distribution(self, k):
        """``(values, ids)`` of the teacher distribution at every position: its ``k`` most probable tokens
        ``(B, T, k)``, or with ``k`` 0 the full distribution ``(B, T, V)`` and ids None. The cache holds
        exactly its k."""
        if self.topk is not None:
            return self.topk
        return topk_lprobs(self.lprobs, k) if k > 0 else (self.lprobs, None)


class Teachers:
    """Frozen teacher models, or the top-k cache that stands in for them; empty when the task has neither
    (then ``bool(teachers)`` is False and ``predict`` returns None).

    The models live here, not in the student: they are never wrapped in DDP, never trained and never saved
    in student checkpoints."""

    skip_language_token = False  # a bilingual target has none (PairTeachers: the decoder's language token)

    def __init__(self, teacher_models, weights=None, weighting="fixed", cache_dir=None):
        self.models = teacher_models
        self.weights = weights  # (K,), summing to 1; None without models
        self.weighting = weighting
        self.cache_dir = cache_dir
        self.cache_k = read_manifest(cache_dir)["k"] if cache_dir else None

    @classmethod
    def load(cls, paths, weights, weighting, task, cache_dir=None, langs=None, multilingual=False):
        """Teachers from ``--teacher-path`` (colon-separated checkpoints), ``--teacher-weights`` and
        ``--teacher-weighting``, each checked against ``task``'s dictionaries and built for it (``langs``,
        ``multilingual``: see ``load_teacher``); or the ``--teacher-topk-cache`` directory."""
        if cache_dir and paths:
            raise FairseqKDError("give either --teacher-path or --teacher-topk-cache, not both")
        if cache_dir and weighting != "fixed":
            raise FairseqKDError(
                f"--teacher-weighting {weighting} does not apply to --teacher-topk-cache: the cache holds"
                " the mixture chosen when it was built (fairseq-kd-build-cache --teacher-weighting confidence)"
            )
        paths = utils.split_paths(paths) if paths else []
        if weighting != "fixed" and len(paths) < 2:
            raise FairseqKDError(
                f"--teacher-weighting {weighting} weighs several teachers, but --teacher-path names"
                f" {len(paths)}; give two or more checkpoints separated by ':', or drop --teacher-weighting"
            )
        parsed_weights = parse_weights(weights, len(paths))
        return cls([load_teacher(path, task, langs=langs, multilingual=multilingual) for path in paths], parsed_weights,
                   weighting, cache_dir)

    def __bool__(self):
        return bool(self.models) or self.cache_dir is not None

    @property
    def layer_teacher(self):
        """The one teacher run online whose layers a student can learn (intermediate-layer KD), or None."""
        return self.models[0] if len(self.models) == 1 else None

    def wrap_dataset(self, split, dataset, target_dictionary, left_pad_target):
        """With a cache, ``dataset`` whose batches carry the split's cached top-k; else ``dataset``."""
        if self.cache_dir is None:
            return dataset
        return TopKCacheDataset(dataset, TopKCache(self.cache_dir, split, dataset, target_dictionary), left_pad_target)

    def predict(self, sample, student, weights=None, capture_layers=False, capture_attention=False):
        """The ``TeacherOutput`` for a batch the criterion is about to score ``student`` on, or None when
        there are no teachers. ``weights`` ``(K,)`` replaces the mixture weights (the criterion's learned
        ones); ``capture_layers``/``capture_attention`` ask for the first teacher's layers."""
        if self.cache_dir is not None:
            return TeacherOutput(topk=sample[TopKCacheDataset.KEY])
        if not self.models:
            return None
        # follow the student's device and dtype (--fp16/--bf16 convert the student after the task is set up)
        param = next(student.parameters())
        return self.mixture(sample["net_input"], sample["target"], param.device, param.dtype, weights,
                            capture_layers, capture_attention)

    @torch.no_grad()
    def mixture(self, net_input, target, device, dtype, weights=None, capture_layers=False, capture_attention=False):
        """The teachers run on a batch on ``device`` in ``dtype``: a ``TeacherOutput`` with ``lprobs``,
        float32. The weights follow --teacher-weighting unless ``weights`` ``(K,)`` are given."""
        lprobs = []
        layers = None
        for i, teacher in enumerate(self.models):
            teacher.to(device=device, dtype=dtype)
            capture = capture_layers and i == 0
            with layer_outputs(teacher, capture_attention) if capture else nullcontext() as captured:
                net_output = teacher(**net_input)
            if captured is not None:
                layers = captured
            lprobs.append(teacher.get_normalized_probs(net_output, log_probs=True).float())
        target = target.to(device)
        reference = torch.stack([lp.gather(-1, target.unsqueeze(-1)).squeeze(-1) for lp in lprobs])
        if weights is None and self.weighting == "confidence":
            weights = confidence_weights(reference, self.weights)
        else:
            weights = self.weights if weights is None else weights
            weights = weights.to(device).view(-1, 1, 1).expand(-1, *target.shape)
        several = len(self.models) > 1
        return TeacherOutput(lprobs=ensemble_lprobs(lprobs, weights), weights=weights if several else None,
                             reference=reference if several else None, layers=layers)

    def init_student(self, model, selection):
        """Copy the first teacher's weights into a freshly built student (--init-student-from-teacher):
        embeddings, output layer, layer norms and, per student layer, the teacher layer ``selection``
        chooses; into a narrower student, projected and pruned (``narrowing.narrow_state``). A resumed run then
        loads its checkpoint over them."""
        if not self.models:
            raise FairseqKDError(
                "--init-student-from-teacher copies a teacher's weights: give the teacher with --teacher-path"
            )
        teacher = self.models[0]
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
        teacher_key = {}
        for key, value in student_state.items():
            match = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", key)
            if match:
                side, layer, rest = match.group(1), int(match.group(2)), match.group(3)
                teacher_layer = chosen.get(side[:3], {}).get(layer)
                if teacher_layer is None:
                    continue
                source = f"{side}.layers.{teacher_layer}.{rest}"
            else:
                source = key
            if source not in teacher_state:
                continue
            shape = teacher_state[source].shape
            if len(shape) != value.dim() or any(s > t for s, t in zip(value.shape, shape)):
                raise FairseqKDError(
                    f"--init-student-from-teacher: {key} is {tuple(value.shape)} in the student but"
                    f" {source} is {tuple(shape)} in the teacher; a student starts from a teacher only where the"
                    " teacher is at least as wide (embedding, FFN, attention heads): choose a narrower student, or"
                    " drop the option"
                )
            teacher_key[key] = source
        narrower = any(teacher_state[t].shape != student_state[s].shape for s, t in teacher_key.items())
        if narrower:
            for label, transformer in (("teacher", teacher), ("student", model)):
                unnarrowable = narrowing_unsupported(transformer)
                if unnarrowable:
                    raise FairseqKDError(
                        f"--init-student-from-teacher: the {label} has {unnarrowable}, which a narrower student's"
                        " projected weights do not reproduce; start this student from random weights, or give it"
                        " the teacher's widths (copied as they are)"
                    )
            try:
                copied = narrow_state(teacher_state, student_state, teacher_key, attention_heads(teacher))
            except ValueError as error:
                raise FairseqKDError(f"--init-student-from-teacher: {error}; start this student from random weights") from None
        else:
            copied = {key: teacher_state[t] for key, t in teacher_key.items()}
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
            f"student initialised from the teacher: {len(copied)} of {len(student_state)} tensors"
            f"{' (narrowed: projected onto the student widths)' if narrower else ''}, teacher layers {chosen}"
        )


class PairTeachers:
    """The teachers of a multilingual student (``translation_multi_distillation``): per language pair a
    teacher, or a top-k cache (with the threshold strategy both: the cache gives the targets, the teacher
    only scores validation data), and how much the pair is distilled. Every batch row carries the index of
    its pair in ``sample[PAIR_KEY]``; ``predict`` runs each pair's teacher on that pair's rows only (a pivot
    teacher on the same sentences in its own source language, ``sample[TEACHER_INPUT_KEY]``) and gives each
    target position its pair's weight: ``pair_weights`` times ``enabled`` (the threshold strategy switches
    it), 0 on the target language token that the decoder is given as its first output.

    It answers the criterion like ``Teachers``: ``predict``, ``cache_k``, ``models``, ``weighting``,
    ``layer_teacher``, ``skip_language_token`` (which mutual learning, with no teachers, follows too)."""

    PAIR_KEY = "pair"
    TEACHER_INPUT_KEY = "teacher_net_input"
    weighting = "fixed"
    layer_teacher = None  # a teacher per pair, not one teacher's layers

    def __init__(self, teachers: Dict[int, Teachers], cache_k, pair_weights, vocab_size, skip_language_token):
        self.teachers = teachers
        self.cache_k = cache_k
        self.pair_weights = pair_weights  # (P,), 0 for pairs without a teacher
        self.enabled = torch.ones_like(pair_weights, dtype=torch.bool)
        self.vocab_size = vocab_size
        self.skip_language_token = skip_language_token
        self.models = [model for pair_teachers in teachers.values() for model in pair_teachers.models]

    def __bool__(self):
        return bool(self.teachers) or self.cache_k is not None

    def position_weights(self, sample):
        """``(B, T)``: each target position's share of KD (see the class)."""
        target = sample["target"]
        rows = (self.pair_weights * self.enabled).to(target.device)[sample[self.PAIR_KEY].to(target.device)]
        weights = rows.unsqueeze(1).expand(target.shape).clone()
        if self.skip_language_token:
            weights[:, 0] = 0.0
        return weights

    def init_student(self, model, selection):
        """--init-student-from-teacher: from the first pair's teacher (``Teachers.init_student``)."""
        if not self.teachers:
            raise FairseqKDError("--init-student-from-teacher copies a teacher's weights: give --teacher-paths")
        next(iter(self.teachers.values())).init_student(model, selection)

    def predict(self, sample, student, weights=None, capture_layers=False, capture_attention=False):
        if not self:
            return None
        position_weights = self.position_weights(sample)
        if self.cache_k is not None:
            # a batch of pairs without a cache only (weighted 0) has none: zeros stand in
            empty = (*sample["target"].shape, self.cache_k)
            device = sample["target"].device
            topk = sample.get(TopKCacheDataset.KEY) or (torch.zeros(empty, device=device),
                                                        torch.zeros(empty, dtype=torch.long, device=device))
            return TeacherOutput(topk=topk, position_weights=position_weights)
        param = next(student.parameters())
        target = sample["target"].to(param.device)
        # rows without a teacher get a uniform distribution: finite, and weighted 0
        lprobs = torch.full((*target.shape, self.vocab_size), -math.log(self.vocab_size), device=param.device)
        net_input = sample.get(self.TEACHER_INPUT_KEY, sample["net_input"])
        pairs = sample[self.PAIR_KEY].to(param.device)
        distilled = position_weights.to(param.device).gt(0).any(1)
        for index, teachers in self.teachers.items():
            rows = (pairs.eq(index) & distilled).nonzero().squeeze(1)
            if rows.numel():
                rows_input = {name: value.index_select(0, rows.to(value.device)) for name, value in net_input.items()}
                lprobs[rows] = teachers.mixture(rows_input, target.index_select(0, rows), param.device, param.dtype).lprobs
        return TeacherOutput(lprobs=lprobs, position_weights=position_weights)


def narrowing_unsupported(model):
    """What in a fairseq Transformer breaks an assumption of ``narrowing.narrow_state``, or None."""
    for side in ("encoder", "decoder"):
        part = getattr(model, side)
        if part.embed_scale != math.sqrt(part.embed_tokens.embedding_dim):
            return "unscaled embeddings (--no-scale-embedding; narrowing relies on fairseq's sqrt(width) scaling)"
    if model.decoder.layer_norm is None and model.decoder.layers[-1].normalize_before:
        return "pre-norm decoder layers without a final layer norm (--no-decoder-final-norm)"
    return None


def load_teacher(path, task, option="--teacher-path", langs=None, multilingual=False, loaded=None):
    """One teacher checkpoint built for ``task`` (its dictionaries checked; ``langs``: the language pair it
    must translate, by default the task's), frozen and in eval mode; ``loaded``: as for ``load_model``."""
    teacher = load_model(path, option, f"teacher {path}", task, langs, multilingual, loaded)
    if loaded is not None:
        return teacher
    teacher.requires_grad_(False).eval()
    logger.info(f"teacher {path}: {sum(p.numel() for p in teacher.parameters()):,} parameters")
    return teacher


def parse_weights(text, num_teachers):
    """``--teacher-weights`` as a ``(K,)`` tensor summing to 1 (equal weights by default); None without
    teachers."""
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
        raise FairseqKDError(f"--teacher-weights has {len(weights)} values but --teacher-path names {num_teachers} teachers")
    if not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:
        raise FairseqKDError(f"--teacher-weights must be non-negative and finite with a positive sum, got {text!r}")
    # normalised in float64, scaled by the largest first: 1e39 or a sum beyond float range would turn NaN
    largest = max(weights)
    total = sum(w / largest for w in weights)
    return torch.tensor([w / largest / total for w in weights])
