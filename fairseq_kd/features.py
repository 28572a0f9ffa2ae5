"""Per-layer hidden states of fairseq Transformer-family models for intermediate-layer KD, and the maps
that pair student layers with teacher layers.

The hidden states are captured by forward hooks on ``model.encoder.layers`` and ``model.decoder.layers``
while the model runs its ordinary forward: the model code and generation stay untouched, and the hooks
exist only inside ``layer_outputs``, so a run without intermediate-layer losses pays nothing.
"""
import math
import re
from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch

from fairseq_kd.errors import FairseqKDError

SIDES = ("enc", "dec")
LayerPair = Tuple[str, int, int]  # (side, student layer, teacher layer)


def layer_stacks(model, label):
    """``{"enc": encoder layers, "dec": decoder layers}`` of a Transformer-family model; ``label`` names
    the model in the error for anything else."""
    try:
        return {"enc": model.encoder.layers, "dec": model.decoder.layers}
    except AttributeError:
        raise FairseqKDError(
            f"the {label} ({type(model).__name__}) has no encoder.layers/decoder.layers: intermediate-layer KD"
            " works with fairseq transformer-family models"
        ) from None


def layer_widths(model, label) -> Dict[str, int]:
    return {side: layers[0].embed_dim for side, layers in layer_stacks(model, label).items()}


def attention_heads(model, label="model") -> Dict[str, int]:
    """``{"enc": heads, "dec": heads}`` of the self-attention of a model's first layers."""
    return {side: layers[0].self_attn.num_heads for side, layers in layer_stacks(model, label).items()}


def layer_counts(model, label) -> Dict[str, int]:
    return {side: len(layers) for side, layers in layer_stacks(model, label).items()}


def layer_drop(model, label) -> float:
    """The largest probability with which training skips a layer (fairseq's --encoder/decoder-layerdrop)."""
    return max(getattr(layers, "p", 0.0) for layers in layer_stacks(model, label).values())


def recomputes_layers(model, label) -> bool:
    """Whether fairseq's --checkpoint-activations (or --offload-activations) wraps the layers: each runs first
    without gradients and again in the backward pass."""
    return any(hasattr(layer, "precheckpoint_forward") for layers in layer_stacks(model, label).values() for layer in layers)


ATTENTIONS = {"enc_self": ("enc", "self_attn"), "dec_self": ("dec", "self_attn"), "dec_cross": ("dec", "encoder_attn")}


@contextmanager
def layer_outputs(model, attention=False):
    """Collect the output of every encoder and decoder layer of ``model`` during the forward passes run
    inside the block: yields ``{"enc": [(B, S, C)] * L_enc, "dec": [(B, T, C)] * L_dec}``, batch first.

    With ``attention``, also every layer's attention log-probabilities per head under ``"enc_self"``
    ``(B, H, S, S)``, ``"dec_self"`` ``(B, H, T, T)`` and ``"dec_cross"`` ``(B, H, T, S)``, recomputed from the
    attention module's inputs (fairseq's fused attention returns only head-averaged weights, after dropout)."""
    outputs = {side: [] for side in (*SIDES, *(ATTENTIONS if attention else ()))}

    def keep(side):
        def hook(module, inputs, output):
            # encoder layers return x (or (x, fc_result)), decoder layers (x, attn, state); x is T x B x C
            outputs[side].append((output[0] if isinstance(output, tuple) else output).transpose(0, 1))

        return hook

    def keep_attention(name):
        def hook(module, args, kwargs):
            outputs[name].append(attention_lprobs(module, kwargs["query"], kwargs["key"],
                                                  kwargs.get("key_padding_mask"), kwargs.get("attn_mask")))

        return hook

    stacks = layer_stacks(model, "model")
    handles = [layer.register_forward_hook(keep(side)) for side, layers in stacks.items() for layer in layers]
    if attention:
        handles += [
            getattr(layer, module).register_forward_pre_hook(keep_attention(name), with_kwargs=True)
            for name, (side, module) in ATTENTIONS.items()
            for layer in stacks[side]
        ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def attention_lprobs(module, query, key, key_padding_mask=None, attn_mask=None) -> torch.Tensor:
    """``(B, H, T, S)`` log-probabilities of a fairseq ``MultiheadAttention`` for inputs ``query`` (T x B x C)
    and ``key`` (S x B x C), computed as it computes them: ``softmax(q k^T / sqrt(d) + attn_mask)``, padded keys
    excluded."""
    tgt_len, batch, _ = query.shape
    heads, head_dim = module.num_heads, module.head_dim
    q = (module.q_proj(query) * module.scaling).view(tgt_len, batch * heads, head_dim).transpose(0, 1)
    k = module.k_proj(key).view(key.size(0), batch * heads, head_dim).transpose(0, 1)
    scores = torch.bmm(q, k.transpose(1, 2)).float().view(batch, heads, tgt_len, key.size(0))
    if attn_mask is not None:
        scores = scores + attn_mask.float()
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.bool()[:, None, None, :], float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def parse_layer_map(text: str, student_layers: Dict[str, int], teacher_layers: Dict[str, int]) -> List[LayerPair]:
    """Student-teacher layer pairs from ``uniform`` or an explicit map like ``enc:0-1,1-3;dec:0-5``.

    ``uniform`` pairs student layer i of L_S with teacher layer round((i + 1) * L_T / L_S) - 1 on each side,
    so the last layers meet (layer 0 where that is below 0: a student of more than twice the teacher's
    layers). An explicit map lists ``student-teacher`` pairs per side (0-based); a side
    it leaves out gets no pairs.
    """
    if text == "uniform":
        return [
            (side, i, max(0, math.floor((i + 1) * teacher_layers[side] / student_layers[side] + 0.5) - 1))
            for side in SIDES
            for i in range(student_layers[side])
        ]
    pairs = []
    for part in filter(None, text.split(";")):
        match = re.fullmatch(r"(enc|dec):(\d+-\d+(?:,\d+-\d+)*)", part.strip())
        if match is None:
            raise FairseqKDError(
                f"cannot read layer map part {part!r} of {text!r}: write 'uniform' or SIDE:STUDENT-TEACHER pairs"
                " like 'enc:0-1,1-3;dec:0-5' (SIDE enc or dec, 0-based layer indices)"
            )
        side = match.group(1)
        for pair in match.group(2).split(","):
            student, teacher = (int(i) for i in pair.split("-"))
            for who, index, count in (("student", student, student_layers), ("teacher", teacher, teacher_layers)):
                if index >= count[side]:
                    raise FairseqKDError(
                        f"layer map {text!r}: {side} layer {index} of the {who} does not exist; the student has"
                        f" {student_layers[side]} {side} layers, the teacher {teacher_layers[side]} (0-based)"
                    )
            pairs.append((side, student, teacher))
    if not pairs:
        raise FairseqKDError(f"layer map {text!r} pairs no layers; write 'uniform' or e.g. 'enc:0-1;dec:0-2'")
    return pairs


def parse_layer_selection(selection, student_layers, teacher_layers):
    """``{side: {student layer: teacher layer}}`` for --init-student-from-teacher."""
    if selection in ("first", "alternate"):
        for side in student_layers:
            if student_layers[side] > teacher_layers[side]:
                raise FairseqKDError(
                    f"--init-student-from-teacher {selection}: the student has {student_layers[side]} {side} layers,"
                    f" more than the teacher's {teacher_layers[side]}; list teacher layers explicitly, e.g."
                    " 'enc:0,1,1;dec:0'"
                )
        step = {side: 1 if selection == "first" else teacher_layers[side] / student_layers[side] for side in student_layers}
        return {side: {i: int(i * step[side]) for i in range(student_layers[side])} for side in student_layers}
    chosen = {}
    for part in filter(None, selection.split(";")):
        match = re.fullmatch(r"(enc|dec):(\d+(?:,\d+)*)", part.strip())
        if match is None:
            raise FairseqKDError(
                f"--init-student-from-teacher {selection!r}: cannot read {part!r}; write none, first, alternate or"
                " teacher layers per side like 'enc:0,2,4;dec:5'"
            )
        side, layers = match.group(1), [int(i) for i in match.group(2).split(",")]
        if len(layers) != student_layers[side]:
            raise FairseqKDError(
                f"--init-student-from-teacher {selection!r}: {len(layers)} {side} layers listed, but the student"
                f" has {student_layers[side]}; list one teacher layer per student layer"
            )
        for layer in layers:
            if layer >= teacher_layers[side]:
                raise FairseqKDError(
                    f"--init-student-from-teacher {selection!r}: the teacher has no {side} layer {layer}"
                    f" ({teacher_layers[side]} layers, 0-based)"
                )
        chosen[side] = dict(enumerate(layers))
    return chosen


def side_mask(sample, side, padding_idx) -> torch.Tensor:
    """``(B, S)`` or ``(B, T)``: True at the real (non-padding) positions of that side's hidden states."""
    tokens = sample["net_input"]["src_tokens"] if side == "enc" else sample["target"]
    return tokens.ne(padding_idx)
