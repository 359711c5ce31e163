"""Beam search: greedy equivalence, batch independence, n-best, length penalty, limits, a hand-built toy model."""

from __future__ import annotations

import copy
import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nmt.onednn
import nmt.search
from nmt.batching import collate
from nmt.checkpoint import load_checkpoint
from nmt.config import ModelConfig, from_dict
from nmt.decoder import Decoder, Memory, MemorySlots
from nmt.model import Seq2Seq
from nmt.search import BeamSearch, beam_search, best_candidates, length_penalty, ngram_bans, search_ids
from nmt.shortlist import Shortlist, shortlist_from_corpus
from nmt.tokenizer import BOS, EOS, PAD, UNK, Tokenizer

# ----------------------------------------------------------------------------------------------------------
# A hand-built model: next-token probabilities looked up by prefix in a table
# ----------------------------------------------------------------------------------------------------------

A, B, C = 4, 5, 6
VOCAB = 7


@dataclass
class PrefixState:
    """The tokens decoded so far, one row per beam (what a real decoder's state summarizes)."""

    rows: list[tuple[int, ...]]

    def select(self, index: torch.Tensor) -> PrefixState:
        return PrefixState([self.rows[i] for i in index.tolist()])

    @staticmethod
    def cat(parts: list[PrefixState]) -> PrefixState:
        return PrefixState([row for p in parts for row in p.rows])


class ToyModel(torch.nn.Module):
    """Seq2Seq's decoding interface over a table {prefix: {token: probability}}; unlisted prefixes end."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]]):
        super().__init__()
        self.table = table
        self.decoder = torch.nn.Module()
        self.decoder.attention = None

    def encode(self, src: torch.Tensor, lens: torch.Tensor) -> Memory:
        n, s = src.shape
        return Memory(torch.zeros(n, s, 1), None, torch.zeros(n, s), torch.zeros(n, 1), None)

    def init_state(self, mem: Memory) -> PrefixState:
        return PrefixState([() for _ in range(mem.values.size(0))])

    def step(self, prev: torch.Tensor, state: PrefixState, mem: Memory, vocab: None = None):
        rows = [row if p == BOS else (*row, p) for row, p in zip(state.rows, prev.tolist(), strict=True)]
        probs = torch.full((len(rows), VOCAB), 1e-6)
        for i, row in enumerate(rows):
            for token, p in self.table.get(row, {EOS: 1.0}).items():
                probs[i, token] = p
        return torch.log(probs / probs.sum(1, keepdim=True)), None, PrefixState(rows)


def toy_src(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, 3), A), torch.full((n,), 3)


def decode_toy(model: ToyModel, **kwargs) -> list:
    src, lens = toy_src()
    return beam_search(model, src, lens, **kwargs)[0]


def test_beam_finds_a_better_sequence_than_greedy():
    # Greedy takes A (0.6) and then has only 0.34 for EOS; B (0.4) then EOS (0.9) is the better sentence.
    model = ToyModel({(): {A: 0.6, B: 0.4}, (A,): {EOS: 0.34, B: 0.33, C: 0.33}, (B,): {EOS: 0.9, C: 0.1}})
    greedy = decode_toy(model, beam_size=1)[0]
    beam = decode_toy(model, beam_size=3)[0]
    assert greedy.tokens == [A]
    assert beam.tokens == [B]
    assert beam.logprob > greedy.logprob
    assert beam.logprob == pytest.approx(math.log(0.4 * 0.9), abs=1e-4)


def test_length_penalty_prefers_longer_outputs_as_alpha_grows():
    # "A" has log-prob log 0.5; "B C" has log 0.495, a little lower, but is a token longer.
    model = ToyModel({(): {A: 0.5, B: 0.5}, (A,): {EOS: 1.0}, (B,): {C: 1.0}, (B, C): {EOS: 0.99, A: 0.01}})
    assert decode_toy(model, beam_size=4, alpha=0.0)[0].tokens == [A]
    best = decode_toy(model, beam_size=4, alpha=1.0)[0]
    assert best.tokens == [B, C]
    assert best.score == pytest.approx(math.log(0.495) / length_penalty(3, 1.0), abs=1e-4)
    # GNMT's ((5 + |Y|) / 6) ** alpha, by hand: the checks above hold for other shapes of penalty too.
    assert (length_penalty(3, 1.0), length_penalty(7, 0.5), length_penalty(9, 0.0)) == pytest.approx(
        (8 / 6, 2 ** 0.5, 1.0))


def test_n_best_is_sorted_and_distinct():
    model = ToyModel({(): {A: 0.5, B: 0.3, C: 0.2}, (A,): {EOS: 0.4, B: 0.6}, (B,): {EOS: 0.6, A: 0.4},
                      (C,): {EOS: 1.0}})
    hyps = decode_toy(model, beam_size=5, n_best=5)
    scores = [h.score for h in hyps]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(h.tokens) for h in hyps}) == len(hyps) >= 4
    assert hyps[0].tokens == [A, B]


def test_ban_unk_and_repeat_blocking():
    model = ToyModel({(): {UNK: 0.9, A: 0.1}, (A,): {A: 0.95, EOS: 0.05}, (A, A): {A: 0.9, EOS: 0.1},
                      (A, A, A): {A: 0.9, EOS: 0.1}})
    assert decode_toy(model, beam_size=2)[0].tokens == [UNK]
    assert UNK not in decode_toy(model, beam_size=2, ban_unk=True)[0].tokens
    assert decode_toy(model, beam_size=2, ban_unk=True, no_repeat_ngram=1)[0].tokens == [A]
    assert decode_toy(model, beam_size=2, ban_unk=True, no_repeat_ngram=2)[0].tokens == [A, A]


def test_max_and_min_length():
    # Ending is always possible but unlikely before 10 tokens: beams must not stop at the first cheap EOS.
    ten = ToyModel({(): {A: 1.0}, **{(A,) * n: {A: 0.99, EOS: 0.01} if n < 10 else {EOS: 0.99, A: 0.01}
                                     for n in range(1, 40)}})
    src, lens = toy_src()  # 2 real pieces (and EOS)
    for beam in (1, 2, 5):
        assert len(beam_search(ten, src, lens, beam_size=beam, max_len_b=20)[0][0].tokens) == 10
        capped = beam_search(ten, src, lens, beam_size=beam, n_best=beam, max_len_a=1.5, max_len_b=4)[0]
        assert max(len(h.tokens) for h in capped) <= 7
    assert len(beam_search(ten, src, lens, beam_size=1, max_len_a=1.5, max_len_b=4)[0][0].tokens) == 7
    quick = ToyModel({(): {EOS: 0.9, A: 0.1}})
    assert decode_toy(quick, beam_size=2)[0].tokens == []
    forced = decode_toy(quick, beam_size=2, min_len=5, max_len_a=0.0, max_len_b=5)[0]
    assert len(forced.tokens) == 5


def test_n_best_must_fit_the_beam():
    with pytest.raises(ValueError, match="n_best"):
        decode_toy(ToyModel({}), beam_size=2, n_best=3)


# ----------------------------------------------------------------------------------------------------------
# The tiny trained model (tests/conftest.py)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_run: Path) -> tuple[Seq2Seq, Tokenizer, list[list[int]]]:
    state = load_checkpoint(tiny_run / "best.pt")
    cfg = from_dict(state["config"])
    model = Seq2Seq(cfg.model, state["vocab"]["src"], state["vocab"]["tgt"])
    model.load_state_dict(state["model"])
    src_tok = Tokenizer(tiny_run / "src.model")
    lines = (Path(cfg.data.dir) / "test.src").read_text(encoding="utf-8").splitlines()[:40]
    return model.eval(), src_tok, src_tok.encode_batch(lines)


def int8_copy(model: Seq2Seq) -> Seq2Seq:
    """A copy of the model decoding with int8 matmuls (skips the test where this torch build has none)."""
    quantized = copy.deepcopy(model)
    if not quantized.decoder.pack_weights(int8=True) or not quantized.decoder.packs_int8:
        pytest.skip("this torch build has no oneDNN int8 matmul")
    return quantized


def one(model: Seq2Seq, ids: list[int], **kwargs) -> list:
    batch = collate([ids], None, [0])
    return beam_search(model, batch.src, batch.src_lens, **kwargs)[0]


@torch.no_grad()
def naive_greedy(model: Seq2Seq, ids: list[int], max_len_a: float, max_len_b: int) -> tuple[list[int], float]:
    """Argmax decoding written out plainly: the reference for beam size 1."""
    batch = collate([ids], None, [0])
    mem = model.encode(batch.src, batch.src_lens)
    state = model.init_state(mem)
    prev, out, total = torch.tensor([BOS]), [], 0.0
    limit = max(1, int(max_len_a * len(ids) + max_len_b))
    for step in range(limit + 1):
        logp, _, state = model.step(prev, state, mem)
        logp[:, PAD] = logp[:, BOS] = float("-inf")
        token = EOS if step == limit else int(logp[0].argmax())
        total += float(logp[0, token])
        if token == EOS:
            break
        out.append(token)
        prev = torch.tensor([token])
    return out, total


def test_beam_one_is_greedy(tiny):
    model, _, sentences = tiny
    for ids in sentences[:20]:
        tokens, total = naive_greedy(model, ids, 1.5, 5)
        for hyp in (one(model, ids, beam_size=1, max_len_b=5)[0],
                    beam_search(model, *_batch(ids), beam_size=1, max_len_b=5)[0][0]):
            assert hyp.tokens == tokens
            assert hyp.logprob == pytest.approx(total, abs=1e-4)
    short, _ = naive_greedy(model, sentences[0], 0.0, 2)
    assert one(model, sentences[0], beam_size=1, max_len_a=0.0, max_len_b=2)[0].tokens == short


def _batch(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate([ids], None, [0])
    return batch.src, batch.src_lens


def assert_same(batched: list, single: list) -> None:
    assert [h.tokens for h in batched] == [h.tokens for h in single]
    for x, y in zip(batched, single, strict=True):
        assert x.score == pytest.approx(y.score, abs=1e-4)
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        if x.attention is not None:
            assert x.attention.shape == y.attention.shape
            assert torch.allclose(x.attention, y.attention, atol=1e-4)


# The shipped source-length groups, and small ones that spread these short test sentences over all three groups.
GROUPINGS = [nmt.search.SOURCE_GROUPS, (3, 6)]


@pytest.mark.parametrize("groups", GROUPINGS)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("chunked_from", [nmt.search.CHUNKED_FROM, 500])
def test_batched_equals_one_by_one(tiny, groups, int8, chunked_from, monkeypatch):
    # chunked_from 500: the whole batch's candidates go through best_candidates' chunks, one sentence's (5 beams x
    # a vocabulary of 40) through a single top-k.
    monkeypatch.setattr(nmt.search, "SOURCE_GROUPS", groups)
    monkeypatch.setattr(nmt.search, "CHUNKED_FROM", chunked_from)
    model, _, sentences = tiny
    model = int8_copy(model) if int8 else model
    mixed = sorted(sentences, key=len)[::3] + [[4], sentences[0] * 3]  # short, long, repeated
    random.Random(0).shuffle(mixed)
    opts = {"beam_size": 5, "n_best": 3, "alpha": 1.0, "return_attention": True}
    batched = search_ids(model, mixed, 10_000, torch.device("cpu"), **opts)
    tiny_batches = search_ids(model, mixed, 10, torch.device("cpu"), **opts)  # one or two sentences a batch
    for ids, b, t in zip(mixed, batched, tiny_batches, strict=True):
        single = one(model, ids, **opts)
        assert_same(b, single)
        assert_same(t, single)
        for h in b:
            assert h.attention.shape == (len(h.tokens) + 1, len(ids) + 1)
            assert torch.allclose(h.attention.sum(1), torch.ones(len(h.tokens) + 1), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 300), st.integers(0, 2**32 - 1), st.booleans())
def test_best_candidates_are_those_of_one_top_k_over_each_sentence(n, k, width, seed, coarse):
    # Through chunks or not, the same totals, best first, at distinct places that hold them; ties (coarse values)
    # and -inf (banned pieces) included.
    generator = torch.Generator().manual_seed(seed)
    logp = torch.randn(n * k, width, generator=generator)
    if coarse:
        logp = logp.round()
    logp[torch.rand(n * k, width, generator=generator) < 0.3] = float("-inf")
    scores = torch.randn(n * k, generator=generator).round(decimals=1)
    count = min(2 * k, k * width)
    totals = (scores.view(-1, 1) + logp).view(n, -1)
    expected = totals.topk(count, dim=1).values
    for chunked_from in (0, 10**9):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(nmt.search, "CHUNKED_FROM", chunked_from)
            top, beam, column = best_candidates(scores, logp, n, count)
        assert torch.equal(top, expected)
        assert bool((beam < k).all()) and bool((column < width).all())
        assert torch.equal(totals.gather(1, beam * width + column), top)
        assert all(len(set(row)) == count for row in (beam * width + column).tolist())


@pytest.mark.parametrize("beam", [1, 5])
def test_the_batch_budget_counts_padded_source_tokens_whatever_the_beam(tiny, beam, monkeypatch):
    # It was divided by the beam size, and each end of sentence counted twice: `nmt translate` batched 5x fewer
    # sentences than the service under the same number.
    model, _, _ = tiny
    sizes = []
    real = nmt.search.beam_search

    def spy(model, src, lens, **kwargs):
        sizes.append(tuple(src.shape))
        return real(model, src, lens, **kwargs)

    monkeypatch.setattr(nmt.search, "beam_search", spy)
    search_ids(model, [[5, 6, 7, 8]] * 9, 20, torch.device("cpu"), beam_size=beam)
    assert sizes == [(4, 5), (4, 5), (1, 5)]  # 4 x (4 pieces + </s>) = 20


def test_n_best_sorted_distinct_and_limited(tiny):
    model, _, sentences = tiny
    for ids in sentences[:10]:
        hyps = one(model, ids, beam_size=6, n_best=6, alpha=0.6, max_len_a=1.0, max_len_b=2)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)
        assert all(len(h.tokens) <= len(ids) + 2 for h in hyps)
        assert all(h.score == pytest.approx(h.logprob / length_penalty(len(h.tokens) + 1, 0.6)) for h in hyps)


def test_forced_length(tiny):
    model, _, sentences = tiny
    for hyps in search_ids(model, sentences[:8], 2000, torch.device("cpu"), beam_size=3, min_len=15,
                           max_len_a=0.0, max_len_b=15):
        assert len(hyps[0].tokens) == 15


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.sampled_from([UNK, *range(4, 37)]), max_size=20), min_size=1, max_size=6),
       st.sampled_from([1, 3]))
def test_property_batch_never_changes_a_sentence(tiny, sentences, beam):
    model = tiny[0]
    batched = search_ids(model, sentences, 10_000, torch.device("cpu"), beam_size=beam, n_best=beam, alpha=1.0)
    for ids, hyps in zip(sentences, batched, strict=True):
        assert_same(hyps, one(model, ids, beam_size=beam, n_best=beam, alpha=1.0))


# ----------------------------------------------------------------------------------------------------------
# Decoding over a lexical shortlist
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_shortlist(tiny_run: Path) -> Shortlist:
    """On the reverse task, each source letter's best candidate is the same letter on the target side."""
    data = Path(from_dict(load_checkpoint(tiny_run / "last.pt")["config"]).data.dir)
    shortlist = shortlist_from_corpus(data, Tokenizer(tiny_run / "src.model"), Tokenizer(tiny_run / "tgt.model"))
    assert shortlist is not None
    return shortlist


def one_listed(model: Seq2Seq, ids: list[int], lists, **kwargs) -> list:
    batch = collate([ids], None, [0])
    return beam_search(model, batch.src, batch.src_lens, shortlist=lists(batch.src), **kwargs)[0]


def test_shortlisted_batches_equal_one_by_one_and_use_only_each_sentence_list(tiny, tiny_shortlist):
    model, _, sentences = tiny
    lists = functools.partial(tiny_shortlist.for_batch, frequent=0, per_source=1)
    mixed = sorted(sentences, key=len)[::3] + [[4], sentences[0] * 3]
    random.Random(1).shuffle(mixed)
    opts = {"beam_size": 5, "n_best": 3, "alpha": 1.0, "return_attention": True}
    batched = search_ids(model, mixed, 10_000, torch.device("cpu"), shortlist=lists, **opts)
    tiny_batches = search_ids(model, mixed, 40, torch.device("cpu"), shortlist=lists, **opts)
    for ids, b, t in zip(mixed, batched, tiny_batches, strict=True):
        single = one_listed(model, ids, lists, **opts)
        assert_same(b, single)
        assert_same(t, single)
        allowed = set(tiny_shortlist.per_source[ids, 0].tolist())
        assert all(token in allowed for h in b for token in h.tokens)


def test_a_shortlist_of_the_source_letters_still_reverses(tiny, tiny_shortlist):
    model, _, sentences = tiny
    lists = functools.partial(tiny_shortlist.for_batch, frequent=0, per_source=1)
    full = search_ids(model, sentences, 10_000, torch.device("cpu"), beam_size=5)
    listed = search_ids(model, sentences, 10_000, torch.device("cpu"), beam_size=5, shortlist=lists)
    same = sum(f[0].tokens == s[0].tokens for f, s in zip(full, listed, strict=True))
    assert same >= 0.9 * len(sentences)


@pytest.mark.parametrize("int8", [False, True])
def test_a_shortlist_of_the_whole_vocabulary_decodes_like_none(tiny, tiny_shortlist, int8):
    model, _, sentences = tiny
    if int8:  # the shortlisted rows are packed anew: they must give the layer's own logits
        model = int8_copy(model)
    everything = functools.partial(tiny_shortlist.for_batch, frequent=model.decoder.out.out_features, per_source=0)
    opts = {"beam_size": 4, "n_best": 2, "alpha": 0.6, "no_repeat_ngram": 2}
    full = search_ids(model, sentences, 10_000, torch.device("cpu"), **opts)
    listed = search_ids(model, sentences, 10_000, torch.device("cpu"), shortlist=everything, **opts)
    for f, s in zip(full, listed, strict=True):
        assert_same(s, f)


@pytest.mark.parametrize("listed", [False, True])
def test_packed_weights_decode_as_torch_layers_do(tiny, tiny_shortlist, listed, monkeypatch):
    model, _, sentences = tiny
    packed = copy.deepcopy(model)
    if not packed.decoder.pack_weights():
        pytest.skip("this torch build has no oneDNN matmul")
    lists = functools.partial(tiny_shortlist.for_batch, frequent=0, per_source=2) if listed else None
    opts = {"beam_size": 4, "n_best": 2, "alpha": 0.6, "return_attention": True, "shortlist": lists}
    want = search_ids(model, sentences, 10_000, torch.device("cpu"), **opts)
    weights = []  # of each packed matmul the search runs
    original = nmt.onednn.PackedLinear.__call__
    monkeypatch.setattr(nmt.onednn.PackedLinear, "__call__", lambda self, x: weights.append(self.weight) or
                        original(self, x))
    got = search_ids(packed, sentences, 10_000, torch.device("cpu"), **opts)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    # Over a shortlist, the output layer is packed per batch for the batch's list; else it is the whole
    # vocabulary's packed layer.
    out = model.decoder.out
    listed_rows = [w for w in weights if w.size(1) == out.in_features and w.size(0) < out.out_features]
    assert bool(listed_rows) == listed
    whole = packed.decoder._packed.cached("out")
    assert (whole._packed is None) == listed  # the whole vocabulary is packed only where it is used


def test_ngram_blocking_bans_the_right_pieces_on_a_shortlist(tiny, tiny_shortlist):
    model, _, sentences = tiny
    lists = functools.partial(tiny_shortlist.for_batch, frequent=0, per_source=1)
    repeating = [ids for ids in sentences if len(set(ids)) < len(ids)]  # letters that come back
    assert repeating
    for ids in repeating:  # alone, so that the list's positions are not the pieces' ids
        tokens = one_listed(model, ids, lists, beam_size=3, no_repeat_ngram=1)[0].tokens
        assert len(set(tokens)) == len(tokens)


# ----------------------------------------------------------------------------------------------------------
# Continuous batching: sentences join a running search between steps
# ----------------------------------------------------------------------------------------------------------


def run_staggered(search: BeamSearch, sentences: list[list[int]], joins: list[int], lists=None) -> dict:
    """Add sentence i after joins[i] more steps of the running search; step until all are done."""
    results: dict[int, list] = {}
    pending = list(range(len(sentences)))
    while pending or len(search):
        while pending and joins[pending[0]] == 0:
            group = [pending.pop(0)]
            while pending and joins[pending[0]] == 0 and len(group) < 2:
                group.append(pending.pop(0))
            batch = collate([sentences[i] for i in group], None, group)
            search.add(group, batch.src, batch.src_lens, None if lists is None else lists(batch.src))
        if pending:
            joins[pending[0]] -= 1
        results.update(search.step())
    return results


@pytest.mark.parametrize("groups", GROUPINGS)
@pytest.mark.parametrize("listed", [False, True])
@pytest.mark.parametrize("int8", [False, True])
def test_sentences_joining_a_running_search_get_what_they_get_alone(tiny, tiny_shortlist, listed, groups, int8,
                                                                    monkeypatch):
    monkeypatch.setattr(nmt.search, "SOURCE_GROUPS", groups)
    model, _, sentences = tiny
    model = int8_copy(model) if int8 else model
    lists = functools.partial(tiny_shortlist.for_batch, frequent=3, per_source=1) if listed else None
    mixed = sorted(sentences, key=len)[::4] + [[4], sentences[0] * 3]
    random.Random(2).shuffle(mixed)
    joins = [random.Random(i).choice([0, 0, 1, 3, 7]) for i in range(len(mixed))]
    for opts in ({"beam_size": 5, "n_best": 3, "alpha": 1.0, "return_attention": True},
                 {"beam_size": 3, "n_best": 1, "min_len": 4, "no_repeat_ngram": 2}):
        results = run_staggered(BeamSearch(model, **opts), mixed, list(joins), lists)
        assert sorted(results) == list(range(len(mixed)))
        for i, ids in enumerate(mixed):
            alone = one_listed(model, ids, lists, **opts) if listed else one(model, ids, **opts)
            assert_same(results[i], alone)


def test_a_join_keeps_only_the_pieces_the_sentences_decoding_list(tiny, tiny_shortlist):
    # A join that brings new pieces gathers and packs the output rows anew: those only a sentence that left listed
    # go then (each cost a column of the output layer at every step), however few. A join that brings none keeps
    # the packed rows.
    model, _, sentences = tiny
    lists = functools.partial(tiny_shortlist.for_batch, frequent=3, per_source=1)

    def listed(*batch: list[int]) -> torch.Tensor:
        return lists(collate(list(batch), None, list(range(len(batch)))).src)[0]

    def own(sentence: list[int], *others: list[int]) -> bool:
        return bool(torch.isin(listed(sentence), listed(*others), invert=True).any())

    long = max(sentences, key=len)
    # One-piece sentences that each list a piece of their own: 1 of the batch's list, which a step would keep.
    gone, new = next(([p], [q]) for p in range(4, 37) for q in range(4, 37)
                     if own([p], long, [q]) and own([q], long, [p]))
    search = BeamSearch(model, beam_size=3)
    for keys, batch in ((["long", "gone"], [long, gone]), (["again"], [long]), (["new"], [new])):
        packed = search.vocab
        padded = collate(batch, None, list(range(len(batch))))
        search.add(keys, padded.src, padded.src_lens, lists(padded.src))
        if "gone" in keys:
            search.drop(["gone"])
            search.step()
            assert bool(torch.isin(listed(gone), search.vocab_ids).all())
        if "again" in keys:
            assert search.vocab is packed
    assert torch.equal(search.vocab_ids, listed(long, new))


@pytest.mark.parametrize("groups", GROUPINGS)
@pytest.mark.parametrize("changes", [{"cell": "gru", "layers": 2}, {"attention": "none"}])
def test_joining_works_for_every_decoder_variant(changes, groups, monkeypatch):
    monkeypatch.setattr(nmt.search, "SOURCE_GROUPS", groups)
    torch.manual_seed(0)
    cfg = ModelConfig(emb_dim=16, enc_hidden=12, dec_hidden=20, attn_dim=10, out_dim=14, dropout=0.0, **changes)
    model = Seq2Seq(cfg, 30, 25).eval()
    rng = random.Random(3)
    sentences = [[rng.randrange(4, 30) for _ in range(rng.randint(1, 9))] for _ in range(10)]
    opts = {"beam_size": 3, "n_best": 2, "max_len_b": 6, "return_attention": True}
    results = run_staggered(BeamSearch(model, **opts), sentences, [rng.choice([0, 1, 2, 4]) for _ in sentences])
    for i, ids in enumerate(sentences):
        assert_same(results[i], one(model, ids, **opts))


@pytest.mark.parametrize("groups", GROUPINGS)
def test_extra_padding_columns_change_nothing(tiny, groups, monkeypatch):
    # The memory parts are cut to their longest source: attention comes back as wide as the sources, not the batch.
    monkeypatch.setattr(nmt.search, "SOURCE_GROUPS", groups)
    model, _, sentences = tiny
    mixed = sorted(sentences, key=len)[::5]
    batch = collate(mixed, None, list(range(len(mixed))))
    wide = torch.cat([batch.src, torch.full((len(mixed), 4), PAD, dtype=torch.long)], dim=1)
    opts = {"beam_size": 3, "n_best": 2, "return_attention": True}
    for ids, hyps in zip(mixed, beam_search(model, wide, batch.src_lens, **opts), strict=True):
        assert_same(hyps, one(model, ids, **opts))


@pytest.mark.parametrize(("listed", "fails"), [(False, "memory"), (True, "memory"), (True, "vocabulary")])
def test_a_join_that_fails_part_way_leaves_the_search_as_it_was(tiny, tiny_shortlist, listed, fails, monkeypatch):
    monkeypatch.setattr(nmt.search, "SOURCE_GROUPS", (3, 6))
    model, _, sentences = tiny
    lists = functools.partial(tiny_shortlist.for_batch, frequent=3, per_source=1) if listed else None
    running = [min(sentences, key=len), max(sentences, key=len)]
    joining = [s for s in sentences if len(s) < 5][:1] + [s for s in sentences if len(s) > 6][:1]  # two groups
    opts = {"beam_size": 3, "n_best": 2, "return_attention": True}
    search = BeamSearch(model, **opts)
    batch = collate(running, None, [0, 1])
    search.add([0, 1], batch.src, batch.src_lens, None if lists is None else lists(batch.src))
    results = dict(search.step())

    def slots_now():
        return [(slots.size, slots.capacity, slots.width, slots._buf) for slots in search.slots]

    before, vocab = slots_now(), search.vocab
    tried = []

    def failing(*args, **kwargs):
        tried.append(1)
        if fails == "vocabulary" or len(tried) == 2:
            raise MemoryError("no room")
        return real(*args, **kwargs)

    owner, name = (MemorySlots, "stage") if fails == "memory" else (Decoder, "output_vocab")
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, failing)
    batch = collate(joining, None, [0, 1])
    with pytest.raises(MemoryError):
        search.add(["a", "b"], batch.src, batch.src_lens, None if lists is None else lists(batch.src))
    monkeypatch.setattr(owner, name, real)
    assert tried and len(search) == 2 and search.vocab is vocab
    assert all(a[:3] == b[:3] and a[3] is b[3] for a, b in zip(slots_now(), before, strict=True))
    while len(search):
        results.update(search.step())
    for key, ids in enumerate(running):
        expected = one_listed(model, ids, lists, **opts) if listed else one(model, ids, **opts)
        assert_same(results[key], expected)


def test_a_search_refuses_keys_already_decoding_and_mixed_shortlists(tiny, tiny_shortlist):
    model, _, sentences = tiny
    search = BeamSearch(model, beam_size=2)
    batch = collate(sentences[:2], None, [0, 1])
    search.add(["a", "b"], batch.src, batch.src_lens)
    with pytest.raises(ValueError, match="key"):
        search.add(["b", "c"], batch.src, batch.src_lens)
    lists = functools.partial(tiny_shortlist.for_batch, frequent=0, per_source=1)
    with pytest.raises(ValueError, match="shortlist"):
        search.add(["c", "d"], batch.src, batch.src_lens, lists(batch.src))


def test_memory_slots_keep_each_sentence_and_pad_the_rest():
    rng = random.Random(0)
    slots, live, next_id, most = MemorySlots(), [], 1, 0  # live: (id, length) in slot order

    def memory(sentences: list[tuple[int, int]]) -> Memory:
        width = max(n for _, n in sentences)
        values = torch.zeros(len(sentences), width, 3)
        mask = torch.full((len(sentences), width), float("-inf"))
        for row, (ident, n) in enumerate(sentences):
            values[row, :n], mask[row, :n] = ident, 0.0
        return Memory(values, values[:, :, :2] * 2, mask, torch.tensor([[float(i)] for i, _ in sentences]), None)

    for _ in range(60):
        if live and rng.random() < 0.45:
            leaving = rng.sample(range(len(live)), rng.randint(1, len(live)))
            width = max((n for i, (_, n) in enumerate(live) if i not in leaving), default=1)
            live = [live[i] for i in slots.remove(leaving, width)]
        else:
            new = [(next_id + i, rng.randint(1, 12)) for i in range(rng.randint(1, 4))]
            next_id += len(new)
            slots.stage(memory(new))()
            live += new
        most = max(most, len(live))
        assert slots.capacity <= 2 * most  # the buffers grow with the rows, not with every change of width
        view = slots.memory
        assert view.values.size(0) == len(live) and view.width == max((n for _, n in live), default=view.width)
        for row, (ident, n) in enumerate(live):
            assert torch.all(view.values[row, :n] == ident) and torch.all(view.keys[row, :n] == 2 * ident)
            assert torch.all(view.values[row, n:] == 0) and torch.all(view.mask_bias[row, n:] == float("-inf"))
            assert torch.all(view.mask_bias[row, :n] == 0) and view.summary[row, 0] == ident


def naive_bans(history: list[int], n: int) -> set[int]:
    """The tokens that would repeat an n-gram of history, by looking at every earlier n-gram."""
    if len(history) < n:
        return set()
    prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == prefix}


@settings(deadline=None)  # no timing: a loaded CI machine took past hypothesis's 200 ms
@given(st.lists(st.lists(st.integers(0, 3), max_size=12), min_size=1, max_size=6), st.integers(1, 4),
       st.integers(0, 3))
def test_ngram_bans_are_those_of_each_rows_own_history(histories, n, padding):
    # Rows are right-aligned: each one's history is its last `age` tokens, whatever stands before them.
    width = max(len(h) for h in histories) + padding
    tokens = torch.tensor([[7] * (width - len(h)) + h for h in histories])
    rows, banned = ngram_bans(tokens, torch.tensor([len(h) for h in histories]), n)
    got = [set() for _ in histories]
    for row, token in zip(rows.tolist(), banned.tolist(), strict=True):
        got[row].add(token)
    assert got == [naive_bans(h, n) for h in histories]
