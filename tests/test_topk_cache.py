"""Top-k teacher cache: fairseq-kd-build-cache writes what the teacher computes, shards add up to the
whole, students train from it with the same KD term as online --kd-topk, stale caches are refused."""
import json
import re

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_kd  # noqa: F401
from conftest import PLUGIN, binarize, run, write_parallel
from fairseq_kd.kd_losses import topk_lprobs
from fairseq_kd.topk_cache import TopKCache, get_parser
from test_cli import train_student

K = 4


def build_cache(data_bin, teacher, out, *extra, expect_ok=True):
    return run(
        "fairseq-kd-build-cache", data_bin, "--teacher-path", teacher, "--topk", K, "--out", out,
        "--cpu", "--max-tokens", "500", *extra, expect_ok=expect_ok,
    )


def load_task(data_bin, teacher, split):
    args = options.parse_args_and_arch(get_parser(), [str(data_bin), "--teacher-path", str(teacher), "--out", "unused"])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    task.load_dataset(split)
    return task


@pytest.fixture(scope="module")
def cache(data_bin, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    build_cache(data_bin, teacher, out)
    return out


def test_cache_holds_the_teachers_topk(data_bin, teacher, cache):
    task = load_task(data_bin, teacher, "valid")
    dataset = task.dataset("valid")
    cached = TopKCache(str(cache), "valid", dataset, task.target_dictionary)
    for index in (0, 7, len(dataset) - 1):
        sample = dataset.collater([dataset[index]])
        lprobs = task.teacher_lprobs(sample["net_input"], sample["target"], torch.device("cpu"), torch.float32)[0]
        expected_values, expected_ids = topk_lprobs(lprobs[0], K)
        values, ids = map(torch.from_numpy, cached[index])
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
    args = options.parse_args_and_arch(get_parser(), [str(data_bin), "--teacher-path", teachers,
                                                      "--teacher-weighting", "confidence", "--out", "unused"])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[3]])
    lprobs = task.teacher_lprobs(sample["net_input"], sample["target"], torch.device("cpu"), torch.float32)[0]
    values, ids = map(torch.from_numpy, TopKCache(str(tmp_path), "valid", dataset, task.target_dictionary)[3])
    expected_values, expected_ids = topk_lprobs(lprobs[0], K)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(values, expected_values, atol=2e-3, rtol=1e-3)
    assert json.loads((tmp_path / "manifest.json").read_text())["teacher_weighting"] == "confidence"
    proc = build_cache(data_bin, teachers, tmp_path / "learned", "--teacher-weighting", "learned", expect_ok=False)
    assert "a cache cannot hold them" in proc.stderr and "Traceback" not in proc.stderr


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
    assert other_k.returncode != 0 and "built with another teacher or k" in other_k.stderr
    task = load_task(data_bin, teacher, "train")
    dataset = task.dataset("train")
    whole = TopKCache(str(cache), "train", dataset, task.target_dictionary)
    parts = TopKCache(str(sharded), "train", dataset, task.target_dictionary)
    # batches differ between the two builds, so float rounding may differ slightly and swap near-tied
    # tokens; anything beyond that would be a misaligned or lost sentence
    swapped = 0
    for index in range(len(dataset)):
        (values_a, ids_a), (values_b, ids_b) = whole[index], parts[index]
        assert values_a.shape == values_b.shape, index
        assert abs(values_a - values_b).max() < 0.02, index
        swapped += int((ids_a != ids_b).any(axis=-1).sum())
    assert swapped <= 0.01 * sum(len(dataset[i]["target"]) for i in range(len(dataset)))


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


def test_stale_cache_is_refused(cache, tmp_path):
    write_parallel(tmp_path, seed=5)  # other sentences, same vocabulary
    other = binarize(tmp_path, tmp_path / "bin")
    proc = train_student(other, tmp_path / "s", "--task", "translation_distillation", "--teacher-topk-cache", cache,
                         "--kd-topk", K, expect_ok=False)
    assert proc.returncode != 0
    assert "rebuild the cache for this data" in proc.stderr and "Traceback" not in proc.stderr
