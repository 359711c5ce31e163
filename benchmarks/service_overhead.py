"""The service's own CPU per translate request: what `nmt serve` spends on a request beside decoding it.

    python benchmarks/service_overhead.py [models/es-en-bible] [--src data/bible/test.src] \\
        [--concurrency 1 32] [--requests 3000] [--server-cpus 1] [--client-cpus 0] [--out benchmarks/results]

A server is started as `nmt serve` runs it (service.server.serve: uvicorn with httptools and uvloop, the access
log, every middleware), with one change: the model's TranslationStream is replaced by one that answers each
request at its first decoding step with its source sentences, without running the model. Each request is still
read, validated, tokenized, queued, handed to the model thread and back, serialized, counted in the metrics and
logged, so the server's CPU time (user + system of all its threads, /proc/PID/stat) over the requests answered
is what those cost. Left out: what scales with decoding steps (a real request takes about 37 steps alone, each
with its metrics and a look at the queue), detokenizing the output, and what the event loop's work does to the
decoder beside it on the same cores (the GIL, caches); loopback TCP is charged partly to the client. The load
generator is service_load.py's (one-verse requests at beam 5 from C clients, each on its own keep-alive
connection); pin it and the server to different CPUs. The server's output goes to OUT/service_overhead.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
from collections.abc import Hashable
from importlib import metadata
from pathlib import Path

from service_load import cpu_seconds, free_port, load, read_sources, running

from nmt.cli import int_from
from nmt.device import cpu_name
from nmt.translator import Job, Translation, detokenize


class InstantStream:
    """A TranslationStream that answers every job at the next step with its source sentences, as they were
    tokenized, for 1-best translations (no alternatives, alignments or scores of the model's)."""

    def __init__(self, translator: object):
        self._jobs: dict[Hashable, Job] = {}

    def add_job(self, handle: Hashable, job: Job) -> None:
        self._jobs[handle] = job

    def cancel(self, handle: Hashable) -> None:
        self._jobs.pop(handle, None)

    def step(self) -> list[tuple[Hashable, list[Translation]]]:
        done = [(handle, [Translation(" ".join(detokenize(job.segments[i].pieces) for i in plan if isinstance(i, int)),
                                      0.0) for plan in job.plans]) for handle, job in self._jobs.items()]
        self._jobs.clear()
        return done

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def segments(self) -> int:
        return sum(len(job.segments) for job in self._jobs.values())


def serve_without_model(model: str, port: int) -> None:
    """The child process: `nmt serve MODEL --port PORT` with InstantStream in place of the model's decoding."""
    from service import server, worker
    worker.TranslationStream = InstantStream
    os.environ["NMT_MODEL_DIR"] = model
    server.serve(host="127.0.0.1", port=port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="models/es-en-bible", help="exported model (default %(default)s)")
    p.add_argument("--src", default="data/bible/test.src", help="sentences, one a line (default %(default)s)")
    p.add_argument("--concurrency", type=int_from(1), nargs="+", default=[1, 32], help="clients per row")
    p.add_argument("--requests", type=int_from(1), default=3000, help="requests per row (default %(default)s)")
    p.add_argument("--server-cpus", default="", help="pin the server with taskset -c (default: no pinning)")
    p.add_argument("--client-cpus", default="", help="pin this load generator, e.g. 0 (default: no pinning)")
    p.add_argument("--out", default="benchmarks/results", help="where service_overhead.json and .md go (default "
                   "%(default)s)")
    p.add_argument("--child-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_port is not None:
        serve_without_model(args.model, args.child_port)
        return
    if not Path(args.model).exists():
        p.error(f"model not found: {args.model}")
    texts = read_sources(Path(args.src), 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "NMT_API_KEYS": "", "NMT_RATE_LIMIT": "", "NMT_MAX_QUEUE": str(4 * max(args.concurrency))}
    cmd = [sys.executable, __file__, args.model, "--child-port", str(port)]
    rows = []
    with running(cmd, env, url, "the server", out / "service_overhead.log", 300, args.server_cpus) as (proc, _):
        if args.client_cpus:  # after the server started: it keeps the CPUs this script started with
            os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
        asyncio.run(load(url, texts, concurrency=1, requests=100, duration=0, beam=5, timeout=60))  # warm-up
        for concurrency in args.concurrency:
            before = cpu_seconds(proc.pid)
            results, wall = asyncio.run(load(url, texts, concurrency=concurrency, requests=args.requests,
                                             duration=0, beam=5, timeout=60))
            cpu = cpu_seconds(proc.pid) - before
            ok = sum(outcome == "200" for outcome, _ in results)
            rows.append({"concurrency": concurrency, "requests": len(results), "errors": len(results) - ok,
                         "requests_per_s": ok / wall,
                         "server_cpu_ms_per_request": 1000 * cpu / ok if ok else None,
                         "server_cpu_percent": 100 * cpu / wall})
            print(json.dumps(rows[-1]), flush=True)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {metadata.version('torch')}"
    lines = [f"Machine: {machine}", "", f"Model {args.model}, its decoding replaced by an instant answer; one "
             f"sentence a request at beam 5; {args.requests} requests a row; server on CPUs "
             f"{args.server_cpus or 'any'}, client on {args.client_cpus or 'any'}", "",
             "| concurrency | requests | errors | requests/s | server CPU ms per request | server CPU % |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        per_request = "" if r["server_cpu_ms_per_request"] is None else f"{r['server_cpu_ms_per_request']:.3f}"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.0f} | "
                     f"{per_request} | {r['server_cpu_percent']:.0f} |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    command = shlex.join([sys.executable, *sys.argv])
    (out / "service_overhead.json").write_text(json.dumps(
        {"machine": machine, "python": platform.python_version(), "command": command, "rows": rows}, indent=1) + "\n",
        encoding="utf-8")
    (out / "service_overhead.md").write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
