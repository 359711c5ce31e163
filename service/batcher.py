"""Request coalescing: concurrent jobs with the same options become one token-budget batch in one worker thread."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RunFn = Callable[[Hashable, list[Any]], Sequence[Any]]
ObserveFn = Callable[[int, int, int, float], None]


class QueueFull(Exception):
    """The queue holds max_queue waiting requests; the caller should retry later."""


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass(eq=False)
class _Job:
    key: Hashable
    items: list[Any]
    tokens: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Runs `run(key, items)` in a worker thread on batches merged from concurrent `submit` calls.

    Jobs share a batch only when their keys are equal (same decoding options). A batch starts with the oldest
    waiting job and takes later jobs with its key, in arrival order, while they fit `max_tokens` and
    `max_requests`; it waits at most `max_wait_s` after the oldest job arrived for more to come. While the
    worker is busy, new jobs queue up, so the next batch grows with the load. A failed batch is rerun job by
    job, so one bad request cannot fail the requests it was merged with.
    """

    def __init__(self, run: RunFn, executor: Executor, *, max_tokens: int, max_requests: int, max_wait_s: float,
                 max_queue: int, observe: ObserveFn | None = None):
        self._run = run
        self._executor = executor
        self.max_tokens, self.max_requests, self.max_wait_s, self.max_queue = (
            max_tokens, max_requests, max_wait_s, max_queue)
        self._observe = observe
        self._pending: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Jobs waiting for the worker (not counting the batch it is running)."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def submit(self, key: Hashable, items: list[Any], tokens: int) -> list[Any]:
        """Queue `items` and wait for their results, in order; cancelling the wait drops the job."""
        if self._closed:
            raise Closed("the service is shutting down")
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} requests are waiting")
        job = _Job(key, items, tokens, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._idle.clear()
        self._wake.set()
        try:
            return await job.future
        finally:
            job.future.cancel()  # no-op when done; otherwise the loop skips the job

    async def close(self) -> None:
        """Refuse new jobs, finish the queued ones, stop the loop."""
        self._closed = True
        await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._drop_abandoned()
            if not self._pending:
                self._idle.set()
                continue
            batch = await self._gather()
            if batch:
                await self._execute(batch)
            self._wake.set()  # look again: jobs with other keys may be waiting

    def _drop_abandoned(self) -> None:
        self._pending = collections.deque(job for job in self._pending if not job.future.done())

    async def _gather(self) -> list[_Job]:
        first = self._pending[0]
        batch: list[_Job] = []
        tokens = 0
        while True:
            for job in list(self._pending):
                if len(batch) >= self.max_requests:
                    break
                if job.key != first.key or job.future.done():
                    continue
                if batch and tokens + job.tokens > self.max_tokens:
                    continue
                self._pending.remove(job)
                batch.append(job)
                tokens += job.tokens
            remaining = first.arrived + self.max_wait_s - time.monotonic()
            if len(batch) >= self.max_requests or tokens >= self.max_tokens or remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                pass
        return [job for job in batch if not job.future.done()]

    async def _execute(self, batch: list[_Job]) -> None:
        key = batch[0].key
        parts = [job.items for job in batch]
        start = time.monotonic()
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_parts, key, parts)
        except Exception as exc:  # a bug here must fail this batch, not stop the loop that serves every request
            log.exception("batch failed")
            outcomes = [exc] * len(batch)
        if self._observe is not None:
            self._observe(len(batch), sum(len(p) for p in parts), sum(job.tokens for job in batch),
                          time.monotonic() - start)
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _run_parts(self, key: Hashable, parts: list[list[Any]]) -> list[list[Any] | BaseException]:
        """Worker thread: run all parts as one batch, falling back to one run per part if that fails."""
        flat = [item for part in parts for item in part]
        try:
            results = list(self._run(key, flat))
            if len(results) != len(flat):
                raise RuntimeError(f"got {len(results)} results for {len(flat)} items")
        except Exception as exc:
            if len(parts) == 1:
                return [exc]
            log.warning("a batch of %d requests failed (%s: %s); rerunning them one by one",
                        len(parts), type(exc).__name__, exc)
            return [self._run_one(key, part) for part in parts]
        outcomes: list[list[Any] | BaseException] = []
        offset = 0
        for part in parts:
            outcomes.append(results[offset:offset + len(part)])
            offset += len(part)
        return outcomes

    def _run_one(self, key: Hashable, part: list[Any]) -> list[Any] | BaseException:
        try:
            return list(self._run(key, part))
        except Exception as exc:
            return exc
