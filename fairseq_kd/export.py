"""``fairseq-kd-export``: a teacher or student checkpoint -> a CTranslate2 model directory that
``fairseq-kd-translate`` (or CTranslate2 itself) translates raw text with.

    fairseq-kd-export checkpoints/checkpoint_best.pt --data data-bin --sentencepiece-model spm.model \\
        --out student-ct2 [--quantization int8|int8_float32|float32] [--vmap] [--peer a|b] [--force]

The checkpoint is first reduced to a plain ``transformer`` model of the ``translation`` task, its options
and weights only, so conversion never loads teachers, KD options or optimizer state; CTranslate2's fairseq
converter then turns it into ``model.bin``. The directory also holds the subword model and
``fairseq_kd_export.json`` (source checkpoint and its sha256, languages, quantization, subwords,
post-processing, the model's source and target position limits). ``--vmap`` adds a vocabulary map (CTranslate2's ``vmap``):
for each source piece the target pieces that co-occur with it most in the training data (Dice
coefficient of sentence counts), plus the most frequent target pieces, so that decoding computes the
output layer over a batch's candidates only.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from fairseq.data import data_utils
from scipy import sparse

from fairseq_kd.checkpoints import (check_binarized, count_parameters, damaged_binarized, inference_state, model_name,
                                    read_checkpoint, sha256)
from fairseq_kd.errors import FairseqKDError, make_writable_directory, one_line
from fairseq_kd.inference import (
    EXPORT_MANIFEST,
    Subwords,
    checked_dictionaries,
    import_ctranslate2,
    language_token_pieces,
    requested_language_pair,
)

logger = logging.getLogger("fairseq_kd.export")

QUANTIZATIONS = ("int8", "int8_float32", "float32")
# activations CTranslate2's fairseq converter maps (fairseq name -> what it becomes)
ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_accurate", "swish")


def get_parser():
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="fairseq checkpoint: transformer, transformer_student_* or transformer_mutual_*")
    parser.add_argument("--data", required=True, help="the fairseq data-bin the model was trained on (its dictionaries)")
    subwords = parser.add_mutually_exclusive_group(required=True)
    subwords.add_argument("--sentencepiece-model", help="the sentencepiece .model the data was encoded with")
    subwords.add_argument("--bpe-codes", help="the subword-nmt BPE codes the data was encoded with")
    parser.add_argument("--source-lang", help="a multilingual model's language pair to export (with --target-lang)")
    parser.add_argument("--target-lang", help="see --source-lang")
    parser.add_argument("--out", required=True, help="output directory (must not exist, unless --force)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="int8",
                        help="weight type of the exported model (default: int8)")
    parser.add_argument("--peer", choices=("a", "b"), default="a",
                        help="which peer of a transformer_mutual checkpoint to export (default: a)")
    parser.add_argument("--vmap", action="store_true",
                        help="add a vocabulary map built from the training data (fairseq-kd-translate uses it)")
    parser.add_argument("--vmap-per-token", type=int, default=30,
                        help="target candidates per source piece in the vocabulary map (default: 30)")
    parser.add_argument("--vmap-common", type=int, default=300,
                        help="most frequent target pieces that are always candidates (default: 300)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def check_output(args):
    """Refuse before any work: an existing --out without --force, or an --out that is or holds one of the
    inputs or the working directory (--force replaces it)."""
    out = os.path.realpath(args.out)
    inputs = [args.checkpoint, args.data, args.sentencepiece_model or args.bpe_codes]
    for path in [path for path in inputs if path] + [os.getcwd()]:
        if os.path.commonpath([os.path.realpath(path), out]) == out:
            raise FairseqKDError(f"--out {args.out} is or holds {path}, which --force would delete; choose a new directory")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FairseqKDError(f"--out {args.out} is a file; choose a directory name")
        if not args.force:
            raise FairseqKDError(f"--out {args.out} exists; choose another directory or pass --force to replace it")
    for option in ("vmap_per_token", "vmap_common"):
        if getattr(args, option) < 0:
            raise FairseqKDError(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")


def check_convertible(path, model_args):
    """What CTranslate2's Transformer cannot represent, refused up front with the option to change."""
    activation = getattr(model_args, "activation_fn", "relu")
    problems = []
    if activation not in ACTIVATIONS:
        problems.append(f"--activation-fn {activation} (supported: {', '.join(ACTIVATIONS)})")
    for option in ("no_token_positional_embeddings", "cross_self_attention", "no_cross_attention"):
        if getattr(model_args, option, False):
            problems.append(f"--{option.replace('_', '-')}")
    if getattr(model_args, "adaptive_softmax_cutoff", None):
        problems.append("--adaptive-softmax-cutoff")
    # a trained linear layer after the embeddings, which the converter leaves out: a silently other model
    if getattr(model_args, "quant_noise_pq", 0):
        problems.append(f"--quant-noise-pq {model_args.quant_noise_pq}")
    for option in ("decoder_input_dim", "decoder_output_dim"):  # the converter maps neither projection alone
        if getattr(model_args, option, model_args.decoder_embed_dim) != model_args.decoder_embed_dim:
            problems.append(f"--{option.replace('_', '-')} {getattr(model_args, option)} with --decoder-embed-dim"
                            f" {model_args.decoder_embed_dim}")
    for option in ("attention_heads", "normalize_before"):
        encoder, decoder = getattr(model_args, f"encoder_{option}"), getattr(model_args, f"decoder_{option}")
        if encoder != decoder:
            problems.append(f"--encoder-{option.replace('_', '-')} {encoder} with --decoder-{option.replace('_', '-')} {decoder}")
    if problems:
        raise FairseqKDError(
            f"{path}: CTranslate2 cannot run a Transformer with {'; '.join(problems)}; train the model without it"
        )
    for option in ("max_source_positions", "max_target_positions"):  # the export's length limits
        value = getattr(model_args, option, None)
        if type(value) is not int or value < 1:
            raise FairseqKDError(
                f"{path}: its config's {option} is {value!r}, not a number of positions >= 1; the file was edited"
                " or damaged: give the checkpoint as fairseq-train wrote it"
            )


def training_side(data, langs, lang, dictionary):
    """LANG's side of the binarized training split of ``data``, binarized in either direction (as fairseq
    reads it)."""
    for pair in ("-".join(langs), "-".join(reversed(langs))):
        prefix = os.path.join(data, f"train.{pair}.{lang}")
        try:
            dataset = data_utils.load_indexed_dataset(prefix, dictionary)
        except Exception as e:  # a truncated or overwritten .idx: fairseq's readers fail in many ways
            raise damaged_binarized(f"--vmap: cannot read {prefix}", e) from None
        if dataset is not None and len(dataset):
            check_binarized(dataset)
            return dataset
    raise FairseqKDError(f"--vmap: {data} has no binarized training split train.{'-'.join(langs)}.{lang}.* (or"
                         f" train.{'-'.join(reversed(langs))}.{lang}.*); the map is built from it")


def vocabulary_map(data, langs, dictionaries, per_token, common):
    """Lines of a CTranslate2 vocabulary map from the binarized training split of ``data``: for each
    source symbol the ``per_token`` target symbols with the highest Dice coefficient of sentence
    co-occurrence, and (under the empty key) the ``common`` most frequent target symbols."""
    src_dict, tgt_dict = dictionaries
    sides = []
    for lang, dictionary in zip(langs, dictionaries):
        dataset = training_side(data, langs, lang, dictionary)
        rows, cols = [], []
        for i in range(len(dataset)):
            symbols = np.unique(dataset[i].numpy())
            rows.append(np.full(len(symbols), i))
            cols.append(symbols)
        presence = sparse.csr_matrix(
            (np.ones(sum(map(len, cols)), dtype=np.float32), (np.concatenate(rows), np.concatenate(cols))),
            shape=(len(dataset), len(dictionary)),
        )
        sides.append(presence)
    source, target = sides
    cooccurrence = (source.T @ target).tocsr()  # source symbol x target symbol: sentences with both
    source_count = np.asarray(source.sum(0)).ravel()
    target_count = np.asarray(target.sum(0)).ravel()
    specials = {tgt_dict.bos(), tgt_dict.pad(), tgt_dict.eos(), tgt_dict.unk()}
    always = [t for t in np.argsort(-target_count, kind="stable") if t not in specials][:common]
    lines = ["\t" + " ".join(tgt_dict[t] for t in always)]
    for s in range(len(src_dict)):
        row = cooccurrence.getrow(s)
        if s in specials or row.nnz == 0:
            continue
        dice = 2 * row.data / (source_count[s] + target_count[row.indices])
        best = row.indices[np.argsort(-dice, kind="stable")[:per_token]]
        lines.append(f"{src_dict[s]}\t" + " ".join(tgt_dict[t] for t in best if t not in specials))
    return lines


def export(args):
    check_output(args)
    pair = requested_language_pair(args.source_lang, args.target_lang)
    ctranslate2 = import_ctranslate2()
    from ctranslate2.converters import FairseqConverter

    kind = "sentencepiece" if args.sentencepiece_model else "bpe"
    subwords = Subwords(kind, args.sentencepiece_model or args.bpe_codes)
    original_cfg, original_state = read_checkpoint(args.checkpoint, "checkpoint")
    state = inference_state(args.checkpoint, original_cfg, original_state, args.peer)
    del original_state
    model_args = state["args"]
    check_convertible(args.checkpoint, model_args)
    langs, dictionaries, tokens = checked_dictionaries(args.checkpoint, original_cfg.task, state, args.data, pair)
    subwords.check_dictionary(dictionaries[0])
    source_token, target_token = language_token_pieces(tokens)
    out = os.path.realpath(args.out)  # a link to a directory: --force replaces the directory, the link stays
    make_writable_directory("--out", args.out, os.path.dirname(out))  # once the inputs are found convertible
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out), prefix=".export-") as work:
        clean = os.path.join(work, "inference.pt")
        torch.save(state, clean)
        vmap = None
        if args.vmap:
            vmap = os.path.join(work, "vmap.txt")
            lines = vocabulary_map(args.data, langs, dictionaries, args.vmap_per_token, args.vmap_common)
            with open(vmap, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            logger.info(f"vocabulary map: {len(lines) - 1} source pieces, {args.vmap_per_token} candidates each,"
                        f" {args.vmap_common} always")
        staged = os.path.join(work, "model")
        # the converter reads the dictionaries from a data directory: a multilingual model's, language tokens
        # included, are written for it
        dictionary_dir = args.data
        if tokens:
            dictionary_dir = os.path.join(work, "dictionaries")
            os.makedirs(dictionary_dir)
            for lang, dictionary in zip(langs, dictionaries):
                dictionary.save(os.path.join(dictionary_dir, f"dict.{lang}.txt"))
        converter = FairseqConverter(clean, dictionary_dir, source_lang=langs[0], target_lang=langs[1])
        try:
            converter.convert(staged, vmap=vmap, quantization=args.quantization)
        except Exception as e:  # whatever a config or weights it cannot map make the converter raise
            raise FairseqKDError(f"CTranslate2 cannot convert {args.checkpoint}: {one_line(e)}") from None
        shutil.copyfile(subwords.path, os.path.join(staged, os.path.basename(subwords.path)))
        params, embedding_params, _ = count_parameters(state["model"])
        manifest = {
            "source_checkpoint": os.path.abspath(args.checkpoint),
            "sha256": sha256(args.checkpoint),
            "peer": args.peer if model_name(original_cfg.model) == "transformer_mutual" else None,
            "architecture": original_cfg.model.arch,
            "params": params,
            "embedding_params": embedding_params,
            "quantization": args.quantization,
            "source_lang": langs[0],
            "target_lang": langs[1],
            # a multilingual model's: the token its sources start with and the one it is told to start with
            "language_tokens": [source_token, target_token],
            "language_symbols": tokens.symbols if tokens else [],
            "subwords": {"kind": kind, "file": os.path.basename(subwords.path)},
            "post_process": Subwords.KINDS[kind],
            "max_source_positions": int(model_args.max_source_positions),
            "max_target_positions": int(model_args.max_target_positions),
            "vmap": vmap is not None,
            "vmap_per_token": args.vmap_per_token if vmap else None,
            "vmap_common": args.vmap_common if vmap else None,
            "ctranslate2": ctranslate2.__version__,
        }
        with open(os.path.join(staged, EXPORT_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out):  # --force, checked above
            shutil.rmtree(out)
        os.replace(staged, out)
    size = os.path.getsize(os.path.join(out, "model.bin"))
    logger.info(f"{args.checkpoint} -> {out} ({args.quantization}, model.bin {size / 2**20:.1f} MB)")
    return manifest


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr, force=True)
    export(get_parser().parse_args(argv))


if __name__ == "__main__":
    main()
