"""The demo recipe (README command 1) on a tiny Multi30k-shaped corpus: every stage, the results table,
skipping finished stages on a re-run, and a failing stage naming its log."""
import gzip
import json
import os
import random
import re
import shutil
import statistics
import subprocess

import pytest

from conftest import BIN, REPO
from fairseq_kd.tasks.distillation import cpu_has_bf16_kernels

SPLITS = {"train": 300, "val": 30, "test_2016_flickr": 30}


def fake_multi30k(directory, more_languages=()):
    """Gzipped en/de (and ``more_languages``) files named like Multi30k's data/task1/raw, four-way parallel
    like it, with a word-for-word toy translation."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lexicon = [("".join(rng.choices(letters, k=4)), "".join(rng.choices(letters, k=5))) for _ in range(30)]
    more = random.Random(1)
    lexicon = [(*words, *("".join(more.choices(letters, k=6)) for _ in more_languages)) for words in lexicon]
    for split, n in SPLITS.items():
        sentences = [[rng.choice(lexicon) for _ in range(rng.randint(3, 8))] for _ in range(n)]
        for side, lang in enumerate(("en", "de", *more_languages)):
            with gzip.open(directory / f"{split}.{lang}.gz", "wt") as f:
                f.writelines(" ".join(words[side] for words in s).capitalize() + " .\n" for s in sentences)


def run_demo(tmp_path, script="run.sh", **env):
    return subprocess.run(
        ["bash", REPO / "examples" / "multi30k" / script],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
            "MULTI30K_DIR": str(tmp_path / "raw"),
            "WORK": str(tmp_path / "work"),
            "VOCAB_SIZE": "60",
            "TEACHER_UPDATES": "4",
            # a teacher of a few updates only loops: keep its outputs, so that the later stages have a corpus
            "DISTILL_KEEP_LOOPS": "1",
            "STUDENT_UPDATES": "2",
            **env,
        },
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo")
    (tmp_path / "raw").mkdir()
    fake_multi30k(tmp_path / "raw")
    failed = run_demo(tmp_path, KD_TOPK="100")  # more than the 60-piece vocabulary: the cache stage fails
    finished = run_demo(tmp_path)
    return tmp_path, failed, finished


def test_a_failing_stage_stops_the_demo_and_names_its_log(demo):
    tmp_path, failed, _ = demo
    assert failed.returncode == 1
    assert f"error: stage 'cache' failed; see {tmp_path}/work/cache.log" in failed.stderr
    assert "[teacher] running" in failed.stdout and "[student-no-kd]" not in failed.stdout


def test_a_stage_stops_at_its_first_failing_command(tmp_path):
    """A stage of several commands (decode, select, binarize) fails with the first that fails: bash ignores
    errexit where the stage runs, and the next command would have used its missing or stale output."""
    (tmp_path / "work").mkdir()
    script = (f"set -euo pipefail; . {REPO}/examples/multi30k/common.sh; "
              f"two_commands() {{ cmd false; cmd touch {tmp_path}/second; }}; stage two {tmp_path}/two.log two_commands")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WORK": str(tmp_path / "work")})
    assert proc.returncode == 1 and f"error: stage 'two' failed; see {tmp_path}/two.log" in proc.stderr
    assert not (tmp_path / "second").exists() and not (tmp_path / "work" / ".stage-two").exists()


def teacher_command(tmp_path, **env):
    """The teacher's fairseq-train command line as the recipes' stage record lists it, for these settings."""
    return listed_command(tmp_path, f"train_teacher {tmp_path}/teacher", **env)


def listed_command(tmp_path, stage_call, setup="true", **env):
    """The first command line of a stage (a common.sh function and its arguments, after the shell commands
    of ``setup``) as its record lists it."""
    script = (f". {REPO}/examples/multi30k/common.sh && {setup} && list_stage {tmp_path}/listing {stage_call}"
              f" && cat {tmp_path}/listing")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WORK": str(tmp_path / "work"), **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp_path / "listing").unlink()
    return proc.stdout.splitlines()[0]


def test_converged_teacher_keeps_its_patience_count_across_resumes(tmp_path):
    # stock translation restarts the count on a resume; translation_distillation saves it (test_scale.py)
    converged = teacher_command(tmp_path, CONFIG="converged")
    assert "--patience 10 " in converged and "--best-checkpoint-metric bleu " in converged
    assert "--task translation_distillation --save-dir" in converged and "--cpu-bf16" not in converged
    assert "--task" not in teacher_command(tmp_path, CONFIG="full")


def test_renormalised_topk_student_reaches_the_word_kd_command_only_when_set(tmp_path):
    word_kd = {"stage_call": 'train_student student-word-kd "${STUDENT_DATA[@]}"', "setup": "student_data student-word-kd"}
    renormalised = listed_command(tmp_path, **word_kd, KD_TOPK_STUDENT="renormalised")
    assert "--kd-topk 8 --kd-topk-student renormalised " in renormalised
    # the default adds nothing, so that the records of runs made before the option existed stay current
    assert "--kd-topk-student" not in listed_command(tmp_path, **word_kd)


def test_bad_settings_are_refused_before_any_stage(tmp_path):
    proc = run_demo(tmp_path, STUDENT_ARCH="no_such_arch", KD_TEMPERATURE="0", LR="fast", DEVICE_FLAGS="", CPU_BF16="1")
    assert proc.returncode == 2 and "[prepare]" not in proc.stdout and "Traceback" not in proc.stderr
    assert "STUDENT_ARCH 'no_such_arch' is not a fairseq architecture" in proc.stderr
    assert "KD_TEMPERATURE must be a number > 0, got '0'" in proc.stderr
    assert "LR must be a number > 0, got 'fast'" in proc.stderr
    assert "CPU_BF16=1 autocasts CPU training; with DEVICE_FLAGS='' set CPU_BF16=0" in proc.stderr
    proc = run_demo(tmp_path, CPU_BF16="yes", STUDENT_DROPOUT="1", KD_TOPK_STUDENT="tail", KD_ALPHA='0"5\\')
    assert proc.returncode == 2 and "CPU_BF16 must be 0, 1 or auto, got 'yes'" in proc.stderr
    assert "KD_ALPHA must be a number in [0, 1], got '0\"5\\'" in proc.stderr and "Traceback" not in proc.stderr
    assert "STUDENT_DROPOUT must be a number in [0, 1), got '1'" in proc.stderr
    assert "KD_TOPK_STUDENT must be full or renormalised, got 'tail'" in proc.stderr


def test_rerun_skips_finished_stages_and_prints_the_table(demo):
    tmp_path, _, finished = demo
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for stage in ("prepare", "teacher", "distill"):
        assert f"[{stage}] finished earlier, skipping" in finished.stdout
    for stage in ("cache", "student-no-kd", "student-word-kd"):
        assert f"[{stage}] running" in finished.stdout
    # the stage run again appends to its log: the failed attempt, then the finished one
    cache_log = (tmp_path / "work" / "cache.log").read_text()
    assert cache_log.index("fairseq_kd: error: --topk 100 exceeds") < cache_log.index("cache complete:")
    table = (tmp_path / "work" / "results.md").read_text()
    names = ["teacher", "student-no-kd", "student-word-kd", "student-seq-kd", "student-seq-word-kd"]
    rows = [line for line in table.split("\n\n")[0].splitlines() if re.match(r"\| (teacher|student)", line)]
    # the best student by valid BLEU, exported to CTranslate2 int8, closes the table
    records = {name: json.loads((tmp_path / "work" / "results" / f"{name}.json").read_text())["models"][0]
               for name in names}
    best = max(names[1:], key=lambda name: records[name]["valid"]["bleu"])
    assert [row.split("|")[1].strip() for row in rows] == [*names, f"{best}-ct2-int8"]
    manifest = json.loads((tmp_path / "work" / f"{best}-ct2-int8" / "fairseq_kd_export.json").read_text())
    assert manifest["quantization"] == "int8" and manifest["source_checkpoint"].endswith(f"{best}/checkpoint_last.pt")
    exported = json.loads((tmp_path / "work" / "results" / f"{best}-ct2-int8.json").read_text())["models"][0]
    assert exported["params"] == records[best]["params"] and exported["test"]["sentences"] == SPLITS["test_2016_flickr"]
    assert f"| {best}-ct2-int8 | {best} |" in table  # the export beside the checkpoint it came from
    assert "nrefs:1|case:mixed" in table and json.loads((tmp_path / "work" / "results.json").read_text())["models"]
    assert (tmp_path / "work" / "results-curves.png").read_bytes()[:4] == b"\x89PNG"
    # the quick configuration trains under bfloat16 autocast where the CPU has its kernels, the teacher
    # through the distillation task
    bf16 = cpu_has_bf16_kernels()
    assert ("--task translation_distillation --cpu-bf16" in (tmp_path / "work" / ".stage-teacher").read_text()) == bf16
    assert ("--cpu-bf16" in (tmp_path / "work" / ".stage-student-seq-word-kd").read_text()) == bf16
    # the distilled corpus is in the training source's order: line i of its source is line i of the original
    distilled_src = (tmp_path / "work" / "distill" / "train.en").read_text().splitlines()
    original_src = (tmp_path / "work" / "subword" / "train.en").read_text().splitlines()
    assert distilled_src and set(distilled_src) <= set(original_src)
    positions = [original_src.index(line) for line in distilled_src]
    assert positions == sorted(positions)


def run_after_demo(demo, script, **env):
    """Run another recipe on the finished demo's work directory, which it must finish; returns that directory."""
    demo_path, _, finished = demo
    assert finished.returncode == 0
    proc = run_demo(demo_path, script, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return demo_path / "work"


def test_sweep_over_temperature_and_alpha(demo, tmp_path):
    refused = run_demo(tmp_path, "sweep.sh")  # an empty work directory: no teacher yet
    assert refused.returncode == 1 and "no finished 'teacher' stage" in refused.stderr
    work = run_after_demo(demo, "sweep.sh", TEMPERATURES="1 2", ALPHAS="0.5", SCHEDULE="cosine")
    log = (work / "sweep-cosine-T2-a0.5.log").read_text()
    # the epoch's mean T over updates 1 and 2 of the cosine from 2 to 1 (2 and 1.5)
    temperature = float(re.search(r"\| train \|.*kd_temperature ([\d.]+)", log).group(1))
    assert 1.5 < temperature < 2, temperature
    table = (work / "sweep-cosine.md").read_text().splitlines()
    assert table[0] == "| T \\ alpha | 0.5 |"
    assert [row.split("|")[1].strip() for row in table[2:4]] == ["1", "2"]
    assert (work / "sweep-cosine.png").stat().st_size > 0


def progression(work):
    """A chain that starts from a model trained elsewhere, then two links trained by progressive.sh."""
    return f"{work}/student-seq-kd/checkpoint_last.pt transformer_student_small transformer_student_tiny_dec2"


def test_progressive_distillation_chains_the_models(demo):
    work = demo[0] / "work"
    run_after_demo(demo, "progressive.sh", PROGRESSION=progression(work))
    # each stage's cache holds the previous model's distribution
    teachers = [json.loads((work / f"cache-progressive-{arch}" / "manifest.json").read_text())["teachers"][0]["path"]
                for arch in ("transformer_student_small", "transformer_student_tiny_dec2")]
    assert teachers == [str(work / "student-seq-kd" / "checkpoint_last.pt"),
                        str(work / "progressive-transformer_student_small" / "checkpoint_last.pt")]
    rows = [line.split("|")[1].strip() for line in (work / "results" / "progressive.md").read_text().splitlines()[2:6]]
    assert rows == ["teacher", "student-word-kd", "progressive-transformer_student_small",
                    "progressive-transformer_student_tiny_dec2"]
    # another chain would reuse these stages' results
    refused = run_demo(demo[0], "progressive.sh", PROGRESSION="transformer_student_tiny_dec2")
    assert refused.returncode == 1 and f'holds the chain PROGRESSION="{progression(work)}"' in refused.stderr


def test_intermediate_layer_comparison(demo):
    work = run_after_demo(demo, "layers.sh", VALIDATE_EVERY="1")
    for name, term in (("hidden", "kd_hidden_loss"), ("attention", "kd_attn_loss"), ("relation", "kd_relation_loss")):
        assert re.search(rf"\| train \|.*\| {term} [\d.]+", (work / f"layers-{name}.log").read_text()), name
    assert "kd_hidden_loss" not in (work / "layers-logit.log").read_text()
    assert "student initialised from the teacher" in (work / "layers-wide-init.log").read_text()
    assert "student initialised from the teacher" not in (work / "layers-wide-random.log").read_text()
    table = (work / "layers.md").read_text().splitlines()
    names = ["logit", "hidden", "attention", "relation", "wide-random", "wide-init"]
    assert [row.split("|")[1].strip() for row in table[2:9]] == ["teacher", *(f"layers-{n}" for n in names)]
    curve = table[table.index("| valid NLL (bits/token) at update | 1 | 2 |"):]
    assert [row.split("|")[1].strip() for row in curve[2:8]] == [f"layers-{n}" for n in names]


def test_strategies_against_plain_kd(demo):
    refused = run_demo(demo[0], "strategies.sh", STRATEGIES="strategy-mi strategy-magic")
    assert refused.returncode == 1 and "STRATEGIES names 'strategy-magic'; choose from: strategy-temperature-cosine" in refused.stderr
    refused = run_demo(demo[0], "strategies.sh", STRATEGIES="strategy-dml", DML_ARCH="transformer_student_tiny")
    assert refused.returncode == 1 and "DML_ARCH 'transformer_student_tiny' is not a transformer_mutual architecture" in refused.stderr
    # the others are criterion flags, each run end to end by test_cli.py
    work = run_after_demo(demo, "strategies.sh", STRATEGIES="strategy-two-teachers-confidence strategy-dml")
    teacher_2 = str(work / "teacher-2" / "checkpoint_last.pt")
    manifest = json.loads((work / "cache-two-teachers-confidence" / "manifest.json").read_text())
    assert [t["path"] for t in manifest["teachers"]] == [str(work / "teacher" / "checkpoint_last.pt"), teacher_2]
    assert manifest["teacher_weighting"] == "confidence"
    assert "'seed': 2" in (work / "teacher-2.log").read_text()
    assert "--seed 1 " not in (work / ".stage-teacher-2").read_text()  # the next seed, given once
    assert (work / "strategies-curves.png").read_bytes()[:4] == b"\x89PNG"
    table = (work / "strategies.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:8]] == [
        "teacher", "student-no-kd", "student-word-kd", "strategy-two-teachers-confidence",
        "strategy-dml-a", "strategy-dml-b"]
    curve = table[table.index("| valid NLL (bits/token) at update | 2 |"):]
    assert [row.split("|")[1].strip() for row in curve[2:6]] == [
        "student-no-kd", "student-word-kd", "strategy-two-teachers-confidence", "strategy-dml"]
    peers = [json.loads((work / "results" / f"strategy-dml-{p}.json").read_text())["models"][0] for p in "ab"]
    student = json.loads((work / "results" / "student-no-kd.json").read_text())["models"][0]
    assert peers[0]["params"] == peers[1]["params"] == student["params"]


def test_levers_against_plain_kd(demo):
    refused = run_demo(demo[0], "levers.sh", LEVERS="lever-dec2 lever-magic")
    assert refused.returncode == 1 and "LEVERS names 'lever-magic'; choose from: lever-narrow-init" in refused.stderr
    # the students the levers are measured against, trained under another rule than now
    refused = run_demo(demo[0], "levers.sh", LEVERS="lever-dec2", LR="1e-3")
    assert refused.returncode == 1 and "student-no-kd in " in refused.stderr
    assert "was trained with other settings or inputs" in refused.stderr
    # the quick demo's students already have the second decoder layer: lever-dec2 would be student-word-kd again
    refused = run_demo(demo[0], "levers.sh", LEVERS="lever-narrow-init lever-dec2")
    assert refused.returncode == 1 and "these are STUDENT_ARCH=transformer_student_tiny_dec2: leave lever-dec2 out" in refused.stderr
    work = run_after_demo(demo, "levers.sh", LEVERS="lever-narrow-init lever-seq-bestbleu", DISTILL_BEAM="2", NBEST="2")
    assert "student initialised from the teacher: " in (work / "lever-narrow-init.log").read_text()
    assert "(narrowed: projected onto the student widths)" in (work / "lever-narrow-init.log").read_text()
    # two hypotheses per sentence decoded, one kept
    assert "H-0\t" in (work / "distill-nbest" / "generate-train.txt").read_text()
    assert len((work / "distill-nbest" / "generate-train.txt").read_text().split("\nH-")) > 2 * SPLITS["train"]
    assert len((work / "distill-bestbleu" / "train.de").read_text().splitlines()) <= SPLITS["train"]
    table = (work / "levers.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:8]] == [
        "teacher", "student-no-kd", "student-word-kd", "student-seq-kd", "lever-narrow-init", "lever-seq-bestbleu"]
    assert (work / "levers-curves.png").stat().st_size > 0


def test_seeds_measure_the_spread_between_trainings(demo):
    refused = run_demo(demo[0], "seeds.sh", SEEDS="2 1")
    assert refused.returncode == 1 and "SEEDS must be integers >= 1 other than run.sh's SEED (1), got '1'" in refused.stderr
    refused = run_demo(demo[0], "seeds.sh", SEED_STUDENTS="student-magic")
    assert refused.returncode == 1 and "SEED_STUDENTS names 'student-magic'; choose from: student-no-kd" in refused.stderr
    # seed 1 trained with other settings than now: the spread would compare runs made under two rules
    refused = run_demo(demo[0], "seeds.sh", SEED_STUDENTS="student-seq-kd", LR="1e-3")
    assert refused.returncode == 1 and "student-seq-kd in " in refused.stderr
    assert "was trained with other settings or inputs: it ran with --lr 2e-3, now --lr 1e-3" in refused.stderr
    work = run_after_demo(demo, "seeds.sh", SEEDS="2", SEED_STUDENTS="student-seq-kd")
    first, again = ((work / f".stage-student-seq-kd{suffix}").read_text().splitlines()[0] for suffix in ("", "-seed2"))
    assert first.replace("--seed 1", "--seed 2").replace("student-seq-kd ", "student-seq-kd-seed2 ") == again
    table = (work / "seeds.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:5]] == ["teacher", "student-seq-kd", "student-seq-kd-seed2"]
    bleu = [json.loads((work / "results" / f"{name}.json").read_text())["models"][0]["test"]["bleu"]
            for name in ("student-seq-kd", "student-seq-kd-seed2")]
    spread = table[table.index("| test BLEU by seed | 1 | 2 | mean | spread (max - min) |") + 2]
    assert spread == f"| student-seq-kd | {bleu[0]:.2f} | {bleu[1]:.2f} | {statistics.mean(bleu):.2f} | {max(bleu) - min(bleu):.2f} |"


def test_nat_students_beside_the_autoregressive_one(demo):
    work = demo[0] / "work"
    dictionary = work / "distill" / "data-bin" / "dict.de.txt"
    original, before = dictionary.read_text(), dictionary.stat()
    dictionary.write_text(original + "extra 1\n")
    try:
        refused = run_demo(demo[0], "nat.sh")
    finally:  # its time too: the stages that read the corpus record its files' times
        dictionary.write_text(original)
        os.utime(dictionary, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert refused.returncode == 1 and "the distilled corpus was binarized with another dictionary" in refused.stderr
    refused = run_demo(demo[0], "nat.sh", NAT_ARCHS="cmlm_transformer_student_tiny cmlm_transformer")
    assert refused.returncode == 1 and "whose stages would share the names nat-cmlm-*" in refused.stderr
    run_after_demo(demo, "nat.sh", NAT_ARCHS="cmlm_transformer_student_tiny", NAT_UPDATES="2")
    assert "--noise random_mask" in (work / ".stage-nat-cmlm-distilled").read_text()
    report = json.loads((work / "results" / "nat.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names[1:] == [names[0] + "-ct2-int8", "nat-cmlm-original", "nat-cmlm-distilled"]
    assert [s["batch_size"] for s in report["models"][2]["speed"]] == [1, 32]
    assert all("refinement_steps" in m for m in report["models"][2:])
    assert report["settings"]["iter_decode_max_iter"] == 10 and report["settings"]["threads"] == 1


def test_stages_refuse_changed_settings_and_inputs(demo):
    """A finished stage is not reused for other settings or for inputs rebuilt since: the re-run stops at it,
    naming what changed."""
    tmp_path, _, finished = demo
    assert finished.returncode == 0
    # where a stage ran is not one of its settings: other device flags reuse every stage
    moved = run_demo(tmp_path, DEVICE_FLAGS="--cpu --num-workers 0")
    assert moved.returncode == 0 and "running, log" not in moved.stdout, moved.stdout + moved.stderr
    changed = run_demo(tmp_path, KD_ALPHA="0.3")
    assert changed.returncode == 1
    assert "stage 'student-word-kd'" in changed.stderr and "it ran with --kd-alpha 0.5, now --kd-alpha 0.3" in changed.stderr
    teacher = tmp_path / "work" / "teacher" / "checkpoint_last.pt"
    before = teacher.stat()
    os.utime(teacher)  # as if the teacher had been trained again
    try:
        rebuilt = run_demo(tmp_path)
    finally:
        os.utime(teacher, ns=(before.st_atime_ns, before.st_mtime_ns))
    # the first stage whose files changed since it finished: the teacher's own
    assert rebuilt.returncode == 1 and "stage 'teacher'" in rebuilt.stderr
    assert f"the files in {tmp_path / 'work' / 'teacher'} are not those it read" in rebuilt.stderr
    # a directory another stage wrote, rebuilt since (its record deleted and the stage run again, as the
    # refusal advises): the stage that wrote it, and every stage that read it, are stale
    work = tmp_path / "work"
    corpus = work / "distill" / "data-bin" / "train.en-de.de.bin"
    before = corpus.stat()
    os.utime(corpus)
    try:
        rebuilt = run_demo(tmp_path)
        reader = subprocess.run(
            ["bash", "-c", f". {REPO}/examples/multi30k/common.sh && stale_record {work}/.stage-cache-distilled build_cache"
                           f" {work}/distill/data-bin {work}/cache-distilled"],
            capture_output=True, text=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WORK": str(work)})
    finally:
        os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert rebuilt.returncode == 1 and "stage 'distill'" in rebuilt.stderr
    assert f"the files in {work}/distill are not those it read (rebuilt since)" in rebuilt.stderr
    assert reader.stdout == f"the files in {work}/distill/data-bin are not those it read (rebuilt since)\n", reader.stderr
    assert "running, log" not in run_demo(tmp_path).stdout  # restored: every stage current again
    # a training stopped under other settings (its record not written yet, its checkpoint there) goes on only
    # under those: resumed under these, the run would be two runs under one record
    record = work / ".stage-student-word-kd"
    finished = record.read_text()
    started = "\n".join(line for line in finished.splitlines() if not line.startswith(("file ", "directory ")))
    record.unlink()
    (work / ".stage-student-word-kd.started").write_text(started.replace("--kd-alpha 0.5 ", "--kd-alpha 0.3 ") + "\n")
    try:
        stopped = run_demo(tmp_path)
    finally:
        record.write_text(finished)
        (work / ".stage-student-word-kd.started").unlink()
    assert stopped.returncode == 1 and "stage 'student-word-kd' in" in stopped.stderr
    assert "stopped earlier under other settings: it ran with --kd-alpha 0.3, now --kd-alpha 0.5; its training would go on from" in stopped.stderr


def test_sequence_level_corpus_translated_by_ctranslate2(demo, tmp_path):
    """DISTILL_BACKEND=ctranslate2: the teacher, exported in float32, translates the subword training source
    into the corpus; it is a setting of the distill stage, and it keeps one hypothesis per sentence."""
    refused = run_demo(tmp_path, DISTILL_BACKEND="ctranslate2", DISTILL_BEAM="2", DISTILL_NBEST="2")
    assert refused.returncode == 2 and "DISTILL_BACKEND=ctranslate2 keeps the teacher's best translation alone" in refused.stderr
    demo_path, _, finished = demo
    assert finished.returncode == 0
    changed = run_demo(demo_path, DISTILL_BACKEND="ctranslate2")
    assert changed.returncode == 1 and "stage 'distill'" in changed.stderr  # the demo's corpus is not reused
    # the demo's data and teacher in a directory of this test (the stage records name their paths), the
    # corpus built again; the run stops at the cache stage, which KD_TOPK=100 fails
    for name in ("raw", "work"):
        shutil.copytree(demo_path / name, tmp_path / name, symlinks=True)  # file times kept: the records hold them
    work = tmp_path / "work"
    for record in work.glob(".stage-*"):
        record.write_text(record.read_text().replace(str(demo_path), str(tmp_path)))
    for path in [work / ".stage-distill", *work.glob(".stage-cache*")]:
        path.unlink()
    shutil.rmtree(work / "distill")
    proc = run_demo(tmp_path, DISTILL_BACKEND="ctranslate2", KD_TOPK="100")
    assert proc.returncode == 1 and "stage 'cache' failed" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[teacher] finished earlier, skipping" in proc.stdout and "[distill] running" in proc.stdout
    record = (work / ".stage-distill").read_text()
    assert "fairseq-kd-translate" in record and "--subwords" in record and "fairseq-generate" not in record
    assert "--device" not in record  # where it ran is no setting of the stage
    hypotheses = (work / "distill" / "hypotheses.txt").read_text().splitlines()
    assert len(hypotheses) == SPLITS["train"] and all(hypotheses)
    corpus = (work / "distill" / "train.de").read_text().splitlines()
    assert len(corpus) >= SPLITS["train"] // 2 and set(corpus) <= set(hypotheses)  # loops kept (DISTILL_KEEP_LOOPS=1)


def test_prepare_with_bpe_and_a_training_prefix(tmp_path):
    (tmp_path / "raw").mkdir()
    fake_multi30k(tmp_path / "raw")

    def prepare(**env):
        return subprocess.run(
            ["bash", REPO / "scripts" / "prepare-multi30k.sh", tmp_path / "out", "en", "de"], capture_output=True,
            text=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MULTI30K_DIR": str(tmp_path / "raw"),
                            "SUBWORDS": "bpe", "VOCAB_SIZE": "60", **env})

    refused = prepare(TRAIN_SENTENCES="10k")  # not read as 0, all the data
    assert refused.returncode == 2 and "TRAIN_SENTENCES must be an integer >= 0 (0: all), got '10k'" in refused.stderr
    proc = prepare(TRAIN_SENTENCES="100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "subword" / "bpe.codes").exists()
    assert len((tmp_path / "out" / "raw" / "train.de").read_text().splitlines()) == 100
    assert len((tmp_path / "out" / "raw" / "test.de").read_text().splitlines()) == SPLITS["test_2016_flickr"]
    assert "data-bin is complete, skipping" in prepare(TRAIN_SENTENCES="100").stdout  # the same settings: reused
    # other settings are not served the data prepared with these
    refused = prepare(TRAIN_SENTENCES="200")
    assert refused.returncode == 1 and "was prepared with SRC=en TGT=de SUBWORDS=bpe VOCAB_SIZE=60 TRAIN_SENTENCES=100, now" in refused.stderr


def test_without_multi30k_dir_or_a_shared_copy_prepare_downloads(tmp_path):
    """A user's machine: no MULTI30K_DIR and no ../shared beside the repository (the recipes in a copy of it)."""
    repo = tmp_path / "repo"
    for part in ("examples", "scripts"):
        shutil.copytree(REPO / part, repo / part)
    env = {key: value for key, value in os.environ.items() if key != "MULTI30K_DIR"}
    script = f". {repo}/examples/multi30k/common.sh && list_stage {tmp_path}/listing prepare_data && cat {tmp_path}/listing"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**env, "PATH": f"{BIN}:{os.environ['PATH']}", "WORK": str(tmp_path / "work")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MULTI30K_DIR= bash" in proc.stdout  # empty: prepare-multi30k.sh downloads the official files


def test_prepare_multilingual_with_a_low_resource_pair(tmp_path):
    (tmp_path / "raw").mkdir()
    fake_multi30k(tmp_path / "raw", more_languages=("fr", "cs"))

    def prepare(**env):  # OUT relative to the working directory, as a user may type it
        return subprocess.run(
            ["bash", REPO / "scripts" / "prepare-multi30k-multilingual.sh", "out"], cwd=tmp_path, capture_output=True,
            text=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MULTI30K_DIR": str(tmp_path / "raw"),
                            "VOCAB_SIZE": "90", **env})

    proc = prepare(LOW_RESOURCE="en-cs:100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = tmp_path / "out" / "data-bin"
    from fairseq.data import Dictionary, data_utils
    dictionary = Dictionary.load(str(data / "dict.en.txt"))
    assert all((data / f"dict.{lang}.txt").read_text() == (data / "dict.en.txt").read_text() for lang in ("de", "fr", "cs"))
    for directory, cut in ((data, SPLITS["train"]), (tmp_path / "out" / "data-bin-low-resource", 100)):
        sizes = {pair: len(data_utils.load_indexed_dataset(str(directory / f"train.{pair}.{pair[-2:]}"), dictionary))
                 for pair in ("en-de", "en-fr", "en-cs")}
        assert sizes == {"en-de": SPLITS["train"], "en-fr": SPLITS["train"], "en-cs": cut}
    assert (data / "langs.txt").read_text() == "cs\nde\nen\nfr\n"
    # line i is the same sentence in every pair (the pivot relies on it)
    assert (tmp_path / "out" / "raw" / "train.cs").read_text().count("\n") == SPLITS["train"]
    refused = prepare(LOW_RESOURCE="en-cs:200")
    assert refused.returncode == 1 and "was prepared with PAIRS=en-de en-fr en-cs LOW_RESOURCE=en-cs:100" in refused.stderr
    refused = prepare(PAIRS="en-de en-xx")
    assert refused.returncode == 2 and "PAIRS names 'en-xx'" in refused.stderr

