"""Continuous batching: translate calls join running beam searches between decoding steps and leave when done."""

from __future__ import annotations

import collections
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
        # Segments that join their search at the next step, by search key: (handle, job, position in job.todo).
        self._joining: dict[tuple, list[tuple[Hashable, Job, int]]] = {}

    def __len__(self) -> int:
        """Calls in progress."""
        return len(self._running)

    @property
    def segments(self) -> int:
        """Segments being decoded or joining at the next step, over all searches."""
        return sum(len(s) for s in self._searches.values()) + sum(len(j) for j in self._joining.values())

    def add(self, handle: Hashable, texts: list[str], **options: Any) -> None:
        """Start translating texts; bad options raise NMTError here. The handle names the call in step's results.

        The call's segments join their search at the next step, together with every other segment joining it
        then: one encoder pass and one batch merge for them all."""
        self.add_job(handle, self.translator.prepare(texts, **options))

    def add_job(self, handle: Hashable, job: Job) -> None:
        """Start a call prepared already (Translator.prepare), as add does."""
        if handle in self._running:
            raise ValueError(f"call {handle!r} is already running")
        todo = len(job.todo)
        self._running[handle] = _Running(job, [None] * todo, todo)
        if not todo:
            self._ready.append(handle)
            return
        self._queue(handle, job, list(range(todo)), job.return_alignment)

    def cancel(self, handle: Hashable) -> None:
        """Stop a call: its segments leave their searches at the next step, and it is never returned."""
        running = self._running.pop(handle, None)
        if running is None:
            return
        if handle in self._ready:
            self._ready.remove(handle)
        for key, joining in list(self._joining.items()):
            self._joining[key] = [entry for entry in joining if entry[0] != handle]
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
            done += self._join()
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
                        self._queue(handle, running.job, [j], True)
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

    def _queue(self, handle: Hashable, job: Job, which: list[int], attention: bool) -> None:
        """Have segments (positions in job.todo) join the search for the job's settings at the next step."""
        self._joining.setdefault((job.key, attention), []).extend((handle, job, j) for j in which)

    def _join(self) -> list[tuple[Hashable, Exception]]:
        """Add joining segments to their searches (creating those that are needed) while all searches together
        decode at most the calls' token budget of source tokens (one segment at least, when nothing decodes); the
        others wait for room, so a call of many segments decodes them as they fit and can be cancelled between
        steps. Segments of the calls with the fewest source tokens waiting go first (then the earlier calls'), so
        a short call never waits behind a long one, and calls of equal size finish in the order they came. The
        calls whose segments could not join fail (the searches stay as they were)."""
        failed: list[tuple[Hashable, Exception]] = []
        waiting = [(key, entry) for key, entries in self._joining.items() for entry in entries]
        live = sum(sum(search.src_lens) for search in self._searches.values())
        if not waiting or live >= max(job.budget for _, (_, job, _) in waiting):
            return failed
        tokens = [len(job.segments[job.todo[j]].ids) + 1 for _, (_, job, j) in waiting]
        left: collections.Counter[Hashable] = collections.Counter()
        for (_, (handle, _, _)), count in zip(waiting, tokens, strict=True):
            left[handle] += count
        arrival = {handle: n for n, handle in enumerate(self._running)}
        order = sorted(range(len(waiting)), key=lambda n: (left[waiting[n][1][0]], arrival[waiting[n][1][0]]))
        chosen: set[int] = set()
        for n in order:
            if live + tokens[n] > waiting[n][1][1].budget and (live or chosen):
                break
            chosen.add(n)
            live += tokens[n]
        self._joining, joins = {}, {}
        for n, (key, entry) in enumerate(waiting):
            (joins if n in chosen else self._joining).setdefault(key, []).append(entry)
        for key, entries in joins.items():
            search = self._searches.get(key)
            try:
                if search is None:
                    search = BeamSearch(self.translator.model, return_attention=key[1], **entries[0][1].search)
                batch = collate([job.segments[job.todo[j]].ids for _, job, j in entries], None,
                                list(range(len(entries))))
                src = batch.src.to(self.translator.device)
                job = entries[0][1]  # the calls of one search share its settings, shortlist sizes included
                search.add([(handle, j) for handle, _, j in entries], src, batch.src_lens,
                           None if job.shortlist is None else job.shortlist(src))
            except Exception as exc:
                for handle in dict.fromkeys(handle for handle, _, _ in entries):
                    if handle in self._running:
                        failed.append(self._fail(handle, exc))
                continue
            self._searches[key] = search
        return failed

    def _finish(self, handle: Hashable) -> tuple[Hashable, list[Translation] | Exception]:
        running = self._running.pop(handle)
        try:
            return handle, self.translator.finish(running.job, running.hyps)
        except Exception as exc:
            log.exception("finishing a translation call failed")
            return handle, exc
