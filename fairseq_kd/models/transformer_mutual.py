"""Deep mutual learning (Zhang et al., 2018): two Transformers trained together from scratch, each with its
own cross-entropy plus a KL term towards the other's (detached) distribution.

The model is peer A, an ordinary Transformer that ``fairseq-generate --user-dir fairseq_kd`` decodes as
it is; peer B is a submodule, ``peer``, of the same architecture with its own initialisation and
embeddings. ``scripts/extract_peer.py`` writes either peer as a plain ``transformer`` checkpoint.
"""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture

from fairseq_kd.models.transformer_student import transformer_student_tiny, transformer_student_tiny_dec2


@register_model("transformer_mutual")
class TransformerMutualModel(TransformerModel):
    """Peer A, with peer B as ``self.peer``. ``forward`` runs both and returns A's output with B's
    ``(logits, extra)`` in ``extra["peer_output"]``; decoding uses A's encoder and decoder only."""

    @classmethod
    def build_model(cls, args, task):
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
