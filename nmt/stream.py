"""Continuous batching: translate calls join running beam searches between decoding steps and leave when done."""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from nmt.batching import collate
from nmt.search import BeamSearch, Hypothesis
from nmt.translator import Job, Translation, Translator

log = logging.getLogger(__name__)

_NOBODY = object()  # no call (a handle may be any hashable, None included)


@dataclass
class _Running:
    job: Job
    hyps: list[list[Hypothesis] | None]  # per segment to decode (job.todo order)
    left: int  # segments not done yet
    call: int  # the searches' name for the call (a handle may be used again once its call is over)


@dataclass
class _Waiting:
    """A segment waiting to join its search."""

    key: tuple  # the search's: (job key, with attention)
    job: Job
    position: int  # in job.todo
    ids: list[int]  # its source ids


class TranslationStream:
    """Keeps a Translator's decoding batch full while translate calls come and go.

    `add` starts a call (the same options as Translator.translate); every `step` advances each running beam search by
    one token and returns the calls whose last segment just finished, with their translations. Calls with the same
    search settings share one search; a new call joins it between two steps as the token budget has room (see _join)
    instead of waiting for the running batch to end, and a finished segment leaves it at once. Every translation equals
    what Translator.translate gives for the call alone (up to float rounding: see BeamSearch).
    Not thread-safe: use from one thread.
    """

    def __init__(self, translator: Translator):
        self.translator = translator
        self._searches: dict[tuple, BeamSearch] = {}  # by (job key, with attention)
        self._running: dict[Hashable, _Running] = {}
        self._calls = itertools.count()
        self._handles: dict[int, Hashable] = {}  # the running calls' handles, by Running.call
        self._ready: list[Hashable] = []  # calls with nothing to decode, answered at the next step
        # Segments waiting to join their searches, by call, in order, and their source tokens per call.
        self._waiting: dict[Hashable, collections.deque[_Waiting]] = {}
        self._waiting_tokens: dict[Hashable, int] = {}
        self._first: object = _NOBODY  # the call whose next segment joins before any other at the next step

    def __len__(self) -> int:
        """Calls in progress."""
        return len(self._running)

    @property
    def segments(self) -> int:
        """Segments in progress: being decoded or waiting to join their search."""
        return sum(len(s) for s in self._searches.values()) + sum(len(q) for q in self._waiting.values())

    def add(self, handle: Hashable, texts: list[str], **options: Any) -> None:
        """Start translating texts; bad options raise NMTError here. The handle names the call in step's results
        (and may name another once this one is done or cancelled).

        The call's segments join their search at the next step as the token budget has room (see _join),
        together with every other segment joining it then: one encoder pass and one batch merge for them all."""
        self.add_job(handle, self.translator.prepare(texts, **options))

    def add_job(self, handle: Hashable, job: Job) -> None:
        """Start a call prepared already (Translator.prepare), as add does."""
        if handle in self._running:
            raise ValueError(f"call {handle!r} is already running")
        todo = len(job.todo)
        running = self._running[handle] = _Running(job, [None] * todo, todo, next(self._calls))
        self._handles[running.call] = handle
        if not todo:
            self._ready.append(handle)
            return
        self._queue(handle, job, list(range(todo)), job.return_alignment)

    def cancel(self, handle: Hashable) -> None:
        """Stop a call: its segments leave their searches at the next step, and it is never returned."""
        running = self._running.pop(handle, None)
        if running is None:
            return
        del self._handles[running.call]
        if handle in self._ready:
            self._ready.remove(handle)
        self._waiting.pop(handle, None)
        self._waiting_tokens.pop(handle, None)
        for key, search in list(self._searches.items()):
            search.drop([(running.call, j) for j in range(len(running.hyps))])
            if search.dropped.issuperset(search.keys):
                # Nobody is left in it: gone now, not at the next step, which would be that of the next call to
                # come (its first step batched with the cancelled rows, as wide as their sources: other digits).
                del self._searches[key]

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
                if self._searches.get(key) is not search:  # gone with a failed search's calls (see cancel)
                    continue
                calls = list(dict.fromkeys(c for c, _ in search.keys))  # before the step: it may retire some
                try:
                    finished = search.step()
                except Exception as exc:  # a bug must fail this search's calls, not every call of the stream
                    log.exception("a decoding step failed")
                    del self._searches[key]
                    for call in calls:
                        if call in self._handles:
                            done.append(self._fail(self._handles[call], exc))
                    continue
                for (call, j), hyps in finished:
                    if call not in self._handles:  # cancelled
                        continue
                    handle = self._handles[call]
                    running = self._running[handle]
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
        """Have segments (positions in job.todo) wait to join the search for the job's settings."""
        todo, queue = job.todo, self._waiting.setdefault(handle, collections.deque())
        for j in which:
            ids = job.segments[todo[j]].ids
            queue.append(_Waiting((job.key, attention), job, j, ids))
            self._waiting_tokens[handle] = self._waiting_tokens.get(handle, 0) + len(ids) + 1

    def _join(self) -> list[tuple[Hashable, Exception]]:
        """Add waiting segments to their searches (creating those that are needed) while all searches together
        decode at most the calls' token budget of source tokens (one segment at least, when nothing decodes), so a call
        of many segments decodes them as they fit and can be cancelled between steps. The calls with the fewest source
        tokens waiting go first (then the earlier calls), so a short call does not wait behind a long one, and calls of
        equal size finish in the order they came; a call whose next segment does not fit the room left lets the others'
        segments that do take it. But of the calls passed over at a step (still with a segment waiting after another
        call's segment joined, even if some of their own did), the one that came first has its next segment join before
        any other at the next step, and nothing joins until it fits; so no call waits for ever behind others that keep
        the budget busy, and a segment longer than the budget joins once the searches are empty. A call with a smaller
        budget than the others' may thus hold them up: give the calls of a stream one budget. The calls whose segments
        could not join fail (the searches stay as they were)."""
        first, self._first = self._first, _NOBODY
        if not self._waiting:  # most steps: nothing to join
            return []
        live = sum(sum(search.src_lens) for search in self._searches.values())
        joins: dict[tuple, list[tuple[Hashable, _Waiting]]] = {}
        arrival = {handle: n for n, handle in enumerate(self._running)}
        joined: set[Hashable] = set()  # the calls that joined a segment at this step

        def take(handle: Hashable) -> bool:
            """Move the call's next segment to joins if it fits; whether it did."""
            nonlocal live
            queue = self._waiting[handle]
            tokens = len(queue[0].ids) + 1
            if live and live + tokens > queue[0].job.budget:
                return False
            entry = queue.popleft()
            joins.setdefault(entry.key, []).append((handle, entry))
            live += tokens
            joined.add(handle)
            self._waiting_tokens[handle] -= tokens
            if not queue:
                del self._waiting[handle], self._waiting_tokens[handle]
            return True

        if first in self._waiting and not take(first):
            self._first = first  # the room is kept for it
            return []
        for handle in sorted(self._waiting, key=lambda h: (self._waiting_tokens[h], arrival[h])):
            while handle in self._waiting and take(handle):
                pass
        passed = [handle for handle in self._waiting if joined - {handle}]
        if passed:
            self._first = min(passed, key=arrival.__getitem__)
        return self._add(joins)

    def _add(self, joins: dict[tuple, list[tuple[Hashable, _Waiting]]]) -> list[tuple[Hashable, Exception]]:
        """Add these segments to their searches, creating those that are needed; the calls that failed."""
        failed: list[tuple[Hashable, Exception]] = []
        for key, entries in joins.items():
            entries = [(handle, entry) for handle, entry in entries if handle in self._running]  # none failed
            if not entries:
                continue
            search = self._searches.get(key)
            job = entries[0][1].job  # the calls of one search share its settings, shortlist sizes included
            try:
                if search is None:
                    search = BeamSearch(self.translator.model, return_attention=key[1], **job.search)
                batch = collate([entry.ids for _, entry in entries], None, list(range(len(entries))))
                src = batch.src.to(self.translator.device)
                keys = [(self._running[handle].call, entry.position) for handle, entry in entries]
                search.add(keys, src, batch.src_lens, None if job.shortlist is None else job.shortlist(src))
            except Exception as exc:
                for handle in dict.fromkeys(handle for handle, _ in entries):
                    if handle in self._running:
                        failed.append(self._fail(handle, exc))
                continue
            self._searches[key] = search
        return failed

    def _finish(self, handle: Hashable) -> tuple[Hashable, list[Translation] | Exception]:
        running = self._running.pop(handle)
        del self._handles[running.call]
        try:
            return handle, self.translator.finish(running.job, running.hyps)
        except Exception as exc:
            log.exception("finishing a translation call failed")
            return handle, exc
