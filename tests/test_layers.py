"""Intermediate-layer KD: layer maps, capturing hidden states and attention, the hidden-state, relation
and attention terms, and initialising the student from the teacher."""
import pytest
import torch

from fairseq_kd.errors import FairseqKDError
from fairseq_kd.features import attention_heads, attention_lprobs, layer_outputs, parse_layer_map, parse_layer_selection
from fairseq_kd.kd_losses import kd_attention_loss, kd_hidden_loss, kd_relation_loss, match_heads
from fairseq_kd.narrowing import narrow_state
from test_criterion_and_task import build, first_batch


def test_uniform_map_pairs_last_with_last():
    pairs = parse_layer_map("uniform", {"enc": 3, "dec": 1}, {"enc": 6, "dec": 3})
    assert pairs == [("enc", 0, 1), ("enc", 1, 3), ("enc", 2, 5), ("dec", 0, 2)]
    assert parse_layer_map("uniform", {"enc": 2, "dec": 2}, {"enc": 3, "dec": 2}) == [
        ("enc", 0, 1), ("enc", 1, 2), ("dec", 0, 0), ("dec", 1, 1)]
    # a student deeper than twice its teacher: its first layer meets the teacher's first, not (index -1) its last
    assert parse_layer_map("uniform", {"enc": 5, "dec": 1}, {"enc": 2, "dec": 1})[:3] == [
        ("enc", 0, 0), ("enc", 1, 0), ("enc", 2, 0)]


def test_explicit_map():
    assert parse_layer_map("enc:0-1,1-3;dec:0-5", {"enc": 2, "dec": 1}, {"enc": 6, "dec": 6}) == [
        ("enc", 0, 1), ("enc", 1, 3), ("dec", 0, 5)]


@pytest.mark.parametrize("text, message", [
    ("enc:0-6", "enc layer 6 of the teacher does not exist; the student has 2 enc layers, the teacher 6"),
    ("dec:1-0", "dec layer 1 of the student does not exist; the student has 1 dec layers"),
    ("enc:0>1", "cannot read layer map part 'enc:0>1'"),
    ("mid:0-1", "cannot read layer map part 'mid:0-1'"),
    (";", "pairs no layers"),
])
def test_bad_maps_are_refused(text, message):
    with pytest.raises(FairseqKDError) as error:
        parse_layer_map(text, {"enc": 2, "dec": 1}, {"enc": 6, "dec": 6})
    assert message in str(error.value)


def test_layer_selections():
    student, teacher = {"enc": 3, "dec": 1}, {"enc": 6, "dec": 3}
    assert parse_layer_selection("first", student, teacher) == {"enc": {0: 0, 1: 1, 2: 2}, "dec": {0: 0}}
    assert parse_layer_selection("alternate", student, teacher) == {"enc": {0: 0, 1: 2, 2: 4}, "dec": {0: 0}}
    assert parse_layer_selection("enc:5,3,1", student, teacher) == {"enc": {0: 5, 1: 3, 2: 1}}
    for text, message in [("enc:0,1", "2 enc layers listed, but the student has 3"),
                          ("dec:3", "the teacher has no dec layer 3"), ("enc=1", "cannot read 'enc=1'")]:
        with pytest.raises(FairseqKDError, match=message):
            parse_layer_selection(text, student, teacher)
    with pytest.raises(FairseqKDError, match="the student has 3 enc layers, more than the teacher's 2"):
        parse_layer_selection("first", student, {"enc": 2, "dec": 1})


def test_hidden_loss_identities():
    teacher = torch.randn(5, 8)
    assert torch.allclose(kd_hidden_loss(teacher.clone(), teacher, "mse"), torch.zeros(5))
    assert torch.allclose(kd_hidden_loss(3 * teacher, teacher, "cosine"), torch.zeros(5), atol=1e-6)
    assert torch.allclose(kd_hidden_loss(teacher + 2, teacher, "mse"), torch.full((5,), 4.0))
    assert torch.allclose(kd_hidden_loss(-teacher, teacher, "cosine"), torch.full((5,), 2.0))


def test_relation_loss_is_zero_across_widths_for_the_same_relations():
    """Student states of another width with the teacher's relations (an isometry, rescaled for the
    1/sqrt(C) of the scores) cost nothing: no projection is needed."""
    teacher = torch.randn(2, 4, 8)
    q, _ = torch.linalg.qr(torch.randn(20, 8))  # 20 x 8, orthonormal columns
    student = teacher @ q.T * (20 / 8) ** 0.25
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    assert torch.allclose(kd_relation_loss(student, teacher, mask), torch.zeros(2, 4), atol=1e-5)
    assert (kd_relation_loss(torch.randn(2, 4, 20), teacher, mask)[mask] > 0).all()
    # under bfloat16 autocast (--cpu-bf16) the relations are still computed in float32
    student = torch.randn(2, 4, 20) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = kd_relation_loss(student, teacher, mask)
    assert autocast.dtype == torch.float32 and torch.allclose(autocast, kd_relation_loss(student, teacher, mask))


def test_relation_loss_ignores_padding():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    student = torch.randn(2, 3, 6, requires_grad=True)
    teacher = torch.randn(2, 3, 4)
    loss = kd_relation_loss(student, teacher, mask)
    assert loss[1, 2] == 0
    changed_student, changed_teacher = student.detach().clone(), teacher.clone()
    changed_student[1, 2], changed_teacher[1, 2] = 100.0, -100.0
    assert torch.allclose(kd_relation_loss(changed_student, changed_teacher, mask), loss)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all() and (student.grad[1, 2] == 0).all()


def test_head_matching():
    teacher = torch.log_softmax(torch.randn(2, 4, 3, 5), -1)
    averaged = match_heads(teacher, 2).exp()
    assert torch.allclose(averaged[:, 1], (teacher[:, 2].exp() + teacher[:, 3].exp()) / 2, atol=1e-6)
    assert torch.equal(match_heads(teacher, 8)[:, 2], teacher[:, 1])  # each teacher head guides two
    with pytest.raises(ValueError, match="3 attention heads and the teacher's 4"):
        match_heads(teacher, 3)


@pytest.mark.parametrize("distance", ["kl", "mse"])
def test_attention_loss_identities(distance):
    scores = torch.randn(2, 2, 4, 4)
    causal = torch.triu(torch.full((4, 4), float("-inf")), 1)  # future keys masked, as in the decoder
    keys = torch.tensor([[True] * 4, [True, True, True, False]])
    scores = (scores + causal).masked_fill(~keys[:, None, None, :], float("-inf"))
    teacher = torch.log_softmax(scores, -1)
    assert torch.allclose(kd_attention_loss(teacher, teacher, keys, distance), torch.zeros(2, 4))
    student = torch.log_softmax(torch.randn(2, 2, 4, 4) + causal, -1).masked_fill(~keys[:, None, None, :], float("-inf"))
    student.requires_grad_()
    loss = kd_attention_loss(student, teacher, keys, distance)
    assert (loss[:, 1:] > 0).all() and torch.allclose(loss[:, 0], torch.zeros(2))  # query 0 sees only key 0
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_layer_outputs_captures_every_layer_then_unhooks(data_bin, teacher):
    task, model, _ = build(data_bin, "--teacher-path", teacher)
    sample = first_batch(task)
    with layer_outputs(model, attention=True) as layers:
        model(**sample["net_input"])
    batch, src_len = sample["net_input"]["src_tokens"].shape
    assert [h.shape for h in layers["enc"]] == [(batch, src_len, 32)]
    tgt_len = sample["target"].size(1)
    assert [h.shape for h in layers["dec"]] == [(batch, tgt_len, 32)]
    assert [a.shape for a in layers["enc_self"]] == [(batch, 2, src_len, src_len)]
    assert [a.shape for a in layers["dec_self"]] == [(batch, 2, tgt_len, tgt_len)]
    assert [a.shape for a in layers["dec_cross"]] == [(batch, 2, tgt_len, src_len)]
    assert layers["dec_self"][0][0, :, 0, 1:].exp().sum() == 0  # no looking ahead
    modules = [*model.encoder.layers, *model.decoder.layers]
    modules += [m for layer in model.decoder.layers for m in (layer.self_attn, layer.encoder_attn)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def test_attention_is_recomputed_as_fairseq_computes_it(data_bin, teacher):
    task, model, _ = build(data_bin, "--teacher-path", teacher)
    model.eval()
    attention = model.encoder.layers[0].self_attn
    x = torch.randn(5, 3, 32)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    # an incremental state sends fairseq down its own (non-fused) path, which returns every head's weights
    _, reference = attention(x, x, x, key_padding_mask=padding, incremental_state={}, need_head_weights=True)
    ours = attention_lprobs(attention, x, x, padding).exp()  # (B, H, T, S); fairseq's is (H, B, T, S)
    assert torch.allclose(ours.transpose(0, 1), reference, atol=1e-6)


def test_student_initialised_as_the_teacher_has_zero_layer_terms(data_bin, teacher):
    """Same architecture, every weight copied: the student computes the teacher's function, so the KL,
    hidden-state and relation terms are all 0."""
    task, model, criterion = build(data_bin, "--teacher-path", teacher, "--init-student-from-teacher", "first",
                                   "--kd-hidden-weight", 1, "--kd-relation-weight", 1, "--kd-attn-weight", 1,
                                   "--arch", "transformer")
    model.eval()
    sample = first_batch(task)
    _, _, log = criterion(model, sample)
    for term in ("kd_loss", "kd_hidden_loss", "kd_relation_loss", "kd_attn_loss"):
        assert log[term].item() == pytest.approx(0, abs=1e-4), (term, log[term])


@pytest.mark.parametrize("positions", [(), ("--encoder-learned-pos", "--decoder-learned-pos")])
def test_narrowing_drops_only_what_the_teacher_does_not_use(data_bin, positions):
    """FFN neurons with no weights in or out are the ones dropped: a student with half the FFN width
    computes the teacher's function exactly; with learned positions, a student of fewer positions takes the
    teacher's first ones."""
    task, teacher, _ = build(data_bin, "--arch", "transformer", "--kd-alpha", 0, *positions)
    _, student, _ = build(data_bin, "--arch", "transformer", "--kd-alpha", 0, "--encoder-ffn-embed-dim", 32,
                          "--decoder-ffn-embed-dim", 32, *positions, "--max-source-positions", 64,
                          "--max-target-positions", 64)
    for layer in (*teacher.encoder.layers, *teacher.decoder.layers):
        unused = torch.randperm(64)[:32]
        layer.fc1.weight.data[unused] = 0
        layer.fc1.bias.data[unused] = 0
        layer.fc2.weight.data[:, unused] = 0
    same_keys = {key: key for key in student.state_dict()}
    student.load_state_dict(narrow_state(teacher.state_dict(), student.state_dict(), same_keys, attention_heads(teacher)))
    teacher.eval(), student.eval()
    net_input = first_batch(task)["net_input"]
    assert torch.allclose(student(**net_input)[0], teacher(**net_input)[0], atol=1e-5)


def test_narrower_student_starts_near_the_teacher(data_bin, teacher):
    """A student of 3/4 the teacher's width (model, FFN, attention heads) starts closer to the teacher's
    predictions from the teacher's projected weights than from random ones (measured: 2.2 against 3.1 nats
    per token; a random basis instead of the embedding's singular directions gives 2.6)."""
    def kl_to_teacher(*flags):
        task, model, criterion = build(data_bin, "--teacher-path", teacher, "--arch", "transformer", "--kd-alpha", 1,
                                       "--encoder-embed-dim", 24, "--decoder-embed-dim", 24, "--encoder-ffn-embed-dim",
                                       48, "--decoder-ffn-embed-dim", 48, *flags)
        model.eval()
        return criterion(model, first_batch(task))[2]["kd_loss"].item()
    assert kl_to_teacher("--init-student-from-teacher", "first") < 0.8 * kl_to_teacher()


@pytest.mark.parametrize("flags, message", [
    (["--no-scale-embedding"], "the student has unscaled embeddings"),
    (["--decoder-normalize-before", "--no-decoder-final-norm"], "the student has pre-norm decoder layers without a final"),
])
def test_a_narrower_student_the_projection_cannot_reproduce_is_refused(data_bin, teacher, flags, message):
    with pytest.raises(FairseqKDError, match=message):
        build(data_bin, "--teacher-path", teacher, "--arch", "transformer", "--init-student-from-teacher", "first",
              "--encoder-embed-dim", 24, "--decoder-embed-dim", 24, *flags)


def test_layer_terms_add_to_the_loss(data_bin, teacher):
    """A student of another width: one projection per pair, trained through the hidden-state term."""
    task, model, criterion = build(data_bin, "--teacher-path", teacher, "--kd-hidden-weight", 0.5,
                                   "--kd-relation-weight", 2, "--encoder-embed-dim", 16, "--decoder-embed-dim", 16)
    sample = first_batch(task)
    loss, _, log = criterion(model, sample)
    _, _, plain = build(data_bin, "--teacher-path", teacher, "--encoder-embed-dim", 16, "--decoder-embed-dim", 16)
    loss_plain, _, _ = plain(model, sample)
    expected = loss_plain + 0.5 * log["kd_hidden_loss"] + 2 * log["kd_relation_loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert [tuple(p.weight.shape) for p in criterion.layer_kd.projections] == [(32, 16), (32, 16)]
    loss.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in criterion.layer_kd.projections)


@pytest.mark.parametrize("flags, message", [
    (["--kd-hidden-weight", -1], "--kd-hidden-weight must be >= 0"),
    (["--kd-attn-weight", 1, "--encoder-embed-dim", 48, "--decoder-embed-dim", 48, "--encoder-attention-heads", 3,
      "--decoder-attention-heads", 3], "the student's enc attention has 3 heads and the teacher's 2"),
    (["--kd-relation-weight", 1, "--kd-hidden-map", "enc:0-3"], "enc layer 3 of the teacher does not exist"),
    (["--init-student-from-teacher", "first", "--encoder-embed-dim", 48, "--decoder-embed-dim", 48],
     "a student starts from a teacher only where the teacher is at least as wide"),
    (["--init-student-from-teacher", "first"],  # the student ties its output layer to its embedding
     "shares one weight between decoder.embed_tokens.weight and decoder.output_projection.weight"),
])
def test_bad_layer_options_are_refused(data_bin, teacher, flags, message):
    with pytest.raises(FairseqKDError) as error:
        build(data_bin, "--teacher-path", teacher, *flags)
    assert message in str(error.value)


def test_layer_terms_need_one_online_teacher(data_bin, teacher):
    with pytest.raises(FairseqKDError, match="give exactly one --teacher-path"):
        build(data_bin, "--teacher-path", f"{teacher}:{teacher}", "--kd-hidden-weight", 1)
