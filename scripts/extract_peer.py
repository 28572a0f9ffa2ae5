"""Write one peer of a deep-mutual-learning checkpoint (``--arch transformer_mutual*``) as a plain fairseq
``transformer`` checkpoint, without the other peer, the optimizer state or the criterion state.

    python scripts/extract_peer.py checkpoints/checkpoint_best.pt --peer b --out peer_b.pt
    fairseq-generate data-bin --user-dir fairseq_kd --path peer_b.pt ...

Peer a is also decodable directly from the mutual checkpoint; extracting it halves the file.
(``fairseq-kd-export --peer a|b`` takes either peer straight to CTranslate2.)
"""
import argparse
import os
import sys

import torch

from fairseq_kd.checkpoints import inference_state, model_name, read_checkpoint
from fairseq_kd.errors import FairseqKDError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by fairseq-train --arch transformer_mutual*")
    parser.add_argument("--peer", choices=["a", "b"], required=True, help="a: the model itself, b: its peer")
    parser.add_argument("--out", required=True, help="where to write the peer's checkpoint (a new file)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        raise FairseqKDError(f"--out {args.out} exists; choose a new file (this script never overwrites one)")
    cfg, state = read_checkpoint(args.checkpoint, "checkpoint")
    if model_name(cfg.model) != "transformer_mutual":
        raise FairseqKDError(
            f"this checkpoint's model is {getattr(cfg.model, '_name', '?')!r}, not a transformer_mutual one;"
            " only deep-mutual-learning checkpoints hold two peers"
        )
    torch.save(inference_state(args.checkpoint, cfg, state, args.peer), args.out)
    print(f"peer {args.peer} of {args.checkpoint} -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
