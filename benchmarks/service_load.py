"""Service load: throughput, latency percentiles, errors and server memory of `nmt serve` under concurrent clients.

    python benchmarks/service_load.py [models/es-en-bible] [--src data/bible/test.src] \\
        [--concurrency 1 8 32 128] [--requests N | --duration S] [--modes on off] \\
        [--server-cpus 0,1] [--threads 2] [--client-cpus 0] [--large-texts N [--large-sentences K]] \\
        [--out benchmarks/results]

For each mode a fresh server is started: `nmt serve MODEL --host 127.0.0.1 --port <free port>` (as
`python -m nmt serve`, pinned with `taskset -c SERVER_CPUS` when given, NMT_THREADS and OMP_NUM_THREADS from
--threads), with continuous batching on (the server's NMT_MAX_BATCH_REQUESTS, or --max-batch-requests) or off
(NMT_MAX_BATCH_REQUESTS=1). The request deadline is raised (NMT_REQUEST_TIMEOUT_S, --request-timeout) and the
queue made room for every client (NMT_MAX_QUEUE, --max-queue), so the numbers measure throughput; whatever
errors still happen are counted, by status, and reported. The server's output goes to OUT/service_load_MODE.log.

Once /v1/ready answers, --warmup requests are sent one after the other, outside the timing. Then, for each
concurrency level C, C workers, each on its own keep-alive connection over loopback, send POST /v1/translate requests
back to back: one sentence of --src (shuffled with --seed, the same sequence for every level and mode) at
--beam, until --requests requests have been sent in all (default: 256, or 4 per client above 64 clients) or,
with --duration S, until S seconds have passed (requests in flight then are finished and counted).
requests/s counts the 200 responses over the wall time of the level, the last response included; latencies
(p50/p95/p99, linear interpolation) are those of the 200 responses, from send to full response; every other
outcome (status code, or exception class when no response came) is an error. Peak RSS is the server's VmHWM
from /proc/PID/status (summed over its worker processes with --workers), reset before each level through
/proc/PID/clear_refs where the kernel allows (`peak_rss_scope`: level), otherwise the peak since the server
started (`server`). Mean batch is the mean number of requests in the server's running batch over the decoding
steps of the level (nmt_batch_requests_sum / _count from /metrics; not measured with several worker processes,
which each keep their own); server CPU is its user + system time (all its processes) over the wall time (100% = one core
busy). The load generator shares the machine: pin it away from the server with --client-cpus where there are
cores to spare.

With --large-texts N, one more client sends requests of N texts (of --large-sentences sentences each, from the
end of the shuffled sources) back to back while the others run, and is stopped when they are done (its request
in flight abandoned): the rows then show the latency of single sentences beside large requests, and how many of
those were answered (with their median latency).

Writes OUT/service_load.json (machine, command lines, settings, rows) and OUT/service_load.md (the table), and
prints the table with the issue's bars: batching on / off throughput at concurrency 32, and whether p99 at
concurrency 32 stays under 1.5 s (with no errors in that row); with repeated modes, medians over on/off pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import httpx

from nmt.cli import int_from
from nmt.device import cpu_name

BAR_CONCURRENCY = 32
BAR_P99_S = 1.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_sources(path: Path, seed: int) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"source sentences not found: {path}\n"
                         "prepare the Bible corpus first (`nmt prepare bible data/bible`, or `make bible`), "
                         "or give a file of one sentence a line with --src")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise SystemExit(f"no sentences in {path}")
    random.Random(seed).shuffle(texts)
    return texts


# --- the server process: /proc readings, /metrics, start and stop -------------------------------------------------

def proc_status(pid: int, field: str) -> str | None:
    """The value of one line of /proc/PID/status, e.g. `VmHWM` (None when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def proc_status_mb(pid: int, field: str) -> float | None:
    """A `Vm...` line of /proc/PID/status (in kB there) in MiB."""
    value = proc_status(pid, field)
    try:
        return int(value.split()[0]) / 1024 if value else None
    except (ValueError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (nmt serve --workers N: the supervisor and its N workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def tree_total(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/PID/clear_refs); False where refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the process, all its threads, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)")


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics samples, by name with labels (empty when it does not answer)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            try:
                samples[match.group(1)] = float(match.group(2))
            except ValueError:
                pass
    return samples


def mean_delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """Mean of histogram `name` over the observations between two scrapes."""
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    if f"{name}_sum" not in after or count <= 0:
        return None
    return (after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)) / count


def server_env(args: argparse.Namespace, mode: str) -> dict[str, str]:
    """The NMT_* settings of one mode (on top of the caller's environment)."""
    settings = {"NMT_REQUEST_TIMEOUT_S": str(args.request_timeout), "NMT_MAX_QUEUE": str(args.max_queue),
                "NMT_API_KEYS": "", "NMT_RATE_LIMIT": ""}  # a .env with keys or a rate limit would skew the load
    if mode == "off":
        settings["NMT_MAX_BATCH_REQUESTS"] = "1"
    elif args.max_batch_requests:
        settings["NMT_MAX_BATCH_REQUESTS"] = str(args.max_batch_requests)
    if args.max_batch_tokens:
        settings["NMT_MAX_BATCH_TOKENS"] = str(args.max_batch_tokens)
    if args.threads:
        settings["NMT_THREADS"] = settings["OMP_NUM_THREADS"] = str(args.threads)
    return settings


@contextmanager
def running(cmd: list[str], env: dict[str, str], url: str, name: str, log_path: Path, timeout: float,
            server_cpus: str = "", affinity: set[int] | None = None) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """A server process started from cmd (under `taskset -c server_cpus` when given, else with `affinity` when
    given), its output in log_path; yields it and its full command once url's /v1/ready answers, and stops it
    (SIGTERM, then SIGKILL after 60 s) at the end. SystemExit, with the log's tail, if it exits or is not ready
    within timeout seconds."""
    if server_cpus:
        if not shutil.which("taskset"):
            raise SystemExit("--server-cpus needs taskset (util-linux), which is not installed")
        cmd = ["taskset", "-c", server_cpus, *cmd]  # taskset execs the server: same PID
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode} before it was ready; the tail of "
                                 f"{log_path}:\n{tail(log_path)}")
            try:
                if httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} was not ready within {timeout:g} s; the tail of {log_path}:\n"
                                 f"{tail(log_path)}")
            time.sleep(0.2)
        yield proc, cmd
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within 60 s of SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


@contextmanager
def serving(args: argparse.Namespace, mode: str, log_path: Path):
    """A fresh `nmt serve` process on a free loopback port; yields (url, process, command, settings) once ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "nmt", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers)]
    settings = server_env(args, mode)
    url = f"http://127.0.0.1:{port}"
    # unpinned, the server gets the CPUs this script started with, not those of --client-cpus
    affinity = args.start_cpus if args.client_cpus and not args.server_cpus else None
    with running(cmd, {**os.environ, **settings}, url, f"the {mode} server", log_path, args.startup_timeout,
                 args.server_cpus, affinity) as (proc, cmd):
        yield url, proc, cmd, settings


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


# --- the load generator ------------------------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


class Connection:
    """One keep-alive HTTP/1.1 connection that speaks just enough to POST JSON and read the status: a few hundred
    microseconds of CPU a request against ~3 ms for httpx, which would take a share of the two cores from the server
    it measures (and a larger one the faster the server answers)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        """Send the request and read the whole response; its status code."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), self.port, len(body),
                                                             body))
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head.split(b" ", 2)[1])
        headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        if b"content-length" in headers:
            await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").strip() == b"chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        if headers.get(b"connection", b"").strip() == b"close":
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(url: str, texts: list[str], *, concurrency: int, requests: int, duration: float, beam: int,
               timeout: float, large: bytes = b"",
               large_results: list[tuple[str, float]] | None = None) -> tuple[list[tuple[str, float]], float]:
    """`concurrency` workers, each on its own connection, sending requests back to back; returns (outcome,
    seconds) per request and the wall time. With a `large` body, one more client sends it back to back until
    the others are done (its request then in flight is abandoned), its outcomes going to large_results.

    The outcome is the HTTP status code, or the exception's class name when no response came."""
    counter = itertools.count()
    results: list[tuple[str, float]] = []
    deadline = 0.0
    address = httpx.URL(url)

    async def post(connection: Connection, body: bytes, into: list[tuple[str, float]]) -> None:
        start = time.perf_counter()
        try:
            outcome = str(await asyncio.wait_for(connection.post("/v1/translate", body), timeout))
        except Exception as exc:  # counted as an error of its kind; the worker goes on on a new connection
            connection.close()
            outcome = type(exc).__name__
        into.append((outcome, time.perf_counter() - start))

    async def worker() -> None:
        connection = Connection(address.host, address.port)
        while True:
            i = next(counter)
            if (time.perf_counter() >= deadline) if duration else (i >= requests):
                connection.close()
                return
            await post(connection, json.dumps({"text": texts[i % len(texts)], "beam_size": beam}).encode(), results)

    async def large_worker() -> None:
        connection = Connection(address.host, address.port)
        try:
            while True:
                await post(connection, large, large_results)
        finally:
            connection.close()

    start = time.perf_counter()
    deadline = start + duration
    background = asyncio.ensure_future(large_worker()) if large else None
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    if background is not None:
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
    return results, wall


def measure(args: argparse.Namespace, url: str, pid: int, mode: str, concurrency: int, texts: list[str]) -> dict:
    """One row: load at one concurrency level, with the server's memory, CPU and batch sizes around it."""
    pids = process_tree(pid)
    peak_reset = all([reset_peak_rss(p) for p in pids])
    before, cpu_before = scrape(url), tree_total([cpu_seconds(p) for p in pids])
    client_cpu = time.process_time()
    requests = args.requests or max(256, 4 * concurrency)
    large: list[tuple[str, float]] = []
    results, wall = asyncio.run(load(url, texts, concurrency=concurrency, requests=requests,
                                     duration=args.duration, beam=args.beam, timeout=args.request_timeout + 30,
                                     large=large_body(args, texts), large_results=large))
    large_ok = sorted(seconds for outcome, seconds in large if outcome == "200")
    client_cpu = time.process_time() - client_cpu
    cpu_after, after = tree_total([cpu_seconds(p) for p in pids]), scrape(url)
    hwm = tree_total([proc_status_mb(p, "VmHWM") for p in pids])
    if args.workers > 1:  # each worker process keeps its own /metrics: two scrapes may reach different ones
        before = after = {}
    ok = sorted(seconds for outcome, seconds in results if outcome == "200")
    by_outcome: dict[str, int] = {}
    for outcome, _ in results:
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
    errors = {k: v for k, v in sorted(by_outcome.items()) if k != "200"}
    ms = {f"p{q}_ms": (None if (p := percentile(ok, q)) is None else p * 1000) for q in (50, 95, 99)}
    return {"mode": mode, "concurrency": concurrency, "requests": len(results), "ok": len(ok),
            "errors": sum(errors.values()), "errors_by_status": errors, "seconds": wall,
            "requests_per_s": len(ok) / wall if wall > 0 else 0.0, **ms,
            "max_ms": ok[-1] * 1000 if ok else None,
            "peak_rss_mb": hwm,
            "peak_rss_scope": "level" if peak_reset else "server",
            "mean_batch_requests": mean_delta(before, after, "nmt_batch_requests"),
            "mean_batch_texts": mean_delta(before, after, "nmt_batch_texts"),
            "mean_batch_ms": None if (m := mean_delta(before, after, "nmt_batch_duration_seconds")) is None
            else m * 1000,
            "server_cpu_percent": None if cpu_before is None or cpu_after is None or wall <= 0
            else 100 * (cpu_after - cpu_before) / wall,
            "client_cpu_percent": 100 * client_cpu / wall if wall > 0 else None,
            "large_ok": len(large_ok), "large_errors": sum(outcome != "200" for outcome, _ in large),
            "large_p50_ms": None if (p := percentile(large_ok, 50)) is None else p * 1000}


def large_body(args: argparse.Namespace, texts: list[str]) -> bytes:
    """The body of the background client's requests (--large-texts): texts of --large-sentences sentences each,
    taken from the end of the shuffled sources; empty without --large-texts."""
    n, k = args.large_texts, args.large_sentences
    pool = texts[::-1]
    large = [" ".join(pool[(i * k + j) % len(pool)] for j in range(k)) for i in range(n)]
    return json.dumps({"text": large, "beam_size": args.beam}).encode() if n else b""


def run_mode(args: argparse.Namespace, mode: str, texts: list[str], out: Path) -> tuple[list[dict], dict]:
    log_path = out / f"service_load_{mode}.log"
    rows = []
    with serving(args, mode, log_path) as (url, proc, cmd, settings):
        info = {"mode": mode, "command": shlex.join(cmd), "settings": settings, "log": str(log_path)}
        if args.warmup:
            warm, _ = asyncio.run(load(url, texts[-args.warmup:], concurrency=1, requests=args.warmup, duration=0,
                                       beam=args.beam, timeout=args.request_timeout + 30))
            bad = [outcome for outcome, _ in warm if outcome != "200"]
            if bad:
                print(f"warning: {len(bad)} of {len(warm)} warm-up requests failed ({', '.join(sorted(set(bad)))})",
                      file=sys.stderr)
        info["rss_after_warmup_mb"] = proc_status_mb(proc.pid, "VmRSS")
        info["cpus"] = proc_status(proc.pid, "Cpus_allowed_list")
        for concurrency in args.concurrency:
            row = measure(args, url, proc.pid, mode, concurrency, texts)
            rows.append(row)
            print(json.dumps(row), flush=True)
    info["exit_code"] = proc.returncode
    return rows, info


# --- report ------------------------------------------------------------------------------------------------------

def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(rows: list[dict], machine: str, args: argparse.Namespace, servers: list[dict]) -> str:
    amount = (f"{args.duration:g} s" if args.duration else f"{args.requests} requests" if args.requests
              else "max(256, 4 x concurrency) requests")
    cpus = ", ".join(sorted({str(s.get("cpus")) for s in servers}))
    threads = args.threads or f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} / torch default"
    large = (f"; meanwhile one more client sends requests of {args.large_texts} texts of {args.large_sentences} "
             "sentences back to back (large: those answered, their median latency)" if args.large_texts else "")
    lines = [f"Machine: {machine}", "",
             f"Model {args.model}; one sentence a request at beam {args.beam}; {amount} a row; server on CPUs "
             f"{cpus}, {args.workers} worker process(es) of {threads} thread(s){large}", "",
             "| batching | concurrency | requests | errors | requests/s | p50 ms | p95 ms | p99 ms | peak RSS MB | "
             "mean batch | server CPU % |" + (" large | large p50 ms |" if args.large_texts else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.large_texts else "")]
    for r in rows:
        errors = str(r["errors"])
        if r["errors"]:
            errors += " (" + ", ".join(f"{k}: {v}" for k, v in r["errors_by_status"].items()) + ")"
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {errors} | "
                     f"{r['requests_per_s']:.2f} | {_num(r['p50_ms'], '.0f')} | {_num(r['p95_ms'], '.0f')} | "
                     f"{_num(r['p99_ms'], '.0f')} | {_num(r['peak_rss_mb'], '.0f')} | "
                     f"{_num(r['mean_batch_requests'], '.1f')} | {_num(r['server_cpu_percent'], '.0f')} |"
                     + (_large_cells(r) if args.large_texts else ""))
    return "\n".join(lines) + "\n"


def _large_cells(row: dict) -> str:
    """The large-request columns of a row: those answered (and errors), their median latency."""
    errors = f" ({row['large_errors']} errors)" if row["large_errors"] else ""
    return f" {row['large_ok']}{errors} | {_num(row['large_p50_ms'], '.0f')} |"


def summary(rows: list[dict]) -> dict:
    """The bars of the speed issue: batching on / off throughput and p99 latency at concurrency 32.

    With modes repeated (--modes on off on off ...), the k-th on row pairs with the k-th off row, run next to it
    in time, and the bars take the median over the pairs (these machines' speed drifts from minute to minute)."""
    at = {mode: [r for r in rows if r["concurrency"] == BAR_CONCURRENCY and r["mode"] == mode]
          for mode in ("on", "off")}
    out: dict = {"concurrency": BAR_CONCURRENCY, "p99_bar_s": BAR_P99_S}
    ratios = [on["requests_per_s"] / off["requests_per_s"]
              for on, off in zip(at["on"], at["off"], strict=False) if off["requests_per_s"] > 0]
    if ratios:
        out["throughput_on_over_off"] = statistics.median(ratios)
        out["throughput_on_over_off_pairs"] = ratios
    for mode, measured in at.items():
        p99s = [r["p99_ms"] / 1000 for r in measured if r["p99_ms"] is not None]
        if p99s:
            out[f"p99_{mode}_s"] = statistics.median(p99s)
            out[f"p99_{mode}_under_bar"] = out[f"p99_{mode}_s"] < BAR_P99_S and not any(r["errors"] for r in measured)
    return out


def summary_text(s: dict) -> str:
    c, bar = s["concurrency"], s["p99_bar_s"]
    lines = []
    if "throughput_on_over_off" in s:
        pairs = s["throughput_on_over_off_pairs"]
        each = (f" (median of {len(pairs)} on/off pairs: {', '.join(f'{r:.2f}x' for r in pairs)})"
                if len(pairs) > 1 else "")
        lines.append(f"batching on / off throughput at concurrency {c}: {s['throughput_on_over_off']:.2f}x{each}")
    else:
        lines.append(f"batching on / off throughput at concurrency {c}: not measured (needs both modes at {c})")
    for mode in ("on", "off"):
        if f"p99_{mode}_s" in s:
            verdict = "yes" if s[f"p99_{mode}_under_bar"] else "no"
            lines.append(f"p99 at concurrency {c}, batching {mode}: {s[f'p99_{mode}_s']:.3f} s "
                         f"(< {bar:g} s without errors: {verdict})")
    return "".join(f"\n{line}\n" for line in lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="models/es-en-bible",
                   help="exported model (or run) directory (default models/es-en-bible)")
    p.add_argument("--src", default="data/bible/test.src", help="sentences, one a line (default data/bible/test.src)")
    p.add_argument("--concurrency", type=int_from(1), nargs="+", default=[1, 8, 32, 128],
                   help="concurrent clients per row")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per row, over all clients (default 0: max(256, 4 x the row's concurrency))")
    p.add_argument("--duration", type=float, default=0.0, help="seconds per row instead of --requests (0 = off)")
    p.add_argument("--modes", nargs="+", choices=("on", "off"), default=["on", "off"],
                   help="batching on, off (NMT_MAX_BATCH_REQUESTS=1) or both, a fresh server each; repeat them "
                        "(on off on off) to pair runs close in time: the bars take the median over the pairs")
    p.add_argument("--beam", type=int_from(1), default=5, help="beam size of every request (default 5)")
    p.add_argument("--warmup", type=int, default=8, help="requests before the timing, one at a time (default 8)")
    p.add_argument("--seed", type=int, default=0, help="shuffles the sentences (default 0)")
    p.add_argument("--server-cpus", default="", help="pin the server with taskset -c, e.g. 0,1 (default: no pinning)")
    p.add_argument("--client-cpus", default="", help="pin this load generator, e.g. 1 (default: no pinning)")
    p.add_argument("--workers", type=int, default=1,
                   help="server worker processes (nmt serve --workers); peak RSS and CPU are summed over the "
                        "processes, the batch means are not measured with more than one")
    p.add_argument("--threads", type=int, default=0,
                   help="NMT_THREADS and OMP_NUM_THREADS of the server (default 0: inherited / torch default)")
    p.add_argument("--max-batch-requests", type=int, default=0,
                   help="NMT_MAX_BATCH_REQUESTS with batching on (default 0: the server's default)")
    p.add_argument("--max-batch-tokens", type=int, default=0, help="NMT_MAX_BATCH_TOKENS (default 0: the server's)")
    p.add_argument("--max-queue", type=int, default=0,
                   help="NMT_MAX_QUEUE (default 0: max(256, 2 x the largest concurrency))")
    p.add_argument("--request-timeout", type=float, default=120.0, help="NMT_REQUEST_TIMEOUT_S (default 120)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /v1/ready (default 300)")
    p.add_argument("--large-texts", type=int, default=0,
                   help="meanwhile, one more client sends requests of this many texts back to back, so that the "
                        "rows show what large requests do to the latency of small ones (default 0: none)")
    p.add_argument("--large-sentences", type=int, default=5, help="sentences per text of --large-texts (default 5)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if any(c < 1 for c in args.concurrency) or min(args.requests, args.duration, args.warmup, args.max_batch_requests,
                                                   args.max_batch_tokens, args.large_texts) < 0:
        p.error("--concurrency must be >= 1; --requests, --duration, --warmup, --max-batch-requests, "
                "--max-batch-tokens and --large-texts >= 0")
    if args.large_sentences < 1:
        p.error("--large-sentences must be >= 1")
    if not Path(args.model).exists():
        p.error(f"model not found: {args.model}")
    args.max_queue = args.max_queue or max(256, 2 * max(args.concurrency))
    args.start_cpus = os.sched_getaffinity(0)
    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for part in args.client_cpus.split(",") for c in _cpu_range(part)})
    texts = read_sources(Path(args.src), args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {metadata.version('torch')}"
    load_before = os.getloadavg()
    rows, servers = [], []
    for mode in args.modes:
        mode_rows, info = run_mode(args, mode, texts, out)
        rows += mode_rows
        servers.append(info)
    result = summary(rows)
    report = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": metadata.version("torch"),
                          "python": platform.python_version(), "kernel": platform.release(),
                          "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "command": shlex.join([sys.executable, *sys.argv]), "model": args.model, "src": args.src,
              "beam": args.beam, "requests": args.requests, "duration_s": args.duration, "warmup": args.warmup,
              "seed": args.seed, "server_cpus": args.server_cpus, "client_cpus": args.client_cpus,
              "threads": args.threads, "servers": servers, "rows": rows, "summary": result}
    (out / "service_load.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows, machine, args, servers) + summary_text(result)
    (out / "service_load.md").write_text(table)
    print(table)


def _cpu_range(part: str) -> range:
    """`3` or `0-2` as a range of CPU numbers."""
    low, _, high = part.strip().partition("-")
    return range(int(low), int(high or low) + 1)


if __name__ == "__main__":
    main()
