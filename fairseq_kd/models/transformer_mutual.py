"""Deep mutual learning (Zhang et al., 2018): two Transformers trained together from scratch, each with its
own cross-entropy plus a KL term towards the other's (detached) distribution.

The model is peer A, an ordinary Transformer that ``fairseq-generate --user-dir fairseq_kd`` decodes as
it is; peer B is a submodule, ``peer``, of the same architecture with its own initialisation and
embeddings. ``scripts/extract_peer.py`` writes either peer as a plain ``transformer`` checkpoint.
"""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture

from fairseq_kd.errors import FairseqKDError
from fairseq_kd.models.transformer_student import transformer_student_tiny, transformer_student_tiny_dec2


@register_model("transformer_mutual")
class TransformerMutualModel(TransformerModel):
    """Peer A, with peer B as ``self.peer``. ``forward`` runs both and returns A's output with B's
    ``(logits, extra)`` in ``extra["peer_output"]``; decoding uses A's encoder and decoder only."""

    # the peers learn from each other only through this criterion, given the student by a distillation task
    TRAINED_BY = {"task": ("translation_distillation", "translation_multi_distillation"),
                  "criterion": ("kd_label_smoothed_cross_entropy",)}

    @classmethod
    def build_model(cls, args, task):
        # a legacy model's args are the whole command line: its task and criterion too (a checkpoint's: those
        # it was trained with)
        other = {name: getattr(args, name, None) for name in cls.TRAINED_BY}
        if any(value is not None and value not in cls.TRAINED_BY[name] for name, value in other.items()):
            raise FairseqKDError(
                f"--arch {args.arch} trains its two peers together only with --task translation_distillation (or"
                f" translation_multi_distillation) and --criterion kd_label_smoothed_cross_entropy, got --task"
                f" {other['task']} --criterion {other['criterion']}: only peer a would learn"
            )
        model = super().build_model(args, task)
        model.add_module("peer", TransformerModel.build_model(args, task))
        return model

    def forward(self, src_tokens, src_lengths, prev_output_tokens, **kwargs):
        logits, extra = super().forward(src_tokens, src_lengths, prev_output_tokens, **kwargs)
        extra["peer_output"] = self.peer(src_tokens, src_lengths, prev_output_tokens, **kwargs)
        return logits, extra


@register_model_architecture("transformer_mutual", "transformer_mutual")
def transformer_mutual(args):
    base_architecture(args)


@register_model_architecture("transformer_mutual", "transformer_mutual_student_tiny")
def transformer_mutual_student_tiny(args):
    """Two ``transformer_student_tiny`` peers."""
    transformer_student_tiny(args)


@register_model_architecture("transformer_mutual", "transformer_mutual_student_tiny_dec2")
def transformer_mutual_student_tiny_dec2(args):
    """Two ``transformer_student_tiny_dec2`` peers."""
    transformer_student_tiny_dec2(args)
