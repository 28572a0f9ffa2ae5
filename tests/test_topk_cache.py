"""Top-k teacher cache: fairseq-kd-build-cache writes what the teacher computes, shards add up to the
whole, students train from it with the same KD term as online --kd-topk, stale caches are refused."""
import json
import re
import shutil

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_kd  # noqa: F401
from conftest import PLUGIN, binarize, one_error, run, write_parallel
from fairseq_kd.kd_losses import topk_lprobs
from fairseq_kd.build_cache import get_parser
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.teachers import Teachers
from fairseq_kd.topk_cache import TopKCache, TopKCacheDataset
from test_cli import train_student
from test_criterion_and_task import build, first_batch

K = 4


def build_cache(data_bin, teacher, out, *extra, expect_ok=True):
    return run(
        "fairseq-kd-build-cache", data_bin, "--teacher-path", teacher, "--topk", K, "--out", out,
        "--cpu", "--max-tokens", "500", *extra, expect_ok=expect_ok,
    )


def load_teachers(data_bin, teachers, split, *extra):
    """``(task, teachers)`` as fairseq-kd-build-cache sets them up, with ``split`` loaded."""
    args = options.parse_args_and_arch(get_parser(), [str(data_bin), "--teacher-path", str(teachers), *extra,
                                                      "--out", "unused"])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    task.load_dataset(split)
    return task, Teachers.load(args.teacher_path, args.teacher_weights, args.teacher_weighting, task)


def teacher_lprobs(teachers, sample):
    return teachers.mixture(sample["net_input"], sample["target"], torch.device("cpu"), torch.float32).lprobs


@pytest.fixture(scope="module")
def cache(data_bin, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    build_cache(data_bin, teacher, out)
    return out


def test_cache_holds_the_teachers_topk(data_bin, teacher, cache):
    task, teachers = load_teachers(data_bin, teacher, "valid")
    dataset = task.dataset("valid")
    cached = TopKCache(str(cache), "valid", dataset, task.target_dictionary)
    for index in (0, 7, len(dataset) - 1):
        sample = dataset.collater([dataset[index]])
        lprobs = teacher_lprobs(teachers, sample)
        expected_values, expected_ids = topk_lprobs(lprobs[0], K)
        values, ids = map(torch.from_numpy, cached.rows(index, len(dataset[index]["target"])))
        assert ids.shape == (len(dataset[index]["target"]), K)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(values, expected_values, atol=2e-3, rtol=1e-3)  # fp16 storage
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["k"] == K and set(manifest["splits"]) == {"train", "valid"}
    assert manifest["splits"]["valid"]["target_tokens"] == sum(len(dataset[i]["target"]) for i in range(len(dataset)))
    assert len(manifest["teachers"][0]["sha256"]) == 64


def test_cache_of_a_confidence_weighted_mixture(data_bin, teacher, weak_teacher, tmp_path):
    teachers = f"{teacher}:{weak_teacher}"
    build_cache(data_bin, teachers, tmp_path, "--teacher-weighting", "confidence", "--splits", "valid")
    task, mixture = load_teachers(data_bin, teachers, "valid", "--teacher-weighting", "confidence")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[3]])
    lprobs = teacher_lprobs(mixture, sample)
    cached = TopKCache(str(tmp_path), "valid", dataset, task.target_dictionary)
    values, ids = map(torch.from_numpy, cached.rows(3, len(dataset[3]["target"])))
    expected_values, expected_ids = topk_lprobs(lprobs[0], K)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(values, expected_values, atol=2e-3, rtol=1e-3)
    assert json.loads((tmp_path / "manifest.json").read_text())["teacher_weighting"] == "confidence"
    proc = build_cache(data_bin, teachers, tmp_path / "learned", "--teacher-weighting", "learned", expect_ok=False)
    assert "a cache cannot hold them" in proc.stderr and "Traceback" not in proc.stderr


def test_a_cache_holds_the_training_split_fairseq_train_reads(data_bin, teacher, tmp_path):
    """fairseq-train appends train1, train2, ... to its training split: the cache holds them too. A DATA of
    several directories, which it reads one per epoch, no cache can follow: refused."""
    combined = tmp_path / "combined"
    shutil.copytree(data_bin, combined)
    for path in data_bin.glob("valid.*"):
        shutil.copy(path, combined / path.name.replace("valid", "train1", 1))
    unsaid = build_cache(combined, teacher, tmp_path / "cache", expect_ok=False)  # as fairseq-train, which fails
    assert "holds 'train1' beside 'train', which fairseq-train appends" in unsaid.stderr and "Traceback" not in unsaid.stderr
    build_cache(combined, teacher, tmp_path / "cache", "--upsample-primary", "1")
    train_student(combined, tmp_path / "student", "--task", "translation_distillation", "--teacher-topk-cache",
                  tmp_path / "cache", "--kd-topk", K, "--max-update", "1", "--upsample-primary", "1")
    one_per_epoch = f"{data_bin}:{combined}"
    refused = build_cache(one_per_epoch, teacher, tmp_path / "other", expect_ok=False)
    assert "DATA: a cache holds the sentences of one data directory, but" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "other").exists()
    with pytest.raises(FairseqKDError, match="--teacher-topk-cache: a cache holds the sentences of one data directory"):
        build(one_per_epoch, "--teacher-topk-cache", tmp_path / "cache", "--kd-topk", K)


def test_sharded_build_equals_unsharded(data_bin, teacher, cache, tmp_path):
    sharded = tmp_path / "sharded"
    build_cache(data_bin, teacher, sharded, "--num-shards", "2", "--shard-id", "1")
    assert not (sharded / "manifest.json").exists()  # shard 0 still missing
    proc = train_student(data_bin, tmp_path / "s", "--task", "translation_distillation", "--teacher-topk-cache", sharded,
                         "--kd-topk", K, "--max-update", "1", expect_ok=False)
    assert proc.returncode != 0 and "the cache is incomplete" in proc.stderr
    log = build_cache(data_bin, teacher, sharded, "--num-shards", "2", "--shard-id", "0").stdout
    assert "cache complete" in log
    rerun = build_cache(data_bin, teacher, sharded, "--num-shards", "2", "--shard-id", "0").stdout
    assert "complete, skipping" in rerun
    other_k = run("fairseq-kd-build-cache", data_bin, "--teacher-path", teacher, "--topk", "2", "--out", sharded,
                  "--cpu", "--num-shards", "2", "--shard-id", "0", expect_ok=False)
    assert other_k.returncode != 0 and "was built with other k; pass --force" in other_k.stderr
    task, _ = load_teachers(data_bin, teacher, "train")
    dataset = task.dataset("train")
    whole = TopKCache(str(cache), "train", dataset, task.target_dictionary)
    parts = TopKCache(str(sharded), "train", dataset, task.target_dictionary)
    # batches differ between the two builds, so float rounding may differ slightly and swap near-tied
    # tokens; anything beyond that would be a misaligned or lost sentence
    swapped = 0
    for index in range(len(dataset)):
        length = len(dataset[index]["target"])
        (values_a, ids_a), (values_b, ids_b) = whole.rows(index, length), parts.rows(index, length)
        assert values_a.shape == values_b.shape, index
        assert abs(values_a - values_b).max() < 0.02, index
        swapped += int((ids_a != ids_b).any(axis=-1).sum())
    assert swapped <= 0.01 * sum(len(dataset[i]["target"]) for i in range(len(dataset)))


def test_online_and_cached_teachers_give_the_same_kd_loss(data_bin, teacher, cache):
    """Through the teacher interface the criterion cannot tell a cache from the teacher it was built from."""
    online_task, model, online = build(data_bin, "--teacher-path", teacher, "--kd-topk", K, "--kd-temperature", 2)
    cached_task, _, cached = build(data_bin, "--teacher-topk-cache", cache, "--kd-topk", K, "--kd-temperature", 2)
    sample, cached_sample = first_batch(online_task), first_batch(cached_task)
    real = sample["target"].ne(online_task.target_dictionary.pad())
    assert torch.equal(sample["target"], cached_sample["target"]) and not real.all()
    (values, ids), (cached_values, cached_ids) = (
        task.teachers.predict(batch, model).distribution(K)
        for task, batch in ((online_task, sample), (cached_task, cached_sample))
    )
    assert torch.equal(ids[real], cached_ids[real])
    torch.testing.assert_close(cached_values[real], values[real], atol=2e-3, rtol=1e-3)  # fp16 storage
    online_loss, cached_loss = online(model, sample)[2]["kd_loss"], cached(model, cached_sample)[2]["kd_loss"]
    assert cached_loss.item() == pytest.approx(online_loss.item(), rel=1e-3)


def valid_kd_loss(log):
    return float(re.search(r"valid on 'valid' subset.*?\| kd_loss ([\d.]+)", log).group(1))


def test_training_from_cache_matches_online_topk(data_bin, teacher, cache, tmp_path):
    train_student(data_bin, tmp_path, "--task", "translation_distillation", "--teacher-topk-cache", cache,
                  "--kd-alpha", "0.5", "--kd-temperature", "2", "--kd-topk", K, "--max-epoch", "1")
    # the same student and KD function, fed by the teacher or by the cache: only the cache's fp16
    # storage differs
    kd_loss = {}
    for name, teacher_path, cache_dir in (("online", teacher, None), ("cached", None, cache)):
        # fairseq-validate rebuilds the task from the checkpoint; overrides pick the teacher side
        overrides = repr({"teacher_path": teacher_path and str(teacher_path), "teacher_topk_cache": cache_dir and str(cache_dir)})
        proc = run("fairseq-validate", data_bin, "--user-dir", PLUGIN, "--path", tmp_path / "checkpoint_last.pt",
                   "--task", "translation_distillation", "--model-overrides", overrides, "--cpu", "--max-tokens", "500")
        kd_loss[name] = valid_kd_loss(proc.stdout + proc.stderr)
    assert kd_loss["cached"] == pytest.approx(kd_loss["online"], abs=0.005)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--kd-topk", "8"), "holds the teachers' top-4, so pass --kd-topk 4"),
        (("--kd-topk", str(K), "--teacher-path", "x.pt"), "either --teacher-path or --teacher-topk-cache"),
        (("--kd-topk", str(K), "--teacher-weighting", "confidence"), "does not apply to --teacher-topk-cache"),
    ],
)
def test_cache_option_errors(data_bin, cache, tmp_path, extra, message):
    proc = train_student(data_bin, tmp_path, "--task", "translation_distillation", "--teacher-topk-cache", cache,
                         *extra, expect_ok=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_targets_padded_to_buckets_are_refused_by_the_build_and_by_training(data_bin, teacher, cache, tmp_path):
    one_error(build_cache(data_bin, teacher, tmp_path / "c", "--num-batch-buckets", "2", expect_ok=False),
              "--num-batch-buckets 2 pads each target to its bucket's length, where a top-k cache holds a row per")
    one_error(train_student(data_bin, tmp_path, "--task", "translation_distillation", "--teacher-topk-cache", cache,
                            "--kd-topk", K, "--num-batch-buckets", "2", expect_ok=False),
              "drop --num-batch-buckets, or distil from the teachers online")


def test_stale_cache_is_refused(cache, tmp_path):
    write_parallel(tmp_path, seed=5)  # other sentences, same vocabulary
    other = binarize(tmp_path, tmp_path / "bin")
    proc = train_student(other, tmp_path / "s", "--task", "translation_distillation", "--teacher-topk-cache", cache,
                         "--kd-topk", K, expect_ok=False)
    assert proc.returncode != 0
    assert "rebuild the cache for this data" in proc.stderr and "Traceback" not in proc.stderr


def test_a_build_into_an_existing_cache_never_keeps_shards_made_another_way(data_bin, teacher, weak_teacher, tmp_path):
    """Re-running the builder skips only shards made from the same data, teachers and mixture."""
    out = tmp_path / "cache"
    build_cache(data_bin, teacher, out, "--splits", "valid")
    (tmp_path / "other").mkdir()
    write_parallel(tmp_path / "other", seed=5)  # other sentences, same vocabulary
    other = binarize(tmp_path / "other", tmp_path / "other" / "bin", "--srcdict", data_bin / "dict.src.txt")
    for data, teachers, extra, changed in (
        (other, teacher, (), "other data_sha256"),
        (data_bin, f"{teacher}:{weak_teacher}", ("--teacher-weights", "1,3"), "other teacher_weights, teachers"),
    ):
        proc = build_cache(data, teachers, out, "--splits", "valid", *extra, expect_ok=False)
        assert proc.returncode != 0 and changed in proc.stderr and "pass --force" in proc.stderr, proc.stderr[-800:]
        assert "Traceback" not in proc.stderr
    build_cache(other, teacher, out, "--splits", "valid", "--force")
    task, _ = load_teachers(other, teacher, "valid")
    TopKCache(str(out), "valid", task.dataset("valid"), task.target_dictionary)  # now the other data's


def damaged_copy(cache, tmp_path, damage):
    """A copy of the module's cache with one of its files damaged by ``damage(path)``."""
    copy = tmp_path / "damaged"
    shutil.copytree(cache, copy)
    damage(copy)
    return copy


def edit_manifest(cache, edit):
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "valid.shard0-of-1.lprobs.bin").write_bytes(
        bytes(len((c / "valid.shard0-of-1.lprobs.bin").read_bytes()))), "checksum differs"),
    (lambda c: (c / "valid.shard0-of-1.ids.idx").unlink(), "is missing its .bin or .idx file"),
    (lambda c: (c / "valid.shard0-of-1.ids.idx").write_bytes(bytes(64)), "ids.idx is not an index file"),
    (lambda c: (c / "manifest.json").write_text('{"format_version": 2, "k": 4, "splits": []}'),
     "not a cache manifest of the expected shape"),
    (lambda c: (c / "manifest.json").write_text("[1, 2]"), "cache format None"),
    # fields of other types: a weight that is text failed at the first checkpoint, after an epoch of training
    (lambda c: edit_manifest(c, lambda m: m.update(teacher_weights=["x"])), "not a cache manifest of the expected shape"),
    (lambda c: edit_manifest(c, lambda m: m["splits"]["valid"].update(content_sha256=["ab"])),
     "not a cache manifest of the expected shape"),
])
def test_damaged_caches_are_refused(data_bin, teacher, cache, tmp_path, damage, message):
    copy = damaged_copy(cache, tmp_path, damage)
    task, _ = load_teachers(data_bin, teacher, "valid")
    with pytest.raises(FairseqKDError, match=message):
        TopKCache(str(copy), "valid", task.dataset("valid"), task.target_dictionary)


def test_cached_rows_that_do_not_fit_the_targets_are_refused(data_bin, teacher, cache, tmp_path):
    """A manifest whose k was changed: every sentence's entries read as twice as few rows of 2k."""
    def double_k(copy):
        manifest = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, "k": 2 * manifest["k"]}))

    task, _ = load_teachers(data_bin, teacher, "valid")
    data = task.dataset("valid")
    cached = TopKCacheDataset(data, TopKCache(str(damaged_copy(cache, tmp_path, double_k)), "valid", data,
                                              task.target_dictionary), left_pad_target=False)
    length = len(data[0]["target"])
    with pytest.raises(FairseqKDError, match=rf"sentence 0 has {K * length} cached entries, not its {length} target tokens x k={2 * K}"):
        cached[0]


def test_a_build_of_another_split_keeps_the_splits_built_before(data_bin, teacher, cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    splits = set(json.loads((copy / "manifest.json").read_text())["splits"])
    build_cache(data_bin, teacher, copy, "--splits", "test")
    assert set(json.loads((copy / "manifest.json").read_text())["splits"]) == splits | {"test"}


@pytest.mark.parametrize("damaged", ["valid.shard0-of-1.lprobs.bin", "valid.shard0-of-1.json"])
def test_force_rebuilds_a_damaged_shard(data_bin, teacher, cache, tmp_path, damaged):
    """As the refusal advises: the shard's settings still match (or cannot be read), so only --force builds
    it again."""
    copy = damaged_copy(cache, tmp_path, lambda c: (c / damaged).write_bytes(bytes(16)))
    refused = build_cache(data_bin, teacher, copy, "--splits", "valid", expect_ok=False)
    one_error(refused, "valid.shard0-of-1.json is damaged (not the settings a build writes); pass --force"
              if damaged.endswith(".json") else "lprobs.bin is not the file the build wrote (checksum differs): the shard is not as its build wrote it; pass --force")
    build_cache(data_bin, teacher, copy, "--splits", "valid", "--force")
    task, _ = load_teachers(data_bin, teacher, "valid")
    TopKCache(str(copy), "valid", task.dataset("valid"), task.target_dictionary)
    assert (copy / "valid.shard0-of-1.lprobs.bin").read_bytes() == (cache / "valid.shard0-of-1.lprobs.bin").read_bytes()


def test_data_the_builder_cannot_read_is_refused(data_bin, teacher, tmp_path):
    missing = build_cache(tmp_path / "no-such-data", teacher, tmp_path / "c1", expect_ok=False)
    one_error(missing, "no-such-data: no such directory; give a fairseq data-bin")
    empty = tmp_path / "empty-split"
    shutil.copytree(data_bin, empty)
    for path in empty.glob("test.*"):
        path.write_bytes(b"")
    refused = build_cache(empty, teacher, tmp_path / "c2", "--splits", "test", expect_ok=False)
    assert "split 'test' of" in refused.stderr and "has no sentences; leave it out" in refused.stderr
    assert "Traceback" not in missing.stderr + refused.stderr
