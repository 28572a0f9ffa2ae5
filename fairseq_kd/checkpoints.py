"""Reading fairseq checkpoints: one place for loading, dictionary checks, building a model from a
checkpoint, parameter counts and the clean inference checkpoint that export and translation start from;
and reading the data-bins they are used with (a task for one, its splits, checked to be whole).

Reading keeps torch's ``weights_only=True`` (the plugin's allowlist, ``safe_load``, makes fairseq
checkpoints load under it).
"""
import argparse
import hashlib
import logging
import os
import re
import traceback
from dataclasses import dataclass
from typing import List, Optional

import torch
from fairseq import checkpoint_utils, models, tasks, utils
from fairseq.data import Dictionary
from fairseq.data import indexed_dataset
from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager
from fairseq.data.multilingual.multilingual_utils import augment_dictionary, get_lang_tok
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq.models.nat import FairseqNATModel
from fairseq.models.transformer import TransformerModel

from fairseq_kd.errors import FairseqKDError, one_line

logger = logging.getLogger(__name__)

# models whose weights are fairseq's Transformer's under the same names (transformer_mutual: peer a, and
# peer b under ``peer.``)
INFERENCE_MODELS = ("transformer", "transformer_student", "transformer_mutual")
PEER_PREFIX = "peer."


def read_checkpoint(path, option, unreadable_fix="give a checkpoint written by fairseq-train"):
    """``(cfg, state)`` of a fairseq checkpoint; ``option`` names where the path came from in errors, and
    ``unreadable_fix`` what to do about a file that torch cannot read."""
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
            f"{option}: cannot read {path!r} as a fairseq checkpoint ({reason}); {unreadable_fix}"
        ) from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise FairseqKDError(f"{option}: {path!r} holds no model weights; give a checkpoint written by fairseq-train")
    # NaN weights translate every sentence into nothing (or trip an assertion deep in fairseq's beam search)
    diverged = next((name for name, weight in state["model"].items() if torch.is_tensor(weight)
                     and weight.is_floating_point() and not torch.isfinite(weight).all()), None)
    if diverged is not None:
        raise FairseqKDError(
            f"{option}: {path!r} holds weights that are not finite ({diverged} has NaN or infinite values): the"
            " training that wrote it diverged, or the file was edited; give a checkpoint from before"
        )
    if state.get("cfg") is not None:
        return state["cfg"], state
    if state.get("args") is None:
        raise FairseqKDError(
            f"{option}: {path!r} records neither the config ('cfg') nor the arguments ('args') it was trained with,"
            " so its model cannot be rebuilt; give a checkpoint written by fairseq-train"
        )
    return convert_namespace_to_omegaconf(state["args"]), state


def load_model(path, option, label, task, langs=None, multilingual=False, loaded=None):
    """The model of a checkpoint, built for ``task`` and holding the checkpoint's weights, once it is found
    to translate ``langs`` (default: the task's pair) with ``task``'s dictionaries
    (``check_checkpoint_dictionaries``; for a ``multilingual`` task, ``check_multilingual_checkpoint``);
    ``option`` and ``label`` name it in errors. ``loaded``: the model already built from this checkpoint
    (for another pair), returned once checked for ``langs``, so that pairs share one copy."""
    cfg, state = read_checkpoint(path, option)
    if is_non_autoregressive(cfg.model):
        raise FairseqKDError(
            f"{label}: its model (--arch {cfg.model.arch}) is non-autoregressive, with no distribution over each next"
            " token given the ones before; give the checkpoint of an autoregressive translation model"
        )
    langs = langs or (task.cfg.source_lang, task.cfg.target_lang)
    check_language_pair(label, trained_language_pair(cfg.task), langs)
    if multilingual:
        check_multilingual_checkpoint(path, label, cfg.task, state["model"], langs, task.args, task.target_dictionary)
    else:
        check_checkpoint_dictionaries(path, label, cfg.task.data, state["model"], langs,
                                      (task.source_dictionary, task.target_dictionary))
    if loaded is not None:
        return loaded
    # fairseq-train seeds torch before the task loads its teachers and then builds the student: a loaded
    # model's throw-away random initialisation must not draw from that seed, or the student would start
    # elsewhere than with a cache or without KD
    with torch.random.fork_rng(devices=[]):
        model = build_saved_model(label, cfg.model, lambda: models.build_model(cfg.model, task, from_checkpoint=True))
    if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
        raise FairseqKDError(
            f"{label}: its model ({type(model).__name__}, --arch {getattr(cfg.model, 'arch', '?')}) is not an"
            " encoder-decoder translation model; give a checkpoint of a translation model"
        )
    load_saved_weights(label, model, state["model"], cfg.model)
    return model


def build_saved_model(label, model_cfg, build):
    """``build()``, the model of a checkpoint's config; what fairseq's builders raise for it, refused."""
    try:
        return build()
    except Exception as e:  # whatever the saved config makes fairseq's builders raise
        raise FairseqKDError(
            f"{label}: cannot build its model (--arch {getattr(model_cfg, 'arch', '?')}) for this data"
            f" ({type(e).__name__}: {e}); give a checkpoint of a translation model"
        ) from None


def load_saved_weights(label, model, weights, model_cfg=None):
    """A checkpoint's ``weights`` into ``model``, built from its own config: weights that do not fit, refused."""
    try:
        model.load_state_dict(weights, strict=True, model_cfg=model_cfg)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise FairseqKDError(
            f"{label}: its weights do not fit the model its own config describes ({first}); the file is damaged or"
            " was edited: give the checkpoint as fairseq-train wrote it"
        ) from None


def trained_language_pair(task_cfg):
    """``(source, target)`` a checkpoint was trained on: as its config records them, or as fairseq inferred
    them from its data directory's file names when that holds a single pair; else ``(None, None)``."""
    recorded = (getattr(task_cfg, "source_lang", None), getattr(task_cfg, "target_lang", None))
    lang_pairs = getattr(task_cfg, "lang_pairs", None)  # translation_multi_simple_epoch's: "en-de,..." or a list
    if None in recorded and lang_pairs:
        lang_pairs = lang_pairs.split(",") if isinstance(lang_pairs, str) else list(lang_pairs)
        return tuple(lang_pairs[0].split("-")) if len(lang_pairs) == 1 else recorded
    data = getattr(task_cfg, "data", None)
    if None not in recorded or not data or not os.path.isdir(utils.split_paths(data)[0]):
        return recorded
    pairs = data_language_pairs(utils.split_paths(data)[0])
    return pairs[0] if len(pairs) == 1 else recorded


def data_language_pairs(directory):
    """The ``(source, target)`` pairs of a data-bin, from its file names (SPLIT.SRC-TGT.LANG.bin)."""
    pairs = set()
    for name in os.listdir(directory):
        parts = name.split(".")
        if len(parts) == 4 and parts[3] == "bin" and parts[1].count("-") == 1:
            pairs.add(tuple(parts[1].split("-")))
    return sorted(pairs)


def load_dictionary(path):
    """fairseq's ``Dictionary`` of the file ``path``; a file that is not one (a line without a count, a word
    twice, binary content), refused."""
    try:
        return Dictionary.load(path)
    except (ValueError, RuntimeError) as e:  # UnicodeDecodeError is a ValueError
        raise FairseqKDError(
            f"{path}: not a fairseq dictionary ({one_line(e)}); give the dict.LANG.txt fairseq-preprocess wrote"
        ) from None


def setup_data_task(task_cfg, data):
    """fairseq's task for the data-bin ``data`` (``task_cfg``), its dictionaries read; a path that is not a
    data-bin, refused."""
    directory = utils.split_paths(data)[0]
    if not os.path.isdir(directory):
        raise FairseqKDError(f"{data}: no such directory; give a fairseq data-bin (fairseq-preprocess's --destdir)")
    try:
        return tasks.setup_task(task_cfg)
    except FairseqKDError:
        raise
    except Exception as e:  # a missing or damaged dictionary, no binarized pair to infer the languages from, ...
        raise FairseqKDError(
            f"{data}: cannot read it as a fairseq data-bin ({one_line(e)}); check the directory and the"
            " languages, or binarize the data again with fairseq-preprocess"
        ) from None


def load_split(task, split, data, src, tgt, option, combine=False):
    """``task.load_dataset(split, combine=combine)`` of the ``src``-``tgt`` data in ``data``, with a missing or
    empty split refused in one line (fairseq cannot even open an empty binarized split: it memory-maps an
    empty file); ``option`` names the command-line option that chose the split."""
    empty = FairseqKDError(f"{option}: split '{split}' of {data} has no sentences; leave it out, or binarize a non-empty one")
    directory = utils.split_paths(data)[0]
    pairs = (f"{src}-{tgt}", f"{tgt}-{src}")
    sources = [os.path.join(directory, f"{split}.{pair}.{src}.bin") for pair in pairs]
    if any(os.path.isfile(source) and os.path.getsize(source) == 0 for source in sources):
        raise empty
    appended = [os.path.join(directory, f"{split}1.{pair}.{src}.bin") for pair in pairs]
    if combine and getattr(getattr(task, "cfg", None), "upsample_primary", 1) < 1 and any(map(os.path.isfile, appended)):
        # fairseq's default -1 fails on them (numpy.tile of a negative count), in fairseq-train as well
        raise FairseqKDError(
            f"{option}: {data} holds '{split}1' beside '{split}', which fairseq-train appends to its training data"
            " only with --upsample-primary N (1: each sentence once); pass the one the training uses"
        )
    try:
        task.load_dataset(split, combine=combine)
    except FileNotFoundError:
        raise FairseqKDError(
            f"{option}: {data} has no split '{split}' for {src}-{tgt}; name binarized splits (train, valid, test, ...)"
        ) from None
    except Exception as e:  # a truncated or overwritten .bin or .idx file
        raise damaged_binarized(f"{option}: cannot read split '{split}' of {data}", e) from None
    if len(task.dataset(split)) == 0:
        raise empty
    check_binarized(task.dataset(split))


def damaged_binarized(what, error):
    """The refusal of binarized files that fairseq's readers failed on: ``what`` could not be read (``error``)."""
    return FairseqKDError(f"{what} ({one_line(error)}); its files are damaged: binarize it again with fairseq-preprocess")


def raised_reading_binarized(error):
    """Whether ``error`` came from fairseq's reader of binarized files (a truncated or overwritten .idx)."""
    return traceback.extract_tb(error.__traceback__)[-1].filename == indexed_dataset.__file__


def check_binarized(dataset):
    """Refuse a dataset (or one it wraps) read from a .bin file shorter than its .idx says: a truncated copy,
    or an index of other data. fairseq memory-maps the file and would fail only when a batch reaches the
    missing sentences, in the middle of a training or an evaluation."""
    seen, todo = set(), [dataset]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, indexed_dataset.MMapIndexedDataset):
            index = item._index
            written = len(item._bin_buffer)
            needed = int((index._pointers + index.sizes * index.dtype().itemsize).max(initial=0))
            if written < needed:
                raise FairseqKDError(
                    f"{item._path}.bin has {written} bytes, but its index {item._path}.idx needs {needed}: the file"
                    " was cut short (an interrupted copy?) or the index is of other data; binarize it again with"
                    " fairseq-preprocess"
                )
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, torch.utils.data.Dataset):  # fairseq's wrappers hold the datasets they wrap
            todo.extend(vars(item).values())


def check_language_pair(label, recorded, langs):
    """A checkpoint that records its languages must translate in the data's direction."""
    if None not in recorded and None not in langs and tuple(recorded) != tuple(langs):
        raise FairseqKDError(
            f"{label}: it translates {recorded[0]}->{recorded[1]}, but the data is {langs[0]}->{langs[1]}; give a"
            f" model of {langs[0]}->{langs[1]} (or -s {recorded[0]} -t {recorded[1]})"
        )


def resumed_checkpoint_path(save_dir, restore_file, suffix, continue_once):
    """The checkpoint ``fairseq-train`` resumes from, found as fairseq's ``checkpoint_utils.load_checkpoint``
    finds it: SAVE_DIR/checkpoint_last{SUFFIX}.pt by default (``--continue-once`` where that does not exist
    yet), else ``--restore-file`` with the suffix before its ``.pt``. It may not exist (a fresh run)."""
    if restore_file == "checkpoint_last.pt":
        path = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
        return continue_once if continue_once and not os.path.exists(path) else path
    return restore_file.replace(".pt", suffix + ".pt") if suffix else restore_file


def read_resumed_checkpoint(path):
    """``read_checkpoint`` of the checkpoint ``fairseq-train`` resumes from, naming what to do about one cut
    short: fairseq-train writes checkpoint_best.pt, then copies it over checkpoint_last.pt, so a run killed
    during that copy leaves the copy cut short and the best one whole."""
    return read_checkpoint(path, "--restore-file", "this run cannot resume from it: copy an intact checkpoint of"
                           " the run over it (checkpoint_best.pt, after a run stopped while saving), or delete it"
                           " to train afresh")


def check_resumed_settings(current, path, reset_optimizer, allow_changes, task_state=None):
    """When ``fairseq-train`` is about to resume from ``path`` (``resumed_checkpoint_path``) without
    ``--reset-optimizer``, compare the options ``current`` ({config section: {name: value}}) with
    those the checkpoint was trained with, and ``task_state`` (the task's class name and a function
    returning {name: value}, called on a resume only) with what the task kept in the checkpoint
    (``saved_task_state``; a value it did not keep is not compared): a difference is refused in one line,
    or with ``allow_changes`` logged. Returns the checkpoint, ``(config, state)``, or None for a fresh run."""
    if reset_optimizer or not os.path.isfile(path):
        return None
    cfg, state = read_resumed_checkpoint(path)
    changed = [f"--{name.replace('_', '-')} {saved_option(cfg, section, name)} -> {value}"
               for section, options in current.items() for name, value in options.items()
               if str(saved_option(cfg, section, name)) != str(value)]
    if task_state is not None:
        task_name, current_state = task_state
        saved = saved_task_state(state, task_name)
        changed += [f"{name} {abbreviate_sha256(saved[name])} -> {abbreviate_sha256(value)}"
                    for name, value in current_state().items() if saved.get(name) not in (None, value)]
    if changed and not allow_changes:
        raise FairseqKDError(
            f"{path} was trained with other distillation settings ({'; '.join(changed)}): resuming would mix two"
            " runs; give the settings it was trained with, start afresh in another --save-dir, or pass"
            " --kd-allow-changed-settings to continue with the new ones"
        )
    for change in changed:
        logger.warning(f"resuming {path} with a changed setting (--kd-allow-changed-settings): {change}")
    return cfg, state


def saved_task_state(checkpoint, task_name):
    """What a task's ``get_checkpoint_dict`` kept in a checkpoint (its state dict), {} if nothing."""
    return (checkpoint.get("extra_state") or {}).get(task_name) or {}


def abbreviate_sha256(value):
    """``value`` as text, each sha256 in it cut to its first 12 digits (enough to tell files apart)."""
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1", str(value))


def saved_option(cfg, section, name):
    """An option of a checkpoint's config section (an argparse-based task keeps its section as a Namespace)."""
    options = cfg.get(section) or {}
    return getattr(options, name, None) if isinstance(options, argparse.Namespace) else options.get(name)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint_dictionaries(path, label, trained_on, model_state, langs, dictionaries, added_symbols=(),
                                  fix=None):
    """A checkpoint's dictionaries must equal the data's (``dictionaries``: source and target, of the
    languages ``langs``), symbol for symbol, or its outputs mean nothing. They are looked for beside the
    checkpoint, then in ``trained_on``, the data directory it was trained on (None: unknown), and extended
    with ``added_symbols`` (a multilingual model's language tokens, which its task appends); failing both,
    only the embedding sizes can be compared. ``label`` names the checkpoint in messages, ``fix`` the remedy."""
    search = [os.path.dirname(os.path.abspath(path))]
    if trained_on:
        search.append(utils.split_paths(trained_on)[0])
    fix = fix or (
        "re-binarize the data with the checkpoint's dictionaries (fairseq-preprocess --srcdict/--tgtdict"
        " CHECKPOINT_DATA/dict.LANG.txt)"
    )
    for side, lang, data_dict, embed_key in zip(
        ("source", "target"), langs, dictionaries, ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    ):
        dict_files = [os.path.join(d, f"dict.{lang}.txt") for d in search]
        dict_file = next((f for f in dict_files if os.path.isfile(f)), None)
        if dict_file is not None:
            checkpoint_symbols = load_dictionary(dict_file).symbols + list(added_symbols)
            index = first_difference(checkpoint_symbols, data_dict.symbols)
            if index is not None:
                raise FairseqKDError(
                    f"{label}: its {side} dictionary {dict_file}{' with its language tokens' if added_symbols else ''}"
                    f" ({len(checkpoint_symbols)} symbols)"
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


# what decides the inputs and outputs of a translation_multi_simple_epoch model, besides its dictionary
LANGUAGE_TOKEN_OPTIONS = ("encoder_langtok", "decoder_langtok", "lang_tok_style", "lang_tok_replacing_bos_eos")
MULTILINGUAL_TASKS = ("translation_multi_simple_epoch", "translation_multi_distillation")


@dataclass
class LanguageTokens:
    """How a model trained by ``translation_multi_simple_epoch`` marks languages, for one language pair:
    ``symbols``, what fairseq appends to its dictionary (a token per language of its --lang-dict);
    ``source``, the token its sources start with (--encoder-langtok), and ``target``, the token the decoder is
    given as its first output (--decoder-langtok) and translations are stripped of; None where not used."""

    symbols: List[str]
    source: Optional[str]
    target: Optional[str]


def task_name(task_cfg):
    return getattr(task_cfg, "_name", None) or getattr(task_cfg, "task", None)


def language_tokens(label, task_cfg, langs, data=None):
    """The ``LanguageTokens`` of a checkpoint's task config for the pair ``langs``, or None for a
    bilingual task. Its --lang-dict is read where training read it, else from ``data`` by its name."""
    if task_name(task_cfg) not in MULTILINGUAL_TASKS:
        return None
    if task_cfg.lang_tok_replacing_bos_eos:
        raise FairseqKDError(f"{label}: --lang-tok-replacing-bos-eos is not supported; train it with --decoder-langtok")
    lang_dict = task_cfg.lang_dict
    if lang_dict and not os.path.isfile(lang_dict) and data and os.path.isfile(os.path.join(data, os.path.basename(lang_dict))):
        lang_dict = os.path.join(data, os.path.basename(lang_dict))
    if lang_dict and not os.path.isfile(lang_dict):
        raise FairseqKDError(
            f"{label}: its --lang-dict {task_cfg.lang_dict} (the order of its language tokens) is not on this machine;"
            " put it in the data directory under that name"
        )
    lang_pairs = task_cfg.lang_pairs
    languages = MultilingualDatasetManager.load_langs(argparse.Namespace(
        lang_dict=lang_dict, langs=task_cfg.langs,
        lang_pairs=lang_pairs.split(",") if isinstance(lang_pairs, str) else lang_pairs))
    added = Dictionary()
    first = len(added)
    augment_dictionary(added, languages, task_cfg.lang_tok_style, getattr(task_cfg, "langtoks_specs", None) or ["main"],
                       getattr(task_cfg, "extra_data", None))
    style, (src, tgt) = task_cfg.lang_tok_style, langs
    source = None
    if task_cfg.encoder_langtok:
        spec = task_cfg.encoder_langtok
        source = get_lang_tok(lang=src if spec.startswith("src") else tgt, lang_tok_style=style, spec=spec)
    target = get_lang_tok(lang=tgt, lang_tok_style=style, spec="tgt") if task_cfg.decoder_langtok else None
    return LanguageTokens(added.symbols[first:], source, target)


def check_multilingual_checkpoint(path, label, task_cfg, model_state, langs, args, dictionary):
    """A teacher of a multilingual student must have been trained by ``translation_multi_simple_epoch`` with
    the student's language-token options (``args``) and the same dictionary, language tokens included
    (``dictionary``): its dict.LANG.txt, beside it or in its data directory, extended with the tokens of its
    --lang-dict as fairseq does, symbol for symbol."""
    fix = (
        "train the teacher with --task translation_multi_simple_epoch, this run's --lang-dict,"
        " --encoder-langtok, --decoder-langtok and dictionary"
    )
    if task_name(task_cfg) not in MULTILINGUAL_TASKS:
        raise FairseqKDError(
            f"{label}: it was trained with --task {task_name(task_cfg)}, so its inputs carry no language tokens; {fix}"
        )
    for option in LANGUAGE_TOKEN_OPTIONS:
        if getattr(task_cfg, option, None) != getattr(args, option, None):
            raise FairseqKDError(
                f"{label}: it was trained with --{option.replace('_', '-')} {getattr(task_cfg, option, None)}, this run"
                f" uses {getattr(args, option, None)}; {fix}"
            )
    # a --lang-dict of another machine's path is read from the student's data directory by its name
    tokens = language_tokens(label, task_cfg, langs, utils.split_paths(args.data)[0])
    check_checkpoint_dictionaries(path, label, task_cfg.data, model_state, langs, (dictionary, dictionary),
                                  tokens.symbols, fix)


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
    Tied tensors share one storage in a checkpoint saved from the CPU; saved from a GPU, each is its own copy
    (fairseq moves tensors to the CPU one by one), so a matrix equal to one already counted is a tied copy:
    two independently initialised matrices are never equal. Embeddings are the token and learned position
    tables; fairseq's one-element ``.version`` entries are not parameters."""
    seen, matrices, total, embedding, size = set(), [], 0, 0, 0
    for key, tensor in model_state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if key.endswith(".version") or pointer in seen:
            continue
        seen.add(pointer)
        if tensor.dim() > 1:
            if any(m.shape == tensor.shape and torch.equal(m, tensor) for m in matrices):
                continue
            matrices.append(tensor)
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


def is_non_autoregressive(model_cfg):
    """Whether a checkpoint's model is one of fairseq's NAT models (decoded by iterative refinement)."""
    model_class = ARCH_MODEL_REGISTRY.get(getattr(model_cfg, "arch", None))
    return model_class is not None and issubclass(model_class, FairseqNATModel)


def inference_state(path, cfg, state, peer="a"):
    """The checkpoint ``(cfg, state)`` read from ``path``, reduced to what translation needs: a plain
    ``transformer`` model and a ``translation`` task, the model's options and weights only (no teacher, KD,
    optimizer or criterion state). ``peer`` picks one of the two models of a ``transformer_mutual``
    checkpoint. Returns the checkpoint dict; fairseq-generate and CTranslate2's converter both read it."""
    model_cfg = cfg.model
    name = model_name(model_cfg)
    if is_non_autoregressive(model_cfg):
        raise FairseqKDError(
            f"{path}: {name} is non-autoregressive, and CTranslate2 has no decoder for it; decode it with"
            " fairseq-kd-eval or fairseq-generate --task translation_lev"
        )
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
