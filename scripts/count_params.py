"""Print a Markdown row of parameter counts for each architecture, built on a data-bin's dictionaries.

    python scripts/count_params.py --data work/multi30k-en-de/data-bin \
        transformer_student_tiny transformer_student_small transformer_student_base

Models are built with --share-all-embeddings; extra fairseq flags can follow ``--``.
"""
import argparse
import os

from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fairseq_kd")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("archs", nargs="+")
    args, fairseq_flags = parser.parse_known_args()
    print("| arch | width | FFN | heads | enc layers | dec layers | params | non-embedding |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.archs:
        fairseq_args = options.parse_args_and_arch(
            options.get_training_parser(),
            [args.data, "--user-dir", PLUGIN, "--arch", arch, "--share-all-embeddings", "--cpu", *fairseq_flags],
        )
        cfg = convert_namespace_to_omegaconf(fairseq_args)
        model = tasks.setup_task(cfg.task).build_model(cfg.model)
        total = sum(p.numel() for p in model.parameters())
        non_embedding = total - model.encoder.embed_tokens.weight.numel()
        m = cfg.model
        print(
            f"| `{arch}` | {m.encoder_embed_dim} | {m.encoder_ffn_embed_dim} | {m.encoder_attention_heads} "
            f"| {m.encoder_layers} | {m.decoder_layers} | {total / 1e6:.2f} M | {non_embedding / 1e6:.2f} M |"
        )


if __name__ == "__main__":
    main()
