"""translation_multi_distillation on a tiny four-way parallel toy corpus: each row distilled from its own
pair's teacher, caches keyed by pair, the threshold strategy and its resume, pivot KD, and the refusals."""
import random
import shutil

import pytest
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from conftest import PLUGIN, TINY_TRANSFORMER, TRAIN_FLAGS, run
from fairseq_kd.checkpoints import sha256
from fairseq_kd.errors import FairseqKDError
from fairseq_kd.kd_losses import kd_mi_loss, mutual_kl_loss
from fairseq_kd.teachers import PairTeachers

# every language spells the same words with its own letter; fr in reverse order
LANGUAGES = {"en": "e", "de": "d", "fr": "f", "cs": "c"}
PAIRS = ("en-de", "en-fr", "en-cs", "cs-de")
LANGTOK_FLAGS = ("--encoder-langtok", "src", "--decoder-langtok")
TEACHER_FLAGS = (*TRAIN_FLAGS, "--arch", "transformer", *TINY_TRANSFORMER, "--share-all-embeddings", "--dropout", "0",
                 "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1")


def write_four_way(directory, sizes=(("train", 600), ("valid", 30), ("test", 30))):
    rng = random.Random(0)
    for split, n in sizes:
        files = {lang: open(directory / f"{split}.{lang}", "w") for lang in LANGUAGES}
        for _ in range(n):
            words = [rng.randrange(10) for _ in range(rng.randint(2, 6))]
            for lang, letter in LANGUAGES.items():
                files[lang].write(" ".join(f"{letter}{w}" for w in (words[::-1] if lang == "fr" else words)) + "\n")
        for f in files.values():
            f.close()


def binarize_pairs(text, dest, pairs=PAIRS):
    """One dictionary over all languages, a data-bin per pair in ``dest``, ``langs.txt``."""
    (text / "all.txt").write_text("".join((text / f"train.{lang}").read_text() for lang in LANGUAGES))
    run("fairseq-preprocess", "--only-source", "--trainpref", text / "all.txt", "--destdir", text / "dict", "--workers", "1")
    for pair in pairs:
        src, tgt = pair.split("-")
        run("fairseq-preprocess", "-s", src, "-t", tgt, "--trainpref", text / "train", "--validpref", text / "valid",
            "--testpref", text / "test", "--srcdict", text / "dict" / "dict.txt", "--tgtdict", text / "dict" / "dict.txt",
            "--destdir", dest, "--workers", "1")
    (dest / "langs.txt").write_text("cs\nde\nen\nfr\n")
    return dest


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory):
    text = tmp_path_factory.mktemp("four_way")
    write_four_way(text)
    return binarize_pairs(text, text / "bin")


def train_teacher(data, pair, save_dir, *extra):
    run("fairseq-train", data, "--task", "translation_multi_simple_epoch", "--lang-pairs", pair, "--lang-dict",
        data / "langs.txt", *LANGTOK_FLAGS, *TEACHER_FLAGS, "--max-epoch", "6", "--save-dir", save_dir, *extra)
    return save_dir / "checkpoint_best.pt"


@pytest.fixture(scope="module")
def ml_teachers(ml_data, tmp_path_factory):
    """Teachers for en-de and en-fr, trained by stock fairseq's translation_multi_simple_epoch."""
    return {pair: train_teacher(ml_data, pair, tmp_path_factory.mktemp(f"teacher-{pair}")) for pair in ("en-de", "en-fr")}


def build(data, *flags, lang_pairs="en-de,en-fr,en-cs", lang_dict=("--lang-dict", "{data}/langs.txt")):
    """(task, student) as fairseq-train builds them."""
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--user-dir", PLUGIN, "--task", "translation_multi_distillation", "--lang-pairs", lang_pairs,
        *(flag.format(data=data) for flag in lang_dict), *LANGTOK_FLAGS, "--arch", "transformer", *TINY_TRANSFORMER,
        "--share-all-embeddings", "--cpu", "--max-tokens", "300", "--criterion", "kd_label_smoothed_cross_entropy",
        *map(str, flags)])
    task = tasks.setup_task(args)
    return task, task.build_model(args)


def whole_split(task, split="valid"):
    """One batch with every sentence of every pair of ``split``, as fairseq collates mixed pairs."""
    task.load_dataset(split)
    dataset = task.dataset(split)
    return dataset.collater([dataset[i] for i in range(len(dataset))])


class Wrapper(torch.nn.Module):
    """A module around another, which it keeps as ``module``, as fairseq's distributed wrappers do."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def run_alone(model, sample, row, net_input="net_input"):
    """``model``'s log-probabilities for one row of ``sample``, run on that row alone."""
    source = sample[net_input]["src_tokens"][row]
    source = source[source.ne(1)].unsqueeze(0)  # drop the padding
    target = sample["net_input"]["prev_output_tokens"][row].unsqueeze(0)
    with torch.no_grad():
        output = model(source, torch.tensor([source.size(1)]), target)
    return model.get_normalized_probs(output, log_probs=True)[0]


def test_each_row_is_distilled_by_its_own_pairs_teacher(ml_data, ml_teachers):
    task, student = build(ml_data, "--teacher-paths", f"en-de:{ml_teachers['en-de']},en-fr:{ml_teachers['en-fr']}",
                          "--kd-pair-weights", "en-fr:0.25")
    sample = whole_split(task)
    pairs = sample[PairTeachers.PAIR_KEY]
    dictionary = task.target_dictionary
    # the tags agree with the language token fairseq put first in each target
    assert [dictionary[t] for t in sample["target"][:, 0].tolist()] == [
        f"__{task.lang_pairs[p].split('-')[1]}__" for p in pairs.tolist()]
    assert set(pairs.tolist()) == {0, 1, 2}
    output = task.teachers.predict(sample, student)
    models = {task.pair_index[pair]: task.teachers.teachers[task.pair_index[pair]].models[0] for pair in ("en-de", "en-fr")}
    for row in range(len(pairs)):
        pair = int(pairs[row])
        length = int(sample["target"][row].ne(1).sum())
        weight = {0: 1.0, 1: 0.25, 2: 0.0}[pair]
        assert output.position_weights[row, 0] == 0  # the language token is given, not learnt
        assert torch.all(output.position_weights[row, 1:length] == weight)
        if pair in models:
            own = run_alone(models[pair], sample, row)[:length]
            other = run_alone(models[1 - pair], sample, row)[:length]
            assert torch.allclose(output.lprobs[row, :length], own, atol=1e-5)
            assert not torch.allclose(output.lprobs[row, :length], other, atol=1e-2)


def test_mi_negatives_are_the_distilled_positions_only(ml_data, ml_teachers):
    """--kd-loss mi contrasts each position with the others of the batch: rows of a pair without a teacher
    and the language tokens (weighted 0) are nobody's negatives."""
    task, student = build(ml_data, "--teacher-paths", f"en-de:{ml_teachers['en-de']}", "--kd-loss", "mi",
                          "--dropout", "0")
    criterion = task.build_criterion(convert_namespace_to_omegaconf(task.args).criterion)
    sample = whole_split(task)
    teacher = task.teachers.predict(sample, student)
    distilled = sample["target"].ne(task.target_dictionary.pad()) & teacher.position_weights.gt(0)
    assert 0 < distilled.sum() < sample["target"].ne(task.target_dictionary.pad()).sum() - len(distilled)
    _, _, log = criterion(student, sample)
    lprobs = student.get_normalized_probs(student(**sample["net_input"]), log_probs=True)
    expected = kd_mi_loss(lprobs[distilled], teacher.lprobs[distilled], 1.0, 15).sum()
    assert log["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_teachers_of_different_lengths_are_named(ml_data, ml_teachers, tmp_path, caplog):
    """The task has one length limit, the shortest teacher's: the rows of every pair beyond it are dropped."""
    state = torch.load(ml_teachers["en-de"], map_location="cpu")
    state["cfg"]["model"].max_source_positions = 6
    torch.save(state, tmp_path / "short.pt")
    build(ml_data, "--teacher-paths", f"en-de:{tmp_path / 'short.pt'},en-fr:{ml_teachers['en-fr']}")
    assert "the pairs' teachers read different lengths (en-de: (6, 1024), en-fr: (1024, 1024))" in caplog.text


def test_mutual_peers_are_not_distilled_on_the_language_token(ml_data):
    """Without teachers there are no position weights, but the decoder is still given the target language
    token: the peers' KL leaves it out as a teacher's KD does (with --ignore-prefix-size 1 it is gone anyway)."""
    task, student = build(ml_data, "--arch", "transformer_mutual", "--kd-alpha", "0.5",
                          "--dropout", "0")
    criterion = task.build_criterion(convert_namespace_to_omegaconf(task.args).criterion)
    sample = whole_split(task)
    student.eval()
    _, _, log = criterion(student, sample)
    output = student(**sample["net_input"])
    lprobs = student.get_normalized_probs(output, log_probs=True)
    lprobs_peer = student.peer.get_normalized_probs(output[1]["peer_output"], log_probs=True)
    distilled = sample["target"].ne(task.target_dictionary.pad())
    distilled[:, 0] = False
    assert log["kd_distilled"] == distilled.sum()
    expected = mutual_kl_loss(lprobs[distilled], lprobs_peer[distilled], 1.0).sum()
    assert log["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def select_rows(sample, rows):
    """The rows of a collated batch where ``rows`` (a boolean mask) is True."""
    if isinstance(sample, dict):
        return {key: select_rows(value, rows) for key, value in sample.items()}
    return sample[rows] if torch.is_tensor(sample) and sample.dim() and len(sample) == len(rows) else sample


def test_a_pairs_weight_scales_its_alpha_and_a_pair_without_a_teacher_keeps_its_cross_entropy(ml_data, ml_teachers):
    """Per position (1 - alpha) CE + alpha (w KD + (1 - w) CE): the rows of a pair of weight w train as with
    alpha times w, those of a pair without a teacher as without KD."""
    teacher = ("--teacher-paths", f"en-de:{ml_teachers['en-de']}")
    weighted, student = build(ml_data, *teacher, "--kd-pair-weights", "en-de:0.5", "--kd-alpha", 0.8)
    scaled, _ = build(ml_data, *teacher, "--kd-alpha", 0.4)
    plain, _ = build(ml_data, "--kd-alpha", 0)
    student.eval()
    sample = whole_split(weighted)
    en_de = sample[PairTeachers.PAIR_KEY].eq(weighted.pair_index["en-de"])

    def loss(task, rows):
        criterion = task.build_criterion(convert_namespace_to_omegaconf(task.args).criterion)
        return criterion(student, select_rows(sample, rows))[0].item()

    assert 0 < en_de.sum() < len(en_de)
    assert loss(weighted, en_de | ~en_de) == pytest.approx(loss(scaled, en_de) + loss(plain, ~en_de), rel=1e-5)
    assert loss(weighted, en_de) != pytest.approx(loss(plain, en_de), rel=1e-3)  # KD does change the en-de rows


@pytest.fixture(scope="module")
def ml_caches(ml_data, ml_teachers, tmp_path_factory):
    """Top-4 caches of the training and validation data, one per teacher in ``ml_teachers``."""
    caches = {pair: tmp_path_factory.mktemp("caches") / pair for pair in ml_teachers}
    for pair, teacher in ml_teachers.items():
        run("fairseq-kd-build-cache", ml_data, "--user-dir", PLUGIN, "--task", "translation_multi_simple_epoch",
            "--lang-pairs", pair, "--lang-dict", ml_data / "langs.txt", *LANGTOK_FLAGS, "--teacher-path", teacher,
            "--topk", 4, "--splits", "train,valid", "--out", caches[pair], "--cpu")
    return caches


def test_cache_is_keyed_by_pair_and_equals_the_teachers(ml_data, ml_teachers, ml_caches):
    online, student = build(ml_data, "--teacher-paths", f"en-de:{ml_teachers['en-de']},en-fr:{ml_teachers['en-fr']}",
                            "--kd-topk", 4)
    cached, _ = build(ml_data, "--teacher-topk-caches", f"en-de:{ml_caches['en-de']},en-fr:{ml_caches['en-fr']}",
                      "--kd-topk", 4)
    sample = whole_split(online)
    sample_cached = whole_split(cached)
    assert torch.equal(sample["id"], sample_cached["id"])  # ids repeat across pairs: (pair, id) tells them apart
    assert len(set(zip(sample["pair"].tolist(), sample["id"].tolist()))) == len(sample["id"]) > len(set(sample["id"].tolist()))
    values, ids = online.teachers.predict(sample, student).distribution(4)
    cached_values, cached_ids = cached.teachers.predict(sample_cached, student).distribution(4)
    distilled = online.teachers.position_weights(sample).gt(0) & sample["target"].ne(1)
    assert torch.equal(ids[distilled], cached_ids[distilled])
    assert torch.allclose(values[distilled], cached_values[distilled], atol=2e-3)  # stored as float16
    # a resume checks the teachers by content: the caches are the same teachers, per pair
    assert cached.resumed_state() == online.resumed_state() == {"teachers": {
        pair: [sha256(ml_teachers[pair])] for pair in ("en-de", "en-fr")}}
    with pytest.raises(FairseqKDError, match="the cache holds the en-fr teacher's top-k; build one for en-de"):
        build(ml_data, "--teacher-topk-caches", f"en-de:{ml_caches['en-fr']}", "--kd-topk", 4)[0].load_dataset("valid")


def test_resampled_training_rows_keep_their_pairs_teacher_and_cache_entry(ml_data, ml_teachers, ml_caches):
    """Training batches come through fairseq's resampling (--sampling-method uniform: each pair's rows drawn
    again, indices remapped): each row still carries its pair's tag and its own cached top-k."""
    paths = f"en-de:{ml_teachers['en-de']},en-fr:{ml_teachers['en-fr']}"
    resampled = ("--kd-topk", 4, "--sampling-method", "uniform")
    online, student = build(ml_data, "--teacher-paths", paths, *resampled)
    cached, _ = build(ml_data, "--teacher-topk-caches", f"en-de:{ml_caches['en-de']},en-fr:{ml_caches['en-fr']}", *resampled)
    sample, sample_cached = whole_split(online, "train"), whole_split(cached, "train")
    assert torch.equal(sample["id"], sample_cached["id"]) and torch.equal(sample["pair"], sample_cached["pair"])
    dictionary = online.target_dictionary
    assert [dictionary[t] for t in sample["target"][:, 0].tolist()] == [
        f"__{online.lang_pairs[p].split('-')[1]}__" for p in sample["pair"].tolist()]
    values, ids = online.teachers.predict(sample, student).distribution(4)
    cached_values, cached_ids = cached.teachers.predict(sample_cached, student).distribution(4)
    distilled = online.teachers.position_weights(sample).gt(0) & sample["target"].ne(1)
    assert distilled.any(1).sum() > 600  # rows of both taught pairs
    assert torch.equal(ids[distilled], cached_ids[distilled])
    assert torch.allclose(values[distilled], cached_values[distilled], atol=2e-3)


def test_threshold_with_caches_scores_with_the_teachers_and_distils_from_the_caches(ml_data, ml_teachers, ml_caches):
    paths = f"en-de:{ml_teachers['en-de']},en-fr:{ml_teachers['en-fr']}"
    threshold = ("--kd-threshold", "loss", "--kd-topk", 4)
    task, student = build(ml_data, "--teacher-paths", paths, "--teacher-topk-caches",
                          f"en-de:{ml_caches['en-de']},en-fr:{ml_caches['en-fr']}", *threshold)
    cached, _ = build(ml_data, "--teacher-topk-caches", f"en-de:{ml_caches['en-de']},en-fr:{ml_caches['en-fr']}",
                      "--kd-topk", 4)
    sample = whole_split(task)
    output = task.teachers.predict(sample, student)
    assert output.lprobs is None and torch.equal(output.topk[1], cached.teachers.predict(whole_split(cached), student).topk[1])
    # each teacher scores its pair's validation data, as without the caches; the student as the trainer hands it
    # over, inside fairseq's distributed wrappers (DDP inside a proxy, each keeping the next as ``module``)
    online, _ = build(ml_data, "--teacher-paths", paths, *threshold)
    task.threshold.maybe_check(Wrapper(Wrapper(student)), 1000)
    online.threshold.maybe_check(student, 1000)
    assert task.threshold.teacher_scores == pytest.approx(online.threshold.teacher_scores, rel=1e-5)
    assert task.threshold.student_scores == pytest.approx(online.threshold.student_scores, rel=1e-5)
    assert task.threshold.teacher_scores["en-de"] != task.threshold.teacher_scores["en-fr"]
    # the loss is per predicted token: the decoder is given the language token, as the bleu metric's prefix
    dataset = online.pair_dataset("valid", "en-de")
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    teacher = online.teachers.teachers[online.pair_index["en-de"]].models[0]
    with torch.no_grad():
        lprobs = teacher.get_normalized_probs(teacher(**sample["net_input"]), log_probs=True)
    predicted = sample["target"].ne(online.target_dictionary.pad())
    predicted[:, 0] = False
    nll = -lprobs.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1)[predicted].mean()
    assert online.threshold.teacher_scores["en-de"] == pytest.approx(nll.item(), rel=1e-4)
    with pytest.raises(FairseqKDError, match="--teacher-paths: no such file"):
        build(ml_data, "--teacher-paths", f"en-de:{ml_caches['en-de']}/missing.pt,en-fr:{ml_teachers['en-fr']}",
              "--teacher-topk-caches", f"en-de:{ml_caches['en-de']},en-fr:{ml_caches['en-fr']}", *threshold)
    with pytest.raises(FairseqKDError, match="en-de:.* was built from another teacher than --teacher-paths en-de:"):
        build(ml_data, "--teacher-paths", paths, "--teacher-topk-caches",
              f"en-de:{ml_caches['en-fr']},en-fr:{ml_caches['en-fr']}", *threshold)
    with pytest.raises(FairseqKDError, match="give a teacher and its cache for the same pairs"):
        build(ml_data, "--teacher-paths", paths, "--teacher-topk-caches", f"en-de:{ml_caches['en-de']}", *threshold)


def test_pivot_teacher_reads_the_same_sentence_in_its_own_language(ml_data, ml_teachers, tmp_path):
    task, student = build(ml_data, "--teacher-paths", f"cs-de:{ml_teachers['en-de']}", "--teacher-source-lang", "en",
                          lang_pairs="cs-de")
    sample = whole_split(task)
    dictionary = task.source_dictionary
    english = (ml_data.parent / "valid.en").read_text().splitlines()
    for row in range(len(sample["id"])):
        source = sample["teacher_net_input"]["src_tokens"][row]
        words = dictionary.string(source[source.ne(1)]).split()
        assert words == ["__en__", *english[int(sample["id"][row])].split()]
    output = task.teachers.predict(sample, student)
    teacher = task.teachers.teachers[0].models[0]
    length = int(sample["target"][0].ne(1).sum())
    assert torch.allclose(output.lprobs[0, :length], run_alone(teacher, sample, 0, "teacher_net_input")[:length], atol=1e-5)
    # the pivot data must be the same sentences, line by line
    shuffled = tmp_path / "bin"
    shutil.copytree(ml_data, shuffled)
    for name in ("valid.en-de.en", "valid.en-de.de"):
        for suffix in (".bin", ".idx"):
            (shuffled / f"{name}{suffix}").write_bytes((ml_data / f"{name.replace('valid', 'test')}{suffix}").read_bytes())
    with pytest.raises(FairseqKDError, match="valid sentence 0 of cs-de has another de side"):
        build(shuffled, "--teacher-paths", f"cs-de:{ml_teachers['en-de']}", "--teacher-source-lang", "en",
              lang_pairs="cs-de")[0].load_dataset("valid")
    for suffix in (".bin", ".idx"):
        (shuffled / f"valid.en-de.en{suffix}").unlink()
    with pytest.raises(FairseqKDError, match="has no valid data in en"):
        build(shuffled, "--teacher-paths", f"cs-de:{ml_teachers['en-de']}", "--teacher-source-lang", "en",
              lang_pairs="cs-de")[0].load_dataset("valid")
    # the student's and the pivot pair's data binarized the other way round (de-cs, de-en), as fairseq reads them
    reversed_data = tmp_path / "reversed"
    shutil.copytree(ml_data, reversed_data)
    for pair, backwards in (("cs-de", "de-cs"), ("en-de", "de-en")):
        for path in reversed_data.glob(f"*.{pair}.*"):
            path.rename(path.with_name(path.name.replace(f".{pair}.", f".{backwards}.")))
    task, _ = build(reversed_data, "--teacher-paths", f"cs-de:{ml_teachers['en-de']}", "--teacher-source-lang", "en",
                    lang_pairs="cs-de")
    assert torch.equal(whole_split(task)["teacher_net_input"]["src_tokens"], sample["teacher_net_input"]["src_tokens"])
    # fairseq filters the student's sources by length; the teacher's are checked against what it reads
    short = tmp_path / "short-teacher"
    shutil.copytree(ml_teachers["en-de"].parent, short, ignore=shutil.ignore_patterns("checkpoint_last.pt"))
    state = torch.load(short / "checkpoint_best.pt", weights_only=False)
    state["cfg"]["model"].max_source_positions = 4
    torch.save(state, short / "checkpoint_best.pt")
    with pytest.raises(FairseqKDError, match=r"valid sentence \d+ of .*valid.en-de.en has \d+ tokens, more than the cs-de"
                                             r" teacher reads \(4\)"):
        build(ml_data, "--teacher-paths", f"cs-de:{short / 'checkpoint_best.pt'}", "--teacher-source-lang", "en",
              lang_pairs="cs-de")[0].load_dataset("valid")
    # a training set fairseq combines from parts (train, train1): the pivot lines of train1 are not read
    for suffix in (".bin", ".idx"):
        for lang in ("cs", "de"):
            shutil.copy(ml_data / f"train.cs-de.{lang}{suffix}", shuffled / f"train1.cs-de.{lang}{suffix}")
    task, _ = build(shuffled, "--teacher-paths", f"cs-de:{ml_teachers['en-de']}", "--teacher-source-lang", "en",
                    lang_pairs="cs-de")
    with pytest.raises(FairseqKDError, match="the cs-de train data has 1200 pairs, .*train.cs-de.de 600; .*.no train1"):
        task.load_dataset("train", combine=True)


def train_student(data, save_dir, *flags):
    return run("fairseq-train", data, "--user-dir", PLUGIN, "--task", "translation_multi_distillation", "--lang-pairs",
               "en-de,en-fr", "--lang-dict", data / "langs.txt", *LANGTOK_FLAGS, *TRAIN_FLAGS, "--arch", "transformer",
               *TINY_TRANSFORMER, "--share-all-embeddings", "--dropout", "0", "--criterion", "kd_label_smoothed_cross_entropy",
               "--save-dir", save_dir, *flags).stdout


def test_threshold_switches_kd_per_pair_and_survives_a_resume(ml_data, ml_teachers, tmp_path):
    # an en-fr teacher that a student beats at once: the en-fr teacher with noise on every weight
    state = torch.load(ml_teachers["en-fr"], map_location="cpu")
    generator = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 2.0 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    weak = tmp_path / "weak" / "checkpoint_best.pt"
    weak.parent.mkdir()
    torch.save(state, weak)
    flags = ("--teacher-paths", f"en-de:{ml_teachers['en-de']},en-fr:{weak}", "--kd-threshold", "loss",
             "--kd-threshold-interval", "10", "--kd-threshold-margin", "0.5")
    log = train_student(ml_data, tmp_path / "student", *flags, "--max-epoch", "1")
    assert "kd-threshold at update 10: en-fr" in log and "KD off" in log
    switches = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "student" / "checkpoint_last.pt"))[
        "extra_state"]["TranslationMultiDistillationTask"]["threshold"]["switches"]
    assert [pair for _, pair, _ in switches] == ["en-fr"] and switches[0][2] == "off"
    resumed = train_student(ml_data, tmp_path / "student", *flags, "--max-epoch", "2")
    first = next(line for line in resumed.splitlines() if "train_inner" in line)
    assert "kd_on_en-de=1" in first and "kd_on_en-fr=0" in first  # before any new comparison
    # restored scores are compared with only if measured the same way, with the same teachers
    saved = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "student" / "checkpoint_last.pt"))[
        "extra_state"]["TranslationMultiDistillationTask"]["threshold"]
    other_teacher = ("--teacher-paths", f"en-de:{ml_teachers['en-de']},en-fr:{ml_teachers['en-fr']}", *flags[2:])
    other_metric = (*flags[:3], "bleu", *flags[4:], "--kd-threshold-post-process", "none")
    for changed, restored in ((flags, saved["teacher_scores"]), (other_teacher, {}), (other_metric, {})):
        task, _ = build(ml_data, *changed)
        task.threshold.load_state_dict(saved)
        assert task.threshold.teacher_scores == restored and task.threshold.switches == saved["switches"]
        # the switches the scores decided go with them: KD on for en-fr until the next comparison
        assert bool(task.teachers.enabled[task.pair_index["en-fr"]]) == (changed is not flags)
    assert set(saved["teacher_scores"]) == {"en-de", "en-fr"}
    with pytest.raises(FairseqKDError, match="trained with other distillation settings .--kd-threshold-margin 0.5 -> 2"):
        task, _ = build(ml_data, *flags[:-1], "2", "--save-dir", tmp_path / "student")
        task.build_criterion(convert_namespace_to_omegaconf(task.args).criterion)


@pytest.mark.parametrize("flags, message", [
    (("--teacher-paths", "en-es:X.pt"), "en-es is not one of --lang-pairs"),
    (("--teacher-paths", "en-de:{en-de}", "--kd-pair-weights", "en-fr:0.5"), "en-fr has no teacher"),
    (("--teacher-paths", "en-de:{en-de}", "--kd-pair-weights", "en-de:2"), r"weights are numbers in \[0, 1\]"),
    (("--teacher-paths", "en-de:{en-de}", "--kd-threshold", "bleu", "--disable-validation"), "needs validation data"),
    (("--teacher-paths", "en-de:{en-fr}",), "it translates en->fr"),
    (("--teacher-topk-caches", "en-de:X", "--teacher-source-lang", "en"), "give them with --teacher-paths"),
    (("--teacher-paths", "en-de:{en-de}", "--teacher-topk-caches", "en-de:X", "--teacher-source-lang", "en",
      "--kd-threshold", "loss"), "without --teacher-topk-caches"),
    (("--teacher-paths", "en-de:{en-de}", "--teacher-topk-caches", "en-fr:X"), "not both .both only with --kd-threshold"),
    (("--teacher-paths", "en-de:{en-de}", "--kd-threshold", "loss", "--kd-threshold-margin", "-1"),
     "--kd-threshold-margin must be >= 0"),
    (("--teacher-paths", "en-de:{en-de}", "--decoder-langtok", "--encoder-langtok", "tgt"),
     "trained with --encoder-langtok src, this run uses tgt"),
    (("--teacher-paths", "en-de:{en-de}", "--left-pad-target", "True"), "keep --left-pad-target False"),
    (("--teacher-paths", "en-de:{en-de}", "--extra-lang-pairs", '{{"mined": "en-de"}}'),
     "drop --extra-data/--extra-lang-pairs and name every pair in --lang-pairs"),
    (("--teacher-paths", "en-de:{en-de}", "--kd-hidden-weight", "1"), "a multilingual student has a teacher per language pair"),
    (("--teacher-paths", "en-de:{en-de}", "--kd-threshold", "bleu", "--kd-threshold-post-process", "bpe"),
     "--kd-threshold-post-process 'bpe' is not one fairseq knows"),
    # sentencepiece's (the default) on pieces without its word boundaries: BLEU of one-word sentences
    (("--teacher-paths", "en-de:{en-de}", "--kd-threshold", "bleu"), "the dictionary has no sentencepiece pieces"),
    # fairseq's multilingual task then translates, with no teachers
    (("--teacher-paths", "en-de:{en-de}", "-s", "en", "-t", "de"), "with -s/-t, which make fairseq's multilingual task"),
    (("--teacher-paths", "en-de:{en-de}", "--langtoks", '{{"main": ("src", None)}}'), "--langtoks gives main"),
])
def test_bad_multilingual_options_are_refused(ml_data, ml_teachers, flags, message):
    flags = [flag.format(**ml_teachers) for flag in flags]
    with pytest.raises(FairseqKDError, match=message):
        task, _ = build(ml_data, *flags)
        task.build_criterion(convert_namespace_to_omegaconf(task.args).criterion)


def test_languages_without_a_fixed_order_are_refused_with_teachers(ml_data, ml_teachers):
    with pytest.raises(FairseqKDError, match="needs the languages in a fixed order .* give --lang-dict langs.txt"):
        build(ml_data, "--teacher-paths", f"en-de:{ml_teachers['en-de']}", lang_dict=())
    build(ml_data, lang_dict=())  # without teachers no token ids need to match


def test_pairs_that_name_one_teacher_share_one_copy_of_it(ml_data, tmp_path):
    both = train_teacher(ml_data, "en-de,en-fr", tmp_path, "--max-epoch", "1")
    task, _ = build(ml_data, "--teacher-paths", f"en-de:{both},en-fr:{both}")
    teachers = task.teachers.teachers
    assert teachers[0].models[0] is teachers[1].models[0]
    assert task.teachers_sha256["en-de"] == task.teachers_sha256["en-fr"]


def test_the_threshold_margin_defaults_to_a_bleu_point_or_any_lead_in_loss(ml_data, ml_teachers):
    teachers = ("--teacher-paths", f"en-de:{ml_teachers['en-de']}")
    assert build(ml_data, *teachers, "--kd-threshold", "loss")[0].threshold.margin == 0.0
    assert build(ml_data, *teachers, "--kd-threshold", "loss", "--kd-threshold-margin", "0.1")[0].threshold.margin == 0.1
    assert build(ml_data, *teachers)[0].args.kd_threshold_margin == 1.0  # as checkpoints of runs without it kept it


def test_threshold_without_a_pairs_validation_data_is_refused(ml_data, ml_teachers, tmp_path):
    data = tmp_path / "bin"
    shutil.copytree(ml_data, data, ignore=shutil.ignore_patterns("valid.en-fr.*"))
    with pytest.raises(FairseqKDError, match=r"has no valid data for en-fr \(valid.en-fr.en\).* binarize a valid set"):
        build(data, "--teacher-paths", f"en-de:{ml_teachers['en-de']},en-fr:{ml_teachers['en-fr']}",
              "--kd-threshold", "bleu")
    # binarized the other way round (fr-en), as fairseq reads it
    for path in ml_data.glob("valid.en-fr.*"):
        shutil.copy(path, data / path.name.replace(".en-fr.", ".fr-en."))
    task, student = build(data, "--teacher-paths", f"en-de:{ml_teachers['en-de']},en-fr:{ml_teachers['en-fr']}",
                          "--kd-threshold", "loss")
    task.threshold.maybe_check(student, 1000)
    assert set(task.threshold.student_scores) == {"en-de", "en-fr"}


def test_threshold_scores_the_sentences_fairseqs_validation_reads(ml_data, ml_teachers):
    """A validation sentence longer than the models read is refused, or skipped as fairseq's validation skips it."""
    flags = ("--teacher-paths", f"en-de:{ml_teachers['en-de']}", "--kd-threshold", "loss", "--max-target-positions", "5")
    task, student = build(ml_data, *flags)
    with pytest.raises(FairseqKDError, match="valid sentence .* of en-de is longer than the student or its teacher reads"):
        task.threshold.maybe_check(student, 1000)
    task, student = build(ml_data, *flags, "--skip-invalid-size-inputs-valid-test")
    task.threshold.maybe_check(student, 1000)
    assert "en-de" in task.threshold.student_scores


def test_a_teacher_whose_lang_dict_was_elsewhere_reads_the_students(ml_data, ml_teachers, tmp_path):
    """Trained on another machine: its --lang-dict, by that name, from the student's data directory."""
    state = torch.load(ml_teachers["en-de"], map_location="cpu")
    state["cfg"]["task"].lang_dict = "/cluster/run1/langs.txt"
    state["cfg"]["task"].data = "/cluster/run1/data-bin"
    moved = tmp_path / "teacher.pt"
    torch.save(state, moved)
    for dictionary in ("dict.en.txt", "dict.de.txt"):  # beside it, as its data directory is not here either
        shutil.copy(ml_data / dictionary, tmp_path / dictionary)
    task, _ = build(ml_data, "--teacher-paths", f"en-de:{moved}")
    assert task.teachers.teachers


def test_teachers_with_other_language_tokens_are_refused(ml_data, ml_teachers, tmp_path):
    bilingual = tmp_path / "bilingual"
    run("fairseq-train", ml_data, "--task", "translation", "-s", "en", "-t", "de", *TEACHER_FLAGS, "--max-epoch", "1",
        "--save-dir", bilingual)
    with pytest.raises(FairseqKDError, match="trained with --task translation, so its inputs carry no language tokens"):
        build(ml_data, "--teacher-paths", f"en-de:{bilingual / 'checkpoint_best.pt'}")
    reordered = tmp_path / "langs.txt"
    reordered.write_text("en\nde\nfr\ncs\n")
    other_order = train_teacher(ml_data, "en-de", tmp_path / "reordered", "--lang-dict", reordered, "--max-epoch", "1")
    with pytest.raises(FairseqKDError, match="with its language tokens .* differs .* at index 48: checkpoint '__en__', data '__cs__'; train the teacher"):
        build(ml_data, "--teacher-paths", f"en-de:{other_order}")


@pytest.fixture(scope="module")
def ml_student(ml_data, ml_teachers, tmp_path_factory):
    """A multilingual student of en-de, en-fr and en-cs, distilled from the en-de and en-fr teachers."""
    save_dir = tmp_path_factory.mktemp("ml_student")
    train_student(ml_data, save_dir, "--lang-pairs", "en-de,en-fr,en-cs", "--teacher-paths",
                  f"en-de:{ml_teachers['en-de']},en-fr:{ml_teachers['en-fr']}", "--max-epoch", "2")
    return save_dir / "checkpoint_last.pt"


def test_multilingual_student_evaluates_and_exports_per_pair(ml_data, ml_student, tmp_path):
    # fairseq-kd-eval decodes it as fairseq-generate does: the source language token in, the target's given
    generate = run("fairseq-generate", ml_data, "--user-dir", PLUGIN, "--task", "translation_multi_simple_epoch",
                   "--lang-pairs", "en-de,en-fr,en-cs", "--lang-dict", ml_data / "langs.txt", *LANGTOK_FLAGS,
                   "-s", "en", "-t", "fr", "--path", ml_student, "--gen-subset", "test", "--beam", "5", "--cpu",
                   "--required-batch-size-multiple", "1").stdout
    expected = [line.split("\t")[2] for line in sorted((line for line in generate.splitlines() if line.startswith("D-")),
                                                        key=lambda line: int(line.split("\t")[0][2:]))]
    pair = ("--source-lang", "en", "--target-lang", "fr")
    run("fairseq-kd-eval", ml_data, "--checkpoints", f"student={ml_student}", "--split", "test", *pair,
        "--post-process", "none", "--beam", "5", "--no-speed", "--out-prefix", tmp_path / "beam5")
    assert (tmp_path / "beam5.student.test.txt").read_text().splitlines() == expected
    # exported for one pair, CTranslate2 writes the same greedy translations (its beam search ranks without
    # the given language token's score, so beams > 1 may differ)
    codes = tmp_path / "codes"
    # a merge per toy word (a letter and a digit): each stays one piece, as the data-bin holds it
    codes.write_text("#version: 0.2\n" + "".join(f"{letter} {digit}</w>\n" for letter in LANGUAGES.values()
                                                  for digit in range(10)))
    run("fairseq-kd-export", ml_student, "--data", ml_data, "--bpe-codes", codes, *pair, "--quantization", "float32",
        "--out", tmp_path / "ct2")
    run("fairseq-kd-eval", ml_data, "--checkpoints", f"fairseq={ml_student}", f"ct2={tmp_path / 'ct2'}", "--split",
        "test", *pair, "--post-process", "subword_nmt", "--beam", "1", "--no-speed", "--out-prefix", tmp_path / "beam1")
    assert (tmp_path / "beam1.fairseq.test.txt").read_text() == (tmp_path / "beam1.ct2.test.txt").read_text()
    refused = run("fairseq-kd-export", ml_student, "--data", ml_data, "--bpe-codes", codes, "--out", tmp_path / "x",
                  expect_ok=False)
    assert refused.returncode == 1 and "a multilingual model of several pairs" in refused.stderr
