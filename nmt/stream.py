"""Continuous batching: translate calls join running beam searches between decoding steps and leave when done."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from nmt.batching import collate
from nmt.search import BeamSearch, Hypothesis
from nmt.translator import Job, Translation, Translator

log = logging.getLogger(__name__)


@dataclass
class _Running:
    job: Job
    hyps: list[list[Hypothesis] | None]  # per segment to decode (job.todo order)
    left: int  # segments not done yet


class TranslationStream:
    """Keeps a Translator's decoding batch full while translate calls come and go.

    `add` starts a call (the same options as Translator.translate); every `step` advances each running beam search
    by one token and returns the calls whose last segment just finished, with their translations. Calls with
    the same search settings share one search; a new call joins it at the next step instead of waiting for the
    running batch to end, and a finished segment leaves it at once. Every translation equals what
    Translator.translate gives for the call alone (up to float rounding; int8 models: see BeamSearch).
    Not thread-safe: use from one thread.
    """

    def __init__(self, translator: Translator):
        self.translator = translator
        self._searches: dict[tuple, BeamSearch] = {}  # by (job key, with attention)
        self._running: dict[Hashable, _Running] = {}
        self._ready: list[Hashable] = []  # calls with nothing to decode, answered at the next step

    def __len__(self) -> int:
        """Calls in progress."""
        return len(self._running)

    @property
    def segments(self) -> int:
        """Segments being decoded, over all searches."""
        return sum(len(s) for s in self._searches.values())

    def add(self, handle: Hashable, texts: list[str], **options: Any) -> None:
        """Start translating texts; bad options raise NMTError here. The handle names the call in step's results."""
        if handle in self._running:
            raise ValueError(f"call {handle!r} is already running")
        job = self.translator.prepare(texts, **options)
        todo = len(job.todo)
        self._running[handle] = _Running(job, [None] * todo, todo)
        if not todo:
            self._ready.append(handle)
            return
        try:
            self._decode(handle, job, list(range(todo)), job.return_alignment)
        except BaseException:
            del self._running[handle]
            raise

    def cancel(self, handle: Hashable) -> None:
        """Stop a call: its segments leave their searches at the next step, and it is never returned."""
        running = self._running.pop(handle, None)
        if running is None:
            return
        if handle in self._ready:
            self._ready.remove(handle)
        for search in self._searches.values():
            search.drop([(handle, j) for j in range(len(running.hyps))])

    def step(self) -> list[tuple[Hashable, list[Translation] | Exception]]:
        """One decoding step of every running search; the calls that are now done, or failed with an exception
        (a search that raises fails its calls and is dropped; a call that fails on its own fails alone)."""
        done: list[tuple[Hashable, list[Translation] | Exception]] = []
        ready, self._ready = self._ready, []
        for handle in ready:
            done.append(self._finish(handle))
        with self.translator.lock:
            for key, search in list(self._searches.items()):
                try:
                    finished = search.step()
                except Exception as exc:  # a bug must fail this search's calls, not every call of the stream
                    log.exception("a decoding step failed")
                    del self._searches[key]
                    for handle in dict.fromkeys(h for h, _ in search.keys):
                        if handle in self._running:
                            done.append(self._fail(handle, exc))
                    continue
                for (handle, j), hyps in finished:
                    running = self._running.get(handle)
                    if running is None:
                        continue
                    if not key[1] and running.job.needs_attention(hyps):
                        # As Translator.translate does: decode it again with attention to replace its <unk>s.
                        try:
                            self._decode(handle, running.job, [j], True)
                        except Exception as exc:
                            done.append(self._fail(handle, exc))
                        continue
                    running.hyps[j] = hyps
                    running.left -= 1
                    if not running.left:
                        done.append(self._finish(handle))
                if not len(search):
                    del self._searches[key]
        return done

    def _fail(self, handle: Hashable, exc: Exception) -> tuple[Hashable, Exception]:
        """Stop a call that failed, so that it neither lingers nor takes the others down."""
        log.error("translation call %r failed: %s: %s", handle, type(exc).__name__, exc)
        self.cancel(handle)
        return handle, exc

    def _decode(self, handle: Hashable, job: Job, which: list[int], attention: bool) -> None:
        """Add segments (positions in job.todo) to the search for the job's settings, creating it if needed."""
        key = (job.key, attention)
        search = self._searches.get(key)
        if search is None:
            search = self._searches[key] = BeamSearch(self.translator.model, return_attention=attention, **job.search)
        batch = collate([job.segments[job.todo[j]].ids for j in which], None, which)
        src = batch.src.to(self.translator.device)
        with self.translator.lock:
            search.add([(handle, j) for j in which], src, batch.src_lens,
                       None if job.shortlist is None else job.shortlist(src))

    def _finish(self, handle: Hashable) -> tuple[Hashable, list[Translation] | Exception]:
        running = self._running.pop(handle)
        try:
            return handle, self.translator.finish(running.job, running.hyps)
        except Exception as exc:
            log.exception("finishing a translation call failed")
            return handle, exc
