"""Unit tests of the RNNsearch model: shapes, masking, attention, variants."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from nmt import encoder, onednn
from nmt.batching import collate
from nmt.config import ModelConfig
from nmt.model import Seq2Seq
from nmt.tokenizer import BOS, PAD

SRC_VOCAB, TGT_VOCAB = 23, 19
SMALL = ModelConfig(emb_dim=8, enc_hidden=6, dec_hidden=10, attn_dim=7, out_dim=9, dropout=0.0)


def make_model(**changes) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(dataclasses.replace(SMALL, **changes), SRC_VOCAB, TGT_VOCAB).eval()


def sentences(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def batch(src: list[list[int]], tgt: list[list[int]]):
    return collate(src, tgt, list(range(len(src))))


def test_shapes() -> None:
    model = make_model()
    src, tgt = [[5, 6, 7, 8], [9, 10]], [[4, 5, 6], [7]]
    b = batch(src, tgt)
    mem = model.encode(b.src, b.src_lens)
    assert mem.values.shape == (2, 5, 2 * SMALL.enc_hidden)  # 4 pieces + EOS
    assert mem.keys.shape == (2, 5, SMALL.attn_dim)
    assert model.decoder(b.tgt_in, model.init_state(mem), mem).shape == (2, 4, SMALL.out_dim)
    logp, alpha, state = model.step(torch.tensor([BOS, BOS]), model.init_state(mem), mem)
    assert logp.shape == (2, TGT_VOCAB) and alpha.shape == (2, 5)
    assert torch.allclose(logp.exp().sum(1), torch.ones(2))
    assert state.h[0].shape == (2, SMALL.dec_hidden)
    loss, nll = model(b.src, b.src_lens, b.tgt_in, b.tgt_out)
    assert loss.dim() == 0 and torch.equal(loss.detach(), nll)


@pytest.mark.parametrize("changes", [{}, {"cell": "gru"}, {"attention": "none"}, {"layers": 2}])
def test_padding_never_changes_a_sentence_loss(changes: dict) -> None:
    model = make_model(**changes)
    src, tgt = sentences(6, SRC_VOCAB, 1), sentences(6, TGT_VOCAB, 2)
    b = batch(src, tgt)
    together, _ = model(b.src, b.src_lens, b.tgt_in, b.tgt_out, label_smoothing=0.1)
    alone = []
    for s, t in zip(src, tgt, strict=True):
        one = batch([s], [t])
        alone.append(model(one.src, one.src_lens, one.tgt_in, one.tgt_out, label_smoothing=0.1)[0])
    assert torch.allclose(together, torch.stack(alone).sum(), rtol=1e-5, atol=1e-5)


def test_encoder_annotations_ignore_padding() -> None:
    model = make_model()
    b = batch([[5, 6], [5, 6, 7, 8, 9, 10]], [[4], [4]])
    values = model.encoder(b.src, b.src_lens)
    alone = model.encoder(b.src[:1, :3], b.src_lens[:1])
    assert torch.allclose(values[0, :3], alone[0], atol=1e-6)
    assert torch.equal(values[0, 3:], torch.zeros_like(values[0, 3:]))


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("changes", [{}, {"cell": "gru"}, {"layers": 2}])
def test_the_cpu_encoder_matches_the_packed_sequence_one_with_its_gradients(changes: dict, padded: bool) -> None:
    # CPU runs each direction over the padded batch (oneDNN), or both at once when nothing is padded; CUDA and
    # int8 models run packed sequences.
    model = make_model(**changes).train()
    src = sentences(7, SRC_VOCAB, 3) if padded else [[4 + (3 * i + j) % (SRC_VOCAB - 4) for j in range(5)]
                                                      for i in range(7)]
    b = batch(src, sentences(7, TGT_VOCAB, 4))
    grads = []
    for one_way in (True, False):
        model.zero_grad()
        x = model.encoder.embed(b.src)
        for i, rnn in enumerate(model.encoder.rnns):
            out = (encoder._both_ways if one_way else encoder._packed)(rnn, x, b.src_lens)
            x = out + x if i > 0 else out
        (x * torch.linspace(-1, 1, x.numel()).view_as(x)).sum().backward()
        grads.append((x.detach(), [p.grad.clone() for p in model.encoder.parameters()]))
    (mine, my_grads), (packed, packed_grads) = grads
    assert torch.allclose(mine, packed, atol=1e-6)
    assert torch.equal(mine[b.src == PAD], torch.zeros_like(mine[b.src == PAD]))
    for g, h in zip(my_grads, packed_grads, strict=True):
        assert torch.allclose(g, h, atol=1e-5)


@pytest.mark.parametrize("changes", [{}, {"cell": "gru"}, {"layers": 2}, {"cell": "gru", "layers": 3}])
def test_the_cpu_inference_encoder_gives_the_training_one_and_each_source_what_it_gets_alone(changes: dict) -> None:
    # Without autograd a padded batch runs Encoder._infer (both directions together, real positions only).
    model = make_model(**changes)
    src = sentences(9, SRC_VOCAB, 5) + [[4] * 12]
    b = batch(src, sentences(10, TGT_VOCAB, 6))
    with torch.inference_mode():
        fast = model.encoder(b.src, b.src_lens)
        alone = [model.encoder(b.src[i:i + 1, :len(s) + 1], b.src_lens[i:i + 1]) for i, s in enumerate(src)]
    trained = model.encoder(b.src, b.src_lens)  # with autograd: oneDNN's RNN, a direction at a time
    assert torch.allclose(fast, trained, atol=1e-6)
    assert torch.equal(fast[b.src == PAD], torch.zeros_like(fast[b.src == PAD]))
    for i, one in enumerate(alone):
        assert torch.allclose(fast[i, :len(src[i]) + 1], one[0], atol=1e-6)
    with torch.no_grad():  # weights changed in place (an optimizer step) are read anew
        model.encoder.rnns[0].weight_hh_l0_reverse.mul_(-0.5)
        changed = model.encoder(b.src, b.src_lens)
    assert not torch.allclose(changed, fast, atol=1e-3)
    assert torch.allclose(changed, model.encoder(b.src, b.src_lens), atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_cpu_inference_encoder_takes_other_dtypes_and_weights_made_without_autograd(cell: str) -> None:
    b = batch(sentences(5, SRC_VOCAB, 7), sentences(5, TGT_VOCAB, 8))
    model = make_model(cell=cell)
    expected = model.encoder(b.src, b.src_lens)
    with torch.no_grad():
        model.encoder(b.src, b.src_lens)  # weights cached in float32, then converted: cached again
    half = model.encoder.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.allclose(half(b.src, b.src_lens).float(), expected, atol=0.05)
    with torch.inference_mode():  # inference tensors have no version counter to key a cache on
        made = make_model(cell=cell)
        assert torch.allclose(made.encoder(b.src, b.src_lens), expected, atol=1e-6)


@pytest.mark.parametrize("changes", [{}, {"layers": 2}])
def test_inference_hoisting_gives_the_training_arithmetic(changes: dict) -> None:
    # At inference the memory holds W_c h_j and W_oc h_j, and the decoder weighs them instead of forming c_i.
    model = make_model(**changes)
    b = batch(sentences(5, SRC_VOCAB, 5), sentences(5, TGT_VOCAB, 6))
    rows, hoist = [], model.decoder.hoist
    model.decoder.hoist = lambda values: rows.append(tuple(values.shape[:-1])) or hoist(values)
    hoisted = model.encode(b.src, b.src_lens)
    del model.decoder.hoist
    assert rows == [(int((b.src != PAD).sum()),)]  # only the real positions are projected
    assert hoisted.value_gates is not None and hoisted.value_readout is not None
    eval_loss, _ = model(b.src, b.src_lens, b.tgt_in, b.tgt_out)
    train_loss, _ = model.train()(b.src, b.src_lens, b.tgt_in, b.tgt_out)  # dropout 0: the same function
    assert model.encode(b.src, b.src_lens).value_readout is None
    assert torch.allclose(eval_loss, train_loss, rtol=1e-5)
    # Computed at the real positions only, the hoisted projections are those of every position, zero at padding.
    values, real = hoisted.values, b.src != PAD
    assert not real.all()
    gates, readout = model.decoder.hoist(values)
    for got, want in ((hoisted.keys, model.decoder.attention.keys(values)), (hoisted.value_gates, gates),
                      (hoisted.value_readout, readout)):
        assert torch.allclose(got, want, atol=1e-6) and not got[~real].any()


@pytest.mark.parametrize("changes", [{}, {"cell": "gru", "layers": 2}, {"attention": "none"}])
def test_packed_weights_change_inference_only_by_rounding(changes: dict, monkeypatch) -> None:
    plain, packed = make_model(**changes), make_model(**changes)
    if not packed.decoder.pack_weights():
        pytest.skip("this torch build has no oneDNN matmul")
    calls = []
    original = onednn.PackedLinear.__call__
    monkeypatch.setattr(onednn.PackedLinear, "__call__", lambda self, x: calls.append(1) or original(self, x))
    b = batch(sentences(5, SRC_VOCAB, 7), sentences(5, TGT_VOCAB, 8))
    with torch.no_grad():
        mems = [m.encode(b.src, b.src_lens) for m in (plain, packed)]
        states = [m.init_state(mem) for m, mem in zip((plain, packed), mems, strict=True)]
        for t in range(b.tgt_in.size(1)):
            steps = [m.step(b.tgt_in[:, t], state, mem) for m, state, mem in zip((plain, packed), states, mems,
                                                                                 strict=True)]
            (want, _, states[0]), (got, _, states[1]) = steps
            assert torch.allclose(got, want, atol=1e-5)
    assert calls  # the packed matmuls did the work
    # Training, and anything recording gradients, runs torch's own layers, with gradients.
    calls.clear()
    for training in (True, False):
        loss, _ = packed.train(training)(b.src, b.src_lens, b.tgt_in, b.tgt_out)
        loss.backward()
        assert packed.decoder.hidden_proj.weight.grad is not None
    assert not calls


def test_packed_weights_follow_the_live_weights() -> None:
    model = make_model()
    if not model.decoder.pack_weights():
        pytest.skip("this torch build has no oneDNN matmul")
    b = batch(sentences(4, SRC_VOCAB, 9), sentences(4, TGT_VOCAB, 10))

    @torch.no_grad()
    def first_step(m: Seq2Seq) -> torch.Tensor:
        mem = m.encode(b.src, b.src_lens)
        return m.step(b.tgt_in[:, 0], m.init_state(mem), mem)[0]

    before = first_step(model)  # packs
    with torch.no_grad():  # in place, as an optimizer step or load_state_dict changes them
        for p in model.parameters():
            p.mul_(1.5)
    plain = make_model()
    plain.load_state_dict(model.state_dict())
    want = first_step(plain)
    assert not torch.allclose(before, want)
    assert torch.allclose(first_step(model), want, atol=1e-5)
    assert torch.allclose(first_step(copy.deepcopy(model)), want, atol=1e-5)  # a copy packs its own



def test_packed_weights_of_a_model_made_under_inference_mode() -> None:
    # Inference tensors keep no version counter: their packed copies are made at each use, not kept.
    plain = make_model()
    with torch.inference_mode():
        made = make_model()
        if not made.decoder.pack_weights(int8=False):
            pytest.skip("this torch build has no oneDNN matmul")
        b = batch(sentences(4, SRC_VOCAB, 9), sentences(4, TGT_VOCAB, 10))
        steps = []
        for m in (plain, made):
            mem = m.encode(b.src, b.src_lens)
            steps.append(m.step(b.tgt_in[:, 0], m.init_state(mem), mem)[0])
    assert torch.allclose(steps[1], steps[0], atol=1e-5)

def test_attention_sums_to_one_and_skips_padding() -> None:
    model = make_model()
    b = batch([[5, 6], [5, 6, 7, 8, 9, 10], [7]], [[4], [4], [4]])
    mem = model.encode(b.src, b.src_lens)
    state = model.init_state(mem)
    prev = torch.full((3,), BOS)
    for _ in range(3):
        logp, alpha, state = model.step(prev, state, mem)
        assert torch.allclose(alpha.sum(1), torch.ones(3))
        assert torch.equal(alpha[b.src == PAD], torch.zeros(int((b.src == PAD).sum())))
        assert bool((alpha[b.src != PAD] > 0).all())
        prev = logp.argmax(1)


@pytest.mark.parametrize("changes", [{}, {"cell": "gru", "layers": 2}, {"attention": "none"}])
def test_teacher_forcing_matches_step_by_step_decoding(changes: dict) -> None:
    """The hoisted teacher-forced pass computes what the one-step inference path computes."""
    model = make_model(**changes)
    b = batch([[5, 6, 7], [8, 9]], [[4, 5, 6, 7], [8]])
    mem = model.encode(b.src, b.src_lens)
    forced = torch.log_softmax(model.decoder.out(model.decoder(b.tgt_in, model.init_state(mem), mem)), dim=-1)
    state = model.init_state(mem)
    for t in range(b.tgt_in.size(1)):
        logp, _, state = model.step(b.tgt_in[:, t], state, mem)
        assert torch.allclose(logp, forced[:, t], atol=1e-5)


@pytest.mark.parametrize("changes", [{"cell": "gru"}, {"attention": "none"}, {"layers": 2, "dropout": 0.2},
                                     {"tie_embeddings": True, "out_dim": 8}])
def test_variants_train(changes: dict) -> None:
    model = make_model(**changes).train()
    b = batch(sentences(8, SRC_VOCAB, 3), sentences(8, TGT_VOCAB, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = model(b.src, b.src_lens, b.tgt_in, b.tgt_out, label_smoothing=0.1)
        loss.backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_attention_none_has_no_attention_weights() -> None:
    model = make_model(attention="none")
    b = batch([[5, 6]], [[4]])
    mem = model.encode(b.src, b.src_lens)
    _, alpha, _ = model.step(torch.tensor([BOS]), model.init_state(mem), mem)
    assert alpha is None and model.decoder.attention is None


def test_tied_embeddings_share_storage() -> None:
    tied, untied = make_model(tie_embeddings=True, out_dim=8), make_model(out_dim=8)
    assert tied.decoder.out.weight is tied.decoder.embed.weight
    assert tied.decoder.out.weight.data_ptr() == tied.decoder.embed.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == TGT_VOCAB * 8
    assert torch.equal(tied.decoder.embed.weight[PAD], torch.zeros(8))


def test_padding_embeddings_get_no_gradient() -> None:
    model = make_model().train()
    b = batch([[5, 6], [5, 6, 7, 8]], [[4], [4, 5, 6]])
    model(b.src, b.src_lens, b.tgt_in, b.tgt_out)[0].backward()
    assert torch.equal(model.encoder.embed.weight.grad[PAD], torch.zeros(SMALL.emb_dim))
    assert torch.equal(model.decoder.embed.weight.grad[PAD], torch.zeros(SMALL.emb_dim))
