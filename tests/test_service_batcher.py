"""The continuous-batching Batcher, driving a recording engine (no model needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batcher import Batcher, Closed, QueueFull
from service.memory import trim_heap


class Recorder:
    """An engine whose jobs are lists of ints: a job takes as many steps as its largest item, then answers
    "key:item" for each. It records who was running at every step; `gate` holds the worker thread until the test
    opens it, `fail_on` makes every step that runs that item fail all running jobs (like a shared beam search)."""

    def __init__(self) -> None:
        self.running: dict[Hashable, tuple[object, list, int]] = {}
        self.steps: list[list[list]] = []  # per step: the items of each running job
        self.added: list[list] = []
        self.cancelled: list[list] = []
        self.alone: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on: object = None
        self.raise_on: object = None  # a step that runs this item raises (a bug outside any one search)
        self.delay = 0.0  # seconds a step takes
        self.joined: list[tuple[int, float]] = []  # per add: steps taken before it, and when

    def add(self, handle: Hashable, key: object, items: list) -> None:
        if "refused" in items:
            raise ValueError("cannot take that")
        self.added.append(items)
        self.joined.append((len(self.steps), time.monotonic()))
        self.running[handle] = (key, items, max(i for i in items if isinstance(i, int)))

    def cancel(self, handle: Hashable) -> None:
        self.cancelled.append(self.running.pop(handle)[1])

    def step(self) -> list:
        self.entered.set()
        assert self.gate.wait(10)
        time.sleep(self.delay)
        self.steps.append([items for _, items, _ in self.running.values()])
        if any(self.raise_on in items for _, items, _ in self.running.values()):
            raise RuntimeError("engine bug")
        if any(self.fail_on in items for _, items, _ in self.running.values()):
            failed = [(h, ValueError("boom")) for h in self.running]
            self.running.clear()
            return failed
        done = []
        for handle, (key, items, left) in list(self.running.items()):
            if left <= 1:
                del self.running[handle]
                done.append((handle, [f"{key}:{i}" for i in items]))
            else:
                self.running[handle] = (key, items, left - 1)
        return done

    def run_alone(self, key: object, items: list) -> list:
        self.alone.append(items)
        if self.fail_on in items:
            raise ValueError(f"cannot take {self.fail_on!r}")
        return [f"{key}:{i}" for i in items]

    def __len__(self) -> int:
        return len(self.running)

    @property
    def segments(self) -> int:
        return sum(len(items) for _, items, _ in self.running.values())


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


def make(engine: Recorder, executor: ThreadPoolExecutor, **kwargs) -> Batcher:
    options = {"max_requests": 64, "max_queue": 100, **kwargs}
    return Batcher(engine, executor, **options)


async def wait_for(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_concurrent_jobs_run_together_and_keep_their_order(executor):
    async def main():
        engine = Recorder()
        batcher = make(engine, executor)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("k", [i, 3], 2) for i in range(5)))
        await batcher.close()
        return engine, results

    engine, results = asyncio.run(main())
    assert results == [[f"k:{i}", "k:3"] for i in range(5)]
    assert max(len(step) for step in engine.steps) == 5


def test_a_short_job_joins_a_running_one_and_leaves_first(executor):
    async def main():
        engine = Recorder()
        engine.gate.clear()
        batcher = make(engine, executor)
        batcher.start()
        long = asyncio.ensure_future(batcher.submit("k", [20], 1))
        await wait_for(engine.entered.is_set)
        short = asyncio.ensure_future(batcher.submit("k", [2], 1))
        await wait_for(lambda: batcher.depth == 1)
        engine.gate.set()
        assert await short == ["k:2"]
        assert not long.done()  # the short job did not wait for the long one
        assert await long == ["k:20"]
        await batcher.close()
        return engine

    engine = asyncio.run(main())
    assert [[20], [2]] in engine.steps  # it joined the running batch between two steps
    assert len(engine.steps) == 20

def test_the_batch_decodes_on_while_the_event_loop_is_busy(executor):
    # A job done goes to the event loop while the worker thread steps on: the batch does not wait for the loop
    # (which may be busy with other requests) before its next step. It did, at every job done: 12% of the model's
    # time at concurrency 32, where a job ends every step or two.
    async def main():
        engine = Recorder()
        engine.delay = 0.01
        batcher = make(engine, executor)
        batcher.start()
        long = asyncio.ensure_future(batcher.submit("k", [40], 1))
        short = asyncio.ensure_future(batcher.submit("k", [2], 1))
        await wait_for(lambda: len(engine.steps) >= 1)
        time.sleep(0.3)  # the event loop busy (the short job ends meanwhile)
        during = len(engine.steps) - 1
        assert await short == ["k:2"] and await long == ["k:40"]
        await batcher.close()
        return during

    assert asyncio.run(main()) >= 10


def test_an_outcome_that_cannot_be_handed_over_fails_its_job_alone(executor):
    # asyncio refuses StopIteration as a future's exception: the job whose step gave one was left unanswered, and
    # (since the worker thread hands outcomes over as it goes) the loop spun and close() never returned.
    class Odd(Recorder):
        def step(self) -> list:
            return [(h, StopIteration() if "odd" in str(out) else out) for h, out in super().step()]

    async def main():
        engine = Odd()
        batcher = make(engine, executor)
        batcher.start()
        both = asyncio.gather(batcher.submit("k", [1, "odd"], 1), batcher.submit("k", [2], 1), return_exceptions=True)
        results = await asyncio.wait_for(both, 5)
        await asyncio.wait_for(batcher.close(), 5)
        return results

    odd, fine = asyncio.run(main())
    assert isinstance(odd, TypeError) and fine == ["k:2"]


@pytest.mark.parametrize("max_wait_s", [1.2, 0.0])
def test_jobs_arriving_while_a_batch_runs_join_it_together_at_most_every_max_wait(executor, max_wait_s):
    async def main():
        engine = Recorder()
        engine.delay = 0.005
        batcher = make(engine, executor, max_wait_s=max_wait_s, max_requests=4)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("k", [200], 1))
        await wait_for(lambda: engine.joined)
        later = []
        for i in range(3):  # 40 ms apart: within the batch's join interval (0.3 s, below) of each other
            await asyncio.sleep(0.04)
            later.append(asyncio.ensure_future(batcher.submit("k", [2 + i], 1)))
        assert await asyncio.gather(*later) == [["k:2"], ["k:3"], ["k:4"]]
        first.cancel()
        await batcher.close()
        return engine

    engine = asyncio.run(main())
    (start, started_at), *joins = engine.joined
    assert start == 0  # the idle engine took the first job at once
    if max_wait_s:
        assert len({step for step, _ in joins}) == 1  # one round for the three
        # A batch holding 1 job of at most 4 waits a quarter of max_wait_s for others to join it (counted from the
        # join's admission on the event loop, which the engine records a little later: 50 ms of slack).
        assert max_wait_s / 4 - 0.05 <= joins[0][1] - started_at < max_wait_s / 2
    else:
        assert len({step for step, _ in joins}) == 3  # each at the step after it came


def test_the_join_interval_shrinks_with_the_batch(executor):
    async def main():
        engine = Recorder()
        engine.delay = 0.005
        batcher = make(engine, executor, max_wait_s=1.2, max_requests=4)
        batcher.start()
        # Four join an idle engine together (a full batch: the next join 1.2 s on); three leave after two steps.
        long = asyncio.ensure_future(batcher.submit("k", [400], 1))
        short = [asyncio.ensure_future(batcher.submit("k", [2], 1)) for _ in range(3)]
        await asyncio.gather(*short)
        assert len(engine.running) == 1
        late = await batcher.submit("k", [1], 1)
        long.cancel()
        await batcher.close()
        return engine, late

    engine, late = asyncio.run(main())
    assert late == ["k:1"]
    (first, started_at), *_, (_, joined_at) = engine.joined
    assert first == 0 and len(engine.joined) == 5
    # One job of at most 4 left running: others may join 0.3 s after the last join, not the full batch's 1.2 s
    # (50 ms of slack, as above).
    assert 0.25 <= joined_at - started_at < 0.6


def test_the_request_budget_caps_the_running_batch_and_tokens_do_not(executor):
    async def main():
        engine = Recorder()
        batcher = make(engine, executor, max_requests=2)
        batcher.start()
        # The engine keeps its own token budget: a job of many tokens neither runs alone nor keeps others out.
        results = await asyncio.gather(batcher.submit("k", [9], 5000),
                                       *(batcher.submit("k", [3], 3) for _ in range(4)))
        await batcher.close()
        return engine, results

    engine, results = asyncio.run(main())
    assert results == [["k:9"], *[["k:3"]] * 4]
    assert max(len(step) for step in engine.steps) == 2
    assert [[9], [3]] in engine.steps


def test_full_queue_refuses_new_jobs(executor):
    async def main():
        engine = Recorder()
        engine.gate.clear()
        batcher = make(engine, executor, max_queue=2, max_requests=1)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("k", [1], 1))
        await wait_for(engine.entered.is_set)
        queued = [asyncio.ensure_future(batcher.submit("k", [i + 1], 1)) for i in range(2)]
        await wait_for(lambda: batcher.depth == 2)
        with pytest.raises(QueueFull):
            await batcher.submit("k", [1], 1)
        engine.gate.set()
        await asyncio.gather(running, *queued)
        await batcher.close()

    asyncio.run(main())


def submit_all_then_one(engine: Recorder, executor: ThreadPoolExecutor, jobs: list[list]) -> tuple[list, list]:
    """Submit the jobs together, then (the engine's faults off) one more; their outcomes."""
    async def main():
        batcher = make(engine, executor)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("k", items, 1) for items in jobs), return_exceptions=True)
        engine.raise_on = None
        after = await batcher.submit("k", [1], 1)
        await batcher.close()
        return results, after

    return asyncio.run(main())


def test_a_failing_job_does_not_fail_the_jobs_it_ran_with(executor):
    engine = Recorder()
    engine.fail_on = "bad"
    results, after = submit_all_then_one(engine, executor, [[2], [1, "bad"], [3], ["refused", 1]])
    assert results[0] == ["k:2"] and results[2] == ["k:3"]
    assert isinstance(results[1], ValueError) and "bad" in str(results[1])
    assert isinstance(results[3], ValueError) and "cannot take that" in str(results[3])
    assert sorted(map(str, engine.alone)) == sorted(map(str, [[2], [1, "bad"], [3]]))  # each rerun alone
    assert after == ["k:1"]


def test_abandoned_jobs_are_dropped_or_cancelled(executor):
    counted: list[int] = []

    async def main():
        engine = Recorder()
        engine.gate.clear()
        batcher = make(engine, executor, max_requests=1, count_tokens=counted.append)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("k", [10**9], 7))  # never done within the time slice
        await wait_for(engine.entered.is_set)
        with pytest.raises(asyncio.TimeoutError):  # waiting in the queue (not the builtin before Python 3.11)
            await asyncio.wait_for(batcher.submit("k", ["queued", 1], 1), 0.05)
        kept = asyncio.ensure_future(batcher.submit("k", [2], 1))
        await wait_for(lambda: batcher.depth == 1)
        running.cancel()  # running in the engine: its room goes to the waiting job
        engine.gate.set()
        assert await kept == ["k:2"]
        await batcher.close()
        return engine

    engine = asyncio.run(main())
    assert engine.cancelled == [[10**9]]
    assert ["queued", 1] not in engine.added
    assert [[2]] in engine.steps
    assert counted == [1]  # the tokens translated: not those of the cancelled job (counted as it joined)


def test_tokens_of_a_job_whose_caller_left_during_its_last_step_are_not_counted(executor):
    # nmt_source_tokens counts the tokens translated for someone: it counted these too.
    counted: list[int] = []

    async def main():
        engine = Recorder()
        engine.gate.clear()
        batcher = make(engine, executor, count_tokens=counted.append)
        batcher.start()
        leaving = asyncio.ensure_future(batcher.submit("k", [1], 7))  # done in the step that is held
        await wait_for(engine.entered.is_set)
        leaving.cancel()
        await asyncio.sleep(0)
        engine.gate.set()
        assert await batcher.submit("k", [1], 3) == ["k:1"]
        await batcher.close()

    asyncio.run(main())
    assert counted == [3]


def test_close_finishes_queued_and_running_jobs_then_refuses_new_ones(executor):
    async def main():
        engine = Recorder()
        engine.gate.clear()
        batcher = make(engine, executor, max_requests=1)
        batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit("k", [i + 1], 1)) for i in range(3)]
        await wait_for(engine.entered.is_set)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.02)
        assert not closing.done()
        engine.gate.set()
        await closing
        with pytest.raises(Closed):
            await batcher.submit("k", [1], 1)
        return await asyncio.gather(*jobs)

    assert asyncio.run(main()) == [["k:1"], ["k:2"], ["k:3"]]


def test_a_raising_step_takes_the_running_jobs_out_of_the_engine_and_reruns_them_alone(executor):
    engine = Recorder()
    engine.raise_on = "bug"
    results, after = submit_all_then_one(engine, executor, [[3], [2, "bug"]])
    assert results == [["k:3"], ["k:2", "k:bug"]]
    assert sorted(map(str, engine.alone)) == sorted(map(str, [[3], [2, "bug"]]))
    assert engine.cancelled and after == ["k:1"] and len(engine) == 0


def test_a_failure_outside_the_engine_fails_the_running_jobs_and_takes_them_out_of_it(executor):
    engine = Recorder()

    def observe(jobs: int, segments: int, seconds: float) -> None:
        if engine.raise_on is not None:
            raise RuntimeError("metrics bug")

    async def main():
        batcher = make(engine, executor, observe=observe)
        batcher.start()
        engine.raise_on = "off"  # only observe raises
        failed = await asyncio.gather(batcher.submit("k", [3], 1), batcher.submit("k", [5], 1),
                                      return_exceptions=True)
        engine.raise_on = None
        after = await batcher.submit("k", [1], 1)
        await batcher.close()
        return failed, after

    failed, after = asyncio.run(main())
    assert [str(f) for f in failed] == ["metrics bug", "metrics bug"] and after == ["k:1"]
    assert sorted(engine.cancelled) == [[3], [5]]  # not decoded on for nobody
    assert engine.steps[-1] == [[1]]


def test_jobs_failing_together_are_not_rerun_for_callers_who_gave_up(executor):
    async def main():
        engine = Recorder()
        engine.gate.clear()
        engine.fail_on = "bad"
        batcher = make(engine, executor)
        batcher.start()
        bad = asyncio.ensure_future(batcher.submit("k", [3, "bad"], 1))
        gone = asyncio.ensure_future(batcher.submit("k", [3], 1))
        await wait_for(engine.entered.is_set)
        gone.cancel()  # its caller gives up while the step that will fail is running
        await asyncio.gather(gone, return_exceptions=True)
        engine.gate.set()
        with pytest.raises(ValueError):
            await bad
        await batcher.close()
        return engine

    engine = asyncio.run(main())
    assert engine.steps[0] == [[3, "bad"], [3]]  # they failed together ...
    assert engine.alone == [[3, "bad"]]  # ... and only the job somebody still waits for ran again


def test_idle_work_runs_once_a_pause_after_work_on_the_worker_thread(executor):
    calls = []

    async def main():
        engine = Recorder()
        batcher = make(engine, executor, on_idle=lambda: calls.append(threading.current_thread().name),
                       idle_s=0.1)
        batcher.start()
        await asyncio.sleep(0.3)
        assert calls == []  # no work yet: nothing to clean up after
        for _ in range(3):  # requests closer together than idle_s: no idle work between them
            assert await batcher.submit("k", [2], 1) == ["k:2"]
            await asyncio.sleep(0.02)
        assert calls == []
        await asyncio.sleep(0.3)
        assert len(calls) == 1  # once, not again while idle
        assert await batcher.submit("k", [1], 1) == ["k:1"]  # the batcher still serves after it
        await asyncio.sleep(0.3)
        await batcher.close()

    asyncio.run(main())
    assert len(calls) == 2 and all(name != threading.main_thread().name for name in calls)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_trim_heap_gives_freed_heap_memory_back():
    # 100 MB in blocks below glibc's mmap threshold, freed under a block still in use: the heap keeps the pages.
    blocks = [bytearray(b"x" * 100_000) for _ in range(1000)]
    kept = bytearray(b"x" * 100_000)
    del blocks
    before = rss_mb()
    assert trim_heap() is True  # Debian's glibc has malloc_trim
    assert rss_mb() < before - 50
    assert kept[0] == ord("x")
