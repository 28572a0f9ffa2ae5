"""``fairseq-kd-translate``: raw text in, detokenized translations out, one line for each line.

    fairseq-kd-translate student-ct2 < raw.en > translated.de                   # exported directory
    fairseq-kd-translate checkpoint_best.pt --data data-bin --sentencepiece-model spm.model < raw.en

MODEL is a directory written by fairseq-kd-export (CTranslate2; the subword model comes with it) or a
fairseq checkpoint with the data-bin it was trained on and its subword model (a multilingual checkpoint of
several pairs: the pair to translate with -s and -t). With ``--subwords`` the input and the output are the
model's subword pieces instead of raw text, as fairseq-generate's ``H-`` lines: a sequence-level KD corpus
from the subword training source (``scripts/distilled_corpus.py --hypotheses``). Both decode with
fairseq-generate's rules and defaults (beam 5, at most 200 output pieces, length penalty 1; see
``fairseq_kd.inference``), in batches of sentences of similar length; empty lines stay empty. Progress
goes to stderr.
"""
import argparse
import logging
import os
import sys
import time

import torch

from fairseq_kd.errors import FairseqKDError, make_writable_directory, overwritten_input
from fairseq_kd.inference import (
    CTranslate2Translator,
    DecodingOptions,
    FairseqTranslator,
    Subwords,
    export_subwords,
    requested_language_pair,
    translate_all,
)

logger = logging.getLogger("fairseq_kd.translate")


def get_parser():
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-translate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a directory written by fairseq-kd-export, or a fairseq checkpoint")
    parser.add_argument("--data", help="checkpoint only: the fairseq data-bin it was trained on (its dictionaries)")
    subwords = parser.add_mutually_exclusive_group()
    subwords.add_argument("--sentencepiece-model", help="checkpoint only: the sentencepiece model of the data")
    subwords.add_argument("--bpe-codes", help="checkpoint only: the subword-nmt BPE codes of the data")
    parser.add_argument("--peer", choices=("a", "b"),
                        help="checkpoint only: peer of a transformer_mutual model (default: a)")
    parser.add_argument("-s", "--source-lang", help="checkpoint only: the source language (a multilingual model's pair)")
    parser.add_argument("-t", "--target-lang", help="checkpoint only: the target language (see --source-lang)")
    parser.add_argument("--input", default="-", help="raw text file, one sentence per line (default: stdin)")
    parser.add_argument("--output", default="-", help="where the translations go (default: stdout)")
    parser.add_argument("--subwords", action="store_true",
                        help="read and write subword pieces (space-separated, as the data-bin's text was) instead "
                             "of raw text; a checkpoint then needs no subword model")
    parser.add_argument("--beam", type=int, default=5, help="beam size (default: 5)")
    parser.add_argument("--max-len-a", type=float, default=0.0,
                        help="at most a * source pieces + b output pieces, as fairseq-generate (default: 0)")
    parser.add_argument("--max-len-b", type=int, default=200, help="see --max-len-a (default: 200)")
    parser.add_argument("--lenpen", type=float, default=1.0, help="length penalty, as fairseq-generate (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-vmap", action="store_true", help="exported model: ignore its vocabulary map")
    return parser


def load(args, options):
    """``(translator, subwords)`` for MODEL."""
    checkpoint_only = [flag for flag, value in (("--data", args.data), ("--sentencepiece-model", args.sentencepiece_model),
                                                ("--bpe-codes", args.bpe_codes), ("--peer", args.peer),
                                                ("--source-lang", args.source_lang), ("--target-lang", args.target_lang))
                       if value]
    if os.path.isdir(args.model):
        if checkpoint_only:
            raise FairseqKDError(
                f"{' and '.join(checkpoint_only)} apply to a fairseq checkpoint; {args.model} is an exported"
                " directory, which carries its own dictionaries, subword model and language pair: drop them"
            )
        translator = CTranslate2Translator(args.model, options, threads=args.threads, device=args.device,
                                           use_vmap=False if args.no_vmap else None)
        return translator, export_subwords(args.model)
    if not os.path.isfile(args.model):
        raise FairseqKDError(f"no such file or directory {args.model!r}; give an exported directory or a checkpoint")
    if not args.data or not (args.sentencepiece_model or args.bpe_codes or args.subwords):
        raise FairseqKDError(
            f"{args.model} is a checkpoint: give --data (its data-bin) and --sentencepiece-model or --bpe-codes"
            " (or --subwords), or translate with a directory written by fairseq-kd-export"
        )
    if args.no_vmap:
        raise FairseqKDError("--no-vmap applies to an exported directory; a checkpoint has no vocabulary map")
    subwords = None
    if args.sentencepiece_model:
        subwords = Subwords("sentencepiece", args.sentencepiece_model)
    elif args.bpe_codes:
        subwords = Subwords("bpe", args.bpe_codes)
    torch.set_num_threads(args.threads)
    langs = requested_language_pair(args.source_lang, args.target_lang)
    translator = FairseqTranslator(args.model, args.data, options, peer=args.peer or "a", device=args.device, langs=langs)
    if subwords is not None:
        subwords.check_dictionary(translator.src_dict)
    return translator, subwords


def read_lines(path):
    """The input's lines, split at line feeds only: str.splitlines also splits at form feeds, U+2028 and
    others, which raw text can hold inside a line, and every later translation would land a line off."""
    try:
        if path == "-":
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
    except FileNotFoundError:
        raise FairseqKDError(f"--input: no such file {path!r}") from None
    except OSError as e:  # a directory, no permission, ...
        raise FairseqKDError(f"--input {path}: cannot read it ({e.strerror}); give a text file") from None
    except UnicodeDecodeError as e:
        raise FairseqKDError(f"--input {path}: not UTF-8 text ({e}); convert it to UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the last line's line feed
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def files_read(args):
    """The files a run reads: the input, the model (an export's files), the data-bin's and the subword model."""
    paths = [args.sentencepiece_model, args.bpe_codes, None if args.input == "-" else args.input]
    for path in (args.model, args.data):
        if path and os.path.isdir(path):
            paths += [os.path.join(path, name) for name in os.listdir(path)]
        else:
            paths.append(path)
    return [path for path in paths if path and os.path.isfile(path)]


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.WARNING,
                        stream=sys.stderr, force=True)
    args = get_parser().parse_args(argv)
    options = DecodingOptions(beam=args.beam, max_len_a=args.max_len_a, max_len_b=args.max_len_b, lenpen=args.lenpen)
    options.check()
    for option, value in (("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value < 1:
            raise FairseqKDError(f"{option} must be >= 1, got {value}")
    if args.output != "-":
        if os.path.isdir(args.output):
            raise FairseqKDError(f"--output {args.output} is a directory; give a file name")
        read = overwritten_input(args.output, files_read(args))
        if read:
            raise FairseqKDError(f"--output {args.output} is an input of this run ({read}); choose another file")
    translator, subwords = load(args, options)
    lines = read_lines(args.input)
    if args.output != "-":  # made once the model and input are read, before any translation is spent on it
        make_writable_directory("--output", args.output, os.path.dirname(os.path.abspath(args.output)))
    sources = [line.split() if args.subwords else subwords.encode(line) for line in lines]
    start = last_report = time.perf_counter()

    def report(done, total):
        nonlocal last_report
        now = time.perf_counter()
        if now - last_report >= 10 or done == total:
            print(f"fairseq-kd-translate: {done}/{total} sentences, {done / (now - start):.1f} sentences/s",
                  file=sys.stderr)
            last_report = now

    outputs = translate_all(translator, sources, args.batch_size, report)  # empty lines stay empty
    translations = [" ".join(pieces) if args.subwords else subwords.decode(pieces) for pieces in outputs]
    text = "".join(line + "\n" for line in translations)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:  # a full disk, a file that cannot be replaced
            raise FairseqKDError(f"--output {args.output}: cannot write the translations ({e.strerror})") from None


if __name__ == "__main__":
    main()
