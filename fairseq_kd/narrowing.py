"""A teacher Transformer's weights mapped onto a narrower student (``--init-student-from-teacher`` when the
widths differ), as pure functions on state dicts.

Three reductions, each the natural one for what the dimension is:

- the residual stream (model width ``d -> d'``): every layer reads and writes it, so it is projected onto one
  basis ``P`` (``d x d'``, orthonormal columns), the top right singular vectors of the token embedding table,
  the directions the vocabulary uses most. The student's hidden state is ``P^T h``: a matrix reading the
  stream becomes ``W P``, one writing it ``P^T W``, the embedding table ``E P``;
- FFN neurons (``f -> f'``): the ``f'`` neurons with the largest ``|fc1 row| * |fc2 column|`` are kept;
- attention head dimensions (``h -> h'`` per head, same number of heads): per head, the query/key
  dimensions with the largest ``|q row| * |k row|`` and the value dimensions with the largest
  ``|v row| * |out column|``; queries are rescaled so that fairseq's ``h'^-1/2`` scaling gives the
  teacher's ``h^-1/2`` scores.

Layer norms keep the diagonal of ``P^T diag(gamma) P``, times ``sqrt(d / d')``: a stream of ``d'`` projected
coordinates has ``sqrt(d / d')`` times the teacher's standard deviation. fairseq scales embeddings by
``sqrt(width)``, so the table is multiplied by ``s = sqrt(d / d')`` to give the projected teacher input, and
the last layer norm before the (tied) output layer is divided by ``s`` to give the teacher's logits.

A dimension the student keeps at the teacher's size is copied as it is (at ``d' = d``, ``P`` is the
identity), so a student of the teacher's widths gets an exact copy; with reductions
the student starts near, not at, the teacher's function (layer norm statistics and sinusoidal positions do not
project), and training takes it from there.
"""
import math
import re
from typing import Dict

import torch

_ATTENTION = re.compile(r"(.*)\.(q|k|v|out)_proj\.(weight|bias)$")
_FFN = re.compile(r"(.*)\.(fc1|fc2)\.(weight|bias)$")


def residual_basis(embedding: torch.Tensor, width: int) -> torch.Tensor:
    """``(d, width)``: the top ``width`` right singular vectors of a ``(V, d)`` embedding table; the identity
    at the same width (a rotation would change what the layer norms compute)."""
    if width == embedding.size(1):
        return torch.eye(width)
    # full: a vocabulary smaller than the width still gives d directions (the rest in any order)
    _, _, vh = torch.linalg.svd(embedding.float(), full_matrices=True)
    return vh[:width].T


def _top_rows(score: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """Indices of the ``keep`` highest-scoring entries in each consecutive group of ``group`` entries
    (per head; one group for FFN neurons), in their original order."""
    groups = score.view(-1, group)
    chosen = groups.topk(keep, dim=-1).indices.sort(dim=-1).values
    offsets = torch.arange(groups.size(0)).unsqueeze(-1) * group
    return (chosen + offsets).flatten()


def narrow_state(
    teacher: Dict[str, torch.Tensor],
    student: Dict[str, torch.Tensor],
    teacher_key: Dict[str, str],
    heads: Dict[str, int],
) -> Dict[str, torch.Tensor]:
    """Student tensors computed from the teacher's.

    Args:
        teacher: the teacher's state dict (fairseq Transformer names).
        student: the student's state dict; gives every target shape.
        teacher_key: ``{student key: teacher key}`` for the tensors to fill (the layer selection applied).
        heads: ``{"enc": heads, "dec": heads}``, the same in both models.
    Returns:
        ``{student key: tensor}`` shaped as ``student``.
    Raises:
        ValueError: a tensor no rule covers.
    """
    # the layer norm whose output meets the output layer: pre-norm's final one, else the last layer's
    last_norm = "decoder.layer_norm"
    if last_norm + ".weight" not in student:
        last_layer = max(int(k.split(".")[2]) for k in student if k.startswith("decoder.layers."))
        last_norm = f"decoder.layers.{last_layer}.final_layer_norm"
    bases = {
        side: residual_basis(teacher[f"{side}.embed_tokens.weight"], student[f"{side}.embed_tokens.weight"].size(1))
        for side in ("encoder", "decoder")
    }
    out = {}
    for key, tkey in teacher_key.items():
        side = key.split(".")[0]
        # cross-attention keys and values read the encoder's stream
        basis_in = bases["encoder" if re.search(r"encoder_attn\.(k|v)_proj", key) else side]
        basis_out = bases[side]
        d, d_student = basis_out.shape
        scale = math.sqrt(d / d_student)
        w = teacher[tkey].float()
        attention, ffn = _ATTENTION.match(key), _FFN.match(key)
        if tkey.endswith((".version", "._float_tensor")):  # bookkeeping buffers, not weights
            value = w
        elif "embed_positions" in key:  # learned positions, added unscaled; a student of fewer takes the first
            value = w[: student[key].size(0)] @ basis_out
        elif "embed_tokens" in key or "output_projection" in key:
            value = w @ basis_out * scale
        elif attention:
            prefix, proj, kind = attention.groups()
            tprefix = _ATTENTION.match(tkey).group(1)
            n = heads[side[:3]]
            head_dim = teacher[f"{tprefix}.q_proj.weight"].size(0) // n
            head_dim_student = student[f"{prefix}.q_proj.weight"].size(0) // n
            weight = {name: teacher[f"{tprefix}.{name}_proj.weight"].float() for name in ("q", "k", "v", "out")}
            if proj in ("q", "k"):
                score = weight["q"].norm(dim=1) * weight["k"].norm(dim=1)
            else:
                score = weight["v"].norm(dim=1) * weight["out"].norm(dim=0)
            rows = _top_rows(score, head_dim_student, head_dim)
            if proj == "out":
                value = basis_out.T @ w[:, rows] if kind == "weight" else basis_out.T @ w
            else:
                value = w[rows] @ basis_in if kind == "weight" else w[rows]
                if proj == "q":
                    value = value * math.sqrt(head_dim_student / head_dim)
        elif ffn:
            prefix, layer, kind = ffn.groups()
            tprefix = _FFN.match(tkey).group(1)
            fc1, fc2 = teacher[f"{tprefix}.fc1.weight"].float(), teacher[f"{tprefix}.fc2.weight"].float()
            score = fc1.norm(dim=1) * fc2.norm(dim=0)
            neurons = _top_rows(score, student[f"{prefix}.fc1.weight"].size(0), score.numel())
            if layer == "fc1":
                value = w[neurons] @ basis_out if kind == "weight" else w[neurons]
            else:
                value = basis_out.T @ w[:, neurons] if kind == "weight" else basis_out.T @ w
        elif "norm" in key:
            if key.endswith("weight"):
                value = ((basis_out * w.unsqueeze(-1)) * basis_out).sum(dim=0) * scale
            else:
                value = basis_out.T @ w
            if key.rsplit(".", 1)[0] == last_norm:
                value = value / scale
        else:
            raise ValueError(f"no rule to narrow {tkey} {tuple(w.shape)} to {key} {tuple(student[key].shape)}")
        out[key] = value.to(student[key].dtype)
    return out
