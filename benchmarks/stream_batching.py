"""Continuous batching without the service: what batching gains in the decoder itself, with no HTTP, event loop or
other thread beside it.

    python benchmarks/stream_batching.py [models/es-en-bible] [--src data/bible/test.src] [--concurrency 1 32] \\
        [--join-every 1 8 32] [--requests 400] [--beam 5] [--threads 2] [--out benchmarks/results]

For each concurrency C and join interval K, C calls of one sentence each (of --src, shuffled with --seed as
service_load.py does) are kept in one TranslationStream, the decoder the service runs: whenever a call finishes,
the next sentence takes its place, joining at the next step whose number is a multiple of K (the service joins
at most every NMT_MAX_WAIT_MS x running / NMT_MAX_BATCH_REQUESTS, so K stands in for that interval). C = 1 is
the service with batching off (NMT_MAX_BATCH_REQUESTS=1): one request decoded at a time. A few calls run first
as a warm-up, outside the timing. requests/s counts --requests finished calls over the wall time; mean calls is
the number of calls in the stream per step, ms/step the wall time per step, joins included.

The ratio of a row's requests/s to that of C = 1 is the most batching can give the service on this machine; run
service_load.py right after to see how much of it the service keeps. Pin it as the service is pinned
(`taskset -c 0,1`), with nothing else running.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from service_load import read_sources

from nmt.cli import int_from
from nmt.device import cpu_name
from nmt.errors import NMTError
from nmt.stream import TranslationStream
from nmt.translator import Translator

WARMUP_CALLS = 8


def run(translator: Translator, sources: list[str], concurrency: int, join_every: int, requests: int,
        beam: int) -> dict:
    """One row: `requests` calls through a stream kept at `concurrency` calls, joining every `join_every` steps."""
    texts = itertools.cycle(sources)
    stream = TranslationStream(translator)
    handles = itertools.count()
    for _ in range(WARMUP_CALLS):
        stream.add(next(handles), [next(texts)], beam_size=beam)
    while len(stream):
        stream.step()
    for _ in range(concurrency):
        stream.add(next(handles), [next(texts)], beam_size=beam)
    finished = steps = calls = freed = 0
    start = time.perf_counter()
    while finished < requests:
        done = stream.step()
        steps += 1
        calls += len(stream) + len(done)
        finished += len(done)
        freed += len(done)
        if freed and steps % join_every == 0:
            for _ in range(freed):
                stream.add(next(handles), [next(texts)], beam_size=beam)
            freed = 0
    seconds = time.perf_counter() - start
    return {"concurrency": concurrency, "join_every": join_every, "requests": finished,
            "requests_per_s": finished / seconds, "mean_calls": calls / steps, "ms_per_step": 1000 * seconds / steps}


def table(rows: list[dict]) -> str:
    alone = {r["join_every"]: r["requests_per_s"] for r in rows if r["concurrency"] == 1}
    base = next(iter(alone.values()), None)
    lines = ["| concurrency | join every (steps) | requests | requests/s | mean calls per step | ms per step | "
             "/ concurrency 1 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['requests_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {r['concurrency']} | {r['join_every']} | {r['requests']} | {r['requests_per_s']:.1f} | "
                     f"{r['mean_calls']:.1f} | {r['ms_per_step']:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="models/es-en-bible", help="exported model (default: %(default)s)")
    p.add_argument("--src", type=Path, default=Path("data/bible/test.src"),
                   help="source sentences, one a line (default: %(default)s)")
    p.add_argument("--concurrency", type=int_from(1), nargs="+", default=[1, 32],
                   help="calls kept in the stream, one row each (default: 1 32)")
    p.add_argument("--join-every", type=int_from(1), nargs="+", default=[1, 8, 32],
                   help="steps between joins, one row each per concurrency over 1 (default: 1 8 32)")
    p.add_argument("--requests", type=int_from(1), default=400, help="timed calls a row (default: %(default)s)")
    p.add_argument("--beam", type=int_from(1), default=5, help="beam size (default: %(default)s)")
    p.add_argument("--threads", type=int_from(1), default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="shuffles the sentences (default: %(default)s)")
    p.add_argument("--out", type=Path, help="write stream_batching.json and .md here")
    args = p.parse_args()
    sources = read_sources(args.src, args.seed)
    try:
        translator = Translator.load(args.model, threads=args.threads)
    except NMTError as exc:
        raise SystemExit(f"stream_batching.py: {exc}") from None
    rows = []
    for concurrency in sorted(args.concurrency):
        # One call at a time joins at the step after the last finished, whatever the interval: one row.
        for join_every in [1] if concurrency == 1 else args.join_every:
            rows.append(run(translator, sources, concurrency, join_every, args.requests, args.beam))
            print(json.dumps(rows[-1]), flush=True)
    header = (f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), "
              f"CPU affinity {sorted(os.sched_getaffinity(0))}\n\nModel {args.model}; one sentence a call at beam "
              f"{args.beam}; {args.requests} calls a row\n\n")
    report = header + table(rows) + "\n"
    print("\n" + report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stream_batching.json").write_text(json.dumps(
            {"machine": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
             "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n", encoding="utf-8")
        (args.out / "stream_batching.md").write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
