"""``translation_multi_distillation``: fairseq's ``translation_multi_simple_epoch`` (language tokens, --lang-pairs,
--lang-dict, sampling, all unchanged) plus a teacher per language pair.

    fairseq-train data-bin --user-dir fairseq_kd --task translation_multi_distillation \\
        --lang-pairs en-de,en-fr,en-cs --lang-dict langs.txt --encoder-langtok src --decoder-langtok \\
        --teacher-paths en-de:de.pt,en-fr:fr.pt,en-cs:cs.pt --criterion kd_label_smoothed_cross_entropy ...

Batches mix pairs. Every row is tagged with its pair where fairseq loads that pair's data, so each row is
distilled from its own pair's teacher (``teachers.PairTeachers``), never from another pair's. Per-pair control:
``--kd-pair-weights`` scales alpha per pair, and ``--kd-threshold`` switches KD off for a pair while the
student beats its teacher on that pair's validation data (Tan et al., 2019). ``--teacher-source-lang``
lets a teacher teach a pair whose source language it cannot read, from the same sentences in its own
source language (cross-lingual, pivot KD).
"""
import functools
import logging
import os

import numpy as np
import sacrebleu
import torch
from fairseq import search, utils
from fairseq.data import BaseWrapperDataset, PrependTokenDataset, data_utils
from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager
from fairseq.data.multilingual.multilingual_utils import get_lang_tok
from fairseq.logging import metrics
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from fairseq_kd.checkpoints import sha256
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.inference import check_post_process
from fairseq_kd.tasks.distillation import DistillationTaskMixin, check_cpu_bf16
from fairseq_kd.tasks.translation_distillation import check_save_dir
from fairseq_kd.teachers import PairTeachers, Teachers, load_teacher
from fairseq_kd.topk_cache import (TopKCache, TopKCacheDataset, check_one_data_directory, collate_topk, read_manifest,
                                   teachers_built_from)

logger = logging.getLogger(__name__)

THRESHOLD_METRICS = ("none", "bleu", "loss")
# the options a resumed run must keep
RESUMED_OPTIONS = ("kd_pair_weights", "kd_threshold", "kd_threshold_margin", "kd_threshold_interval",
                   "kd_threshold_post_process", "teacher_source_lang")


def parse_pair_values(text, option, lang_pairs, parse):
    """``{pair: parse(value)}`` from ``PAIR:VALUE,PAIR:VALUE``; every pair one of ``lang_pairs``, once."""
    values = {}
    for item in text.split(",") if text else []:
        pair, sep, value = item.partition(":")
        if not sep or not value:
            raise FairseqKDError(f"{option}: {item!r} is not PAIR:VALUE (e.g. en-de:teacher.pt)")
        if pair not in lang_pairs:
            raise FairseqKDError(
                f"{option}: {pair} is not one of --lang-pairs {','.join(lang_pairs)}; name the pairs this student learns"
            )
        if pair in values:
            raise FairseqKDError(f"{option}: {pair} is given twice")
        values[pair] = parse(value)
    return values


def pair_weight(text):
    try:
        weight = float(text)
    except ValueError:
        weight = None
    if weight is None or not 0.0 <= weight <= 1.0:
        raise FairseqKDError(f"--kd-pair-weights: weights are numbers in [0, 1], got {text!r}")
    return weight


class PairTaggedDataset(BaseWrapperDataset):
    """One language pair's ``LanguagePairDataset`` whose items also carry the pair's index, and when asked,
    the pivot teacher's source sentence and the pair's cached teacher top-k. Its collater serves items of
    every pair (fairseq's multilingual datasets collate all pairs with the first pair's collater)."""

    TEACHER_SOURCE = "teacher_source"

    def __init__(self, dataset, pair_index, teacher_source=None, cache=None):
        super().__init__(dataset)
        self.pair_index = pair_index
        self.teacher_source = teacher_source
        self.cache = cache

    def __getitem__(self, index):
        item = self.dataset[index]
        item[PairTeachers.PAIR_KEY] = self.pair_index
        if self.teacher_source is not None:
            item[self.TEACHER_SOURCE] = self.teacher_source[index]
        if self.cache is not None:
            item[TopKCacheDataset.KEY] = self.cache.rows(index, len(item["target"]))
        return item

    def collater(self, samples, **extra_args):
        if not samples:
            return self.dataset.collater(samples, **extra_args)
        # fairseq's collater sorts the rows by source length; numbered samples show its order (sentence ids
        # repeat across pairs, so they cannot)
        ids = [sample["id"] for sample in samples]
        batch = self.dataset.collater([{**sample, "id": i} for i, sample in enumerate(samples)], **extra_args)
        order = batch["id"].tolist()
        rows = [samples[i] for i in order]
        batch["id"] = torch.tensor([ids[i] for i in order])
        batch[PairTeachers.PAIR_KEY] = torch.tensor([row[PairTeachers.PAIR_KEY] for row in rows])
        if self.TEACHER_SOURCE in rows[0]:
            sources = [row[self.TEACHER_SOURCE] for row in rows]
            pad, eos = self.dataset.src_dict.pad(), self.dataset.src_dict.eos()
            batch[PairTeachers.TEACHER_INPUT_KEY] = {
                "src_tokens": data_utils.collate_tokens(sources, pad, eos, left_pad=self.dataset.left_pad_source),
                "src_lengths": torch.tensor([source.numel() for source in sources]),
                "prev_output_tokens": batch["net_input"]["prev_output_tokens"],
            }
        if any(TopKCacheDataset.KEY in row for row in rows):
            batch[TopKCacheDataset.KEY] = collate_topk([row.get(TopKCacheDataset.KEY) for row in rows],
                                                       batch["target"].size(1), self.dataset.left_pad_target)
        return batch


class PairTaggingDataManager(MultilingualDatasetManager):
    """fairseq's multilingual data manager, each pair's dataset passed through ``wrap(params, dataset)``
    (``params``: fairseq's description of the pair's data: split, src, tgt, data_path) before fairseq
    samples and concatenates the pairs."""

    def __init__(self, args, lang_pairs, langs, dicts, sampling_method, wrap):
        super().__init__(args, lang_pairs, langs, dicts, sampling_method)
        self.wrap = wrap

    def load_split_datasets(self, split, training, epoch=1, combine=False, shard_epoch=None, **kwargs):
        datasets, params = super().load_split_datasets(split, training, epoch, combine, shard_epoch, **kwargs)
        return [(key, self.wrap(param, dataset)) for (key, dataset), param in zip(datasets, params)], params


@register_task("translation_multi_distillation")
class TranslationMultiDistillationTask(DistillationTaskMixin, TranslationMultiSimpleEpochTask):
    """``translation_multi_simple_epoch`` with a frozen teacher (or top-k cache) per language pair, which the
    ``kd_label_smoothed_cross_entropy`` criterion distils from (``self.teachers``, a ``PairTeachers``), and
    the per-pair KD control; see the module."""

    @staticmethod
    def add_args(parser):
        TranslationMultiSimpleEpochTask.add_args(parser)
        # fmt: off
        parser.add_argument("--teacher-paths", metavar="PAIR:CHECKPOINT,...",
                            help="a teacher per language pair, e.g. en-de:de.pt,en-fr:fr.pt; each trained with"
                                 " --task translation_multi_simple_epoch, this run's --lang-dict, language-token"
                                 " options and dictionary. A pair without a teacher is trained without KD")
        parser.add_argument("--teacher-topk-caches", metavar="PAIR:DIR,...",
                            help="instead of --teacher-paths: per pair a fairseq-kd-build-cache directory built"
                                 " from its teacher on that pair's data (pass the caches' k as --kd-topk). With"
                                 " --kd-threshold give both: the caches give the KD targets, the teachers only"
                                 " score the validation data")
        parser.add_argument("--teacher-source-lang", metavar="LANG",
                            help="cross-lingual (pivot) KD: the teachers translate from LANG and read, for a pair"
                                 " with another source language, the same sentences in LANG: SPLIT.LANG-TGT.LANG"
                                 " (or SPLIT.TGT-LANG.LANG) of the data directory, aligned line by line")
        parser.add_argument("--kd-pair-weights", metavar="PAIR:W,...",
                            help="per-pair KD: a pair's alpha is --kd-alpha (and its schedule) times W in [0, 1];"
                                 " default 1 for pairs with a teacher")
        parser.add_argument("--kd-threshold", choices=THRESHOLD_METRICS, default="none",
                            help="Tan et al.'s selective multilingual KD: every --kd-threshold-interval updates,"
                                 " compare the student with each pair's teacher on that pair's validation data"
                                 " (greedy-decoded BLEU, or the loss: NLL per target token) and switch KD off for"
                                 " the pair while the student is ahead by --kd-threshold-margin, on otherwise")
        parser.add_argument("--kd-threshold-margin", type=float,
                            help="how far ahead of its teacher the student must be for KD to switch off: BLEU"
                                 " points (default 1), or nats per token with --kd-threshold loss (default 0: any"
                                 " lead; students and teachers differ by tenths of a nat) (>= 0)")
        parser.add_argument("--kd-threshold-interval", type=int, default=1000,
                            help="updates between two comparisons of --kd-threshold (> 0)")
        parser.add_argument("--kd-threshold-post-process", default="sentencepiece",
                            help="how --kd-threshold bleu turns subwords into words (fairseq's --post-process)")
        parser.add_argument("--init-student-from-teacher", default="none",
                            help="as in translation_distillation, from the first pair's teacher")
        parser.add_argument("--cpu-bf16", action="store_true",
                            help="with --cpu: forward passes under torch.autocast to bfloat16 (see"
                                 " translation_distillation)")
        # fmt: on

    def __init__(self, args, langs, dicts, training):
        super().__init__(args, langs, dicts, training)
        if args.lang_tok_replacing_bos_eos:
            raise FairseqKDError(
                "--lang-tok-replacing-bos-eos collates each pair apart, which loses the rows' teachers; use"
                " --encoder-langtok/--decoder-langtok"
            )
        flags = (args.encoder_langtok or None, "tgt" if args.decoder_langtok else None)
        if tuple(args.langtoks["main"]) != flags:  # fairseq's prepare fills "main" from the flags unless given
            raise FairseqKDError(
                f"--langtoks gives main {tuple(args.langtoks['main'])}, not what --encoder-langtok/--decoder-langtok"
                f" say {flags}: the teachers and the KD mask follow those flags; drop --langtoks and use them"
            )
        check_cpu_bf16(args.cpu_bf16, args.cpu)
        if args.kd_threshold_margin is None:  # 1 as before for BLEU (and without a threshold, as checkpoints kept it)
            args.kd_threshold_margin = 0.0 if args.kd_threshold == "loss" else 1.0
        if args.extra_data or args.extra_lang_pairs:
            raise FairseqKDError(
                "translation_multi_distillation trains the pairs of --lang-pairs, each with its own teacher or none:"
                " drop --extra-data/--extra-lang-pairs and name every pair in --lang-pairs"
            )
        self.pair_index = {pair: i for i, pair in enumerate(self.lang_pairs)}
        self.data_manager = PairTaggingDataManager(args, self.lang_pairs, langs, dicts, self.sampling_method,
                                                   self.tag_pair_dataset)
        # a translating (not training) run, e.g. fairseq-generate of a student checkpoint, needs no teachers
        self.cache_dirs, self.teacher_paths = {}, {}
        given = [option for option, value in (("--teacher-paths", args.teacher_paths),
                                              ("--teacher-topk-caches", args.teacher_topk_caches),
                                              ("--teacher-source-lang", args.teacher_source_lang),
                                              ("--kd-pair-weights", args.kd_pair_weights),
                                              ("--kd-threshold", args.kd_threshold != "none")) if value]
        if given and not training:  # fairseq's multilingual task loads no teachers
            raise FairseqKDError(
                f"{' and '.join(given)} with -s/-t, which make fairseq's multilingual task a translating run: to"
                " train, drop -s/-t (the pairs are --lang-pairs); to translate, drop the teacher options"
            )
        self.teachers = (self.load_teachers(args) if training else
                         PairTeachers({}, None, torch.zeros(len(self.lang_pairs)), len(self.target_dictionary), False))
        self.threshold = ThresholdControl(self, args) if training and args.kd_threshold != "none" else None

    def resumed_settings(self):
        return {name: getattr(self.args, name) for name in RESUMED_OPTIONS}  # its per-pair KD control

    @functools.cached_property
    def teachers_sha256(self):
        """{pair: the sha256 of its teacher (of its cache: those it was built from)}, for the taught pairs."""
        by_path = {path: sha256(path) for path in set(self.teacher_paths.values())}
        checksums = {pair: [by_path[path]] for pair, path in self.teacher_paths.items()}
        checksums.update({self.lang_pairs[index]: teachers_built_from(directory)
                          for index, directory in self.cache_dirs.items()})
        return checksums

    def load_teachers(self, args):
        if args.teacher_paths and args.teacher_topk_caches and args.kd_threshold == "none":
            raise FairseqKDError(
                "give either --teacher-paths or --teacher-topk-caches, not both (both only with --kd-threshold: the"
                " teachers score the validation data, the caches give the KD targets)"
            )
        if args.teacher_source_lang and (not args.teacher_paths or args.teacher_topk_caches):
            raise FairseqKDError(
                "--teacher-source-lang runs the teachers on the same sentences in their own language: give them with"
                " --teacher-paths, without --teacher-topk-caches"
            )
        if (args.teacher_paths or args.teacher_topk_caches) and not args.lang_dict and not args.langs:
            raise FairseqKDError(
                "translation_multi_distillation needs the languages in a fixed order (their tokens' ids must match"
                " the teachers'): give --lang-dict langs.txt"
            )
        if args.decoder_langtok and args.left_pad_target:
            raise FairseqKDError(
                "--decoder-langtok with --left-pad-target True: KD skips the language token in each target's first"
                " column, which left padding fills with pads; keep --left-pad-target False (fairseq's default)"
            )
        paths = parse_pair_values(args.teacher_paths, "--teacher-paths", self.lang_pairs, str)
        caches = parse_pair_values(args.teacher_topk_caches, "--teacher-topk-caches", self.lang_pairs, str)
        if caches:
            check_one_data_directory(args.data, "--teacher-topk-caches")
        weights = parse_pair_values(args.kd_pair_weights, "--kd-pair-weights", self.lang_pairs, pair_weight)
        if paths and caches and set(caches) != set(paths):
            raise FairseqKDError(
                f"--teacher-topk-caches names {','.join(sorted(caches))} and --teacher-paths {','.join(sorted(paths))}:"
                " with --kd-threshold give a teacher and its cache for the same pairs"
            )
        taught = paths or caches
        untaught = [pair for pair in weights if pair not in taught]
        if untaught:
            raise FairseqKDError(
                f"--kd-pair-weights: {','.join(untaught)} has no teacher in --teacher-paths/--teacher-topk-caches"
            )
        check_save_dir(args.save_dir, ":".join(paths.values()))
        self.teacher_paths = paths
        self.cache_dirs = {self.pair_index[pair]: directory for pair, directory in caches.items()}
        cache_k = {read_manifest(directory)["k"] for directory in caches.values()}
        if len(cache_k) > 1:
            raise FairseqKDError(f"--teacher-topk-caches: the caches hold different k ({sorted(cache_k)}); build them with one --topk")
        models, loaded = {}, {}  # one copy of a teacher that several pairs name (a multilingual one)
        for pair, path in paths.items():
            src, tgt = pair.split("-")
            langs = (args.teacher_source_lang or src, tgt)
            key = os.path.realpath(path)
            loaded[key] = load_teacher(path, self, "--teacher-paths", langs, multilingual=True, loaded=loaded.get(key))
            models[self.pair_index[pair]] = Teachers([loaded[key]], torch.ones(1))
        if paths and caches:  # the threshold strategy's: after loading, which says what is wrong with a path
            check_caches_built_from_teachers(caches, paths)
        limits = {pair: models[self.pair_index[pair]].models[0].max_positions() for pair in paths}
        if len(set(limits.values())) > 1:  # the task's one limit (max_positions) is the shortest teacher's
            logger.warning(
                f"the pairs' teachers read different lengths ({', '.join(f'{p}: {l}' for p, l in limits.items())}):"
                f" fairseq drops the training rows of every pair that are longer than the shortest teacher reads"
            )
        pair_weights = torch.tensor([weights.get(pair, 1.0) if pair in taught else 0.0 for pair in self.lang_pairs])
        return PairTeachers(models, cache_k.pop() if cache_k else None, pair_weights, len(self.target_dictionary),
                            skip_language_token=bool(args.decoder_langtok))

    @property
    def pivot_pairs(self):
        """The pairs whose teacher reads another source language (--teacher-source-lang)."""
        source = self.args.teacher_source_lang
        return [pair for pair in self.lang_pairs if source and pair.split("-")[0] != source
                and self.pair_index[pair] in self.teachers.teachers]

    def tag_pair_dataset(self, params, dataset):
        """``dataset`` of one pair (fairseq's ``params``) as a ``PairTaggedDataset``."""
        pair = f"{params['src']}-{params['tgt']}"
        index = self.pair_index[pair]
        teacher_source = None
        if self.pivot_pairs:  # then every row brings its teacher's source: its own, or the pivot sentence
            teacher_source = (self.pivot_source(params, dataset) if pair in self.pivot_pairs else dataset.src)
        cache = None
        if index in self.cache_dirs:
            directory = self.cache_dirs[index]
            built_for = read_manifest(directory).get("lang_pair")
            if built_for != pair:
                raise FairseqKDError(
                    f"--teacher-topk-caches {pair}:{directory}: the cache holds the {built_for or 'bilingual'} teacher's"
                    f" top-k; build one for {pair} (fairseq-kd-build-cache --task translation_multi_simple_epoch"
                    f" --lang-pairs {pair} ...)"
                )
            cache = TopKCache(directory, params["split"], dataset, self.target_dictionary)
        return PairTaggedDataset(dataset, index, teacher_source, cache)

    def split_prefix(self, split, a, b, lang, path):
        """``path/SPLIT.A-B.`` or ``path/SPLIT.B-A.``, whichever holds LANG's side (fairseq reads a pair's data
        binarized either way round), or None."""
        for x, y in ((a, b), (b, a)):
            if self.data_manager.split_exists(split, x, y, lang, path, self.args.dataset_impl):
                return os.path.join(path, f"{split}.{x}-{y}.")
        return None

    def pivot_source(self, params, dataset):
        """The teacher's source sentences for a pivot pair: SPLIT.{LANG-TGT,TGT-LANG}.LANG, checked to be the
        same sentences line by line through the target side, which both directories must hold equal."""
        split, src, tgt, path = params["split"], params["src"], params["tgt"], params["data_path"]
        lang = self.args.teacher_source_lang
        prefix = self.split_prefix(split, lang, tgt, lang, path)
        if prefix is None:
            raise FairseqKDError(
                f"--teacher-source-lang {lang}: the {src}-{tgt} teacher reads {lang}, but {path} has no {split} data in"
                f" {lang} ({split}.{lang}-{tgt}.{lang} or {split}.{tgt}-{lang}.{lang}); binarize the same sentences in {lang}"
            )
        dictionary = self.source_dictionary
        source = data_utils.load_indexed_dataset(prefix + lang, dictionary, self.args.dataset_impl)
        ours_prefix = self.split_prefix(split, src, tgt, tgt, path)
        ours = data_utils.load_indexed_dataset(ours_prefix + tgt, dictionary, self.args.dataset_impl)
        if len(ours) != len(dataset):  # fairseq appended SPLIT1, SPLIT2, ...: their pivot lines are not read here
            raise FairseqKDError(
                f"--teacher-source-lang {lang}: the {src}-{tgt} {split} data has {len(dataset)} pairs, {ours_prefix}{tgt}"
                f" {len(ours)}; pivot KD aligns one binarized file per split: binarize {split} as one (no {split}1, ...)"
            )
        theirs = data_utils.load_indexed_dataset(prefix + tgt, dictionary, self.args.dataset_impl)
        if len(theirs) < len(ours):
            raise FairseqKDError(
                f"--teacher-source-lang {lang}: {prefix}{lang} has {len(theirs)} {split} sentences, {src}-{tgt} has"
                f" {len(ours)}; the pivot data must hold the same sentences, line by line"
            )
        for i in range(len(ours)):
            if not torch.equal(ours[i], theirs[i]):
                raise FairseqKDError(
                    f"--teacher-source-lang {lang}: {split} sentence {i} of {src}-{tgt} has another {tgt} side than line"
                    f" {i} of {prefix}{tgt}; the pivot data must hold the same sentences, line by line (a multi-way"
                    " corpus binarized in one order)"
                )
        # the language token fairseq's src_dataset_tranform_func would prepend (it looks for a dictionary
        # of LANG, which a run without LANG lacks: all languages share one)
        spec = self.args.langtoks["main"][0]
        if spec:
            token = get_lang_tok(lang=lang if spec.startswith("src") else tgt, lang_tok_style=self.args.lang_tok_style,
                                 spec=spec)
            source = PrependTokenDataset(source, self.data_manager.get_langtok_index(token, dictionary))
        # fairseq filters the student's sources by length, never the teacher's
        limit = self.teachers.teachers[self.pair_index[f"{src}-{tgt}"]].models[0].max_positions()[0]
        over = np.flatnonzero(source.sizes > limit)
        if len(over):
            raise FairseqKDError(
                f"--teacher-source-lang {lang}: {split} sentence {over[0]} of {prefix}{lang} has {source.sizes[over[0]]}"
                f" tokens, more than the {src}-{tgt} teacher reads ({limit}); {len(over)} sentence(s) do: drop them from"
                " every language's data and binarize it again"
            )
        return source

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if self.threshold is not None:
            self.threshold.maybe_check(model, update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def get_checkpoint_dict(self):
        state = super().get_checkpoint_dict()
        if self.threshold is not None:
            state.setdefault(type(self).__name__, {})["threshold"] = self.threshold.state_dict()
        return state

    def set_checkpoint_dict(self, state):
        super().set_checkpoint_dict(state)
        if self.threshold is not None and "threshold" in state:
            self.threshold.load_state_dict(state["threshold"])

    def pair_dataset(self, split, pair):
        """The ``PairTaggedDataset`` of one pair of a loaded split."""
        if split not in self.datasets:
            self.load_dataset(split)
        dataset = self.datasets[split]
        index = self.pair_index[pair]
        return next(d for d in dataset.datasets if d.pair_index == index)


def check_caches_built_from_teachers(caches, paths):
    """--kd-threshold with both --teacher-paths and --teacher-topk-caches (the same pairs): each cache built
    from that pair's teacher (the checkpoint hash its manifest records)."""
    for pair, directory in caches.items():
        if teachers_built_from(directory) != [sha256(paths[pair])]:
            raise FairseqKDError(
                f"--teacher-topk-caches {pair}:{directory} was built from another teacher than --teacher-paths"
                f" {pair}:{paths[pair]}; give the teacher the cache was built from, or rebuild the cache from it"
            )


class ThresholdControl:
    """--kd-threshold: per pair, the teacher's score on the pair's validation data (measured once) against the
    student's, every --kd-threshold-interval updates; KD on for a pair unless the student is ahead by the
    margin. Its state (scores, switches) is saved in the checkpoints and restored on resume; scores measured
    otherwise (another metric, post-processing, validation split or teacher) are measured again, KD on until
    then."""

    def __init__(self, task, args):
        if not task.teachers.teachers:
            raise FairseqKDError(
                "--kd-threshold compares the student with each pair's teacher, which it runs on validation data:"
                " give --teacher-paths (a top-k cache cannot decode; with --teacher-topk-caches too, the caches"
                " give the KD targets)"
            )
        if args.disable_validation:
            raise FairseqKDError(f"--kd-threshold {args.kd_threshold} needs validation data: drop --disable-validation")
        if args.kd_threshold_margin < 0 or args.kd_threshold_interval <= 0:
            raise FairseqKDError("--kd-threshold-margin must be >= 0 and --kd-threshold-interval > 0")
        self.task, self.metric, self.margin = task, args.kd_threshold, args.kd_threshold_margin
        self.interval, self.post_process = args.kd_threshold_interval, args.kd_threshold_post_process
        self.split = args.valid_subset.split(",")[0]
        self.pairs = {task.pair_index[pair]: pair for pair in task.lang_pairs
                      if task.pair_index[pair] in task.teachers.teachers}
        data = utils.split_paths(args.data)[0]
        for pair in self.pairs.values():
            src, tgt = pair.split("-")
            if task.split_prefix(self.split, src, tgt, src, data) is None:
                raise FairseqKDError(
                    f"--kd-threshold: {data} has no {self.split} data for {pair} ({self.split}.{pair}.{src}), which"
                    f" the threshold strategy compares student and teacher on; binarize a {self.split} set per pair"
                )
        if self.metric == "bleu":
            check_post_process("--kd-threshold-post-process", self.post_process, task.target_dictionary)
        self.teacher_scores, self.student_scores, self.switches, self.last_check = {}, {}, [], 0
        self.measured_with = {
            "metric": self.metric, "split": self.split,
            "post_process": self.post_process if self.metric == "bleu" else None,
            "teachers": {pair: task.teachers_sha256[pair] for pair in self.pairs.values()},
        }

    def state_dict(self):
        return {"teacher_scores": self.teacher_scores, "student_scores": self.student_scores,
                "measured_with": self.measured_with, "switches": self.switches, "last_check": self.last_check,
                "enabled": {pair: bool(self.task.teachers.enabled[i]) for i, pair in self.pairs.items()}}

    def load_state_dict(self, state):
        self.switches, self.last_check = list(state["switches"]), state["last_check"]
        if state.get("measured_with") != self.measured_with:
            # comparing with them would be meaningless (e.g. a BLEU against a loss); so would the switches
            # they decided: KD on for every pair until then
            logger.warning("kd-threshold: the saved scores were measured with other settings or teachers; measuring"
                           " them again at the next check, KD on until then")
            return
        self.teacher_scores, self.student_scores = dict(state["teacher_scores"]), dict(state["student_scores"])
        for i, pair in self.pairs.items():
            self.task.teachers.enabled[i] = state["enabled"].get(pair, True)

    def maybe_check(self, model, update_num):
        for i, pair in self.pairs.items():  # averaged over the log interval: the share of updates with KD on
            metrics.log_scalar(f"kd_on_{pair}", float(self.task.teachers.enabled[i]), round=2)
            if pair in self.student_scores:  # the latest comparison's
                metrics.log_scalar(f"threshold_{self.metric}_{pair}", self.student_scores[pair], round=3)
        if update_num == 0 or update_num % self.interval or update_num == self.last_check:
            return
        self.last_check = update_num
        student = model
        while hasattr(student, "module"):  # fairseq's distributed wrappers, each around the next
            student = student.module
        param = next(student.parameters())
        for i, pair in self.pairs.items():
            teacher = self.task.teachers.teachers[i].models[0]
            # both on the sentences both read, as fairseq's validation filters them
            limits = utils.resolve_max_positions(self.task.max_positions(), student.max_positions(),
                                                 teacher.max_positions())
            if pair not in self.teacher_scores:
                teacher.to(device=param.device, dtype=param.dtype)
                self.teacher_scores[pair] = self.score(teacher, pair, limits, teacher=True)
                if self.task.teachers.cache_k is not None:  # it has done its only job: off the accelerator
                    teacher.cpu()
            self.student_scores[pair] = self.score(student, pair, limits)
            student_ahead = self.student_scores[pair] - self.teacher_scores[pair]
            if self.metric == "loss":
                student_ahead = -student_ahead
            enabled = student_ahead < self.margin
            if enabled != bool(self.task.teachers.enabled[i]):
                self.task.teachers.enabled[i] = enabled
                self.switches.append([update_num, pair, "on" if enabled else "off"])
            logger.info(
                f"kd-threshold at update {update_num}: {pair} student {self.metric} {self.student_scores[pair]:.3f},"
                f" teacher {self.teacher_scores[pair]:.3f}: KD {'on' if enabled else 'off'}"
            )

    @torch.no_grad()
    def score(self, model, pair, max_positions, teacher=False):
        """Greedy BLEU, or NLL per target token, of ``model`` on the pair's validation sentences within
        ``max_positions``."""
        dataset = self.task.pair_dataset(self.split, pair)
        indices, longer = dataset.filter_indices_by_size(dataset.ordered_indices(), max_positions)
        if len(longer) and not self.task.args.skip_invalid_size_inputs_valid_test:
            raise FairseqKDError(
                f"--kd-threshold: {self.split} sentence {longer[0]} of {pair} is longer than the student or its teacher"
                f" reads ({max_positions}); drop it from the data, or pass --skip-invalid-size-inputs-valid-test, as"
                " fairseq's validation needs too"
            )
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        batches = dataset.batch_by_size(indices, max_tokens=self.task.args.max_tokens or 4096)
        dictionary = self.task.target_dictionary
        generator = SequenceGenerator([model], dictionary, beam_size=1, search_strategy=search.BeamSearch(dictionary))
        language_token = (self.task.data_manager.get_decoder_langtok(pair.split("-")[1], "tgt")
                          if self.task.args.decoder_langtok else None)
        strip = {language_token} if language_token is not None else None
        hypotheses, references, nll, tokens = [], [], 0.0, 0
        for batch in batches:
            sample = dataset.collater([dataset[i] for i in batch])
            sample = utils.move_to_cuda(sample) if device.type == "cuda" else sample
            net_input = sample.get(PairTeachers.TEACHER_INPUT_KEY, sample["net_input"]) if teacher else sample["net_input"]
            if self.metric == "loss":
                lprobs = model.get_normalized_probs(model(**net_input), log_probs=True)
                target = sample["target"]
                real = target.ne(dictionary.pad())
                if language_token is not None:  # given to the decoder (the bleu metric's prefix), not predicted
                    real[:, 0] = False
                nll -= lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[real].sum().item()
                tokens += real.sum().item()
                continue
            prefix = sample["target"][:, :1] if language_token is not None else None
            outputs = generator.generate([model], {"net_input": net_input}, prefix_tokens=prefix)
            for row, output in enumerate(outputs):
                hypotheses.append(dictionary.string(output[0]["tokens"], self.post_process, extra_symbols_to_ignore=strip))
                references.append(dictionary.string(utils.strip_pad(sample["target"][row], dictionary.pad()),
                                                     self.post_process, extra_symbols_to_ignore=strip))
        model.train(was_training)
        if self.metric == "loss":
            return nll / max(tokens, 1)
        return sacrebleu.corpus_bleu(hypotheses, [references]).score
