"""examples/multi30k/multilingual.sh on four-way toy data (its own file, so that pytest-xdist runs it beside
the demo's)."""
import json
import re

from test_demo import fake_multi30k, run_demo


def test_multilingual_recipe(tmp_path):
    """multilingual.sh on four-way toy data, its stages at once (PARALLEL=1): the three experiments' tables, the
    threshold comparisons, the pivot teacher reading English, the per-pair exports; a re-run skips every stage."""
    (tmp_path / "raw").mkdir()
    fake_multi30k(tmp_path / "raw", more_languages=("fr", "cs"))
    # teachers without warm-up learn enough in 15 updates for a non-empty sequence-level KD corpus (loops kept)
    # the teachers' translations by CTranslate2 (run.sh's demo tests fairseq-generate's)
    settings = dict(VOCAB_SIZE="90", TEACHER_UPDATES="15", WARMUP_UPDATES="1", STUDENT_UPDATES="4", DISTILL_KEEP_LOOPS="1",
                    LOW_RESOURCE_SIZE="100", THRESHOLD_INTERVAL="2", DISTILL_BACKEND="ctranslate2")
    refused = run_demo(tmp_path, "multilingual.sh", EXPERIMENTS="multilingual magic")
    assert refused.returncode == 2 and "EXPERIMENTS names 'magic'" in refused.stderr
    refused = run_demo(tmp_path, "multilingual.sh", CONFIG="converged")
    assert refused.returncode == 2 and "CONFIG=converged stops on valid BLEU" in refused.stderr
    refused = run_demo(tmp_path, "multilingual.sh", PARALLEL="yes")
    assert refused.returncode == 2 and "PARALLEL must be 0 or 1, got 'yes'" in refused.stderr
    # before the teachers train, not at the first cache after them
    refused = run_demo(tmp_path, "multilingual.sh", KD_TOPK="0")
    assert refused.returncode == 2 and "KD_TOPK must be >= 1: the multilingual and low-resource students" in refused.stderr
    # one experiment trains only the teachers it needs, and the others reuse what it trained
    pivot = run_demo(tmp_path, "multilingual.sh", EXPERIMENTS="pivot", **settings)
    assert pivot.returncode == 0, pivot.stdout[-3000:] + pivot.stderr[-3000:]
    work = tmp_path / "work"
    assert [path.name for path in work.glob(".stage-teacher-*")] == [".stage-teacher-en-de"]
    # every stage as soon as what it needs is there, several at once; the re-run below is sequential
    proc = run_demo(tmp_path, "multilingual.sh", PARALLEL="1", **settings)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[pivot-kd] finished earlier, skipping" in proc.stdout and "[teacher-en-fr] running" in proc.stdout
    assert "    [multilingual-no-kd] " in proc.stdout  # a spawned stage's progress says whose it is
    tables = {name: json.loads((work / "results" / f"{name}.json").read_text())
              for name in ("multilingual", "low-resource", "pivot")}
    assert [m["name"] for m in tables["multilingual"]["models"]] == [
        "teacher", "bilingual-word-kd", "multilingual-no-kd", "multilingual-word-kd", "multilingual-seq-kd",
        "multilingual-threshold", "multilingual-word-kd-ct2-int8"]
    rows = {m["name"]: m for m in tables["multilingual"]["models"]}
    assert set(rows["multilingual-word-kd"]["pairs"]) == {"en-de", "en-fr", "en-cs"}
    # three bilingual students against one multilingual student of the same architecture
    assert rows["bilingual-word-kd"]["params"] == 3 * rows["multilingual-word-kd"]["params"]
    assert [(m["name"], set(m["pairs"])) for m in tables["low-resource"]["models"]] == [
        *((name, {"en-cs"}) for name in ("low-teacher", "low-bilingual-word-kd", "low-bilingual-seq-word-kd")),
        *((name, {"en-de", "en-fr", "en-cs"})
          for name in ("low-multilingual-no-kd", "low-multilingual-word-kd", "low-multilingual-seq-word-kd"))]
    # the cut en-cs teacher translated the English of every training sentence (300), not only of its 100 pairs;
    # its top-k over those translations distils en-cs, the other pairs' caches their original data
    assert len((work / "low-distill" / "en-cs" / "hypotheses.txt").read_text().splitlines()) == 300
    stage = (work / ".stage-low-multilingual-seq-word-kd").read_text()
    assert all(f"{pair}:{work}/{cache}" in stage
               for pair, cache in (("en-de", "cache-en-de"), ("en-fr", "cache-en-fr"), ("en-cs", "low-distill-cache")))
    assert [m["name"] for m in tables["pivot"]["models"]] == ["pivot-no-kd", "pivot-kd"]
    assert "kd-threshold at update 2: en-fr" in (work / "multilingual-threshold.log").read_text()
    # the table says, per pair, how the threshold student compared with its teacher and when KD switched
    threshold = rows["multilingual-threshold"]
    assert {(c["update"], c["pair"]) for c in threshold["threshold_checks"]} == {
        (update, pair) for update in (2, 4, 6, 8, 10) for pair in ("en-de", "en-fr", "en-cs")}
    assert set(threshold["kd_switches"]) == {"en-de", "en-fr", "en-cs"}
    assert "multilingual-threshold, the threshold strategy: student − teacher bleu" in (
        work / "results" / "multilingual.md").read_text()
    # it distils from the word-KD student's caches; its teachers only score
    stage = (work / ".stage-multilingual-threshold").read_text()
    assert "--teacher-topk-caches en-de:" in stage and "--teacher-paths en-de:" in stage
    # each experiment's comparisons, over the pairs both models translate
    comparisons = {(c["model"], c["against"]): c for table in tables.values() for c in table["comparisons"]}
    assert set(comparisons) == {
        ("multilingual-word-kd", "bilingual-word-kd"), ("multilingual-word-kd", "multilingual-no-kd"),
        ("multilingual-seq-kd", "multilingual-no-kd"), ("multilingual-threshold", "multilingual-word-kd"),
        ("low-multilingual-word-kd", "low-bilingual-word-kd"), ("low-multilingual-word-kd", "low-multilingual-no-kd"),
        ("low-multilingual-seq-word-kd", "low-bilingual-word-kd"),
        ("low-multilingual-seq-word-kd", "low-bilingual-seq-word-kd"),
        ("low-multilingual-seq-word-kd", "low-multilingual-word-kd"),
        ("pivot-kd", "pivot-no-kd")}
    low = comparisons["low-multilingual-word-kd", "low-bilingual-word-kd"]
    low_rows = {m["name"]: m for m in tables["low-resource"]["models"]}
    assert list(low["bleu"]) == ["en-cs"] and low["average_bleu"] == round(
        low_rows["low-multilingual-word-kd"]["pairs"]["en-cs"]["bleu"] - low_rows["low-bilingual-word-kd"]["pairs"]["en-cs"]["bleu"], 2)
    word_kd = comparisons["multilingual-word-kd", "multilingual-no-kd"]
    for key, score in (("average_bleu", "bleu"), ("average_chrf", "chrf")):
        differences = [rows["multilingual-word-kd"]["pairs"][pair][score] - rows["multilingual-no-kd"]["pairs"][pair][score]
                       for pair in ("en-de", "en-fr", "en-cs")]
        assert abs(word_kd[key] - sum(differences) / 3) <= 0.005 + 1e-9
    speed = word_kd["speed_ratio"]
    assert speed == round(rows["multilingual-word-kd"]["train_wps"] / rows["multilingual-no-kd"]["train_wps"], 3)
    assert "--teacher-source-lang en" in (work / ".stage-pivot-kd").read_text()
    # STUDENT_UPDATES per pair: three pairs, three times the updates
    assert "--max-update 12 " in (work / ".stage-multilingual-word-kd").read_text()
    assert "--max-update 4 " in (work / ".stage-bilingual-word-kd-en-de").read_text()
    assert "--max-update 4 " in (work / ".stage-pivot-kd").read_text()
    # ...and each pair drawn as often, the cut en-cs too
    log = (work / "low-multilingual-no-kd.log").read_text()
    raw, resampled = ({pair: int(size) for pair, size in re.findall(r"'main:(\w+-\w+)': (?:np\.int64\()?(\d+)", line)}
                      for line in re.findall(r"\[train\] (?:Raw|Resampled) sizes: .*", log)[:2])
    assert raw == {"en-de": 300, "en-fr": 300, "en-cs": 100} and resampled == {"en-de": 300, "en-fr": 300, "en-cs": 300}
    assert json.loads((work / "multilingual-word-kd-ct2-int8-en-cs" / "fairseq_kd_export.json").read_text())[
        "language_tokens"] == [["__en__"], ["__cs__"]]
    # each pair's corpus from its teacher's export, which writes the pair's language tokens
    distill = work / "distill" / "en-fr"
    assert "fairseq-kd-translate" in (work / ".stage-distill-en-fr").read_text()
    assert json.loads((distill / "teacher-ct2" / "fairseq_kd_export.json").read_text())["language_tokens"] == [["__en__"], ["__fr__"]]
    hypotheses = (distill / "hypotheses.txt").read_text().splitlines()
    assert len(hypotheses) == 300 and not any("__fr__" in line for line in hypotheses)
    assert set((distill / "train.fr").read_text().splitlines()) <= set(hypotheses)
    again = run_demo(tmp_path, "multilingual.sh", **settings)
    assert again.returncode == 0 and "running" not in again.stdout
