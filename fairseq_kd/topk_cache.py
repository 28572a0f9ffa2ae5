"""Offline top-k teacher cache.

The teachers run once over a binarized split with teacher forcing; for every target token their K most
probable tokens and log-probabilities are kept, so students are distilled without running a teacher
(``--teacher-topk-cache DIR``). This module reads caches; ``fairseq_kd.build_cache`` (``fairseq-kd-build-cache``)
writes them::

    fairseq-kd-build-cache data-bin --teacher-path teacher.pt --topk 8 --splits train,valid --out cache

A cache directory holds, per split and shard (``--num-shards N --shard-id I``, one process per shard):

- ``{split}.shard{I}-of-{N}.ids.{bin,idx}``: fairseq memory-mapped indexed dataset, one item per sentence
  in corpus order, ``len(target) * K`` token ids;
- ``{split}.shard{I}-of-{N}.lprobs.{bin,idx}``: the same layout, fp16 log-probabilities stored as their
  int16 bit patterns (fairseq's indexed datasets have no float16 type);
- ``{split}.shard{I}-of-{N}.json``: written last, so a shard with it is complete: everything that
  determined its contents (its sentences' fingerprint, dictionary, teacher hashes, mixture, k, dtype) and
  its files' checksums. A re-run skips a shard only when all of that matches;
- ``manifest.json``: written once every shard of every split is there: K, dictionary and data
  fingerprints, teacher checkpoint hashes, split sizes and shard checksums. Students refuse a cache whose
  manifest does not match their data, or whose files are not those the build wrote.
"""
import hashlib
import json
import os

import numpy as np
import torch
from fairseq import utils
from fairseq.data import BaseWrapperDataset
from fairseq.data.indexed_dataset import MMapIndexedDataset, data_file_path, index_file_path

from fairseq_kd.checkpoints import sha256
from fairseq_kd.errors import FairseqKDError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2


def split_fingerprint(dataset, lo=0, hi=None) -> str:
    """sha256 of the source and target sentences ``lo`` to ``hi`` (default: all) of a ``LanguagePairDataset``,
    in corpus order."""
    digest = hashlib.sha256()
    for i in range(lo, len(dataset) if hi is None else hi):
        digest.update(dataset.src[i].numpy().tobytes())
        digest.update(b"|")
        digest.update(dataset.tgt[i].numpy().tobytes())
        digest.update(b"\n")
    return digest.hexdigest()


def dictionary_fingerprint(dictionary) -> str:
    return hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()


def shard_prefix(directory, split, shard_id, num_shards):
    return os.path.join(directory, f"{split}.shard{shard_id}-of-{num_shards}")


def shard_range(num_sentences, shard_id, num_shards):
    """Contiguous sentence range ``[lo, hi)`` of one shard."""
    return num_sentences * shard_id // num_shards, num_sentences * (shard_id + 1) // num_shards


def well_formed_split(entry):
    """Whether a manifest's entry of one split has the fields, and the types, a build writes."""
    return (isinstance(entry["sentences"], int) and isinstance(entry["data_sha256"], str)
            and isinstance(entry["num_shards"], int) and len(entry["content_sha256"]) == entry["num_shards"] > 0
            and all(isinstance(checksums, dict) and all(isinstance(checksums.get(name), str) for name in ("ids", "lprobs"))
                    for checksums in entry["content_sha256"]))


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
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise FairseqKDError(f"{path}: cache format {version}, expected {FORMAT_VERSION}; rebuild the cache")
    try:
        well_formed = (
            isinstance(manifest["k"], int) and manifest["k"] > 0 and isinstance(manifest["target_dictionary_sha256"], str)
            and all(map(well_formed_split, manifest["splits"].values()))
            and all(isinstance(teacher["sha256"], str) for teacher in manifest["teachers"])
            and isinstance(manifest["teacher_weights"], list)
            and all(type(weight) in (int, float) for weight in manifest["teacher_weights"])
            and isinstance(manifest["teacher_weighting"], str)
        )
    except (KeyError, TypeError, AttributeError):
        well_formed = False
    if not well_formed:
        raise FairseqKDError(f"{path}: not a cache manifest of the expected shape; rebuild the cache")
    return manifest


def check_one_data_directory(data, option):
    """A cache holds the sentences of one data directory, but fairseq-train reads a DATA of several
    (``d1:d2:...``) one per epoch for its training split: refused, since no rebuild could follow it."""
    directories = utils.split_paths(data)
    if len(directories) > 1:
        raise FairseqKDError(
            f"{option}: a cache holds the sentences of one data directory, but {data} names {len(directories)},"
            " which fairseq-train reads one per epoch; binarize the training data into one directory, or distil"
            " from the teachers online"
        )


def check_unbucketed_targets(num_batch_buckets):
    """A cache holds a row per target token, but ``--num-batch-buckets`` pads every target to its bucket's
    length in the dataset itself, where no rebuild could give those pads rows."""
    if num_batch_buckets:
        raise FairseqKDError(
            f"--num-batch-buckets {num_batch_buckets} pads each target to its bucket's length, where a top-k cache"
            " holds a row per target token; drop --num-batch-buckets, or distil from the teachers online"
        )


def teachers_built_from(directory):
    """The sha256 of each teacher checkpoint the cache in ``directory`` was built from."""
    return [teacher["sha256"] for teacher in read_manifest(directory)["teachers"]]


def teacher_mixture_built_with(directory):
    """``[weights, weighting]`` of the teachers' distributions that the cache in ``directory`` holds."""
    manifest = read_manifest(directory)
    return [manifest["teacher_weights"], manifest["teacher_weighting"]]


def shard_file_problem(prefix, name, checksum):
    """What is wrong with one of a shard's indexed datasets (``name``: ids or lprobs) as its build recorded
    it (its data file's ``checksum``): a missing file, or another data file; None if nothing."""
    path = data_file_path(f"{prefix}.{name}")
    if not os.path.isfile(path) or not os.path.isfile(index_file_path(f"{prefix}.{name}")):
        return f"{prefix}.{name} is missing its .bin or .idx file"
    if sha256(path) != checksum:
        return f"{path} is not the file the build wrote (checksum differs)"
    return None


def open_shard_file(prefix, name, checksum, sentences):
    """One of a shard's indexed datasets, after checking that its data file is the one the build wrote."""
    fix = "rebuild the cache (fairseq-kd-build-cache --force)"
    problem = shard_file_problem(prefix, name, checksum)
    if problem:
        raise FairseqKDError(f"--teacher-topk-cache: {problem}; {fix}")
    with open(index_file_path(f"{prefix}.{name}"), "rb") as f:  # fairseq's reader fails noisily on another header
        if f.read(len(MMapIndexedDataset.Index._HDR_MAGIC)) != MMapIndexedDataset.Index._HDR_MAGIC:
            raise FairseqKDError(f"--teacher-topk-cache: {index_file_path(f'{prefix}.{name}')} is not an index file; {fix}")
    try:
        dataset = MMapIndexedDataset(f"{prefix}.{name}")
    except Exception as e:  # a damaged index: numpy/struct errors of every kind
        raise FairseqKDError(f"--teacher-topk-cache: cannot read the index of {prefix}.{name} ({e}); {fix}") from None
    if len(dataset) != sentences:
        raise FairseqKDError(f"--teacher-topk-cache: {prefix}.{name} holds {len(dataset)} sentences, not {sentences}; {fix}")
    return dataset


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
        for shard_id, checksums in enumerate(entry["content_sha256"]):
            prefix = shard_prefix(directory, split, shard_id, entry["num_shards"])
            lo, hi = shard_range(entry["sentences"], shard_id, entry["num_shards"])
            self.shards.append((lo, hi, *(open_shard_file(prefix, name, checksums[name], hi - lo) for name in ("ids", "lprobs"))))

    def rows(self, index, target_length):
        """``(lprobs, ids)`` of sentence ``index``, numpy arrays ``(target_length, k)``: float32 and int64. A
        sentence cached with another number of entries (an index or manifest changed since the build) would
        put its rows beside other target tokens, or beside none: refused."""
        for lo, hi, ids, lprobs in self.shards:
            if lo <= index < hi:
                values, tokens = lprobs[index - lo].numpy(), ids[index - lo].numpy()
                if values.size != target_length * self.k or tokens.size != target_length * self.k:
                    raise FairseqKDError(
                        f"--teacher-topk-cache: sentence {index} has {tokens.size} cached entries, not its"
                        f" {target_length} target tokens x k={self.k}; rebuild the cache (fairseq-kd-build-cache --force)"
                    )
                values = values.astype(np.int16).view(np.float16).astype(np.float32)
                return values.reshape(target_length, self.k), tokens.reshape(target_length, self.k)
        raise IndexError(index)


class TopKCacheDataset(BaseWrapperDataset):
    """A ``LanguagePairDataset`` whose batches also carry the cached teacher ``(lprobs, ids)`` under
    ``KEY``, both ``(B, T, k)`` and aligned with ``sample["target"]`` (``Teachers.predict`` reads them)."""

    KEY = "teacher_topk"

    def __init__(self, dataset, cache: TopKCache, left_pad_target):
        super().__init__(dataset)
        self.cache = cache
        self.left_pad_target = left_pad_target

    def __getitem__(self, index):
        item = self.dataset[index]
        item[self.KEY] = self.cache.rows(index, len(item["target"]))
        return item

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if not batch:
            return batch
        by_id = {sample["id"]: sample[self.KEY] for sample in samples}
        batch[self.KEY] = collate_topk([by_id[index] for index in batch["id"].tolist()], batch["target"].size(1),
                                       self.left_pad_target)
        return batch


def collate_topk(rows, tgt_len, left_pad_target):
    """The cached ``(lprobs, ids)`` of a batch's rows, in row order, padded like the targets to
    ``(B, tgt_len, k)`` tensors; a row given as None (no cache) is all zeros."""
    k = next(row[0].shape[1] for row in rows if row is not None)
    lprobs = np.zeros((len(rows), tgt_len, k), dtype=np.float32)
    ids = np.zeros((len(rows), tgt_len, k), dtype=np.int64)
    for row, entry in enumerate(rows):
        if entry is None:
            continue
        values, tokens = entry
        positions = slice(tgt_len - len(tokens), tgt_len) if left_pad_target else slice(0, len(tokens))
        lprobs[row, positions] = values
        ids[row, positions] = tokens
    return torch.from_numpy(lprobs), torch.from_numpy(ids)
