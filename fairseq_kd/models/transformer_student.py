"""Student Transformers: fairseq's Transformer with deep-encoder / shallow-decoder shapes.

Decoding cost is dominated by the decoder, which runs once per output token, while the encoder runs once
per sentence; so students keep depth in the encoder and cut it in the decoder (Kasai et al., 2021).
Parameter counts below are for a joined 8,000-symbol Multi30k dictionary with ``--share-all-embeddings``
(see README, "Student sizes").
"""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture


@register_model("transformer_student")
class TransformerStudentModel(TransformerModel):
    """fairseq's Transformer under its own name, so student checkpoints say what they are and every
    ``transformer_student_*`` size is listed together in ``--arch``. Its checkpoints decode with stock
    ``fairseq-generate --user-dir fairseq_kd``."""


@register_model_architecture("transformer_student", "transformer_student")
def transformer_student(args):
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 4)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", args.encoder_embed_dim)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", args.encoder_ffn_embed_dim)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", args.encoder_attention_heads)
    args.decoder_layers = getattr(args, "decoder_layers", 1)
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", True)
    base_architecture(args)


@register_model_architecture("transformer_student", "transformer_student_tiny")
def transformer_student_tiny(args):
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 128)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 512)
    args.encoder_layers = getattr(args, "encoder_layers", 3)
    transformer_student(args)


@register_model_architecture("transformer_student", "transformer_student_tiny_dec2")
def transformer_student_tiny_dec2(args):
    """The tiny student's parameter count with a second decoder layer: one encoder layer fewer and a
    384-wide decoder FFN pay for it (a one-layer decoder is the usual suspect when a student repeats
    itself)."""
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 384)
    transformer_student_tiny(args)


@register_model_architecture("transformer_student", "transformer_student_small")
def transformer_student_small(args):
    transformer_student(args)


@register_model_architecture("transformer_student", "transformer_student_base")
def transformer_student_base(args):
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 512)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 2048)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 8)
    args.encoder_layers = getattr(args, "encoder_layers", 6)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    transformer_student(args)
