"""Non-autoregressive students: fairseq's Mask-Predict (CMLM) and vanilla NAT Transformers at student size,
trained with fairseq's ``translation_lev`` task and ``nat_loss`` criterion, decoded by its iterative
refinement generator (``fairseq-generate --task translation_lev --iter-decode-max-iter N
--iter-decode-with-beam L``).

A NAT decoder writes every target position at once, so it cannot be shallow the way an autoregressive
student's is: these students keep the tiny student's width and encoder (128-d, 3 layers) with a 3-layer
decoder. Each model refuses, in one line, a task that does not feed it what it was built for: the
``translation_lev`` task, with the noise its training objective assumes (CMLM: ``random_mask``, the
references partly masked; vanilla NAT: ``full_mask``, every position masked).
"""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.nat.cmlm_transformer import CMLMNATransformerModel, cmlm_base_architecture
from fairseq.models.nat.nonautoregressive_transformer import NATransformerModel, base_architecture
from fairseq.tasks.translation_lev import TranslationLevenshteinTask

from fairseq_kd.errors import FairseqKDError


class NATStudentChecks:
    """Mixed into a fairseq NAT model: the task and training noise checks."""

    NOISE: str

    @classmethod
    def build_model(cls, args, task):
        if not isinstance(task, TranslationLevenshteinTask):
            raise FairseqKDError(
                f"--arch {args.arch} is non-autoregressive: it trains and decodes with --task translation_lev"
                f" --noise {cls.NOISE} (and --criterion nat_loss), not --task {getattr(args, 'task', '?')}"
            )
        model = super().build_model(args, task)
        # checked when training: a decoding task has no use for --noise (and keeps its default)
        model.task_noise = str(task.cfg.noise)
        return model

    def forward(self, src_tokens, src_lengths, prev_output_tokens, tgt_tokens, **kwargs):
        # translation_lev's noise builds prev_output_tokens from the references; another one trains on
        # inputs the model never sees at decoding (or fails on their shapes)
        if self.training and self.task_noise != self.NOISE:
            raise FairseqKDError(
                f"--arch {self.args.arch} trains with --noise {self.NOISE} (its decoder inputs made from the references"
                f" that way), but the task's --noise is {self.task_noise}; set --noise {self.NOISE}"
            )
        return super().forward(src_tokens, src_lengths, prev_output_tokens, tgt_tokens, **kwargs)


@register_model("cmlm_transformer_student")
class CMLMStudentModel(NATStudentChecks, CMLMNATransformerModel):
    """Mask-Predict (Ghazvininejad et al., 2019): predicts the masked target tokens, decodes by re-masking
    the least confident ones for a few iterations."""

    NOISE = "random_mask"


@register_model("nonautoregressive_transformer_student")
class NATStudentModel(NATStudentChecks, NATransformerModel):
    """Vanilla NAT (Gu et al., 2018) with length prediction: every target position from a fully masked
    input, in one pass."""

    NOISE = "full_mask"


def nat_student_tiny(args):
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 128)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 512)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 3)
    args.decoder_layers = getattr(args, "decoder_layers", 3)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", args.encoder_attention_heads)
    # the decoder's input and output share the embedding, as fairseq's NAT examples train them
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", True)
    # the length predictor as fairseq's NAT examples train it: from the encoder's mean state, offset
    args.pred_length_offset = getattr(args, "pred_length_offset", True)
    args.length_loss_factor = getattr(args, "length_loss_factor", 0.1)
    args.apply_bert_init = getattr(args, "apply_bert_init", True)
    # learned positions, as fairseq's NAT examples train them: with sinusoidal ones a CMLM student stayed at
    # unigram loss on a word-for-word toy task for 300 updates, with learned ones it learnt the alignment
    args.encoder_learned_pos = getattr(args, "encoder_learned_pos", True)
    args.decoder_learned_pos = getattr(args, "decoder_learned_pos", True)


@register_model_architecture("cmlm_transformer_student", "cmlm_transformer_student_tiny")
def cmlm_transformer_student_tiny(args):
    nat_student_tiny(args)
    cmlm_base_architecture(args)


@register_model_architecture("nonautoregressive_transformer_student", "nonautoregressive_transformer_student_tiny")
def nonautoregressive_transformer_student_tiny(args):
    nat_student_tiny(args)
    base_architecture(args)
