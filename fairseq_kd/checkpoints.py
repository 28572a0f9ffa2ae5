"""Reading fairseq checkpoints: one place for loading, dictionary checks, building a model from a
checkpoint, parameter counts and the clean inference checkpoint that export and translation start from.

Reading keeps torch's ``weights_only=True`` (the plugin's allowlist, ``safe_load``, makes fairseq
checkpoints load under it).
"""
import argparse
import hashlib
import logging
import os

import torch
from fairseq import checkpoint_utils, models, utils
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_MODEL_NAME_REGISTRY
from fairseq.models.transformer import TransformerModel

from fairseq_kd.errors import FairseqKDError

logger = logging.getLogger(__name__)

# models whose weights are fairseq's Transformer's under the same names (transformer_mutual: peer a, and
# peer b under ``peer.``)
INFERENCE_MODELS = ("transformer", "transformer_student", "transformer_mutual")
PEER_PREFIX = "peer."


def read_checkpoint(path, option):
    """``(cfg, state)`` of a fairseq checkpoint; ``option`` names where the path came from in errors."""
    if not os.path.isfile(path):
        raise FairseqKDError(f"{option}: no such file {path!r}; give a checkpoint .pt file written by fairseq-train")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as e:
        # torch wraps the actual reason in paragraphs of advice; keep the last line before its doc link
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("Check the documentation")]
        reason = lines[-1] if lines else type(e).__name__
        raise FairseqKDError(
            f"{option}: cannot read {path!r} as a fairseq checkpoint ({reason}); give a checkpoint"
            " written by fairseq-train"
        ) from e
    cfg = state["cfg"] if state.get("cfg") is not None else convert_namespace_to_omegaconf(state["args"])
    return cfg, state


def load_model(path, option, label, task):
    """The model of a checkpoint, built for ``task`` and holding the checkpoint's weights, once its
    dictionaries are found equal to ``task``'s (``check_checkpoint_dictionaries``); ``option`` and ``label``
    name it in errors."""
    cfg, state = read_checkpoint(path, option)
    check_checkpoint_dictionaries(path, label, cfg.task.data, state["model"], (task.cfg.source_lang, task.cfg.target_lang),
                                  (task.source_dictionary, task.target_dictionary))
    # fairseq-train seeds torch before the task loads its teachers and then builds the student: a loaded
    # model's throw-away random initialisation must not draw from that seed, or the student would start
    # elsewhere than with a cache or without KD
    with torch.random.fork_rng(devices=[]):
        model = models.build_model(cfg.model, task, from_checkpoint=True)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    return model


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint_dictionaries(path, label, trained_on, model_state, langs, dictionaries):
    """A checkpoint's dictionaries must equal the data's (``dictionaries``: source and target, of the
    languages ``langs``), symbol for symbol, or its outputs mean nothing. They are looked for beside the
    checkpoint, then in ``trained_on``, the data directory it was trained on (None: unknown); failing
    both, only the embedding sizes can be compared. ``label`` names the checkpoint in messages."""
    search = [os.path.dirname(os.path.abspath(path))]
    if trained_on:
        search.append(utils.split_paths(trained_on)[0])
    fix = (
        "re-binarize the data with the checkpoint's dictionaries (fairseq-preprocess --srcdict/--tgtdict"
        " CHECKPOINT_DATA/dict.LANG.txt)"
    )
    for side, lang, data_dict, embed_key in zip(
        ("source", "target"), langs, dictionaries, ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    ):
        dict_files = [os.path.join(d, f"dict.{lang}.txt") for d in search]
        dict_file = next((f for f in dict_files if os.path.isfile(f)), None)
        if dict_file is not None:
            checkpoint_symbols = Dictionary.load(dict_file).symbols
            index = first_difference(checkpoint_symbols, data_dict.symbols)
            if index is not None:
                raise FairseqKDError(
                    f"{label}: its {side} dictionary {dict_file} ({len(checkpoint_symbols)} symbols)"
                    f" differs from the data's ({len(data_dict)} symbols) at index {index}: checkpoint"
                    f" {symbol_at(checkpoint_symbols, index)}, data {symbol_at(data_dict.symbols, index)}; {fix}"
                )
        elif embed_key in model_state and model_state[embed_key].size(0) != len(data_dict):
            raise FairseqKDError(
                f"{label}: its {side} embedding has {model_state[embed_key].size(0)} rows but the"
                f" data's {side} dictionary has {len(data_dict)} symbols; {fix}"
            )
        else:
            logger.warning(
                f"{label}: no dict.{lang}.txt beside it or in its data directory, so the {side}"
                " dictionary could not be compared symbol by symbol; put its dictionaries beside the checkpoint"
            )


def first_difference(symbols_a, symbols_b):
    """Index of the first position where two symbol lists differ (a length difference counts), else None."""
    for i, (a, b) in enumerate(zip(symbols_a, symbols_b)):
        if a != b:
            return i
    return None if len(symbols_a) == len(symbols_b) else min(len(symbols_a), len(symbols_b))


def symbol_at(symbols, index):
    return repr(symbols[index]) if index < len(symbols) else "<none, list ends>"


def count_parameters(model_state):
    """``(total, embedding, bytes)`` of the parameters of a saved model state, counting tied (shared)
    tensors once.
    Embeddings are the token and learned position tables; fairseq's one-element ``.version`` entries
    are not parameters."""
    seen, total, embedding, size = set(), 0, 0, 0
    for key, tensor in model_state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if key.endswith(".version") or pointer in seen:
            continue
        seen.add(pointer)
        total += tensor.numel()
        size += tensor.numel() * tensor.element_size()
        if "embed_tokens" in key or "embed_positions" in key:
            embedding += tensor.numel()
    return total, embedding, size


def _transformer_option_names():
    parser = argparse.ArgumentParser()
    TransformerModel.add_args(parser)
    return {action.dest for action in parser._actions}


# what a plain translation checkpoint's args keep: the Transformer's own options and what the
# translation task needs to rebuild its dictionaries and positions
_KEPT_OPTIONS = _transformer_option_names() | {
    "data", "source_lang", "target_lang", "left_pad_source", "left_pad_target", "max_source_positions",
    "max_target_positions",
}


def model_name(model_cfg):
    return ARCH_MODEL_NAME_REGISTRY.get(getattr(model_cfg, "arch", None))


def inference_state(path, cfg, state, peer="a"):
    """The checkpoint ``(cfg, state)`` read from ``path``, reduced to what translation needs: a plain
    ``transformer`` model and a ``translation`` task, the model's options and weights only (no teacher, KD,
    optimizer or criterion state). ``peer`` picks one of the two models of a ``transformer_mutual``
    checkpoint. Returns the checkpoint dict; fairseq-generate and CTranslate2's converter both read it."""
    model_cfg = cfg.model
    name = model_name(model_cfg)
    if not isinstance(model_cfg, argparse.Namespace) or name not in INFERENCE_MODELS:
        raise FairseqKDError(
            f"{path}: model {name or getattr(model_cfg, '_name', '?')!r} (--arch"
            f" {getattr(model_cfg, 'arch', '?')}) is not supported; supported are the models"
            f" {', '.join(INFERENCE_MODELS)} (every transformer_*, transformer_student_* and transformer_mutual_*"
            " architecture)"
        )
    if peer not in ("a", "b"):
        raise FairseqKDError(f"--peer must be a or b, got {peer!r}")
    if peer == "b" and name != "transformer_mutual":
        raise FairseqKDError(
            f"--peer b: {path} holds one model ({name}), not the two peers of a transformer_mutual checkpoint;"
            " drop --peer"
        )
    if peer == "b":
        weights = {k[len(PEER_PREFIX):]: v for k, v in state["model"].items() if k.startswith(PEER_PREFIX)}
    else:
        weights = {k: v for k, v in state["model"].items() if not k.startswith(PEER_PREFIX)}
    args = argparse.Namespace(**{k: v for k, v in vars(model_cfg).items() if k in _KEPT_OPTIONS})
    # every dimension is explicit in the saved options, so the stock architecture rebuilds the same model
    args.arch = args._name = "transformer"
    args.task = "translation"
    for option in ("source_lang", "target_lang"):
        setattr(args, option, getattr(args, option, None) or getattr(cfg.task, option, None))
    num_updates = state["optimizer_history"][-1].get("num_updates", 0) if state.get("optimizer_history") else 0
    return {
        "args": args,
        "model": weights,
        # fairseq's loader expects a training history entry; this one records only how long the model trained
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": None,
                               "lr_scheduler_state": {}, "num_updates": num_updates}],
        "extra_state": {},
    }
