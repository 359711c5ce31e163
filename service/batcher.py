"""Continuous batching: queued requests join the model's running batch between two decoding steps."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

ObserveFn = Callable[[int, int, float], None]
SLICE_S = 0.25  # the worker thread reports back at least this often, so abandoned jobs are dropped promptly


class Engine(Protocol):
    """What the Batcher drives, from its worker thread only: a batch that jobs join and leave between steps, each
    step kept within the engine's own budget (the Batcher limits only how many jobs run)."""

    def add(self, handle: Hashable, key: Hashable, work: Any) -> None:
        """Start a job (what its submitter handed in); raising fails that job alone."""

    def cancel(self, handle: Hashable) -> None:
        """Stop a job nobody waits for any more; it is never returned."""

    def step(self) -> list[tuple[Hashable, Sequence[Any] | BaseException]]:
        """Advance every running job by one step; the jobs now done, with their results in order or the
        exception that failed them."""

    def run_alone(self, key: Hashable, work: Any) -> Sequence[Any]:
        """Run one job start to end on its own (to tell which of several failed jobs is at fault)."""

    def __len__(self) -> int:
        """Jobs running."""

    @property
    def segments(self) -> int:
        """Sentences being decoded, over all running jobs."""


class QueueFull(Exception):
    """The queue holds max_queue waiting requests; the caller should retry later."""


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass(eq=False)
class _Job:
    key: Hashable
    work: Any
    tokens: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # nobody waits for the result any more (set on the event loop, read by the worker)


class Batcher:
    """Runs jobs on an Engine in a worker thread, one engine step at a time, with continuous batching.

    Before a step, waiting jobs join the running batch, oldest first, while it holds fewer than `max_requests`
    jobs; the engine keeps its steps within its own token budget, sharing it between the jobs it runs. A job
    leaves as soon as it is done, so a short request does not wait for a long one to finish, and the batch grows
    with the load. While a batch runs, jobs join it at most every `max_wait_s` times the share of `max_requests` it
    holds (an idle engine starts at once): those arriving within that time join together, which costs the
    engine much less than one by one (one encoder pass), and a join holds up every running job, so a fuller
    batch waits longer.
    The worker thread takes steps until waiting jobs may join (or SLICE_S passes), handing each job that is done
    to the event loop as it goes, so the batch decodes on while answers go out, with no round trip to the event
    loop per step or per finished job. Jobs wait in a queue of at most `max_queue`.
    When several jobs fail in one step (a search shared by their requests raised), each is rerun alone, so one
    bad request cannot fail the requests it ran with. Once no job has run for `idle_s` after some did, `on_idle`
    runs on the worker thread (the service gives the heap memory of the last burst back to the system).
    """

    def __init__(self, engine: Engine, executor: Executor, *, max_requests: int, max_queue: int,
                 max_wait_s: float = 0.0, observe: ObserveFn | None = None,
                 count_tokens: Callable[[int], None] | None = None,
                 on_idle: Callable[[], object] | None = None, idle_s: float = 1.0):
        self._engine = engine
        self._executor = executor
        self.max_requests, self.max_queue = max_requests, max_queue
        self.max_wait_s = max_wait_s
        self._last_join = 0.0  # monotonic time at which jobs last joined the running batch
        self._observe = observe
        self._count_tokens = count_tokens
        self._on_idle, self.idle_s = on_idle, idle_s  # run on the worker thread idle_s into a pause after work
        self._pending: collections.deque[_Job] = collections.deque()
        self._running: dict[_Job, None] = {}  # in the order they joined
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Jobs waiting to join the running batch (not those whose callers gave up: the loop drops them)."""
        return sum(not job.abandoned for job in self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batcher")

    def check_room(self) -> None:
        """Closed or QueueFull when a job submitted now would be refused: before the work of preparing one."""
        if self._closed:
            raise Closed("the service is shutting down")
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} requests are waiting")

    async def submit(self, key: Hashable, work: Any, tokens: int) -> list[Any]:
        """Queue work for the engine (`tokens` source tokens, for count_tokens) and wait for its results, in order;
        cancelling the wait drops the job."""
        self.check_room()
        job = _Job(key, work, tokens, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._idle.clear()
        self._wake.set()
        try:
            return await job.future
        finally:
            if job.future.cancelled() or not job.future.done():  # the caller gave up: drop (or cancel) the job
                job.abandoned = True
                job.future.cancel()

    async def close(self) -> None:
        """Refuse new jobs, finish the queued and running ones, stop the loop."""
        self._closed = True
        await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        worked = False
        loop = asyncio.get_running_loop()
        settle = functools.partial(loop.call_soon_threadsafe, self._settle)  # how the worker thread hands jobs over
        while True:
            self._pending = collections.deque(job for job in self._pending if not job.future.done())
            if not self._pending and not self._running:
                self._idle.set()
                self._wake.clear()
                if worked and self._on_idle is not None:
                    worked = False
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.idle_s)
                    except asyncio.TimeoutError:  # wait_for's: not the builtin TimeoutError before Python 3.11
                        await self._idle_work()
                    continue
                await self._wake.wait()
                continue
            worked = True
            leaving = [job for job in self._running if job.future.done()]
            for job in leaving:  # before admitting: an abandoned job's room goes to a waiting one
                del self._running[job]
            joining = self._admit()
            try:
                await loop.run_in_executor(self._executor, self._advance, joining, leaving,
                                           list(self._running), settle)
            except Exception as exc:  # a bug here must fail the running jobs, not stop the loop that serves them all
                log.exception("a batch step failed")
                failed = list(self._running)
                try:
                    await loop.run_in_executor(self._executor, self._drop, failed)
                except Exception:  # an executor shut down: the jobs still fail below, and the loop goes on
                    log.exception("the failed requests could not leave the batch")
                self._settle([(job, exc) for job in failed])

    def _settle(self, outcomes: list[tuple[_Job, Sequence[Any] | BaseException]]) -> None:
        """Event loop: jobs done (or failed) leave the running batch, and their callers get the outcome."""
        for job, outcome in outcomes:
            self._running.pop(job, None)
            if job.future.done():  # its caller left
                continue
            try:
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(list(outcome))
                    if self._count_tokens is not None:
                        self._count_tokens(job.tokens)  # translated for someone: not failed, nor for nobody
            except Exception as exc:  # an outcome that cannot be handed over fails its own job, not the loop
                log.exception("a finished request could not be answered")
                if not job.future.done():
                    job.future.set_exception(exc)

    async def _idle_work(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._on_idle)
        except Exception:  # housekeeping: never the loop's end
            log.exception("idle work failed")

    def _admit(self) -> list[_Job]:
        """Move waiting jobs into the running batch while it has room, unless they joined it too recently."""
        if self._running and self._pending and time.monotonic() < self._join_time(len(self._running)):
            return []
        joining = []
        while self._pending and len(self._running) < self.max_requests:
            job = self._pending.popleft()
            self._running[job] = None
            joining.append(job)
        if joining:
            self._last_join = time.monotonic()
        return joining

    def _join_time(self, running: int) -> float:
        """When waiting jobs may next join a batch of `running` jobs: max_wait_s after the last join, times the
        share of max_requests the batch holds. A join holds up every running job (encoder pass, batch merge) at a
        cost that hardly depends on how many join: the fuller the batch, the more jobs should wait to join it
        together."""
        return self._last_join + self.max_wait_s * running / self.max_requests

    def _may_join(self, running: int) -> bool:
        """Worker thread: whether waiting jobs may join the engine's `running` jobs now (the event loop admits them)."""
        return bool(self._pending) and running < self.max_requests and time.monotonic() >= self._join_time(running)

    def _advance(self, joining: list[_Job], leaving: list[_Job], running: list[_Job],
                 settle: Callable[[list[tuple[_Job, Sequence[Any] | BaseException]]], object]) -> None:
        """Worker thread: jobs join and leave the engine, which then takes steps until waiting jobs may join or the
        time slice is over. The jobs done at a step go to `settle` (on the event loop) at once, so that their
        answers go out while the batch decodes on. If a step raises, every running job fails and leaves the
        engine."""
        engine = self._engine
        live = dict.fromkeys(running)
        for job in leaving:
            engine.cancel(job)
        refused = []
        for job in joining:
            try:
                engine.add(job, job.key, job.work)
            except Exception as exc:
                refused.append((job, exc))
                del live[job]
        if refused:
            settle(refused)
        end = time.monotonic() + SLICE_S
        while len(engine):
            jobs, segments, start = len(engine), engine.segments, time.monotonic()
            try:
                stepped = engine.step()
            except Exception as exc:
                log.exception("a batch step failed")
                for job in live:
                    engine.cancel(job)
                stepped = [(job, exc) for job in live]
            if self._observe is not None:
                self._observe(jobs, segments, time.monotonic() - start)
            if stepped:
                for job, _ in stepped:
                    live.pop(job, None)
                settle(self._rerun_failed(stepped))
            if time.monotonic() > end or self._may_join(len(engine)):
                break

    def _rerun_failed(self, stepped: list[tuple[_Job, Sequence[Any] | BaseException]]
                      ) -> list[tuple[_Job, Sequence[Any] | BaseException]]:
        """Worker thread: a step's outcomes, with the jobs that failed together (a search they shared raised) each
        rerun alone, so that one bad request cannot fail the requests it ran with."""
        failed = [job for job, outcome in stepped if isinstance(outcome, Exception)]
        if len(failed) < 2:
            return stepped
        log.warning("%d requests failed together; rerunning them one by one", len(failed))
        return [(job, self._run_alone(job) if isinstance(outcome, Exception) and not job.abandoned else outcome)
                for job, outcome in stepped]

    def _drop(self, jobs: list[_Job]) -> None:
        """Worker thread: take failed jobs out of the engine, so that it does not go on decoding them for nobody."""
        for job in jobs:
            try:
                self._engine.cancel(job)
            except Exception:
                log.exception("a failed request could not leave the batch")

    def _run_alone(self, job: _Job) -> Sequence[Any] | BaseException:
        try:
            return self._engine.run_alone(job.key, job.work)
        except Exception as exc:
            return exc
