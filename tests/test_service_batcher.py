"""The request-coalescing Batcher, driven by a recording run function (no model needed)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batcher import Batcher, Closed, QueueFull


class Recorder:
    """A run function that records its batches; `gate` holds the worker thread until the test opens it."""

    def __init__(self) -> None:
        self.batches: list[tuple[object, list]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on: str | None = None

    def __call__(self, key: object, items: list) -> list:
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append((key, list(items)))
        if self.fail_on in items:
            raise ValueError(f"cannot take {self.fail_on!r}")
        return [f"{key}:{item}" for item in items]


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


def make(run: Recorder, executor: ThreadPoolExecutor, **kwargs) -> Batcher:
    options = {"max_tokens": 1000, "max_requests": 64, "max_wait_s": 0.01, "max_queue": 100, **kwargs}
    return Batcher(run, executor, **options)


async def wait_for(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_concurrent_jobs_with_equal_keys_share_a_batch_and_keep_their_order(executor):
    async def main():
        run = Recorder()
        batcher = make(run, executor)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("k", [f"a{i}", f"b{i}"], 2) for i in range(5)))
        await batcher.close()
        return run, results

    run, results = asyncio.run(main())
    assert results == [[f"k:a{i}", f"k:b{i}"] for i in range(5)]
    assert len(run.batches) == 1 and len(run.batches[0][1]) == 10


def test_jobs_queue_while_the_worker_is_busy_and_form_the_next_batch(executor):
    async def main():
        run = Recorder()
        run.gate.clear()
        batcher = make(run, executor, max_wait_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("k", ["first"], 1))
        await wait_for(run.entered.is_set)
        later = [asyncio.ensure_future(batcher.submit("k", [f"x{i}"], 1)) for i in range(6)]
        await wait_for(lambda: batcher.depth == 6)
        run.gate.set()
        await asyncio.gather(first, *later)
        await batcher.close()
        return run

    run = asyncio.run(main())
    assert [len(items) for _, items in run.batches] == [1, 6]


def test_different_keys_never_share_a_batch(executor):
    async def main():
        run = Recorder()
        batcher = make(run, executor)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i % 2, [i], 1) for i in range(6)))
        await batcher.close()
        return run, results

    run, results = asyncio.run(main())
    assert results == [[f"{i % 2}:{i}"] for i in range(6)]
    for key, items in run.batches:
        assert all(item % 2 == key for item in items)


def test_token_and_request_budgets_split_batches(executor):
    async def main(**limits):
        run = Recorder()
        run.gate.clear()
        batcher = make(run, executor, max_wait_s=0.0, **limits)
        batcher.start()
        block = asyncio.ensure_future(batcher.submit("block", ["x"], 1))
        await wait_for(run.entered.is_set)
        jobs = [asyncio.ensure_future(batcher.submit("k", [i], 4)) for i in range(6)]
        await wait_for(lambda: batcher.depth == 6)
        run.gate.set()
        await asyncio.gather(block, *jobs)
        await batcher.close()
        return [len(items) for key, items in run.batches if key == "k"]

    assert asyncio.run(main(max_tokens=8)) == [2, 2, 2]
    assert asyncio.run(main(max_requests=1)) == [1] * 6
    assert asyncio.run(main(max_tokens=1)) == [1] * 6  # a job over the budget still runs, alone


def test_full_queue_refuses_new_jobs(executor):
    async def main():
        run = Recorder()
        run.gate.clear()
        batcher = make(run, executor, max_queue=2, max_wait_s=0.0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("k", ["running"], 1))
        await wait_for(run.entered.is_set)
        queued = [asyncio.ensure_future(batcher.submit("k", [i], 1)) for i in range(2)]
        await wait_for(lambda: batcher.depth == 2)
        with pytest.raises(QueueFull):
            await batcher.submit("k", ["refused"], 1)
        run.gate.set()
        await asyncio.gather(running, *queued)
        await batcher.close()

    asyncio.run(main())


def test_a_failing_job_does_not_fail_the_jobs_it_was_merged_with(executor):
    async def main():
        run = Recorder()
        run.fail_on = "bad"
        batcher = make(run, executor)
        batcher.start()
        results = await asyncio.gather(batcher.submit("k", ["good1"], 1), batcher.submit("k", ["bad"], 1),
                                       batcher.submit("k", ["good2"], 1), return_exceptions=True)
        after = await batcher.submit("k", ["good3"], 1)
        await batcher.close()
        return results, after

    results, after = asyncio.run(main())
    assert results[0] == ["k:good1"] and results[2] == ["k:good2"]
    assert isinstance(results[1], ValueError)
    assert after == ["k:good3"]


def test_abandoned_jobs_are_skipped(executor):
    async def main():
        run = Recorder()
        run.gate.clear()
        batcher = make(run, executor, max_wait_s=0.0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("k", ["running"], 1))
        await wait_for(run.entered.is_set)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit("k", ["abandoned"], 1), 0.05)
        kept = asyncio.ensure_future(batcher.submit("k", ["kept"], 1))
        run.gate.set()
        await asyncio.gather(running, kept)
        await batcher.close()
        return run

    run = asyncio.run(main())
    assert all("abandoned" not in items for _, items in run.batches)


def test_close_finishes_queued_jobs_then_refuses_new_ones(executor):
    async def main():
        run = Recorder()
        run.gate.clear()
        batcher = make(run, executor, max_wait_s=0.0)
        batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit("k", [i], 1)) for i in range(3)]
        await wait_for(run.entered.is_set)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.02)
        assert not closing.done()
        run.gate.set()
        await closing
        with pytest.raises(Closed):
            await batcher.submit("k", ["late"], 1)
        return await asyncio.gather(*jobs)

    assert asyncio.run(main()) == [["k:0"], ["k:1"], ["k:2"]]
