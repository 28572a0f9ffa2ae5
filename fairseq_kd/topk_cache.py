"""Offline top-k teacher cache.

The teachers run once over a binarized split with teacher forcing; for every target token their K most
probable tokens and log-probabilities are kept, so students are distilled without running a teacher
(``--teacher-topk-cache DIR``). Build it with ``fairseq-kd-build-cache``::

    fairseq-kd-build-cache data-bin --teacher-path teacher.pt --topk 8 --splits train,valid --out cache

A cache directory holds, per split and shard (``--num-shards N --shard-id I``, one process per shard):

- ``{split}.shard{I}-of-{N}.ids.{bin,idx}``: fairseq memory-mapped indexed dataset, one item per sentence
  in corpus order, ``len(target) * K`` token ids;
- ``{split}.shard{I}-of-{N}.lprobs.{bin,idx}``: the same layout, fp16 log-probabilities stored as their
  int16 bit patterns (fairseq's indexed datasets have no float16 type);
- ``{split}.shard{I}-of-{N}.json``: written last, so a shard with it is complete and is skipped on re-run;
- ``manifest.json``: written once every shard of every split is there: K, dictionary and data
  fingerprints, teacher checkpoint hashes and split sizes. Students refuse a cache whose manifest does
  not match their data.
"""
import hashlib
import json
import logging
import os
import sys

import numpy as np
import torch
from fairseq import options, tasks, utils
from fairseq.data import BaseWrapperDataset, data_utils
from fairseq.data.indexed_dataset import (
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_fitting_int_dtype,
    data_file_path,
    index_file_path,
)
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import progress_bar

from fairseq_kd.errors import FairseqKDError
from fairseq_kd.kd_losses import topk_lprobs

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SORT_WINDOW = 10000
FORMAT_VERSION = 1


def split_fingerprint(dataset) -> str:
    """sha256 of every source and target sentence of a ``LanguagePairDataset``, in corpus order."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        digest.update(dataset.src[i].numpy().tobytes())
        digest.update(b"|")
        digest.update(dataset.tgt[i].numpy().tobytes())
        digest.update(b"\n")
    return digest.hexdigest()


def dictionary_fingerprint(dictionary) -> str:
    return hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_prefix(directory, split, shard_id, num_shards):
    return os.path.join(directory, f"{split}.shard{shard_id}-of-{num_shards}")


def shard_range(num_sentences, shard_id, num_shards):
    """Contiguous sentence range ``[lo, hi)`` of one shard."""
    return num_sentences * shard_id // num_shards, num_sentences * (shard_id + 1) // num_shards


def write_json(path, content):
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def build_shard(task, split, teachers, k, directory, shard_id, num_shards, max_tokens, device, dtype, log_format):
    """Write one shard of ``split``'s cache; a shard already complete is left as it is. ``teachers``
    identifies the teacher checkpoints (paths and hashes) and is recorded with the shard."""
    prefix = shard_prefix(directory, split, shard_id, num_shards)
    if os.path.isfile(prefix + ".json"):
        done = read_json(prefix + ".json")
        if done["k"] != k or [t["sha256"] for t in done["teachers"]] != [t["sha256"] for t in teachers]:
            raise FairseqKDError(
                f"{prefix}.json: this shard was built with another teacher or k (top-{done['k']}); use a new --out"
                " directory, or the same --teacher-path and --topk"
            )
        logger.info(f"{prefix}: complete, skipping")
        return
    dataset = task.dataset(split)
    lo, hi = shard_range(len(dataset), shard_id, num_shards)
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
        values, ids = topk_lprobs(task.teacher_lprobs(net_input, sample["target"], device, dtype)[0], k)
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
    write_json(prefix + ".json", {"split": split, "range": [lo, hi], "target_tokens": target_tokens, "k": k,
                                  "teachers": teachers})
    logger.info(f"{prefix}: sentences {lo}-{hi - 1}, {target_tokens:,} target tokens")


def write_manifest(task, splits, teachers, k, directory, num_shards):
    """Write ``manifest.json`` once all shards of all splits exist; return whether it was written."""
    entries = {}
    for split in splits:
        shard_files = [shard_prefix(directory, split, i, num_shards) + ".json" for i in range(num_shards)]
        missing = [i for i, path in enumerate(shard_files) if not os.path.isfile(path)]
        if missing:
            logger.info(f"{split}: shards {missing} of {num_shards} still to build; manifest not written yet")
            return False
        dataset = task.dataset(split)
        entries[split] = {
            "sentences": len(dataset),
            "target_tokens": sum(read_json(path)["target_tokens"] for path in shard_files),
            "num_shards": num_shards,
            "data_sha256": split_fingerprint(dataset),
        }
    write_json(
        os.path.join(directory, MANIFEST),
        {
            "format_version": FORMAT_VERSION,
            "k": k,
            "target_dictionary_sha256": dictionary_fingerprint(task.target_dictionary),
            "teachers": teachers,
            "teacher_weights": task.teacher_weights.tolist(),
            "teacher_weighting": str(task.cfg.teacher_weighting),
            "splits": entries,
        },
    )
    return True


def read_manifest(directory):
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        if os.path.isdir(directory):
            raise FairseqKDError(
                f"--teacher-topk-cache {directory!r} has no {MANIFEST}: the cache is incomplete (a shard is"
                " missing or its build was interrupted); run fairseq-kd-build-cache again for every shard"
            )
        raise FairseqKDError(f"--teacher-topk-cache: no such directory {directory!r}; build it with fairseq-kd-build-cache")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise FairseqKDError(f"--teacher-topk-cache: cannot read {path} ({e}); rebuild the cache") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FairseqKDError(f"{path}: cache format {manifest.get('format_version')}, expected {FORMAT_VERSION}; rebuild the cache")
    return manifest


class TopKCache:
    """Read access to one split of a cache, checked against the data it is used with."""

    def __init__(self, directory, split, dataset, target_dictionary):
        manifest = read_manifest(directory)
        fix = "rebuild the cache for this data (fairseq-kd-build-cache)"
        if split not in manifest["splits"]:
            raise FairseqKDError(
                f"--teacher-topk-cache {directory!r} has no '{split}' split (it has {', '.join(manifest['splits'])});"
                f" build it with fairseq-kd-build-cache --splits ...,{split}"
            )
        if manifest["target_dictionary_sha256"] != dictionary_fingerprint(target_dictionary):
            raise FairseqKDError(f"--teacher-topk-cache {directory!r} was built with another target dictionary; {fix}")
        entry = manifest["splits"][split]
        if entry["sentences"] != len(dataset) or entry["data_sha256"] != split_fingerprint(dataset):
            raise FairseqKDError(
                f"--teacher-topk-cache {directory!r}: its '{split}' split ({entry['sentences']} sentences) is not"
                f" this data's ({len(dataset)} sentences, or the same count with other sentences); {fix}"
            )
        self.k = manifest["k"]
        self.shards = []
        for shard_id in range(entry["num_shards"]):
            prefix = shard_prefix(directory, split, shard_id, entry["num_shards"])
            lo, hi = shard_range(entry["sentences"], shard_id, entry["num_shards"])
            self.shards.append((lo, hi, MMapIndexedDataset(prefix + ".ids"), MMapIndexedDataset(prefix + ".lprobs")))

    def __getitem__(self, index):
        """``(lprobs, ids)`` of sentence ``index``, numpy arrays ``(len(target), k)``: float32 and int64."""
        for lo, hi, ids, lprobs in self.shards:
            if lo <= index < hi:
                values = lprobs[index - lo].numpy().astype(np.int16).view(np.float16).astype(np.float32)
                return values.reshape(-1, self.k), ids[index - lo].numpy().reshape(-1, self.k)
        raise IndexError(index)


class TopKCacheDataset(BaseWrapperDataset):
    """A ``LanguagePairDataset`` whose batches also carry ``sample["teacher_topk"]``: cached teacher
    ``(lprobs, ids)``, both ``(B, T, k)`` and aligned with ``sample["target"]``."""

    def __init__(self, dataset, cache: TopKCache, left_pad_target):
        super().__init__(dataset)
        self.cache = cache
        self.left_pad_target = left_pad_target

    def __getitem__(self, index):
        item = self.dataset[index]
        item["teacher_topk"] = self.cache[index]
        return item

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if not batch:
            return batch
        by_id = {sample["id"]: sample["teacher_topk"] for sample in samples}
        bsz, tgt_len = batch["target"].shape
        lprobs = np.zeros((bsz, tgt_len, self.cache.k), dtype=np.float32)
        ids = np.zeros((bsz, tgt_len, self.cache.k), dtype=np.int64)
        for row, index in enumerate(batch["id"].tolist()):
            values, tokens = by_id[index]
            positions = slice(tgt_len - len(tokens), tgt_len) if self.left_pad_target else slice(0, len(tokens))
            lprobs[row, positions] = values
            ids[row, positions] = tokens
        batch["teacher_topk"] = (torch.from_numpy(lprobs), torch.from_numpy(ids))
        return batch


def get_parser():
    parser = options.get_parser("Top-k teacher cache", default_task="translation_distillation")
    options.add_dataset_args(parser, gen=True)
    group = parser.add_argument_group("top-k teacher cache")
    group.add_argument("--topk", type=int, default=8, help="teacher tokens kept per target position")
    group.add_argument("--splits", default="train,valid", help="comma-separated splits to cache")
    group.add_argument("--out", required=True, help="cache directory (created if missing)")
    return parser


def main(argv=None):
    """Console script ``fairseq-kd-build-cache``."""
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stdout, force=True
    )
    args = options.parse_args_and_arch(get_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    if not cfg.task.teacher_path:
        raise FairseqKDError("--teacher-path is required: the checkpoint(s) whose top-k distributions to cache")
    if cfg.task.teacher_weighting == "learned":
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
    task = tasks.setup_task(cfg.task)
    if args.topk > len(task.target_dictionary):
        raise FairseqKDError(f"--topk {args.topk} exceeds the target vocabulary size {len(task.target_dictionary)}")
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.float16 if use_cuda and cfg.common.fp16 else torch.float32
    os.makedirs(args.out, exist_ok=True)
    splits = args.splits.split(",")
    teachers = [{"path": os.path.abspath(p), "sha256": file_sha256(p)} for p in utils.split_paths(cfg.task.teacher_path)]
    for split in splits:
        task.load_dataset(split)
        build_shard(task, split, teachers, args.topk, args.out, shard_id, num_shards,
                    cfg.dataset.max_tokens or 8000, device, dtype, cfg.common.log_format)
    if write_manifest(task, splits, teachers, args.topk, args.out, num_shards):
        logger.info(f"cache complete: {os.path.join(args.out, MANIFEST)}")


if __name__ == "__main__":
    sys.exit(main())
