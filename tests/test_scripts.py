"""The scoring scripts the recipes rely on."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hypotheses_are_put_back_in_corpus_order(tmp_path):
    log = tmp_path / "generate.log"
    # fairseq-generate prints sentences in length-sorted batches, not corpus order
    log.write_text("S-2\tc\nH-2\t-0.1\tC\nD-2\t-0.1\tdrei\nD-0\t-0.2\teins\nS-1\tb\nD-1\t-0.3\t\n")
    score = load_script("score")
    assert score.hypotheses_in_corpus_order(log, 3) == ["eins", "", "drei"]
    with pytest.raises(SystemExit, match="no hypothesis for 1 sentences"):
        score.hypotheses_in_corpus_order(log, 4)


def test_results_table_reports_retention_against_the_first_model(tmp_path):
    records = []
    for name, params, bleu in (("teacher", 8_000_000, 40.0), ("student", 2_000_000, 38.0)):
        record = dict(name=name, params=params, bleu=bleu, chrf=60.0, bleu_signature="sig", chrf_signature="sig",
                      decode_seconds=10.0, threads=1, sentences=1000)
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
        records.append(str(tmp_path / f"{name}.json"))
    out = subprocess.run(
        [sys.executable, REPO / "scripts" / "results_table.py", "--json", tmp_path / "all.json", *records],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "| student | 2.00 M | 25 % | 38.00 | 60.00 | 95.0 % | 10 |" in out
    assert [r["bleu_retention"] for r in json.loads((tmp_path / "all.json").read_text())] == [1.0, 0.95]
