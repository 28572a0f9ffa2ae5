"""fairseq-kd-eval on a tiny teacher and student: every field present and sane, outputs written; bad
inputs give one clear error."""
import json
import multiprocessing
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary

from conftest import binarize, one_error, run, write_parallel
from test_cli import train_student
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.evaluate import load_references, main as evaluate_main, run_in_child
from fairseq_kd.inference import check_post_process
from test_export import export


def evaluate(data_bin, *checkpoints, out, expect_ok=True, extra=()):
    return run(
        "fairseq-kd-eval", data_bin, "--checkpoints", *checkpoints, "--batch-sizes", "4,1", "--speed-sentences", "4",
        "--repeats", "1", "--threads", "1", "--beam", "2", "--post-process", "subword_nmt", "--cpu", "--out-prefix", out,
        *extra, expect_ok=expect_ok,
    )


@pytest.fixture(scope="module")
def report(data_bin, teacher, codes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    train_student(data_bin, tmp / "student", "--kd-alpha", "0", "--max-epoch", "2")
    export(teacher, data_bin, codes, tmp / "teacher-ct2", "--quantization", "float32")
    proc = evaluate(data_bin, f"teacher={teacher}", f"student={tmp / 'student' / 'checkpoint_last.pt'}",
                    f"teacher-ct2={tmp / 'teacher-ct2'}", out=tmp / "eval", extra=("--split", "test,valid"))
    return tmp, proc.stdout


def test_report_fields_are_present_and_sane(report):
    tmp, stdout = report
    result = json.loads((tmp / "eval.json").read_text())
    teacher, student, exported = result["models"]
    assert [teacher["name"], student["name"], exported["name"]] == ["teacher", "student", "teacher-ct2"]
    assert [m["backend"] for m in result["models"]] == ["fairseq", "fairseq", "ctranslate2"]
    for m in result["models"]:
        for split in ("test", "valid"):
            for metric in ("bleu", "chrf"):
                assert 0 <= m[split][metric] <= 100
            assert m[split]["ter"] >= 0 and "nrefs:1" in m[split]["bleu_signature"] and m[split]["length_ratio"] > 0
            assert m[split]["sentences"] == 40
        assert m["params"] == m["embedding_params"] + m["non_embedding_params"] > 0
        assert 0 < m["weights_mb"] <= m["file_mb"]  # checkpoints also hold the optimizer state, exports more files
        assert [s["batch_size"] for s in m["speed"]] == [1, 4]
        assert all(s["sentences"] == 4 and s["sentences_per_s"] > 0 and s["tokens_per_s"] > 0 for s in m["speed"])
        assert m["peak_memory_mb"] > 50
    assert student["weights_mb"] < student["file_mb"]
    assert teacher["compression"] == 1.0 and teacher["bleu_retention"] == 1.0
    # the float32 export of the teacher translates as the teacher does
    assert exported["params"] == teacher["params"] and exported["compared_with"] == "teacher"
    assert exported["identical_share"] == 1.0 and exported["bleu_difference"] == 0
    assert "compared_with" not in student
    assert (tmp / "eval.teacher-ct2.test.txt").read_text() == (tmp / "eval.teacher.test.txt").read_text()
    assert exported["translations"]["valid"] == "eval.teacher-ct2.valid.txt"  # beside the report
    assert student["compression"] == pytest.approx(teacher["params"] / student["params"])
    assert student["param_ratio"] == pytest.approx(student["params"] / teacher["params"], abs=1e-4)
    assert result["settings"]["threads"] == 1 and result["settings"]["sentences"] == {"test": 40, "valid": 40}
    assert result["machine"]["torch"] and result["machine"]["cpu_count"] >= 1
    table = (tmp / "eval.md").read_text()
    assert "| teacher |" in table and "| student |" in table and "sent/s b4" in table and table in stdout
    assert "BLEU valid" in table
    assert "| teacher-ct2 | teacher | 100.0% | +0.00 |" in table
    assert (tmp / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_of_separate_runs_merge_into_one_table(report, data_bin, teacher, tmp_path, monkeypatch):
    tmp, _ = report
    quick = ("--split", "test,valid", "--no-speed")
    (tmp_path / "teacher.png").write_bytes(b"an earlier timed run's plot")
    evaluate(data_bin, f"teacher={teacher}", out=tmp_path / "teacher", extra=quick)
    evaluate(data_bin, f"teacher-ct2={tmp / 'teacher-ct2'}", out=tmp_path / "export", extra=quick)
    assert not (tmp_path / "teacher.png").exists()  # no speed, no speed plot (nor an old one)
    proc = run("fairseq-kd-eval", "--merge", tmp_path / "teacher.json", tmp_path / "export.json",
               "--out-prefix", tmp_path / "all")
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [m["name"] for m in merged["models"]] == ["teacher", "teacher-ct2"]
    assert merged["models"][1]["identical_share"] == 1.0 and merged["models"][1]["bleu_retention"] == 1.0
    assert "| teacher-ct2 | teacher | 100.0% | +0.00 |" in proc.stdout
    proc = run("fairseq-kd-eval", "--merge", tmp_path / "teacher.json", tmp / "eval.json", "--out-prefix",
               tmp_path / "mixed", expect_ok=False)
    assert proc.returncode != 0 and "was evaluated with other settings" in proc.stderr and "Traceback" not in proc.stderr
    # speeds measured on another machine: not one table
    elsewhere = json.loads((tmp / "eval.json").read_text())
    elsewhere["machine"]["device"] = "NVIDIA H200"
    for m in elsewhere["models"]:
        m["name"] += "-gpu"
    (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
    proc = run("fairseq-kd-eval", "--merge", tmp / "eval.json", tmp_path / "elsewhere.json", "--out-prefix",
               tmp_path / "mixed", expect_ok=False)
    assert proc.returncode != 0 and "was timed on another machine or software" in proc.stderr
    # the same sentences scored against other references: not one table
    references = []
    for split, n in merged["settings"]["sentences"].items():
        references.append(tmp_path / f"other.{split}")
        references[-1].write_text("t1\n" * n)
    evaluate(data_bin, f"other={teacher}", out=tmp_path / "other", extra=(*quick, "--reference", ",".join(map(str, references))))
    proc = run("fairseq-kd-eval", "--merge", tmp_path / "teacher.json", tmp_path / "other.json", "--out-prefix",
               tmp_path / "mixed", expect_ok=False)
    assert proc.returncode != 0 and "other settings than" in proc.stderr and "(references)" in proc.stderr
    # reports moved elsewhere with their translations and merged from another directory: the translations
    # are found beside each report, and the merged report names them relative to itself, so it merges again
    moved, tables = tmp_path / "moved", tmp_path / "tables"
    moved.mkdir()
    tables.mkdir()
    for path in [*tmp_path.glob("teacher.*"), *tmp_path.glob("export.*")]:
        path.rename(moved / path.name)
    monkeypatch.chdir(tables)
    evaluate_main(["--merge", "../moved/teacher.json", "../moved/export.json", "--out-prefix", "all"])
    merged = json.loads((tables / "all.json").read_text())
    assert merged["models"][1]["translations"]["test"] == "../moved/export.teacher-ct2.test.txt"
    monkeypatch.chdir(moved)
    evaluate_main(["--merge", str(tables / "all.json"), "--out-prefix", str(tmp_path / "again")])
    assert json.loads((tmp_path / "again.json").read_text())["models"][1]["identical_share"] == 1.0


def without_models(report):
    report["models"] = []


def without_test_scores(report):
    del report["models"][0]["test"]


@pytest.mark.parametrize("damage, message", [
    (without_models, "is not a fairseq-kd-eval report (no models)"),
    (without_test_scores, "lacks test BLEU"),
    (None, "all.json is a directory; choose another prefix"),
])
def test_damaged_reports_and_outputs_are_refused_before_merging(report, tmp_path, damage, message):
    saved = json.loads((report[0] / "eval.json").read_text())
    if damage is None:
        (tmp_path / "all.json").mkdir()
    else:
        damage(saved)
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    with pytest.raises(FairseqKDError, match=re.escape(message)):
        evaluate_main(["--merge", str(tmp_path / "saved.json"), "--out-prefix", str(tmp_path / "all")])
    assert not (tmp_path / "all.md").exists()


def test_a_merge_refuses_to_overwrite_its_inputs_or_to_evaluate(report, teacher, tmp_path):
    saved = tmp_path / "saved.json"
    saved.write_text((report[0] / "eval.json").read_text())
    with pytest.raises(FairseqKDError, match="would overwrite its input"):
        evaluate_main(["--merge", str(saved), "--out-prefix", str(tmp_path / "saved")])
    with pytest.raises(FairseqKDError, match="evaluates nothing"):
        evaluate_main(["--merge", str(saved), "--checkpoints", f"new={teacher}", "--out-prefix", str(tmp_path / "all")])
    assert saved.read_text() == (report[0] / "eval.json").read_text() and not (tmp_path / "all.json").exists()


def test_a_model_that_fails_keeps_the_report_of_those_before_it(data_bin, teacher, tmp_path, monkeypatch):
    import fairseq_kd.evaluate as evaluate_module

    measured = evaluate_module.run_in_child

    def failing_second(context, name, *rest):
        if name == "second":
            raise RuntimeError("CUDA out of memory")  # as torch.cuda.OutOfMemoryError
        return measured(context, name, *rest)
    monkeypatch.setattr(evaluate_module, "run_in_child", failing_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_main([str(data_bin), "--checkpoints", f"first={teacher}", f"second={teacher}", "--split", "test",
                       "--post-process", "none", "--cpu", "--no-speed", "--out-prefix", str(tmp_path / "eval")])
    assert [m["name"] for m in json.loads((tmp_path / "eval.json").read_text())["models"]] == ["first"]


def test_running_out_of_gpu_memory_is_one_line_naming_the_batch_sizes(monkeypatch):
    import fairseq_kd.evaluate as evaluate_module

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(evaluate_module, "evaluate_model", out_of_memory)
    answers = []
    evaluate_module._child(SimpleNamespace(batch_size=64), "big", "x.pt", [1, 32], None, {},
                           SimpleNamespace(put=answers.append))
    assert isinstance(answers[0], FairseqKDError)
    assert "evaluating big: out of GPU memory, decoding in batches of 64 (--batch-size), timed in batches of up to" \
           " 32 (--batch-sizes); give smaller batches, or --cpu" == str(answers[0])


@pytest.mark.parametrize("symbols, value, message", [
    (["\u2581Zwei", "\u2581Hunde", "n"], "subword_nmt", "holds sentencepiece pieces"),
    (["\u2581Zwei", "Hunde"], "none", "holds sentencepiece pieces"),
    (["Zwei", "Hun@@", "de"], "none", "holds BPE pieces"),
    (["Zwei", "Hunde"], "sentencepiece", "has no sentencepiece pieces"),
    (["\u2581Zwei", "Hunde"], "sentencepiece", None),
    (["Zwei", "Hun@@", "de"], "subword_nmt", None),
    (["Zwei", "Hunde"], "none", None),
])
def test_post_processing_must_fit_the_dictionary(symbols, value, message):
    dictionary = Dictionary()
    for symbol in symbols:
        dictionary.add_symbol(symbol)
    if message is None:
        check_post_process("--post-process", value, dictionary)
    else:
        with pytest.raises(FairseqKDError, match=message):
            check_post_process("--post-process", value, dictionary)


def test_a_model_name_that_would_make_a_directory_is_refused(teacher, tmp_path):
    with pytest.raises(FairseqKDError, match="give one without '/'"):
        evaluate_main(["data", "--checkpoints", f"a/b={teacher}", "--out-prefix", str(tmp_path / "eval")])


def test_an_export_scored_with_another_post_processing_is_refused(report, data_bin, tmp_path):
    """BPE pieces left apart (or joined as sentencepiece's) would be scored as other text than the references."""
    tmp, _ = report
    proc = evaluate(data_bin, f"x={tmp / 'teacher-ct2'}", out=tmp_path / "eval", expect_ok=False,
                    extra=("--post-process", "none", "--no-speed"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "writes bpe pieces, which --post-process subword_nmt joins, not none" in proc.stderr


def test_a_failing_model_leaves_the_report_of_those_before_it(data_bin, teacher, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    proc = evaluate(data_bin, f"teacher={teacher}", f"broken={tmp_path / 'broken.pt'}", out=tmp_path / "eval",
                    expect_ok=False, extra=("--no-speed",))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"the report of the models before it: {tmp_path / 'eval'}.json" in proc.stderr
    assert [m["name"] for m in json.loads((tmp_path / "eval.json").read_text())["models"]] == ["teacher"]


def test_missing_checkpoint(data_bin, tmp_path):
    one_error(evaluate(data_bin, f"teacher={tmp_path / 'nope.pt'}", out=tmp_path / "eval", expect_ok=False), "no such file")


@pytest.mark.parametrize("damage, message", [
    ("a file", "no such directory; give a fairseq data-bin"),
    ("raw text only", "cannot read it as a fairseq data-bin (Could not infer language pair"),
    ("a dictionary line without a count", "cannot read it as a fairseq data-bin (Incorrect dictionary format"),
    ("a damaged index", "cannot read split 'test' of"),
    ("a truncated .bin", "test.src-tgt.tgt.idx needs"),
    ("no target side", "has no tgt side of it (binarized with --only-source?); give the raw references"),
])
def test_a_damaged_data_bin_is_refused_before_decoding(data_bin, teacher, tmp_path, damage, message):
    data = tmp_path / "data"
    shutil.copytree(data_bin, data)
    if damage == "a file":
        data = data / "dict.src.txt"
    elif damage == "raw text only":
        for binarized in [*data.glob("*.bin"), *data.glob("*.idx")]:
            binarized.unlink()
    elif damage == "a dictionary line without a count":
        with open(data / "dict.tgt.txt", "a") as f:
            f.write("word\n")
    elif damage == "no target side":
        for binarized in data.glob("test.src-tgt.tgt.*"):
            binarized.unlink()
    elif damage == "a damaged index":
        (data / "test.src-tgt.src.idx").write_bytes(b"not an index")
    else:
        binarized = data / "test.src-tgt.tgt.bin"
        binarized.write_bytes(binarized.read_bytes()[: binarized.stat().st_size // 2])
    with pytest.raises(FairseqKDError, match=re.escape(message)):
        evaluate_main([str(data), "--checkpoints", f"teacher={teacher}", "--split", "test", "--cpu", "--no-speed",
                       "--post-process", "none", "--out-prefix", str(tmp_path / "eval")])
    assert not list(tmp_path.glob("eval*"))


def test_dictionary_mismatch(teacher, tmp_path):
    write_parallel(tmp_path, seed=3, vocab=20)
    other = binarize(tmp_path, tmp_path / "bin")
    proc = evaluate(other, f"teacher={teacher}", out=tmp_path / "eval", expect_ok=False)
    assert proc.returncode != 0 and "differs from the data's" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_split(tmp_path):
    write_parallel(tmp_path, sizes=(("train", 20), ("valid", 5), ("test", 0)))
    data = binarize(tmp_path, tmp_path / "bin")
    (tmp_path / "x.pt").write_bytes(b"")
    proc = evaluate(data, f"teacher={tmp_path / 'x.pt'}", out=tmp_path / "eval", expect_ok=False)
    assert proc.returncode != 0 and "has no sentences" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("extra, message", [
    (("--batch-sizes", ","), "must name at least one batch size"),
    (("--reference", "{tmp}/nope.de"), "--reference {tmp}/nope.de: cannot read it"),
    (("--max-len-b", "0"), "--max-len-b >= 1"),
    (("--split", "test,valid", "--reference", "{tmp}/a.de"), "--reference names 1 files for 2 splits"),
    (("--source-lang", "src"), "give both --source-lang and --target-lang"),
    (("--split", "test,nosuch"), "--split: {data} has no split 'nosuch' for src-tgt"),
    (("--post-process", "sentencepiece"), "the dictionary has no sentencepiece pieces"),
])
def test_bad_settings_are_refused_before_decoding(data_bin, teacher, tmp_path, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    proc = evaluate(data_bin, f"teacher={teacher}", out=tmp_path / "eval", expect_ok=False, extra=extra)
    assert proc.returncode != 0 and message.format(tmp=tmp_path, data=data_bin) in proc.stderr
    assert "Traceback" not in proc.stderr and "translating" not in proc.stdout


def test_export_with_another_vocabulary_and_duplicate_names(report, teacher, tmp_path):
    tmp, _ = report
    write_parallel(tmp_path, seed=3, vocab=20)
    other = binarize(tmp_path, tmp_path / "bin")
    proc = evaluate(other, f"x={tmp / 'teacher-ct2'}", out=tmp_path / "eval", expect_ok=False)
    assert proc.returncode != 0 and "its source vocabulary (32 symbols) differs from the data's" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = evaluate(other, f"a={teacher}", f"a={teacher}", out=tmp_path / "eval", expect_ok=False)
    assert proc.returncode != 0 and "each model needs its own name" in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_of_another_language_pair_is_refused(report, data_bin, teacher, tmp_path):
    """The same vocabulary both ways round: only the recorded languages tell an src->tgt model from tgt->src."""
    tmp, _ = report
    for model in (f"export={tmp / 'teacher-ct2'}", f"checkpoint={teacher}"):
        proc = evaluate(data_bin, model, out=tmp_path / "eval", expect_ok=False,
                        extra=("--source-lang", "tgt", "--target-lang", "src"))
        assert proc.returncode != 0 and "it translates src->tgt, but the data is tgt->src" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_data_bin_of_several_pairs_needs_the_pair_named(data_bin, teacher, tmp_path):
    data = tmp_path / "bin"
    shutil.copytree(data_bin, data)
    for path in data_bin.glob("test.src-tgt.*"):
        shutil.copy(path, data / path.name.replace("src-tgt", "tgt-src"))
    proc = evaluate(data, f"teacher={teacher}", out=tmp_path / "eval", expect_ok=False)
    assert proc.returncode != 0 and "holds several language pairs (src-tgt, tgt-src); name one" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_references_escape_unk_as_fairseq_generate_writes_them():
    dictionary = Dictionary()
    word = dictionary.add_symbol("t1")
    task = SimpleNamespace(tgt_dict=dictionary, dataset=lambda split: [
        {"target": torch.tensor([word, dictionary.unk(), dictionary.eos()])}])
    assert load_references(SimpleNamespace(post_process=None), task, "test", None) == ["t1 <<unk>>"]


class ExitsWhenRead:
    """Settings whose first use ends the process at once, as the out-of-memory killer would."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        os._exit(3)


def test_a_model_process_that_dies_is_named():
    context = multiprocessing.get_context("spawn")
    with pytest.raises(FairseqKDError, match=r"evaluating broken: its process ended without a result \(exit code 3"):
        run_in_child(context, "broken", (ExitsWhenRead(), "broken", "x.pt", [1], None, []))
