"""fairseq-kd-export and fairseq-kd-translate end to end on the toy task: every supported architecture (both
mutual peers) exports and translates raw text; a float32 export translates as the checkpoint does and as
stock fairseq-generate does; the vocabulary map; each refusal in one line."""
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary

import fairseq_kd  # noqa: F401  (torch.load of fairseq checkpoints below relies on its allowlist)
from conftest import BIN, PLUGIN, one_error, run
from fairseq_kd.checkpoints import count_parameters
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.export import main as export_main
from fairseq_kd.inference import CTranslate2Translator, DecodingOptions, FairseqTranslator, Subwords, translate_all
from fairseq_kd.translate import main as translate_main
from test_cli import train_student


@pytest.fixture(scope="module")
def models(data_bin, teacher, tmp_path_factory):
    """One checkpoint of each supported model: stock transformer, KD student, and a mutual pair."""
    tmp = tmp_path_factory.mktemp("export_models")
    train_student(data_bin, tmp / "student", "--task", "translation_distillation", "--teacher-path", teacher,
                  "--kd-alpha", "0.5", "--max-epoch", "2")
    train_student(data_bin, tmp / "mutual", "--task", "translation_distillation",
                  "--arch", "transformer_mutual_student_tiny", "--kd-alpha", "0.5", "--max-epoch", "2")
    return {"teacher": (teacher, "a"), "student": (tmp / "student" / "checkpoint_last.pt", "a"),
            "mutual-a": (tmp / "mutual" / "checkpoint_last.pt", "a"),
            "mutual-b": (tmp / "mutual" / "checkpoint_last.pt", "b")}


def export(checkpoint, data, codes, out, *extra, expect_ok=True, env=None):
    return run("fairseq-kd-export", checkpoint, "--data", data, "--bpe-codes", codes, "--out", out, *extra,
               expect_ok=expect_ok, env=env)


def export_here(checkpoint, data, codes, out, *extra):
    """fairseq-kd-export in this process (no start-up cost; the console script is tested below)."""
    export_main([str(checkpoint), "--data", str(data), "--bpe-codes", str(codes), "--out", str(out), *map(str, extra)])


def translate_here(model, source_file, tmp_path, *extra):
    """fairseq-kd-translate in this process, file to file; returns the output lines."""
    out = tmp_path / f"translated-{len(list(tmp_path.glob('translated-*')))}.txt"
    translate_main([str(model), "--input", str(source_file), "--output", str(out), *map(str, extra)])
    return out.read_text().splitlines()


def translate(model, text, *extra, expect_ok=True):
    proc = subprocess.run([str(BIN / "fairseq-kd-translate"), str(model), *map(str, extra)], input=text,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("name", ["teacher", "student", "mutual-a", "mutual-b"])
def test_export_and_translate_round_trip(data_bin, codes, models, tmp_path, name):
    checkpoint, peer = models[name]
    export_here(checkpoint, data_bin, codes, tmp_path / "ct2", "--quantization", "float32", "--peer", peer)
    manifest = json.loads((tmp_path / "ct2" / "fairseq_kd_export.json").read_text())
    assert manifest["quantization"] == "float32" and manifest["subwords"] == {"kind": "bpe", "file": "bpe.codes"}
    assert manifest["peer"] == (peer if name.startswith("mutual") else None)
    assert (tmp_path / "ct2" / "bpe.codes").read_text() == codes.read_text()
    source = data_bin.parent / "test.src"
    exported = translate_here(tmp_path / "ct2", source, tmp_path, "--beam", "2")
    original = translate_here(checkpoint, source, tmp_path, "--beam", "2", "--data", data_bin, "--bpe-codes", codes,
                              "--peer", peer)
    assert len(exported) == len(source.read_text().splitlines()) == 40
    assert all(line.startswith("t") for line in exported)  # target-language words came out
    identical = sum(a == b for a, b in zip(exported, original))
    # tiny students give the first end of sentence real probability, which CTranslate2 renormalises away
    # after forbidding an empty output and fairseq does not (README, "Deploy"): allow a few differences there
    assert identical == 40 if name == "teacher" else identical >= 30, (identical, name)


@pytest.fixture(scope="module")
def teacher_float32(data_bin, teacher, codes, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_float32") / "ct2"
    export_here(teacher, data_bin, codes, out, "--quantization", "float32")
    return out


@pytest.mark.parametrize("beam", [1, 5])
def test_float32_export_matches_fairseq_generate(data_bin, teacher, teacher_float32, tmp_path, beam):
    generated = run("fairseq-generate", data_bin, "--user-dir", PLUGIN, "--path", teacher, "--cpu", "--beam", beam,
                    "--required-batch-size-multiple", "1", "--max-tokens", "2000").stdout
    hypotheses = sorted((int(line.split("\t")[0][2:]), line.split("\t")[2]) for line in generated.splitlines()
                        if line.startswith("H-"))
    exported = translate_here(teacher_float32, data_bin.parent / "test.src", tmp_path, "--beam", beam,
                              "--batch-size", "7")
    assert [h for _, h in hypotheses] == exported
    # --subwords (pieces in, pieces out: a sequence-level KD corpus), both backends, the checkpoint without
    # a subword model; the toy task's BPE leaves its words whole, so its pieces are the raw text's words
    for model, extra in ((teacher_float32, []), (teacher, ["--data", data_bin])):
        pieces = translate_here(model, data_bin.parent / "test.src", tmp_path, "--beam", beam, "--subwords", *extra)
        assert pieces == [h for _, h in hypotheses]


def test_int8_vocabulary_map_and_empty_lines(data_bin, teacher, codes, tmp_path):
    export_here(teacher, data_bin, codes, tmp_path / "ct2", "--vmap", "--vmap-per-token", "3", "--vmap-common", "2")
    manifest = json.loads((tmp_path / "ct2" / "fairseq_kd_export.json").read_text())
    assert manifest["quantization"] == "int8" and manifest["vmap"] and manifest["vmap_per_token"] == 3
    vmap = (tmp_path / "ct2" / "vmap.txt").read_text().splitlines()
    assert len(vmap[0].split("\t")[1].split()) == 2  # the always-included pieces
    assert all(len(line.split("\t")[1].split()) <= 3 for line in vmap[1:]) and len(vmap) > 10
    # s3 is translated t3: the map must offer t3 for s3
    assert "t3" in next(line for line in vmap if line.startswith("s3\t")).split("\t")[1].split()
    # lines end at line feeds only: a form feed or U+2028 inside a line keeps it one line
    text = "s1 s2\u2028s3\n\ns4\x0cs5\n"
    with_map = translate(tmp_path / "ct2", text).stdout.split("\n")[:-1]  # the console script, from stdin
    (tmp_path / "text.src").write_text(text)
    without = translate_here(tmp_path / "ct2", tmp_path / "text.src", tmp_path, "--no-vmap")
    assert len(with_map) == len(without) == 3 and with_map[1] == without[1] == ""
    assert with_map[0].startswith("t") and without[0].startswith("t")


def test_the_target_language_token_is_stripped_wherever_it_is():
    """Both backends drop a multilingual model's target language token from its output as fairseq-generate
    does (its generator's symbols_to_strip_from_output): the given first token, and one in mid-sentence."""
    ct2 = object.__new__(CTranslate2Translator)
    ct2.manifest, ct2.options, ct2.max_positions, ct2.use_vmap = {"language_tokens": [["__en__"], ["__de__"]]}, DecodingOptions(), 50, False
    ct2.translator = SimpleNamespace(translate_batch=lambda batch, **options: [
        SimpleNamespace(hypotheses=[["__de__", "a", "__de__", "b"]]) for _ in batch])
    assert ct2.translate([["x"]]) == [["a", "b"]]
    dictionary = Dictionary()
    de, a, b = (dictionary.add_symbol(symbol) for symbol in ("__de__", "a", "b"))
    dictionary.add_symbol("x")
    dictionary.add_symbol("__en__")
    fairseq = object.__new__(FairseqTranslator)
    fairseq.language_tokens = SimpleNamespace(source="__en__", target="__de__")
    fairseq.src_dict = fairseq.tgt_dict = dictionary
    fairseq.non_autoregressive, fairseq.left_pad_source, fairseq.device, fairseq.model = False, True, "cpu", None
    fairseq.generator = SimpleNamespace(generate=lambda models, sample, prefix_tokens: [
        [{"tokens": torch.tensor([de, a, de, b, dictionary.eos()])}]])
    assert fairseq.translate([["x"]]) == [["a", "b"]]


def test_tied_embeddings_counted_once_however_saved():
    """Tied tensors share a storage in a checkpoint saved from the CPU and are separate copies in one saved
    from a GPU: counted once either way (the export's manifest and the evaluation table use the count);
    untied matrices and equal vectors (fresh layer norms) each count."""
    embedding = torch.randn(10, 4)
    shared = {"encoder.embed_tokens.weight": embedding, "decoder.embed_tokens.weight": embedding,
              "decoder.output_projection.weight": embedding, "decoder.fc1.weight": torch.randn(4, 4),
              "encoder.layer_norm.weight": torch.ones(4), "decoder.layer_norm.weight": torch.ones(4),
              "decoder.version": torch.tensor([3.0])}
    copied = {key: tensor.clone() for key, tensor in shared.items()}
    assert count_parameters(shared) == count_parameters(copied) == (40 + 16 + 8, 40, 64 * 4)
    untied = dict(copied, **{"decoder.embed_tokens.weight": torch.randn(10, 4)})
    assert count_parameters(untied)[:2] == (40 + 40 + 16 + 8, 80)


def test_training_does_not_import_ctranslate2():
    code = ("import sys, fairseq_kd, fairseq_kd.tasks.translation_distillation, fairseq_kd.checkpoints;"
            " assert 'ctranslate2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def edited_checkpoints(teacher, tmp_path_factory):
    """The teacher with an architecture, activation or layer CTranslate2 cannot run, or no positions (its converter would
    leave out Quant-Noise's trained layer, and fails on a decoder output projection)."""
    tmp = tmp_path_factory.mktemp("edited")
    paths = {}
    for name, option, value in (("lstm", "arch", "lstm_wiseman_iwslt_de_en"), ("tanh", "activation_fn", "tanh"),
                                ("quant noise", "quant_noise_pq", 0.1), ("output projection", "decoder_output_dim", 16),
                                ("no positions", "max_source_positions", 0)):
        state = torch.load(teacher, map_location="cpu")
        setattr(state["cfg"]["model"], option, value)
        paths[name] = tmp / f"{name}.pt"
        torch.save(state, paths[name])
    return paths


@pytest.mark.parametrize("case, message", [
    ("lstm", "is not supported"),
    ("tanh", "--activation-fn tanh (supported: relu"),
    ("quant noise", "--quant-noise-pq 0.1; train the model without it"),
    ("output projection", "--decoder-output-dim 16 with --decoder-embed-dim 32"),
    ("no positions", "its config's max_source_positions is 0, not a number of positions >= 1"),
    ("peer b of a single model", "not the two peers"),
    ("source language alone", "give both --source-lang and --target-lang, or neither"),
    ("missing checkpoint", "no such file"),
    ("missing codes", "--bpe-codes: no such file"),
    ("missing dictionary", "no dict.tgt.txt"),
    ("output is an input", "is or holds"),
    ("output holds an input", "which --force would delete"),
    ("output exists", "exists; choose another directory or pass --force"),
])
def test_export_refusals(data_bin, teacher, codes, edited_checkpoints, tmp_path, case, message):
    checkpoint, data, subwords, out, extra = teacher, data_bin, codes, tmp_path / "out", []
    if case in edited_checkpoints:
        checkpoint = edited_checkpoints[case]
    elif case == "peer b of a single model":
        extra = ["--peer", "b"]
    elif case == "source language alone":  # the model's own pair would be exported without a word
        extra = ["--source-lang", "src"]
    elif case == "missing checkpoint":
        checkpoint = tmp_path / "nope.pt"
    elif case == "missing codes":
        subwords = tmp_path / "nope.codes"
    elif case == "missing dictionary":
        data = tmp_path / "no-dict"
        data.mkdir()
        for f in data_bin.iterdir():
            if f.name != "dict.tgt.txt":
                (data / f.name).symlink_to(f)
    elif case == "output is an input":
        out, extra = teacher, ["--force"]
    elif case == "output holds an input":
        checkpoint = tmp_path / "checkpoints" / "teacher.pt"
        checkpoint.parent.mkdir()
        shutil.copy(teacher, checkpoint)
        out, extra = checkpoint.parent, ["--force"]
    elif case == "output exists":
        out.mkdir()
    with pytest.raises(FairseqKDError, match=re.escape(message)):
        export_main([str(checkpoint), "--data", str(data), "--bpe-codes", str(subwords), "--out", str(out), *extra])
    assert os.path.isfile(checkpoint) or case == "missing checkpoint"


def test_export_refusals_on_the_command_line(data_bin, teacher, codes, tmp_path):
    """One line and no traceback from the console script; --force replaces (the directory a link points to,
    keeping the link); a missing ctranslate2 is named."""
    (tmp_path / "v1").mkdir()
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "v1")
    one_error(export(teacher, data_bin, codes, out, expect_ok=False), "exists; choose another directory")
    export(teacher, data_bin, codes, out, "--force")
    assert out.is_symlink() and (tmp_path / "v1" / "model.bin").is_file()
    fake = tmp_path / "fake"
    (fake / "ctranslate2").mkdir(parents=True)
    (fake / "ctranslate2" / "__init__.py").write_text("raise ImportError('simulated')\n")
    one_error(export(teacher, data_bin, codes, tmp_path / "out2", expect_ok=False, env={"PYTHONPATH": str(fake)}),
              "pip install ctranslate2==4.8.5")


@pytest.fixture(scope="module")
def exported_teacher(data_bin, teacher, codes, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "ct2"
    export_here(teacher, data_bin, codes, out)
    return out


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope"], "no such file or directory"),
    (["{teacher}"], "give --data (its data-bin)"),
    (["{teacher}", "--data", "{data}", "--bpe-codes", "{codes}", "--no-vmap"], "--no-vmap applies to an exported"),
    (["{ct2}", "--data", "{data}"], "drop them"),
    (["{ct2}", "--beam", "0"], "--beam must be >= 1"),
    (["{ct2}", "--max-len-a", "nan"], "--max-len-a must be"),
    (["{ct2}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["{data}"], "fairseq_kd_export.json"),
    (["{ct2}", "--input", "{tmp}/latin1.txt"], "not UTF-8"),
    (["{ct2}", "--input", "{tmp}/nope.txt"], "--input: no such file"),
    (["{ct2}", "--input", "{tmp}"], "cannot read it (Is a directory); give a text file"),
    (["{ct2}", "--input", "{tmp}/latin1.txt", "--output", "{tmp}"], "is a directory; give a file name"),
    (["{tmp}/deeper.pt", "--data", "{data}", "--bpe-codes", "{codes}"], "its weights do not fit the model its own config"),
    (["{ct2}", "--input", "{tmp}/latin1.txt", "--output", "{tmp}/latin1.txt"], "is an input"),
    # nothing the translator reads is overwritten: an export's files, the data-bin's, the subword model, a link
    (["{tmp}/truncated", "--output", "{tmp}/truncated/model.bin"], "is an input of this run"),
    (["{teacher}", "--data", "{data}", "--bpe-codes", "{codes}", "--output", "{data}/dict.tgt.txt"], "is an input"),
    (["{teacher}", "--data", "{data}", "--bpe-codes", "{codes}", "--output", "{codes}"], "is an input"),
    (["{ct2}", "--input", "{tmp}/latin1.txt", "--output", "{tmp}/link.txt"], "is an input"),
    pytest.param(["{ct2}", "--input", "{tmp}/ascii.txt", "--output", "/dev/full"], "cannot write the translations (No space",
                 marks=pytest.mark.skipif(not os.access("/dev", os.W_OK), reason="/dev/full: a full disk, where /dev is writable")),
    (["{tmp}/half-export"], "lacks max_target_positions, vmap"),
    (["{tmp}/edited-export"], "its max_source_positions, language_tokens are not what fairseq-kd-export writes"),
    (["{tmp}/truncated"], "CTranslate2 cannot load"),
    (["{ct2}", "-s", "src", "-t", "tgt"], "language pair: drop them"),
    (["{ct2}", "--peer", "b"], "--peer apply to a fairseq checkpoint"),  # an export holds one peer
    (["{teacher}", "--data", "{data}", "--bpe-codes", "{codes}", "-s", "src"], "give both --source-lang and --target-lang"),
    (["{teacher}", "--data", "{data}", "--bpe-codes", "{codes}", "-s", "tgt", "-t", "src"], "it translates src->tgt"),
])
def test_translate_refusals(data_bin, teacher, codes, exported_teacher, tmp_path, args, message):
    shutil.copytree(exported_teacher, tmp_path / "truncated")
    model = tmp_path / "truncated" / "model.bin"
    model.write_bytes(model.read_bytes()[:1000])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "link.txt").symlink_to(tmp_path / "latin1.txt")
    (tmp_path / "ascii.txt").write_text("s1\n")
    (tmp_path / "half-export").mkdir()
    (tmp_path / "half-export" / "fairseq_kd_export.json").write_text('{"subwords": {"kind": "bpe"}}')
    manifest = json.loads((exported_teacher / "fairseq_kd_export.json").read_text())
    (tmp_path / "edited-export").mkdir()
    (tmp_path / "edited-export" / "fairseq_kd_export.json").write_text(
        json.dumps({**manifest, "max_source_positions": "1024", "language_tokens": "en"}))
    state = torch.load(teacher, map_location="cpu")
    state["cfg"]["model"].decoder_layers = 2  # a config its weights do not fit
    torch.save(state, tmp_path / "deeper.pt")
    values = dict(tmp=tmp_path, teacher=teacher, data=data_bin, codes=codes, ct2=exported_teacher)
    with pytest.raises(FairseqKDError, match=re.escape(message)):
        translate_main([a.format(**values) for a in args])


@pytest.mark.parametrize("damage, message", [
    ("halve", "train.src-tgt.tgt.idx needs"),
    ("overwrite", "--vmap: cannot read"),
])
def test_a_vocabulary_map_from_damaged_training_data_is_refused(data_bin, teacher, codes, tmp_path, damage, message):
    data = tmp_path / "data"
    shutil.copytree(data_bin, data)
    if damage == "halve":
        binarized = data / "train.src-tgt.tgt.bin"
        binarized.write_bytes(binarized.read_bytes()[: binarized.stat().st_size // 2])
    else:
        (data / "train.src-tgt.tgt.idx").write_bytes(b"not an index")
    with pytest.raises(FairseqKDError, match=re.escape(message)):
        export_here(teacher, data, codes, tmp_path / "ct2", "--vmap")


def test_a_checkpoint_without_its_languages_translates_the_data_bins_only_pair(data_bin, teacher, codes, tmp_path):
    """Its pair is the data-bin's when that holds one; of several, none is picked by directory order."""
    state = torch.load(teacher, map_location="cpu")
    # as a run without -s/-t whose data directory is gone records it
    state["cfg"]["task"].update(source_lang=None, target_lang=None, data=str(tmp_path / "gone"))
    state["cfg"]["model"].source_lang = state["cfg"]["model"].target_lang = None
    torch.save(state, tmp_path / "unlabelled.pt")
    (tmp_path / "source.txt").write_text("s1 s2 s3\ns4\n")
    subwords = ("--data", data_bin, "--bpe-codes", codes)
    assert (translate_here(tmp_path / "unlabelled.pt", tmp_path / "source.txt", tmp_path, *subwords)
            == translate_here(teacher, tmp_path / "source.txt", tmp_path, *subwords))
    two_pairs = tmp_path / "two-pairs"
    two_pairs.mkdir()
    for f in data_bin.iterdir():
        (two_pairs / f.name).symlink_to(f)
    (two_pairs / "train.tgt-src.tgt.bin").symlink_to(data_bin / "train.src-tgt.tgt.bin")
    with pytest.raises(FairseqKDError, match=re.escape("cannot tell the language pair (it holds src-tgt, tgt-src); name it")):
        translate_here(tmp_path / "unlabelled.pt", tmp_path / "source.txt", tmp_path, "--data", two_pairs, "--bpe-codes", codes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused where there is no CUDA device")
def test_cuda_without_a_cuda_device_is_refused(data_bin, teacher, codes, exported_teacher):
    for model, backend in (([exported_teacher], "CTranslate2"), ([teacher, "--data", data_bin, "--bpe-codes", codes], "torch")):
        with pytest.raises(FairseqKDError, match=f"--device cuda: {backend} sees no CUDA device on this machine; use --device cpu"):
            translate_main([*map(str, model), "--device", "cuda"])


def test_a_sentencepiece_model_of_other_data_is_refused(data_bin, tmp_path):
    """Its pieces would not be the dictionary's: most sources would be <unk>, the translations garbage."""
    import sentencepiece

    text = data_bin.parent / "train.src"
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=30,
                                             hard_vocab_limit=False, minloglevel=2)
    subwords = Subwords("sentencepiece", str(tmp_path / "spm.model"))
    own = Dictionary()
    for line in text.read_text().splitlines():
        own.encode_line(" ".join(subwords.encode(line)), add_if_not_exist=True)
    subwords.check_dictionary(own)
    with pytest.raises(FairseqKDError, match=r"writes only \d+ of the dictionary's \d+ pieces; give the sentencepiece model"):
        subwords.check_dictionary(Dictionary.load(str(data_bin / "dict.src.txt")))


def test_malformed_bpe_codes_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "empty.codes").write_text("")
    with pytest.raises(FairseqKDError, match=r"cannot read .* as a bpe model \(malformed codes\)"):
        Subwords("bpe", str(tmp_path / "empty.codes"))
    assert capsys.readouterr().err == ""  # subword-nmt's own lines, before it exits, are not shown


def test_bpe_codes_of_other_data_are_refused(data_bin, codes, tmp_path):
    dictionary = Dictionary.load(str(data_bin / "dict.src.txt"))
    Subwords("bpe", str(codes)).check_dictionary(dictionary)
    other_text = " ".join(word[::-1] + "xq" for word in dictionary.symbols[dictionary.nspecial:])
    other = subprocess.run([str(BIN / "subword-nmt"), "learn-bpe", "-s", "100"], input=other_text, capture_output=True,
                           text=True, check=True).stdout
    (tmp_path / "other.codes").write_text(other)
    with pytest.raises(FairseqKDError, match=r"--bpe-codes .* writes only \d+ of the dictionary's \d+ pieces; give the BPE codes"):
        Subwords("bpe", str(tmp_path / "other.codes")).check_dictionary(dictionary)


def test_a_line_longer_than_the_model_reads_is_refused_by_its_number(data_bin, teacher, codes, exported_teacher, tmp_path):
    """As fairseq-generate refuses it, in both backends (CTranslate2 would fail with its own error)."""
    (tmp_path / "long.src").write_text("s1\n\n" + "s2 " * 1100 + "\n")
    for model in ([exported_teacher], [teacher, "--data", data_bin, "--bpe-codes", codes]):
        with pytest.raises(FairseqKDError, match="line 3 has 1100 subword pieces; the model reads at most 1023"):
            translate_main([*map(str, model), "--input", str(tmp_path / "long.src"), "--output", str(tmp_path / "out")])


def test_translate_refusal_on_the_command_line(exported_teacher):
    one_error(translate(exported_teacher, "s1\n", "--beam", "0", expect_ok=False), "--beam must be >= 1")


def test_empty_sources_stay_empty_in_every_backend():
    """fairseq would translate an empty line's end of sentence and CTranslate2 nothing: neither sees one."""
    batches = []
    translator = SimpleNamespace(source_limit=3, translate=lambda batch: batches.append(batch) or [["t"] for _ in batch])
    assert translate_all(translator, [["a"], [], ["b", "c"], []], 8) == [["t"], [], ["t"], []]
    assert batches == [[["a"], ["b", "c"]]]
    with pytest.raises(FairseqKDError, match="line 3 has 4 subword pieces; the model reads at most 3"):
        translate_all(translator, [[], ["a"], ["a"] * 4], 8)
