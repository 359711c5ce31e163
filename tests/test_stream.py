"""Continuous batching (nmt/stream.py): calls that join and leave running searches get what they get alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import nmt.search
import nmt.stream
from nmt.errors import NMTError
from nmt.stream import TranslationStream
from nmt.translator import Job, Translator

LETTERS = "abcdefghijklmnop"


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir, threads=1)


def calls(n: int, seed: int = 0) -> list[list[str]]:
    """n calls of one to three texts: letters of random lengths, sometimes empty, several lines or unknown ones."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        texts = [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 3))]
        extra = rng.choice(["", "", "a b\nc d e", "a ü b", "   "])
        out.append(texts + [extra] if extra else texts)
    return out


def run(stream: TranslationStream, work: list[tuple[list[str], dict]], seed: int = 0) -> dict:
    """Add the calls one or two at a time, a random number of steps apart; step until all are answered."""
    rng = random.Random(seed)
    results: dict = {}
    pending = list(range(len(work)))
    for _ in range(10_000):  # a call the stream never answers must fail the test, not hang it
        if not (pending or len(stream)):
            return results
        for _ in range(min(len(pending), rng.choice([0, 0, 1, 2]))):
            i = pending.pop(0)
            stream.add(i, work[i][0], **work[i][1])
        results.update(stream.step())
    raise AssertionError(f"the stream still holds {len(stream)} calls after 10,000 steps")


def same(a: list, b: list) -> None:
    assert [t.text for t in a] == [t.text for t in b]
    for x, y in zip(a, b, strict=True):
        assert [alt.text for alt in x.alternatives] == [alt.text for alt in y.alternatives]
        assert (x.score is None) == (y.score is None)
        if x.score is not None:
            assert x.score == pytest.approx(y.score, abs=1e-4)
        assert x.tgt_pieces == y.tgt_pieces


def test_calls_joining_and_leaving_get_what_they_get_alone(translator):
    options = [{}, {"beam_size": 3, "n_best": 2}, {"return_alignment": True}, {"beam_size": 1, "shortlist": False}]
    work = [(texts, options[i % len(options)]) for i, texts in enumerate(calls(24))]
    results = run(TranslationStream(translator), work)
    assert sorted(results) == list(range(len(work)))
    for i, (texts, opts) in enumerate(work):
        same(results[i], translator.translate(texts, **opts))
        if opts.get("return_alignment"):
            for r in results[i]:
                assert len(r.alignment or []) == len(r.tgt_pieces)


def test_an_unknown_piece_out_is_decoded_again_with_attention(translator, monkeypatch):
    # Force the "an <unk> came out" branch: every segment decoded without attention goes round again with it.
    monkeypatch.setattr(Job, "needs_attention", lambda self, hyps: not self.return_alignment and self.replace_unk)
    created = []
    real = nmt.stream.BeamSearch

    def spy(model, return_attention=False, **kwargs):
        created.append(return_attention)
        return real(model, return_attention=return_attention, **kwargs)

    monkeypatch.setattr(nmt.stream, "BeamSearch", spy)
    stream = TranslationStream(translator)
    stream.add("x", ["a b c", "d e"])
    results = dict(run(stream, []))
    assert created == [False, True]
    same(results["x"], translator.translate(["a b c", "d e"], replace_unk=False))


def test_empty_calls_bad_options_and_cancelled_calls(translator):
    stream = TranslationStream(translator)
    with pytest.raises(NMTError, match="beam_size"):
        stream.add("bad", ["a b"], beam_size=0)
    stream.add("empty", ["", "  "])
    stream.add("gone", ["a b c d e f g h"])
    stream.add("kept", ["a b c"])
    with pytest.raises(ValueError, match="already running"):
        stream.add("kept", ["x"])
    stream.cancel("gone")
    results = run(stream, [])
    assert sorted(results) == ["empty", "kept"]
    assert [t.text for t in results["empty"]] == ["", "  "]
    assert len(stream) == 0 and stream.segments == 0


def test_a_handle_can_be_used_again_at_once_after_its_call_is_cancelled(translator):
    # The searches named sentences by handle, and a cancelled call's sentences leave them only at the next
    # step: a new call under its handle before then failed ("add needs one key per sentence, none of them
    # already decoding"), or could be given the old call's sentences.
    stream = TranslationStream(translator)
    stream.add("h", ["a b c d e f", "g h i"])
    stream.step()
    stream.cancel("h")
    stream.add("h", ["k l m"])
    results = {}
    while len(stream):
        results.update(stream.step())
    assert list(results) == ["h"]
    same(results["h"], translator.translate(["k l m"]))


def test_a_cancelled_call_alone_leaves_at_once_and_the_next_call_decodes_as_if_alone(translator):
    # Its sentences stayed in the search until the next step, the next call's first: a server that was otherwise
    # idle gave that call other digits of its score than alone.
    stream = TranslationStream(translator)
    stream.add("long", [" ".join(LETTERS * 3)])
    stream.step()
    stream.cancel("long")
    assert len(stream) == 0 and stream.segments == 0
    stream.add("next", ["k l m"])
    results = {}
    while len(stream):
        results.update(stream.step())
    alone = TranslationStream(translator)
    alone.add("next", ["k l m"])
    expected = {}
    while len(alone):
        expected.update(alone.step())
    assert results["next"][0].score == expected["next"][0].score  # exactly


def test_a_failing_search_fails_only_its_calls(translator, monkeypatch):
    real_step = nmt.search.BeamSearch.step

    def step(self):
        if self.k == 2:
            raise RuntimeError("boom")
        return real_step(self)

    monkeypatch.setattr(nmt.search.BeamSearch, "step", step)
    stream = TranslationStream(translator)
    stream.add("fails", ["a b"], beam_size=2)
    stream.add("works", ["a b"], beam_size=3)
    results = run(stream, [])
    assert isinstance(results["fails"], RuntimeError)
    same(results["works"], translator.translate(["a b"], beam_size=3))
    assert len(stream) == 0


def test_a_step_that_fails_after_retiring_sentences_still_fails_their_calls(translator, monkeypatch):
    # The step had retired the call's last sentence when it failed: the call was neither answered nor failed, and
    # stayed in the stream for ever.
    real_step = nmt.search.BeamSearch.step

    def step(self):
        if real_step(self):
            raise RuntimeError("boom after retiring")
        return []

    monkeypatch.setattr(nmt.search.BeamSearch, "step", step)
    stream = TranslationStream(translator)
    stream.add("fails", ["a b"], beam_size=2)
    assert isinstance(run(stream, [])["fails"], RuntimeError)
    assert len(stream) == 0


def test_a_failing_search_whose_call_has_rows_in_another_search_fails_that_call_only(translator, monkeypatch):
    # Failing the call removed its other search (its re-decode with attention), which the step then reached:
    # a KeyError out of step() lost every call's result.
    monkeypatch.setattr(Job, "needs_attention", lambda self, hyps: not self.return_alignment and self.replace_unk)
    real_step = nmt.search.BeamSearch.step

    def step(self):
        if self.k == 5 and not self.with_attention and any(s.with_attention for s in stream._searches.values()):
            raise RuntimeError("boom")
        return real_step(self)

    monkeypatch.setattr(nmt.search.BeamSearch, "step", step)
    stream = TranslationStream(translator)
    stream.add("fails", ["a", "a b c d e f g h i j k l m n o p a b c d e f g h i j k l m n o p"])
    stream.add("works", ["a b"], beam_size=3)
    results = run(stream, [])
    assert isinstance(results["fails"], RuntimeError)
    same(results["works"], translator.translate(["a b"], beam_size=3))
    assert len(stream) == 0


def test_calls_that_cannot_join_fail_and_leave_the_running_ones_as_they_were(translator, monkeypatch):
    stream = TranslationStream(translator)
    stream.add("running", ["a b c d"])
    stream.step()

    def no_memory(*args, **kwargs):
        raise RuntimeError("cannot allocate memory")

    monkeypatch.setattr(translator.model, "encode", no_memory)
    stream.add("refused", ["e f"])
    stream.add("refused too", ["g", "h i"])
    failed = dict(stream.step())
    monkeypatch.undo()
    assert sorted(failed) == ["refused", "refused too"]
    assert all(isinstance(f, RuntimeError) for f in failed.values())
    assert len(stream) == 1 and stream.segments == 1
    stream.add("later", ["e f"])
    results = run(stream, [])
    same(results["running"], translator.translate(["a b c d"]))
    same(results["later"], translator.translate(["e f"]))


def test_calls_added_between_two_steps_join_in_one_batch(translator, monkeypatch):
    batches = []
    real_add = nmt.search.BeamSearch.add

    def add(self, keys, *args, **kwargs):
        batches.append(sorted(keys))
        return real_add(self, keys, *args, **kwargs)

    monkeypatch.setattr(nmt.search.BeamSearch, "add", add)
    stream = TranslationStream(translator)
    stream.add("x", ["a b c", "d e"])
    stream.add("y", ["f g h"])
    stream.add("z", ["i j"], beam_size=2)  # other settings: another search
    stream.add("w", ["k l"])
    stream.cancel("w")
    stream.step()
    named = [[(stream._handles[call], j) for call, j in batch] for batch in batches]  # the searches' names
    assert sorted(named) == [[("x", 0), ("x", 1), ("y", 0)], [("z", 0)]]
    results = run(stream, [])
    same(results["x"], translator.translate(["a b c", "d e"]))
    same(results["y"], translator.translate(["f g h"]))


def test_a_call_that_fails_on_its_own_fails_alone(translator, monkeypatch):
    expected = translator.translate(["a b c"])
    real_finish = translator.finish

    def finish(job, hyps):
        if not job.todo:
            raise RuntimeError("cannot finish")
        return real_finish(job, hyps)

    monkeypatch.setattr(translator, "finish", finish)
    monkeypatch.setattr(Job, "needs_attention", lambda self, hyps: self.n_best == 2 and not self.return_alignment)
    real_add = nmt.search.BeamSearch.add

    def add(self, *args, **kwargs):
        if self.with_attention:  # the second round, with attention, of the call whose <unk>s need it
            raise RuntimeError("no memory for the second round")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(nmt.search.BeamSearch, "add", add)
    stream = TranslationStream(translator)
    stream.add("empty", ["  "])
    stream.add("second round", ["a b c"], beam_size=3, n_best=2)
    stream.add("kept", ["a b c"])
    results = run(stream, [])
    assert isinstance(results["empty"], RuntimeError) and isinstance(results["second round"], RuntimeError)
    same(results["kept"], expected)
    assert len(stream) == 0 and stream.segments == 0
    stream.add("after", ["  ", "d e"])
    assert not isinstance(run(stream, [])["after"], Exception)


def test_a_call_of_many_segments_joins_as_they_fit_the_token_budget(translator):
    # A call of hundreds of sentences used to join all at once (one encoder pass, one huge search), so it could
    # not be cancelled before that pass and the step time grew without bound.
    texts = [" ".join(LETTERS[(i + k) % 16] for k in range(3 + i % 5)) for i in range(30)]
    stream = TranslationStream(translator)
    stream.add("many", texts, batch_tokens=20)
    stream.add("other", ["a b c"], batch_tokens=20)
    results, live = {}, []
    while len(stream):
        results.update(stream.step())
        live.append(max((sum(s.src_lens) for s in stream._searches.values()), default=0))
    assert max(live) <= 20 and len(live) > 10  # never more than the budget decoding, so it took turns
    same(results["many"], translator.translate(texts))
    same(results["other"], translator.translate(["a b c"]))
    stream.add("gone", texts, batch_tokens=20)
    stream.step()
    stream.cancel("gone")
    assert not stream._waiting  # its segments still waiting left too
    assert stream.step() == [] and not len(stream)


def test_a_short_call_does_not_wait_behind_a_long_one_and_equal_calls_finish_in_order(translator):
    # Calls share the token budget: the segments of the calls with the fewest tokens waiting join first. A short
    # call used to wait for every segment of a long call that came before it.
    texts = [" ".join(LETTERS[(i + k) % 16] for k in range(3 + i % 5)) for i in range(30)]
    stream = TranslationStream(translator)
    stream.add("long", texts, batch_tokens=20)
    stream.add("twin", texts, batch_tokens=20)
    stream.step()
    stream.add("short", ["a b c"], batch_tokens=20)
    order, steps, results = [], 0, {}
    while len(stream):
        for handle, result in stream.step():
            order.append(handle)
            results[handle] = result
            if handle == "short":
                steps_for_short = steps
        steps += 1
        assert sum(sum(s.src_lens) for s in stream._searches.values()) <= 20
    assert order == ["short", "long", "twin"]  # the twin, as long, came later: it finishes later
    assert steps_for_short < steps / 4
    same(results["short"], translator.translate(["a b c"]))
    same(results["long"], translator.translate(texts))


@pytest.mark.parametrize("long_tokens", [8, 15])  # within a budget of 10, and over it
def test_a_segment_that_does_not_fit_is_not_passed_over_for_ever(translator, long_tokens):
    # Shorter calls go first, but not for ever: a segment passed over joins before any other at the next step.
    stream = TranslationStream(translator)
    long_text = " ".join(LETTERS[k % 16] for k in range(long_tokens - 1))  # a piece a letter, and </s>
    stream.add("long", [long_text], batch_tokens=10)
    steps, done = 0, {}
    while "long" not in done:
        stream.add(steps, ["a b"], batch_tokens=10)  # a short call every step
        done.update(stream.step())
        steps += 1
        assert steps < 100, "the long segment never joined"
    same(done["long"], translator.translate([long_text]))


def test_short_calls_that_keep_the_budget_busy_do_not_hold_a_long_one_for_ever(translator):
    # Six clients with a short call each, a new one as soon as one is done: they keep a budget of 10 busy, but a
    # call passed over (its segment left waiting while another's joined) goes first, so the long call's turn comes.
    stream = TranslationStream(translator)
    handles = iter(range(10_000))
    for _ in range(6):
        stream.add(next(handles), ["a b"], batch_tokens=10)
    for _ in range(10):
        for _ in stream.step():
            stream.add(next(handles), ["a b"], batch_tokens=10)
    stream.add("long", ["a b c d e f g"], batch_tokens=10)
    for _ in range(200):
        done = dict(stream.step())
        if "long" in done:
            break
        for _ in done:
            stream.add(next(handles), ["a b"], batch_tokens=10)
    else:
        raise AssertionError("the long call never finished")
    same(done["long"], translator.translate(["a b c d e f g"]))


def test_a_short_call_takes_the_room_a_long_one_leaves_while_the_long_one_waits(translator):
    # A long call keeps the budget full and always has segments waiting. A short call that arrives joins as soon
    # as room for it frees up; it used to wait while the long call, as the earliest call left waiting, took every
    # room that freed up first.
    texts = [" ".join(LETTERS[(i + k) % 16] for k in range(3 + i % 5)) for i in range(60)]
    stream = TranslationStream(translator)
    stream.add("long", texts, batch_tokens=20)
    for _ in range(3):
        stream.step()
    stream.add("short", ["a b c d e f g"], batch_tokens=20)
    steps = 0

    def decoding(handle: str) -> bool:
        calls = {call for search in stream._searches.values() for call, _ in search.keys}
        return any(stream._handles.get(call) == handle for call in calls)
    while not decoding("short"):
        assert "long" in stream._waiting  # the long call still had segments waiting
        stream.step()
        steps += 1
    assert steps <= 5  # 130 before
    results = {}
    while len(stream):
        results.update(stream.step())
    same(results["short"], translator.translate(["a b c d e f g"]))
    same(results["long"], translator.translate(texts))


def test_a_large_call_beside_calls_that_keep_the_budget_full_is_not_held_back_much(translator):
    # Eight clients with calls of five texts each keep a budget of 60 full; a call of 40 texts beside them gets
    # a turn each time it is passed over, so it takes a few times as long as alone (2.8x), not one segment now
    # and then (19x when room was kept for a call only after it had waited 32 steps).
    rng = random.Random(0)

    def text() -> str:
        return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 9)))
    large = [text() for _ in range(40)]
    stream = TranslationStream(translator)
    stream.add("large", large, batch_tokens=60)
    alone = 0
    while len(stream):
        stream.step()
        alone += 1
    handles = iter(range(10_000))
    for _ in range(8):
        stream.add(next(handles), [text() for _ in range(5)], batch_tokens=60)
    for _ in range(30):
        for _ in stream.step():
            stream.add(next(handles), [text() for _ in range(5)], batch_tokens=60)
    stream.add("large", large, batch_tokens=60)
    steps, done = 0, {}
    while "large" not in done:
        done = dict(stream.step())
        steps += 1
        for handle in done:
            if handle != "large":
                stream.add(next(handles), [text() for _ in range(5)], batch_tokens=60)
    assert steps < 4 * alone
    same(done["large"], translator.translate(large, batch_tokens=60))
