"""Let torch >= 2.6 load fairseq checkpoints with ``weights_only=True`` (its default).

fairseq pickles, besides tensors and plain containers, an ``argparse.Namespace`` (legacy model args inside
``cfg``) and numpy arrays of logged metrics (``extra_state["metrics"]``, e.g. BLEU n-gram counts from
``--eval-bleu``). We allowlist exactly those classes; anything else in a checkpoint is still refused.
"""
import argparse

import numpy as np
import torch

_NUMERIC_DTYPES = [type(np.dtype(code)) for code in np.typecodes["All"] if code not in "OSUVMm"]

torch.serialization.add_safe_globals(
    [
        argparse.Namespace,
        np.ndarray,
        np.dtype,
        *_NUMERIC_DTYPES,
        np._core.multiarray._reconstruct,
        # checkpoints written under numpy 1.x name the same function by its old module path
        (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    ]
)
