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
- ``{split}.shard{I}-of-{N}.json``: written last, so a shard with it is complete and is skipped on re-run;
- ``manifest.json``: written once every shard of every split is there: K, dictionary and data
  fingerprints, teacher checkpoint hashes and split sizes. Students refuse a cache whose manifest does
  not match their data.
"""
import hashlib
import json
import os

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset
from fairseq.data.indexed_dataset import MMapIndexedDataset

from fairseq_kd.errors import FairseqKDError

MANIFEST = "manifest.json"
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


def shard_prefix(directory, split, shard_id, num_shards):
    return os.path.join(directory, f"{split}.shard{shard_id}-of-{num_shards}")


def shard_range(num_sentences, shard_id, num_shards):
    """Contiguous sentence range ``[lo, hi)`` of one shard."""
    return num_sentences * shard_id // num_shards, num_sentences * (shard_id + 1) // num_shards


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
    """A ``LanguagePairDataset`` whose batches also carry the cached teacher ``(lprobs, ids)`` under
    ``KEY``, both ``(B, T, k)`` and aligned with ``sample["target"]`` (``Teachers.predict`` reads them)."""

    KEY = "teacher_topk"

    def __init__(self, dataset, cache: TopKCache, left_pad_target):
        super().__init__(dataset)
        self.cache = cache
        self.left_pad_target = left_pad_target

    def __getitem__(self, index):
        item = self.dataset[index]
        item[self.KEY] = self.cache[index]
        return item

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if not batch:
            return batch
        by_id = {sample["id"]: sample[self.KEY] for sample in samples}
        bsz, tgt_len = batch["target"].shape
        lprobs = np.zeros((bsz, tgt_len, self.cache.k), dtype=np.float32)
        ids = np.zeros((bsz, tgt_len, self.cache.k), dtype=np.int64)
        for row, index in enumerate(batch["id"].tolist()):
            values, tokens = by_id[index]
            positions = slice(tgt_len - len(tokens), tgt_len) if self.left_pad_target else slice(0, len(tokens))
            lprobs[row, positions] = values
            ids[row, positions] = tokens
        batch[self.KEY] = (torch.from_numpy(lprobs), torch.from_numpy(ids))
        return batch
