"""``fairseq-kd-build-cache``: run the teachers once over binarized splits and write their top-k per
target token (format and reader: ``fairseq_kd.topk_cache``)::

    fairseq-kd-build-cache data-bin --teacher-path teacher.pt --topk 8 --splits train,valid --out cache

A multilingual student's caches are built per language pair, with the teacher's task and language-token
options (``--task translation_multi_simple_epoch --lang-pairs en-de --lang-dict langs.txt --encoder-langtok src
--decoder-langtok``); ``translation_multi_distillation`` takes them as ``--teacher-topk-caches en-de:DIR,...``.

Large corpora build in parallel shards, one process each (``--num-shards N --shard-id I``); the manifest is
written by whichever process completes the last shard.
"""
import json
import logging
import os
import sys
import tempfile

import numpy as np
import torch
from fairseq import options, utils
from fairseq.data import data_utils
from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_int_dtype, data_file_path, index_file_path
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import progress_bar
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from fairseq_kd.checkpoints import load_split, setup_data_task, sha256
from fairseq_kd.errors import FairseqKDError, make_writable_directory
from fairseq_kd.teachers import TEACHER_WEIGHTINGS, Teachers
from fairseq_kd.topk_cache import (FORMAT_VERSION, MANIFEST, check_one_data_directory, check_unbucketed_targets,
                                   dictionary_fingerprint, shard_file_problem, shard_prefix, shard_range, split_fingerprint)

logger = logging.getLogger(__name__)

SORT_WINDOW = 10000


def write_json(path, content):
    """``content`` into ``path`` at once: through a temporary file of this process (shards finishing together
    may both write the manifest), so that a reader never sees a partial file."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".")
    with os.fdopen(handle, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(temporary, path)


def read_json(path):
    """A JSON object from ``path``; None for a file that holds none (damaged)."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return content if isinstance(content, dict) else None


def shard_settings(task, teachers, teacher_files, split, k, shard_id, num_shards, dtype):
    """Everything that determines the contents of one shard: its sentences, the target dictionary, the
    teachers (checkpoint hashes), their mixture, k and the dtype they run in."""
    dataset = split_dataset(task, split)
    lo, hi = shard_range(len(dataset), shard_id, num_shards)
    return {
        "split": split,
        "range": [lo, hi],
        "data_sha256": split_fingerprint(dataset, lo, hi),
        "target_dictionary_sha256": dictionary_fingerprint(task.target_dictionary),
        "teachers": teacher_files,
        "teacher_weights": teachers.weights.tolist(),
        "teacher_weighting": teachers.weighting,
        "k": k,
        "dtype": str(dtype),
    }


def split_dataset(task, split):
    """The ``LanguagePairDataset`` of a loaded split: the task's, or a multilingual task's one pair's (with
    its language tokens, as the student's batches hold them)."""
    if isinstance(task, TranslationMultiSimpleEpochTask):
        return task.dataset(split).datasets[0]
    return task.dataset(split)


def check_within_teacher_positions(dataset, teachers, split):
    """Every sentence pair of ``split`` within the positions each teacher reads (fairseq-train and
    fairseq-generate filter or refuse longer ones; a teacher with learned positions fails on them)."""
    limits = utils.resolve_max_positions(*(teacher.max_positions() for teacher in teachers.models))
    for side, sizes, limit in (("source", dataset.src_sizes, limits[0]), ("target", dataset.tgt_sizes, limits[1])):
        over = np.flatnonzero(sizes > limit)
        if len(over):
            raise FairseqKDError(
                f"sentence {over[0]} of '{split}' has {sizes[over[0]]} {side} tokens, more than the teacher reads"
                f" ({limit}); {len(over)} sentence(s) of '{split}' do: drop them from the data and binarize it again"
            )


def differences(recorded, settings):
    """The settings that differ between a recorded shard and this build, named for a message."""
    return [key for key in settings if key != "teachers" and recorded.get(key) != settings[key]] + (
        ["teachers"] if [t["sha256"] for t in recorded.get("teachers", [])] != [t["sha256"] for t in settings["teachers"]]
        else []
    )


def build_shard(task, teachers, settings, directory, shard_id, num_shards, max_tokens, device, dtype, log_format,
                force):
    """Write one shard of the cache of ``settings["split"]`` from ``teachers``. A complete shard built with
    the same ``settings`` is kept, and one built otherwise refused, unless ``force`` rebuilds it (a damaged
    shard, which training refuses, included)."""
    split = settings["split"]
    prefix = shard_prefix(directory, split, shard_id, num_shards)
    if os.path.isfile(prefix + ".json"):
        built = read_json(prefix + ".json")
        if built is None and not force:
            raise FairseqKDError(f"{prefix}.json is damaged (not the settings a build writes); pass --force to rebuild the shard")
        changed = differences(built, settings) if built is not None else ["settings"]
        if not changed and not force:
            checksums = built.get("content_sha256")
            problems = ([shard_file_problem(prefix, name, checksums.get(name)) for name in ("ids", "lprobs")]
                        if isinstance(checksums, dict) else [f"{prefix}.json records no checksums of its files"])
            problem = next(filter(None, problems), None)
            if problem:
                raise FairseqKDError(f"{problem}: the shard is not as its build wrote it; pass --force to rebuild it")
            logger.info(f"{prefix}: complete, skipping")
            return
        if not force:
            raise FairseqKDError(
                f"{prefix}.json: this shard was built with other {', '.join(changed)}; pass --force to rebuild it"
                " for this data and these teachers, or use a new --out directory"
            )
        os.remove(prefix + ".json")
    dataset = split_dataset(task, split)
    lo, hi = settings["range"]
    # batches of similar lengths (little padding) from windows of consecutive sentences, so only one
    # window's results wait in memory to be written in corpus order
    batches = []
    for start in range(lo, hi, SORT_WINDOW):
        window = np.arange(start, min(start + SORT_WINDOW, hi), dtype=np.int64)
        window = window[np.argsort(dataset.num_tokens_vec(window), kind="stable")]
        batches += data_utils.batch_by_size(window, dataset.num_tokens, max_tokens=max_tokens)
    builders = {
        "ids": MMapIndexedDatasetBuilder(data_file_path(prefix + ".tmp.ids"), best_fitting_int_dtype(len(task.target_dictionary))),
        "lprobs": MMapIndexedDatasetBuilder(data_file_path(prefix + ".tmp.lprobs"), np.int16),
    }
    pad = task.target_dictionary.pad()
    target_tokens, next_index, pending = 0, lo, {}
    progress = progress_bar.progress_bar(batches, log_format=log_format, log_interval=50, prefix=f"{split} shard {shard_id}")
    for batch in progress:
        sample = dataset.collater([dataset[i] for i in batch])
        net_input = utils.move_to_cuda(sample["net_input"]) if device.type == "cuda" else sample["net_input"]
        values, ids = teachers.mixture(net_input, sample["target"], device, dtype).distribution(settings["k"])
        values, ids = values.cpu(), ids.cpu()
        keep = sample["target"].ne(pad)
        for row, index in enumerate(sample["id"].tolist()):
            pending[index] = (ids[row][keep[row]], values[row][keep[row]])
        while next_index in pending:
            tokens, lprobs = pending.pop(next_index)
            builders["ids"].add_item(tokens.flatten())
            builders["lprobs"].add_item(lprobs.half().view(torch.int16).flatten())
            target_tokens += len(tokens)
            next_index += 1
        progress.log({"target_tokens": target_tokens})
    for name, builder in builders.items():
        builder.finalize(index_file_path(prefix + f".tmp.{name}"))
        for path_of in (data_file_path, index_file_path):
            os.replace(path_of(prefix + f".tmp.{name}"), path_of(prefix + f".{name}"))
    checksums = {name: sha256(data_file_path(prefix + f".{name}")) for name in builders}
    write_json(prefix + ".json", {**settings, "target_tokens": target_tokens, "content_sha256": checksums})
    logger.info(f"{prefix}: sentences {lo}-{hi - 1}, {target_tokens:,} target tokens")


def write_manifest(task, teachers, teacher_files, splits, k, directory, num_shards, dtype):
    """Write ``manifest.json`` once all shards of all splits exist, each built with this build's settings,
    keeping the splits an earlier build with the same settings listed; return whether it was written."""
    entries = {}
    for split in splits:
        shard_files = [shard_prefix(directory, split, i, num_shards) + ".json" for i in range(num_shards)]
        missing = [i for i, path in enumerate(shard_files) if not os.path.isfile(path)]
        if missing:
            logger.info(f"{split}: shards {missing} of {num_shards} still to build; manifest not written yet")
            return False
        shards = [read_json(path) for path in shard_files]
        for shard_id, (path, shard) in enumerate(zip(shard_files, shards)):
            if shard is None:
                raise FairseqKDError(f"{path} is damaged (not the settings a build writes); rebuild its shard (--force)")
            changed = differences(shard, shard_settings(task, teachers, teacher_files, split, k, shard_id, num_shards,
                                                        dtype))
            if changed:
                raise FairseqKDError(
                    f"{path}: this shard (built by another process) has other {', '.join(changed)} than this build;"
                    " build every shard with the same options (--force rebuilds it)"
                )
        dataset = split_dataset(task, split)
        entries[split] = {
            "sentences": len(dataset),
            "target_tokens": sum(shard["target_tokens"] for shard in shards),
            "num_shards": num_shards,
            "data_sha256": split_fingerprint(dataset),
            "content_sha256": [shard["content_sha256"] for shard in shards],
        }
    manifest = {
        "format_version": FORMAT_VERSION,
        "k": k,
        "target_dictionary_sha256": dictionary_fingerprint(task.target_dictionary),
        "teachers": teacher_files,
        "teacher_weights": teachers.weights.tolist(),
        "teacher_weighting": teachers.weighting,
        # a multilingual student's cache: the language pair it holds the teacher of
        "lang_pair": task.lang_pairs[0] if isinstance(task, TranslationMultiSimpleEpochTask) else None,
    }
    path = os.path.join(directory, MANIFEST)
    earlier = read_json(path) or {}  # missing or damaged: written anew
    if all(earlier.get(key) == value for key, value in manifest.items()):
        entries = {**earlier.get("splits", {}), **entries}  # e.g. --splits test after train,valid
    write_json(path, {**manifest, "splits": entries})
    return True


def get_parser():
    parser = options.get_parser("Top-k teacher cache", default_task="translation")
    options.add_dataset_args(parser, gen=True)
    group = parser.add_argument_group("top-k teacher cache")
    group.add_argument("--teacher-path", required=True,
                       help="teacher checkpoint(s), colon-separated, whose top-k distributions to cache")
    group.add_argument("--teacher-weights", default=None,
                       help="comma-separated non-negative weights of the teachers' mixture (default: equal)")
    group.add_argument("--teacher-weighting", choices=TEACHER_WEIGHTINGS, default="fixed",
                       help="fixed (--teacher-weights) or confidence (per target token); as in training")
    group.add_argument("--topk", type=int, default=8, help="teacher tokens kept per target position")
    group.add_argument("--splits", default="train,valid", help="comma-separated splits to cache")
    group.add_argument("--out", required=True, help="cache directory (created if missing)")
    group.add_argument("--force", action="store_true",
                       help="rebuild the shards of --out, also those built with other data, teachers or settings"
                            " (refused without it) and damaged ones")
    return parser


def main(argv=None):
    """Console script ``fairseq-kd-build-cache``."""
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stdout, force=True
    )
    args = options.parse_args_and_arch(get_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    if args.teacher_weighting == "learned":
        raise FairseqKDError(
            "--teacher-weighting learned trains the weights with the student, so a cache cannot hold them;"
            " use fixed or confidence, or distil with --teacher-path"
        )
    if args.topk < 1:
        raise FairseqKDError(f"--topk must be >= 1, got {args.topk}")
    num_shards, shard_id = cfg.dataset.num_shards, cfg.dataset.shard_id
    if not 0 <= shard_id < num_shards:
        raise FairseqKDError(f"--shard-id must be in [0, --num-shards={num_shards}), got {shard_id}")
    utils.import_user_module(cfg.common)
    check_one_data_directory(args.data, "DATA")
    task = setup_data_task(cfg.task, args.data)
    check_unbucketed_targets(getattr(task.cfg, "num_batch_buckets", 0))  # a multilingual (legacy) task has no cfg
    multilingual = isinstance(task, TranslationMultiSimpleEpochTask)
    if multilingual and len(task.lang_pairs) != 1:
        raise FairseqKDError(
            f"--lang-pairs {','.join(task.lang_pairs)}: a multilingual student's cache holds one pair's teacher;"
            " build one cache per pair (--lang-pairs en-de, then en-fr, ...)"
        )
    langs = tuple(task.lang_pairs[0].split("-")) if multilingual else None
    teachers = Teachers.load(args.teacher_path, args.teacher_weights, args.teacher_weighting, task, langs=langs,
                             multilingual=multilingual)
    if args.topk > len(task.target_dictionary):
        raise FairseqKDError(f"--topk {args.topk} exceeds the target vocabulary size {len(task.target_dictionary)}")
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.float16 if use_cuda and cfg.common.fp16 else torch.float32
    splits = args.splits.split(",")
    if not all(splits) or len(set(splits)) != len(splits):
        raise FairseqKDError(f"--splits must name distinct splits separated by commas, got {args.splits!r}")
    max_tokens = cfg.dataset.max_tokens or 8000
    # every split is loaded and checked before the first shard is built
    src, tgt = langs or (task.cfg.source_lang, task.cfg.target_lang)
    for split in splits:
        # as fairseq-train reads them: its training split with SPLIT1, SPLIT2, ... appended
        load_split(task, split, args.data, src, tgt, "--splits", combine=split == cfg.dataset.train_subset)
        dataset = split_dataset(task, split)
        if len(dataset) < num_shards:  # an empty shard could not be read (memory-mapping an empty file fails)
            raise FairseqKDError(
                f"--num-shards {num_shards} is more than the {len(dataset)} sentences of '{split}'; use at most"
                f" {len(dataset)} shards, or cache that split on its own"
            )
        check_within_teacher_positions(dataset, teachers, split)
        longest = max(dataset.num_tokens_vec(np.arange(len(dataset))), default=0)
        if longest > max_tokens:
            raise FairseqKDError(
                f"--max-tokens {max_tokens} is smaller than the longest sentence pair of '{split}' ({longest} tokens);"
                f" raise it to at least {longest}"
            )
    make_writable_directory("--out", args.out, args.out)
    teacher_files = [{"path": os.path.abspath(p), "sha256": sha256(p)} for p in utils.split_paths(args.teacher_path)]
    for split in splits:
        settings = shard_settings(task, teachers, teacher_files, split, args.topk, shard_id, num_shards, dtype)
        build_shard(task, teachers, settings, args.out, shard_id, num_shards, max_tokens, device, dtype,
                    cfg.common.log_format, args.force)
    if write_manifest(task, teachers, teacher_files, splits, args.topk, args.out, num_shards, dtype):
        logger.info(f"cache complete: {os.path.join(args.out, MANIFEST)}")


if __name__ == "__main__":
    sys.exit(main())
