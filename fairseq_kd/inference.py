"""Translation with a fairseq checkpoint or an exported CTranslate2 model, under the same decoding rules.

Both backends take batches of subword pieces and return subword pieces, and decode with fairseq's rules:
beam search of ``beam`` hypotheses, scores normalised by ``length ** lenpen`` (end of sentence included),
at least one token, and at most ``int(max_len_a * S + max_len_b)`` tokens before the end of sentence,
where S is the longest source of the batch in pieces plus its end of sentence, capped by the model's
positions. With the same batches, a float32 export therefore writes what ``fairseq-generate`` writes; at
beam 1 also for a model that runs to the length limit. In beam search two corner cases can rank
hypotheses differently (README, "Deploy"): those that reach the length limit (fairseq forces and scores an
end of sentence, CTranslate2 stops), and models that give the first end of sentence real probability
(fairseq masks it, CTranslate2 masks and renormalises). ``ctranslate2`` is imported only by its backend.
"""
import contextlib
import io
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from fairseq.data import data_utils
from fairseq.iterative_refinement_generator import IterativeRefinementGenerator
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.models.transformer import TransformerModel
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks.translation_lev import TranslationLevenshteinConfig, TranslationLevenshteinTask

from fairseq_kd.checkpoints import (
    MULTILINGUAL_TASKS,
    build_saved_model,
    check_checkpoint_dictionaries,
    check_language_pair,
    data_language_pairs,
    inference_state,
    is_non_autoregressive,
    language_tokens,
    load_dictionary,
    load_saved_weights,
    read_checkpoint,
    task_name,
    trained_language_pair,
)
from fairseq_kd.errors import FairseqKDError, one_line

EXPORT_MANIFEST = "fairseq_kd_export.json"


@dataclass
class DecodingOptions:
    """fairseq-generate's defaults."""

    beam: int = 5
    max_len_a: float = 0.0
    max_len_b: int = 200
    lenpen: float = 1.0
    # non-autoregressive models: refinement iterations and length candidates
    iter_decode_max_iter: int = 10
    iter_decode_with_beam: int = 1

    def check(self):
        if self.beam < 1:
            raise FairseqKDError(f"--beam must be >= 1, got {self.beam}")
        if self.iter_decode_max_iter < 0 or self.iter_decode_with_beam < 1:
            raise FairseqKDError(
                f"--iter-decode-max-iter must be >= 0 and --iter-decode-with-beam >= 1, got"
                f" {self.iter_decode_max_iter} and {self.iter_decode_with_beam}"
            )
        if not (self.max_len_a >= 0 and self.max_len_b >= 1 and self.max_len_a < float("inf")):
            raise FairseqKDError(
                f"--max-len-a must be a finite number >= 0 and --max-len-b >= 1, got {self.max_len_a} and"
                f" {self.max_len_b}"
            )
        if not abs(self.lenpen) < float("inf"):
            raise FairseqKDError(f"--lenpen must be a finite number, got {self.lenpen}")


def max_output_length(options, batch, max_positions):
    """fairseq's limit on output pieces (end of sentence excluded) for one batch of source pieces."""
    longest_source = max(len(pieces) for pieces in batch) + 1  # + end of sentence
    return min(int(options.max_len_a * longest_source + options.max_len_b), max_positions - 1)


def check_post_process(option, value, dictionary):
    """``value`` is a post-processing fairseq knows (``--post-process``) and, if sentencepiece's, the
    dictionary has sentencepiece pieces: on other pieces it would join each sentence into one word and score
    BLEU near 0 without an error."""
    try:
        data_utils.post_process("a", value)
    except NotImplementedError:
        raise FairseqKDError(
            f"{option} {value!r} is not one fairseq knows; use sentencepiece, subword_nmt, none, ... (as"
            " fairseq-generate --post-process)"
        ) from None
    sentencepiece_pieces = any("\u2581" in symbol for symbol in dictionary.symbols)
    if value in ("none", "subword_nmt") and sentencepiece_pieces:
        raise FairseqKDError(
            f"{option} {value}, but the dictionary holds sentencepiece pieces ('\u2581'), which would stay in the"
            f" text that is scored; give {option} sentencepiece"
        )
    if value == "none" and any(symbol.endswith("@@") for symbol in dictionary.symbols):
        raise FairseqKDError(
            f"{option} none, but the dictionary holds BPE pieces (ending in '@@'), whose markers would stay in the"
            f" text that is scored; give {option} subword_nmt"
        )
    if value == "sentencepiece" and not sentencepiece_pieces:
        raise FairseqKDError(
            f"{option} sentencepiece, but the dictionary has no sentencepiece pieces (none holds '\u2581'), so each"
            f" sentence would be scored as one word; give the data's: {option} subword_nmt for BPE, none for words"
        )


class Subwords:
    """The subword model a translator's data was made with: raw text to pieces and back. Back is fairseq's
    ``--post-process`` rule, so detokenized output equals fairseq-generate's."""

    KINDS = {"sentencepiece": "sentencepiece", "bpe": "subword_nmt"}  # kind -> fairseq post-process name

    def __init__(self, kind, path):
        if not os.path.isfile(path):
            option = "--sentencepiece-model" if kind == "sentencepiece" else "--bpe-codes"
            raise FairseqKDError(f"{option}: no such file {path!r}")
        self.kind, self.path = kind, path
        try:
            if kind == "sentencepiece":
                import sentencepiece

                self._model = sentencepiece.SentencePieceProcessor(model_file=path)
            else:
                from subword_nmt.apply_bpe import BPE

                # subword-nmt prints its own lines before it exits on a malformed codes file
                with open(path, encoding="utf-8") as codes, contextlib.redirect_stderr(io.StringIO()):
                    self._model = BPE(codes)
        except (Exception, SystemExit) as e:
            reason = "malformed codes" if isinstance(e, SystemExit) else e
            raise FairseqKDError(
                f"cannot read {path!r} as a {kind} model ({reason}); give the file the data was made with"
            ) from None

    def check_dictionary(self, dictionary):
        """Refuse a subword model that cannot write most of the dictionary's pieces: not the one the data was
        encoded with, so that most source pieces would be <unk>."""
        symbols = dictionary.symbols[dictionary.nspecial:]
        if self.kind == "sentencepiece":
            unknown = sum(self._model.piece_to_id(symbol) == self._model.unk_id() for symbol in symbols)
        else:  # a piece of more than one character is the result of a merge: "ab@@" of (a, b), "ab" of (a, b</w>)
            merged = {a + b for a, b in self._model.bpe_codes}
            writable = {m[:-len("</w>")] if m.endswith("</w>") else m + "@@" for m in merged}
            unknown = sum(len(symbol.removesuffix("@@")) > 1 and symbol not in writable for symbol in symbols)
        if unknown > len(symbols) / 2:
            option = "--sentencepiece-model" if self.kind == "sentencepiece" else "--bpe-codes"
            raise FairseqKDError(
                f"{option} {self.path} writes only {len(symbols) - unknown} of the dictionary's {len(symbols)}"
                f" pieces; give the {'sentencepiece model' if self.kind == 'sentencepiece' else 'BPE codes'} the data"
                " was encoded with"
            )

    def encode(self, line):
        line = line.strip()
        if self.kind == "sentencepiece":
            return self._model.encode(line, out_type=str)
        return self._model.process_line(line).split()

    def decode(self, pieces):
        return data_utils.post_process(" ".join(pieces), self.KINDS[self.kind])


class FairseqTranslator:
    """A fairseq checkpoint (any supported model, either peer of a mutual one) on the dictionaries of
    ``data``, decoded with fairseq's SequenceGenerator; a non-autoregressive one (any fairseq NAT model) with
    its IterativeRefinementGenerator, as ``fairseq-generate --task translation_lev`` decodes it."""

    backend = "fairseq"

    def __init__(self, checkpoint, data, options, peer="a", device="cpu", langs=None):
        if device == "cuda" and not torch.cuda.is_available():
            raise FairseqKDError("--device cuda: torch sees no CUDA device on this machine; use --device cpu")
        cfg, saved = read_checkpoint(checkpoint, "checkpoint")
        self.non_autoregressive = is_non_autoregressive(cfg.model)
        if self.non_autoregressive:
            state = {"args": cfg.model, "model": saved["model"]}
        else:
            state = inference_state(checkpoint, cfg, saved, peer)
        args = state["args"]
        langs, (self.src_dict, self.tgt_dict), self.language_tokens = checked_dictionaries(checkpoint, cfg.task, state,
                                                                                          data, langs)
        if self.non_autoregressive:
            task_cfg = TranslationLevenshteinConfig(data=data, source_lang=langs[0], target_lang=langs[1])
            task = TranslationLevenshteinTask(task_cfg, self.src_dict, self.tgt_dict)
            self.model = build_saved_model(checkpoint, args,
                                           lambda: ARCH_MODEL_REGISTRY[args.arch].build_model(args, task))
            self.generator = IterativeRefinementGenerator(
                self.tgt_dict, max_iter=options.iter_decode_max_iter, beam_size=options.iter_decode_with_beam,
            )
        else:
            task = SimpleNamespace(source_dictionary=self.src_dict, target_dictionary=self.tgt_dict)
            self.model = build_saved_model(checkpoint, args, lambda: TransformerModel.build_model(args, task))
            self.generator = SequenceGenerator(
                [self.model], self.tgt_dict, beam_size=options.beam, max_len_a=options.max_len_a,
                max_len_b=options.max_len_b, len_penalty=options.lenpen,
            )
        load_saved_weights(checkpoint, self.model, state["model"])
        self.model.eval().to(device)
        self.device = device
        self.options = options
        self.max_positions = self.model.max_decoder_positions()
        # source pieces it reads: its positions less the end of sentence, language token and NAT's <s>
        self.source_limit = (self.model.encoder.max_positions() - 1 - len(language_token_pieces(self.language_tokens)[0])
                             - (1 if self.non_autoregressive else 0))
        self.left_pad_source = getattr(args, "left_pad_source", True)
        self.refinement_steps = []  # non-autoregressive: the iterations each sentence took

    @torch.inference_mode()
    def translate(self, batch):
        source_token, target_token = language_token_pieces(self.language_tokens)
        tokens = [self.src_dict.encode_line(" ".join(source_token + p), add_if_not_exist=False, append_eos=True).long()
                  for p in batch]
        if self.non_autoregressive:  # translation_lev's sources start with <s>
            tokens = [torch.cat([torch.tensor([self.src_dict.bos()]), t]) for t in tokens]
        lengths = torch.tensor([len(t) for t in tokens])
        src_tokens = data_utils.collate_tokens(tokens, self.src_dict.pad(), self.src_dict.eos(),
                                               left_pad=self.left_pad_source)
        sample = {"net_input": {"src_tokens": src_tokens.to(self.device), "src_lengths": lengths.to(self.device)}}
        if self.non_autoregressive:
            hypotheses = self.generator.generate([self.model], sample)
            self.refinement_steps += [hypos[0]["steps"] for hypos in hypotheses]
        else:
            # a multilingual model's output starts with the target language's token, given, as fairseq gives it
            prefix = (torch.full((len(batch), 1), self.tgt_dict.index(target_token[0]), device=self.device)
                      if target_token else None)
            hypotheses = self.generator.generate([self.model], sample, prefix_tokens=prefix)
        # NAT outputs start with <s>; the target language token goes wherever it is, as fairseq-generate strips it
        special = {self.tgt_dict.eos(), self.tgt_dict.pad(), self.tgt_dict.bos(), *map(self.tgt_dict.index, target_token)}
        return [[self.tgt_dict[i] for i in hypos[0]["tokens"].tolist() if i not in special] for hypos in hypotheses]


def language_token_pieces(tokens):
    """``([source token], [target token])`` of a multilingual model's ``LanguageTokens``; empty lists
    where it uses none, or for a bilingual model (None)."""
    if tokens is None:
        return [], []
    return [tokens.source] if tokens.source else [], [tokens.target] if tokens.target else []


def requested_language_pair(source_lang, target_lang):
    """``(source, target)`` named by --source-lang and --target-lang, or None when neither is given."""
    if bool(source_lang) != bool(target_lang):
        raise FairseqKDError("give both --source-lang and --target-lang, or neither (a model or data-bin of one pair)")
    return (source_lang, target_lang) if source_lang else None


def data_language_pair(data):
    """The only language pair of the data-bin ``data``, for a model that records none."""
    if not os.path.isdir(data):
        raise FairseqKDError(f"--data {data}: no such directory; give the fairseq data-bin the model was trained on")
    pairs = data_language_pairs(data)
    if len(pairs) != 1:
        found = f"it holds {', '.join('-'.join(p) for p in pairs)}" if pairs else "no binarized split SPLIT.SRC-TGT.*"
        raise FairseqKDError(
            f"--data {data}: cannot tell the language pair ({found}); name it with --source-lang and --target-lang"
        )
    return pairs[0]


def checked_dictionaries(checkpoint, task_cfg, state, data, langs=None):
    """``(languages, (source, target dictionary), language tokens)`` of the data-bin ``data`` for the pair
    ``langs`` (default: the checkpoint's): its dictionaries, which must be those the checkpoint (its saved
    task config and ``inference_state``) was trained with, extended for a multilingual model with its
    language tokens (``LanguageTokens``; None for a bilingual model)."""
    label = f"checkpoint {checkpoint}"
    recorded = trained_language_pair(task_cfg)  # its config's, or its training data's only pair
    if langs is None and None in recorded:
        if task_name(task_cfg) in MULTILINGUAL_TASKS:
            raise FairseqKDError(
                f"{label}: a multilingual model of several pairs ({task_cfg.lang_pairs}); name the pair to translate"
                " with --source-lang and --target-lang"
            )
        langs = data_language_pair(data)
    langs = langs or recorded
    check_language_pair(label, recorded, langs)
    tokens = language_tokens(label, task_cfg, langs, data)
    dictionaries = load_dictionaries(data, *langs)
    for dictionary in dictionaries if tokens else []:
        for symbol in tokens.symbols:
            dictionary.add_symbol(symbol)
    check_checkpoint_dictionaries(checkpoint, label, state["args"].data, state["model"], langs, dictionaries,
                                  tokens.symbols if tokens else ())
    return langs, dictionaries, tokens


def load_dictionaries(data, source_lang, target_lang):
    dictionaries = []
    for lang in (source_lang, target_lang):
        path = os.path.join(data, f"dict.{lang}.txt")
        if not os.path.isfile(path):
            raise FairseqKDError(
                f"--data {data}: no dict.{lang}.txt; give the fairseq data-bin the checkpoint was trained on"
            )
        dictionaries.append(load_dictionary(path))
    return dictionaries


class CTranslate2Translator:
    """A directory written by fairseq-kd-export, decoded by CTranslate2 with fairseq's rules."""

    backend = "ctranslate2"

    def __init__(self, model_dir, options, threads=1, device="cpu", use_vmap=None):
        self.manifest = read_export_manifest(model_dir)
        ctranslate2 = import_ctranslate2()
        if device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            raise FairseqKDError("--device cuda: CTranslate2 sees no CUDA device on this machine; use --device cpu")
        self.options = options
        self.max_positions = self.manifest["max_target_positions"]
        # source pieces it reads (exports older than the record: not known)
        positions = self.manifest.get("max_source_positions")
        self.source_limit = positions - 1 - len(self.manifest.get("language_tokens", ([], []))[0]) if positions else None
        self.use_vmap = self.manifest["vmap"] if use_vmap is None else use_vmap
        if self.use_vmap and not self.manifest["vmap"]:
            raise FairseqKDError(f"{model_dir} was exported without a vocabulary map; export it with --vmap")
        try:
            self.translator = ctranslate2.Translator(model_dir, device=device, intra_threads=threads, inter_threads=1)
        except (RuntimeError, ValueError) as e:  # e.g. a missing or truncated model.bin
            raise FairseqKDError(f"CTranslate2 cannot load {model_dir} ({one_line(e)}); export the model again") from None

    def translate(self, batch):
        # a multilingual model's (exports of bilingual models record none)
        source_token, target_token = self.manifest.get("language_tokens", ([], []))
        batch = [source_token + pieces for pieces in batch]
        results = self.translator.translate_batch(
            batch, beam_size=self.options.beam, length_penalty=self.options.lenpen,
            max_decoding_length=max_output_length(self.options, batch, self.max_positions),
            min_decoding_length=1, max_input_length=0, use_vmap=self.use_vmap,
            target_prefix=[target_token] * len(batch) if target_token else None,
        )
        # the given first token, and wherever else it is (fairseq-generate strips it from its output)
        return [[piece for piece in result.hypotheses[0] if piece not in target_token] for result in results]


def read_export_manifest(model_dir):
    path = os.path.join(model_dir, EXPORT_MANIFEST)
    if not os.path.isfile(path):
        raise FairseqKDError(f"{model_dir} has no {EXPORT_MANIFEST}; give a directory written by fairseq-kd-export")
    try:
        with open(path) as f:
            manifest = json.load(f)
        missing = [key for key in ("subwords", "max_target_positions", "vmap", "sha256", "quantization", "source_lang",
                                   "target_lang", "params", "embedding_params", "peer")
                   if key not in manifest] + [f"subwords.{key}" for key in ("kind", "file")
                                              if key not in manifest.get("subwords", {})]
    except (ValueError, TypeError, AttributeError) as e:
        raise FairseqKDError(f"{path} is not a fairseq-kd-export manifest ({e}); export the model again") from None
    if missing:
        raise FairseqKDError(f"{path} lacks {', '.join(missing)}; export the model again")
    wrong = [key for key in ("max_source_positions", "max_target_positions")
             if key in manifest and (type(manifest[key]) is not int or manifest[key] < 1)]
    tokens = manifest.get("language_tokens", [[], []])
    if not (isinstance(tokens, list) and len(tokens) == 2
            and all(isinstance(side, list) and all(isinstance(token, str) for token in side) for side in tokens)):
        wrong.append("language_tokens")
    if not isinstance(manifest["vmap"], bool):
        wrong.append("vmap")
    if wrong:
        raise FairseqKDError(f"{path}: its {', '.join(wrong)} are not what fairseq-kd-export writes; export the model again")
    return manifest


def check_export_vocabulary(model_dir, src_dict, tgt_dict):
    """An exported model's vocabularies must equal the data's dictionaries, symbol for symbol (a multilingual
    model's extended with the language tokens its export recorded)."""
    added = read_export_manifest(model_dir).get("language_symbols", [])
    files = {"source": "source_vocabulary.json", "target": "target_vocabulary.json"}
    if os.path.isfile(os.path.join(model_dir, "shared_vocabulary.json")):
        files = {"source": "shared_vocabulary.json", "target": "shared_vocabulary.json"}
    for side, dictionary in (("source", src_dict), ("target", tgt_dict)):
        try:
            with open(os.path.join(model_dir, files[side])) as f:
                vocabulary = json.load(f)
        except (OSError, ValueError) as e:
            raise FairseqKDError(f"{model_dir}: cannot read its {side} vocabulary ({e}); export the model again")
        # CTranslate2 names fairseq's padding symbol <blank>
        symbols = ["<pad>" if symbol == "<blank>" else symbol for symbol in vocabulary]
        if symbols != dictionary.symbols + added:
            raise FairseqKDError(
                f"{model_dir}: its {side} vocabulary ({len(symbols)} symbols) differs from the data's dictionary"
                f" ({len(dictionary)} symbols); evaluate it on the data-bin it was exported from"
            )


# CTranslate2 runs its AVX2 kernels on AMD CPUs that have AVX-512 too; its AVX-512 ones were 7-23 % faster
# on this project's AMD EPYC (BENCHMARKS.md). A CT2_FORCE_CPU_ISA set by the user is left alone.
AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def import_ctranslate2():
    if "CT2_FORCE_CPU_ISA" not in os.environ and AVX512_FLAGS <= cpu_flags():
        os.environ["CT2_FORCE_CPU_ISA"] = "AVX512"
    try:
        import ctranslate2
    except ImportError:
        raise FairseqKDError(
            "ctranslate2 is not installed; install it with: pip install ctranslate2==4.8.5 (scripts/setup.sh does)"
        ) from None
    return ctranslate2


def export_subwords(model_dir):
    """The subword model bundled in an exported directory."""
    manifest = read_export_manifest(model_dir)
    return Subwords(manifest["subwords"]["kind"], os.path.join(model_dir, manifest["subwords"]["file"]))


def translate_all(translator, sources, batch_size, on_batch=None):
    """Translate every piece list of ``sources`` in batches of up to ``batch_size`` sentences of similar
    length (sorted, so little padding), and return the outputs in the order of ``sources``. An empty source
    stays empty, in both backends alike (fairseq would translate its end of sentence, CTranslate2 nothing).
    ``on_batch(done, total)`` is called after each batch (sentences translated, of the non-empty ones). A
    source longer than the model reads is refused, as fairseq-generate refuses it, by its line number."""
    for i, pieces in enumerate(sources):
        if translator.source_limit is not None and len(pieces) > translator.source_limit:
            raise FairseqKDError(
                f"line {i + 1} has {len(pieces)} subword pieces; the model reads at most {translator.source_limit}:"
                " split the line"
            )
    order = sorted((i for i, pieces in enumerate(sources) if pieces), key=lambda i: len(sources[i]))
    outputs = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        for i, output in zip(indices, translator.translate([sources[i] for i in indices])):
            outputs[i] = output
        if on_batch is not None:
            on_batch(start + len(indices), len(order))
    return outputs
