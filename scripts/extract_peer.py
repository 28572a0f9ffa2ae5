"""Write one peer of a deep-mutual-learning checkpoint (``--arch transformer_mutual*``) as a plain fairseq
``transformer`` checkpoint, without the other peer, the optimizer state or the criterion state.

    python scripts/extract_peer.py checkpoints/checkpoint_best.pt --peer b --out peer_b.pt
    fairseq-generate data-bin --user-dir fairseq_kd --path peer_b.pt ...

Peer a is also decodable directly from the mutual checkpoint; extracting it halves the file.
"""
import argparse
import sys

import torch

import fairseq_kd  # noqa: F401  (its allowlist lets torch.load read fairseq checkpoints)
from fairseq_kd.errors import FairseqKDError


def extract_peer(state, peer):
    """The checkpoint ``state`` of a ``transformer_mutual`` model, reduced to peer ``a`` or ``b``."""
    model_cfg = state["cfg"]["model"]
    if not str(getattr(model_cfg, "_name", "")).startswith("transformer_mutual"):
        raise FairseqKDError(
            f"this checkpoint's model is {getattr(model_cfg, '_name', '?')!r}, not a transformer_mutual one;"
            " only deep-mutual-learning checkpoints hold two peers"
        )
    prefix = "peer."
    if peer == "b":
        weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    else:
        weights = {k: v for k, v in state["model"].items() if not k.startswith(prefix)}
    model_cfg.arch = model_cfg._name = "transformer"  # every dimension is already explicit in the config
    return {"cfg": state["cfg"], "model": weights, "optimizer_history": state["optimizer_history"][-1:],
            "extra_state": {}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by fairseq-train --arch transformer_mutual*")
    parser.add_argument("--peer", choices=["a", "b"], required=True, help="a: the model itself, b: its peer")
    parser.add_argument("--out", required=True, help="where to write the peer's checkpoint")
    args = parser.parse_args(argv)
    try:
        state = torch.load(args.checkpoint, map_location="cpu")
    except Exception as e:  # missing, unreadable or not a checkpoint
        raise FairseqKDError(f"cannot read {args.checkpoint!r} as a fairseq checkpoint ({e})") from e
    torch.save(extract_peer(state, args.peer), args.out)
    print(f"peer {args.peer} of {args.checkpoint} -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
