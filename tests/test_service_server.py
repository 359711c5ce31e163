"""A real `nmt serve` process (uvicorn) on loopback with the tiny model: CLI parity, concurrency, SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import serve_in_thread
from fastapi.testclient import TestClient

import nmt.device
from nmt.cli import main as nmt_main
from nmt.errors import NMTError
from service.app import create_app
from service.request_id import current
from service.server import _log_config, check
from service.settings import Settings

TEXTS = ["a b c d", "p o n m l k j", "c", "e f g h i j k l"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, **settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`nmt serve MODEL` on a free loopback port, yielding its URL once /v1/ready answers."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NMT_THREADS": "1",
           **{f"NMT_{key.upper()}": value for key, value in settings.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "serve", str(model_dir), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/v1/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server not ready within 60 s")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


async def in_flight(client: httpx.AsyncClient, body: dict, name: str, count: int) -> list[asyncio.Future]:
    """Send `count` translate requests (X-Request-ID name-0, name-1, ...) and return once all are in flight."""
    requests = [asyncio.ensure_future(client.post("/v1/translate", json=body, headers={"X-Request-ID": f"{name}-{i}"}))
                for i in range(count)]
    for _ in range(1000):
        if metric(str(client.base_url).rstrip("/"), "nmt_http_requests_in_flight") >= count + 1:  # and /metrics's
            return requests
        await asyncio.sleep(0.01)
    raise AssertionError(f"the {count} requests were never in flight together")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """One server for the module; the SIGTERM test, last, stops it."""
    with serving(tiny_model_dir) as running:
        yield running


def test_http_translation_equals_the_cli(server, tiny_model_dir, tmp_path):
    url, _ = server
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in TEXTS), encoding="utf-8")
    args = ["translate", str(tiny_model_dir), "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.txt")]
    assert nmt_main([*args, "--threads", "1"]) == 0
    expected = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    body = httpx.post(f"{url}/v1/translate", json={"text": TEXTS}, timeout=30).json()
    assert [t["text"] for t in body["translations"]] == expected == ["d c b a", "j k l m n o p", "c", "l k j i h g f e"]


def test_50_concurrent_requests_all_succeed_and_share_batches(server):
    url, _ = server
    before = metric(url, 'nmt_http_requests_total{method="POST",route="/v1/translate",status="200"}')

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=50), timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/translate", json={"text": TEXTS[i % len(TEXTS)]})
                                          for i in range(50)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 50
    expected = [" ".join(reversed(TEXTS[i % len(TEXTS)].split())) for i in range(50)]
    assert [r.json()["translations"][0]["text"] for r in responses] == expected
    assert metric(url, 'nmt_batch_requests_bucket{le="1.0"}') < metric(url, "nmt_batch_requests_count"), \
        "no batch held more than one request"
    assert metric(url, 'nmt_http_requests_total{method="POST",route="/v1/translate",status="200"}') == before + 50


def test_sigterm_finishes_in_flight_requests(server):
    url, proc = server
    heavy = {"text": [" ".join("abcdefghijklmnop"[(i + j) % 16] for j in range(12)) for i in range(24)],
             "beam_size": 16}

    async def drain() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            requests = await in_flight(client, heavy, "drain", 6)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*requests)

    responses = asyncio.run(drain())
    assert [r.status_code for r in responses] == [200] * 6
    assert all(len(r.json()["translations"]) == 24 for r in responses)
    assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    log = proc.stdout.read()
    assert "Finished server process" in log and "Traceback" not in log
    # uvicorn's access lines had no time, unlike the service's own; they end with the request's id.
    for i in range(6):
        assert re.search(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO uvicorn\.access: 127\.0\.0\.1:\d+ - '
                         rf'"POST /v1/translate HTTP/1\.1" 200 OK \[request drain-{i}\]$', log, re.M), log[-2000:]
    assert re.search(r'"GET /metrics HTTP/1\.1" 200 OK \[request [0-9a-f]{32}\]$', log, re.M), log[-2000:]
    assert re.search(r"INFO uvicorn\.error: Finished server process \[\d+\]$", log, re.M)  # no request: no id
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/v1/health", timeout=2)


def test_a_second_ctrl_c_answers_the_requests_in_flight_503_without_a_traceback(tiny_model_dir):
    # A second signal makes uvicorn stop waiting for the requests in flight, and asyncio then cancels their handlers
    # and the app's lifespan: each client got a 500, and the log a traceback for each of them and for the lifespan.
    # Some seconds of work, most of it still to do at the second signal.
    heavy = {"text": [" ".join("abcdefghijklmnop"[(i + j) % 16] for j in range(40)) for i in range(64)],
             "beam_size": 16}
    with serving(tiny_model_dir) as (url, proc):

        async def force_quit() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                requests = await in_flight(client, heavy, "cut", 8)
                proc.send_signal(signal.SIGINT)
                await asyncio.sleep(0.2)
                proc.send_signal(signal.SIGINT)
                return await asyncio.gather(*requests)

        responses = asyncio.run(force_quit())
        assert proc.wait(30) == 130
        log = proc.stdout.read()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    for i, response in enumerate(responses):
        if response.status_code == 200:  # finished before the second signal
            continue
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert response.headers["X-Request-ID"] == f"cut-{i}"
        assert response.json()["error"] == {"code": "unavailable", "fields": [],
                                            "message": "the service was stopped before the answer"}
    assert any(r.status_code == 503 for r in responses), "every request finished before the second signal"


def test_the_services_own_log_lines_end_with_the_request_they_were_written_for():
    config = _log_config()
    assert config["root"]["handlers"] == ["default"] and "request_id" in config["handlers"]["default"]["filters"]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(config["formatters"]["default"]["fmt"]))
    handler.addFilter(config["filters"]["request_id"]["()"]())

    def line() -> str:
        handler.handle(logging.LogRecord("service.app", logging.ERROR, __file__, 1, "translation failed", None, None))
        return out.getvalue().splitlines()[-1]

    assert line().endswith(" ERROR service.app: translation failed")  # no request: no id
    token = current.set("4bf92f35")
    try:
        assert line().endswith(" ERROR service.app: translation failed [request 4bf92f35]")
    finally:
        current.reset(token)


@pytest.mark.parametrize(("args", "env", "message"), [
    (["missing"], {}, "model not found"),
    (["no-model"], {}, "holds no best.pt or last.pt"),
    (["notes.txt"], {}, "notes.txt is not a readable rnnsearch checkpoint"),
    (["no-tgt"], {}, "SentencePiece model not found: no-tgt/tgt.model"),  # a traceback (exit 3), or exit 0
    (["garbled"], {}, "garbled/model.safetensors is not a readable safetensors file"),  # with --workers 2
    ([], {"NMT_DEVICE": "banana"}, "NMT_DEVICE must be cpu, cuda, cuda:N or auto, got 'banana'"),
    # Each worker loads its own model: 100000 of them brought the machine to a standstill.
    (["--workers", "100000"], {}, "--workers 100000 is more than the "),
    # torch devices no path of ours runs on: meta served 500s, mps crashed the startup.
    ([], {"NMT_DEVICE": "meta"}, "NMT_DEVICE must be cpu, cuda, cuda:N or auto, got 'meta'"),
    ([], {"NMT_DEVICE": "mps"}, "NMT_DEVICE must be cpu, cuda, cuda:N or auto, got 'mps'"),
    # These passed the check, then crashed: a traceback after the model had loaded, or libgomp's crash.
    ([], {"NMT_REQUEST_TIMEOUT_S": "inf"}, "NMT_REQUEST_TIMEOUT_S: Input should be a finite number"),
    ([], {"NMT_SEND_TIMEOUT_S": "1e9"}, "NMT_SEND_TIMEOUT_S: Input should be less than or equal to 86400"),
    ([], {"NMT_MAX_WAIT_MS": "nan"}, "NMT_MAX_WAIT_MS: Input should be a finite number"),  # was "less than or equal"
    ([], {"NMT_THREADS": "100000"}, "NMT_THREADS: Input should be less than or equal to 1024"),
    ([], {"NMT_RATE_LIMIT": "9" * 400 + "/second"}, "(periods: second, minute, hour; 1 to 1000000 requests)"),
    # It matched a browser's Latin-1 bytes and not curl's UTF-8 ones.
    ([], {"NMT_API_KEYS": "k1,clé"}, "key 2 holds U+00E9, which is not a visible ASCII character"),
    # A warning before: the service started open to all.
    ([], {"NMT_API_KEY": "secret"}, "NMT_API_KEY is not a setting of nmt serve: did you mean NMT_API_KEYS? (rename "
                                    "or unset it)"),
    ([], {"NMT_MAX_QUEUE": "abc", "NMT_RATE_LIMIT": "10/fortnight"},
     "invalid setting: NMT_MAX_QUEUE: Input should be a valid integer, unable to parse string as an integer; "
     "NMT_RATE_LIMIT: rate limit must look like 60/minute"),
    (["--port", "99999"], {}, "--port must be between 0 and 65535, got 99999"),
    (["--host", "192.0.2.1", "--port", "8000"], {}, "cannot listen on 192.0.2.1:8000: Cannot assign requested "
                                                    "address"),  # TEST-NET
])
def test_serve_refuses_bad_arguments_and_settings_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch, args,
                                                             env, message):
    # Before anything starts: not a traceback from the app's startup (exit 3) or a server on port 99999 % 65536.
    (tmp_path / "no-model").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    (shutil.copytree(tiny_model_dir, tmp_path / "no-tgt") / "tgt.model").unlink()
    (shutil.copytree(tiny_model_dir, tmp_path / "garbled") / "model.safetensors").write_bytes(b"\x00" * 64)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NMT_MODEL_DIR", str(tiny_model_dir))  # check() exports MODEL as NMT_MODEL_DIR: restored after
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # --port 0: any free port (a case's own --port comes after it), so that a service on port 8000 (`make serve` in
    # another terminal, as the README has it) cannot fail these cases.
    assert nmt_main(["serve", "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "50000 100000\n"}, 1),  # cgroup v2: half a CPU still runs one worker
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "max 100000\n"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbled\n", "cpu/cpu.cfs_quota_us": "200000\n"}, None),  # unreadable: the affinity alone
    ({}, None),
])
def test_the_usable_cpus_are_the_affinity_within_a_cgroup_quota(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert nmt.device.usable_cpus(tmp_path) == (affinity if quota is None else min(affinity, quota))


def test_workers_are_capped_by_a_containers_cpu_quota(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # docker-compose's `cpus: 1` on a larger host: each worker loads the model, and they all share that one CPU.
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    monkeypatch.setattr(nmt.device, "CGROUP", tmp_path)
    monkeypatch.setenv("NMT_MODEL_DIR", str(tiny_model_dir))
    assert nmt_main(["serve", "--workers", "2", "--host", "192.0.2.1"]) == 2  # TEST-NET: never listens if let by
    assert "--workers 2 is more than the 1 CPUs this process may use" in capsys.readouterr().err


def test_a_misspelt_setting_is_named_and_the_log_says_what_guards_the_service(tiny_model_dir, monkeypatch, caplog,
                                                                             tmp_path):
    # NMT_API_KEY (for NMT_API_KEYS) left the service open without a word.
    monkeypatch.setenv("NMT_MODEL_DIR", str(tiny_model_dir))  # check() exports MODEL as NMT_MODEL_DIR: restored after
    monkeypatch.setenv("NMT_COLOUR", "blue")  # like no setting: ignored, with a word
    for name in ("NMT_WORKERS", "NMT_PUBLISH", "NMT_STOP_GRACE_PERIOD"):  # docker-compose's, not settings: no warning
        monkeypatch.setenv(name, "2")
    monkeypatch.setenv("NMT_max_chars", "7")  # pydantic-settings reads it: it was said to be ignored
    caplog.set_level(logging.INFO)
    check(str(tiny_model_dir), port=0)
    assert "NMT_COLOUR is not a setting of nmt serve: ignored" in caplog.text
    assert "NMT_WORKERS" not in caplog.text and "NMT_MAX_CHARS" not in caplog.text and Settings().max_chars == 7
    assert "NMT_PUBLISH" not in caplog.text and "NMT_STOP_GRACE_PERIOD" not in caplog.text
    for env, said in [({}, "no API keys (open to all), no rate limit, no CORS origins"),
                      ({"NMT_API_KEYS": "a,b", "NMT_RATE_LIMIT": "60/minute"}, "2 API key(s), rate limit 60/minute")]:
        caplog.clear()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with TestClient(create_app(Settings())):
            pass
        assert f"serving {tiny_model_dir.name}: {said}" in caplog.text
    caplog.clear()  # the same misspelling in the .env file (which Settings reads too) was not named
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("nmt_rate_limt=5/minute\nNMT_CORS_ORIGINS=https://a.example\n")
    with pytest.raises(NMTError, match=re.escape("NMT_RATE_LIMT in .env is not a setting of nmt serve: did you mean "
                                                 "NMT_RATE_LIMIT? (rename or unset it)")):
        check(str(tiny_model_dir), port=0)
    assert "CORS" not in caplog.text


def test_each_worker_process_logs_what_it_serves_and_sigterm_refuses_new_connections(tiny_model_dir):
    # uvicorn's spawned workers had no logging set up: neither "loaded" nor "serving" reached the log.
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NMT_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "serve", str(tiny_model_dir), "--port", str(port),
                             "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while sum("INFO service.app: serving" in line for line in lines) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        assert sum("INFO nmt.translator: loaded" in line for line in lines) == 2
        # SIGTERM while a request is in flight (its body still coming): it is answered, and new connections are
        # refused meanwhile. uvicorn's supervisor kept the socket listening: they were taken, left waiting until
        # the workers had stopped, then reset.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow, \
                socket.create_connection(("127.0.0.1", port), timeout=30) as heading:
            slow.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 15\r\n\r\n{\"text\"")
            heading.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\n")  # its headers not all there yet
            time.sleep(0.5)
            proc.terminate()
            deadline = time.monotonic() + 10  # the supervisor looks at its signals every 0.5 s
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, "still taking connections 10 s after SIGTERM"
                time.sleep(0.1)
            assert proc.poll() is None  # still finishing the request
            slow.sendall(b': "a b"}')
            assert slow.recv(4096).startswith(b"HTTP/1.1 200 ")
            # It was closed without an answer.
            assert heading.recv(4096).startswith(b"HTTP/1.1 503 ")
        assert proc.wait(30) == 0
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(10)
        proc.stdout.close()


def test_a_connection_whose_request_headers_never_end_is_closed(tiny_model_dir):
    # uvicorn held such a connection open for as long as the client liked: enough of them (slowloris) used up the
    # process's file descriptors, and nobody else was served.
    with serving(tiny_model_dir, header_timeout_s="0.5", max_header_bytes="2048") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        # Nor was their size bounded: ten connections sending 80 MB of one header each doubled the process's memory.
        for parts in ([b"X-B: " + b"a" * 5000 + b"\r\n\r\n"], [b"X-B: " + b"a" * 600] * 4):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as big:
                big.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                with contextlib.suppress(ConnectionError):  # the server may close before the last part
                    for part in parts:
                        big.sendall(part)
                        time.sleep(0.05)
                answer = b"".join(iter(lambda: big.recv(4096), b""))
                assert answer.startswith(b"HTTP/1.1 431 ") and b"exceed 2048 bytes" in answer, answer
                assert b"\"code\":\"headers_too_large\"" in answer
                assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", answer), answer  # answered before the app
        with socket.create_connection(("127.0.0.1", port), timeout=10) as fits:
            fits.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-B: " + b"a" * 1500 + b"\r\n\r\n")
            assert fits.recv(4096).startswith(b"HTTP/1.1 200 ")
        # Not header bytes: a body's, in the read in which a pipelined request begins, nor a chunked body's trailers.
        body = b'{"text": "a b"' + b" " * 10_000 + b"}"
        second = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-B: " + b"a" * 1500 + b"\r\n\r\n"
        first = b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + \
            str(len(body)).encode() + b"\r\nX-B: " + b"a" * 1500 + b"\r\n\r\n" + body
        chunked = (b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                   b"Transfer-Encoding: chunked\r\nX-B: " + b"a" * 1500 + b"\r\n\r\n" + b"%x\r\n" % len(body) + body +
                   b"\r\n0\r\nX-T: " + b"t" * 1000 + b"\r\n\r\n")
        for parts, answers in (([first[:6000], first[6000:] + second[:5], second[5:] + b"GET /v1/health HTTP/1.1\r\n"
                                 b"Host: x\r\nConnection: close\r\n\r\n"], 3), ([chunked], 1)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                for part in parts:
                    conn.sendall(part)
                    time.sleep(0.05)
                answer = b"".join(iter(lambda: conn.recv(65536), b""))
                assert answer.count(b"HTTP/1.1 200 ") == answers, answer[:300]
        with socket.create_connection(("127.0.0.1", port)) as stalled, \
                socket.create_connection(("127.0.0.1", port)) as silent:
            stalled.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            for conn in (stalled, silent):
                conn.settimeout(10)
            start = time.monotonic()
            answer = b"".join(iter(lambda: stalled.recv(4096), b""))  # until the server closes it
            assert answer.startswith(b"HTTP/1.1 408 ") and b"request headers" in answer, answer
            assert silent.recv(4096) == b""  # no request begun: closed without an answer
            assert time.monotonic() - start < 5
        # A body the app answered without reading, sent a byte at a time: each byte cancelled uvicorn's keep-alive
        # timeout, and nothing else bounded the connection.
        with socket.create_connection(("127.0.0.1", port)) as trickle:
            trickle.settimeout(10)
            trickle.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            assert trickle.recv(4096).startswith(b"HTTP/1.1 200 ")
            trickle.settimeout(0.1)
            start, closed = time.monotonic(), False
            while not closed and time.monotonic() - start < 5:
                try:
                    trickle.sendall(b"x")
                    closed = trickle.recv(4096) == b""
                except TimeoutError:  # open, with nothing to read
                    pass
                except ConnectionError:
                    closed = True
            assert closed and time.monotonic() - start < 3
        with httpx.Client(base_url=url) as client:  # one that keeps up is served, and its connection kept
            for _ in range(2):
                assert client.post("/v1/translate", json={"text": "a b"}).status_code == 200
                time.sleep(0.7)
        # Bytes that are no HTTP request: uvicorn answered in plain text, unlike every other error of the service.
        for framing in (b"Content-Length: -5", b"Content-Length: 2\r\nContent-Length: 3"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as bad:
                bad.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n{}")
                answer = b"".join(iter(lambda: bad.recv(4096), b""))
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head, answer
                assert b"\r\ndate: " in head.lower(), answer  # uvicorn's default headers, as on its own answers
                assert json.loads(body)["error"]["code"] == "bad_request", answer
        # A chunked body that breaks off (a bad chunk size, junk after a chunk): it waited for the rest of its body
        # until the request deadline (30 s), then 408.
        for chunks in (b'zz\r\n{"text": "a"}\r\n0\r\n\r\n', b'd\r\n{"text": "a"}XX0\r\n\r\n'):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as broken:
                broken.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
                answer = b"".join(iter(lambda: broken.recv(4096), b""))
                assert answer.startswith(b"HTTP/1.1 400 ") and b'"code":"bad_request"' in answer, answer
        time.sleep(0.5)  # the app counts its request when it has seen the client gone: as a 400, not a 499
        metrics = httpx.get(f"{url}/metrics").text
        assert 'nmt_http_requests_total{method="POST",route="/v1/translate",status="400"} 2.0' in metrics, metrics
        assert 'status="499"' not in metrics
        # A WebSocket upgrade got uvicorn's own 403: plain text, no request id, not in /metrics.
        upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        response = httpx.get(f"{url}/v1/health", headers=upgrade)
        assert response.json() == {"status": "ok"} and "x-request-id" in response.headers
        assert response.headers["connection"] == "close"  # what follows it is not read as HTTP
        # `curl --http2 -d ...` on http:// asks for h2c: its body never reached the app, which answered 422 "empty".
        h2c = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as upgrading:
            upgrading.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + h2c +
                              b'Content-Length: 13\r\n\r\n{"text": "a"}')
            answer = b"".join(iter(lambda: upgrading.recv(4096), b""))
            assert answer.startswith(b"HTTP/1.1 400 ") and b"asks to switch protocols (Upgrade: h2c)" in answer, answer
        # A packet of 130 KB that is no HTTP held the event loop for 90 s (a regular expression searched it whole).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as flood:
            start = time.monotonic()
            flood.sendall(b"x" + b"a" * 130_000)
            assert flood.recv(4096).startswith(b"HTTP/1.1 400 ") and time.monotonic() - start < 3
        # A request answered without reading its body (a GET) whose body then breaks off got a second answer, 400,
        # which a client reusing the connection would take for its next request's.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as answered:
            answered.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            first = b""
            while not first.endswith(b'{"status":"ok"}'):
                first += answered.recv(4096)
            assert first.startswith(b"HTTP/1.1 200 ")
            answered.sendall(b"zz\r\n")
            assert b"".join(iter(lambda: answered.recv(4096), b"")) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as unknown:  # 400 as if malformed, before
            unknown.sendall(b"FROB /v1/translate HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b"".join(iter(lambda: unknown.recv(4096), b""))
            assert answer.startswith(b"HTTP/1.1 501 Not Implemented\r\n"), answer
            assert b'"code":"not_implemented","message":"the request\'s method is unknown to this service' in answer
        # The same after pipelined requests: their answers first (uvicorn closed the connection at once, and they
        # were lost), then the 400.
        body = b'{"text": "a b"}'
        pipelined = (b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body)) * 2
        for garbage, status in ((b"GET /\x01 HTTP/1.1\r\n\r\n", b"400"), (b"GARBAGE \x01\r\n\r\n", b"400"),
                                (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"400"),  # a TLS ClientHello
                                (b"GET /v1/health HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"400"),
                                (b"GET /v1/health HTTP/1.1\r\nX-B: " + b"a" * 5000 + b"\r\n\r\n", b"431")):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(pipelined + garbage)
                answer = b"".join(iter(lambda: conn.recv(65536), b""))
            assert [m.group() for m in re.finditer(rb"HTTP/1\.1 \d+", answer)] == \
                [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 " + status], answer
            assert answer.endswith(b'"fields":[]}}'), answer
        # Counted: slowloris or oversized headers were not seen in /metrics.
        metrics = httpx.get(f"{url}/metrics").text
        for status in (400, 408, 431, 501):
            assert f'nmt_http_requests_total{{method="other",route="unparsed",status="{status}"}}' in metrics
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    # One line for them all (a minute apart at most), not uvicorn's own line for each malformed request.
    assert "Invalid HTTP request received" not in log and "Unsupported upgrade" not in log
    assert log.count("refused before reaching the app") == 1


@pytest.mark.parametrize("failure", ["import", "factory"])
def test_a_worker_that_fails_to_start_is_an_error(tiny_model_dir, tmp_path, failure):
    # uvicorn's supervisor stops when a worker fails to start, and nmt serve --workers 2 then exited 0; a worker
    # whose app could not be built (a rate limit too large for a float) was started again, for ever.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NMT_THREADS": "1", "NMT_MODEL_DIR": str(tiny_model_dir)}
    app = "s.APP = 'service.missing:create_app'; " if failure == "import" else ""
    if failure == "factory":  # imported by every Python process, the spawned workers included
        (tmp_path / "sitecustomize.py").write_text(
            "import service.app\n\n\ndef broken(*args, **kwargs):\n    raise OverflowError('too large')\n\n\n"
            "service.app.create_app = broken\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    code = f"import service.server as s; {app}s.serve('127.0.0.1', {free_port()}, 2)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "NMTError: a worker process did not start: its error is in the log above" in done.stderr
    if failure == "factory":
        assert "the service could not be set up" in done.stderr and "OverflowError: too large" in done.stderr


@pytest.mark.parametrize(("port", "sig", "inherited", "when", "status"), [
    pytest.param("free", signal.SIGINT, signal.SIG_DFL, "Uvicorn running on", 130, id="ctrl-c"),  # in a terminal
    pytest.param("0", signal.SIGINT, signal.SIG_DFL, "Uvicorn running on", 130, id="ctrl-c-port-0"),
    # A background job of a script starts with SIGINT ignored: uvicorn stopped on it all the same, then raised it again
    # into that disposition, and the command exited 0; sent before uvicorn's handlers were in, it was lost and the
    # service ran on. So with SIGTERM ignored, which now ends the process by that signal, as in a terminal.
    pytest.param("free", signal.SIGINT, signal.SIG_IGN, "Uvicorn running on", 130, id="sigint-ignored"),
    pytest.param("free", signal.SIGINT, signal.SIG_IGN, "nmt serve: starting", 130, id="sigint-ignored-early"),
    pytest.param("free", signal.SIGTERM, signal.SIG_IGN, "Uvicorn running on", -signal.SIGTERM, id="sigterm-ignored"),
])
def test_a_signal_stops_the_service_with_its_status(tiny_model_dir, port, sig, inherited, when, status):
    # uvicorn.run swallowed the KeyboardInterrupt it raises again after a graceful stop: the command exited 0.
    number = free_port() if port == "free" else 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NMT_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "serve", str(tiny_model_dir), "--port", str(number)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(sig, inherited))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(when in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        proc.send_signal(sig)
        assert proc.wait(30) == status
        reader.join(10)
        log = "".join(lines)
        assert ("nmt serve: interrupted" in log) == (sig == signal.SIGINT) and "Traceback" not in log
        # --port 0: the port is the system's choice, which only uvicorn's line can tell (it said :0).
        assert ":0/" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_a_client_that_stops_reading_its_answer_is_dropped(monkeypatch):
    # One that read nothing kept its connection, and the megabytes of its answer, for ever, and held up a graceful
    # shutdown as long ("Waiting for connections to close").
    import service.http

    monkeypatch.setattr(service.http, "send_timeout_s", lambda: 0.5)
    body = b"x" * (64 << 20)  # more than the kernel's socket buffers hold

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    with serve_in_thread(app, http=service.http.HeaderDeadlineProtocol, lifespan="off") as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.connect(("127.0.0.1", port))
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(2.0)  # reading nothing
            conn.settimeout(5)
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := conn.recv(1 << 20):
                    received += len(chunk)
            assert received < len(body) // 2  # dropped, not sent on once the client read again


def test_the_startup_check_starts_no_threads_beside_the_model_threads():
    # nmt serve reads the model on the thread that then runs the event loop. torch's parallel ops gave that thread an
    # OpenMP team of its own, idle beside the model thread's, and with more OpenMP threads than cores libgomp stops
    # spin-waiting between parallel regions: batched decoding ran a third slower. The shipped model, because the
    # tiny one's tensors are too small for torch to run any op in parallel.
    model = Path(__file__).resolve().parent.parent / "models" / "es-en-bible"
    code = ("import os; from service.server import check; threads = lambda: len(os.listdir('/proc/self/task')); "
            f"before = threads(); check({str(model)!r}, port=0); print(before, threads())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "2"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == out[-2], out


def test_serve_refuses_a_port_in_use_before_loading_the_model(tiny_model_dir, capsys, monkeypatch):
    # uvicorn found it only after the model had loaded, and exited 3.
    monkeypatch.setenv("NMT_MODEL_DIR", str(tiny_model_dir))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert nmt_main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["serve"], "NMT_INT8 quantizes for CPU inference: use NMT_DEVICE=cpu"),
    (["translate", "MODEL", "--int8", "--device", "cuda"], "int8 quantizes for CPU inference: use device cpu"),
])
def test_int8_on_a_cuda_device_is_refused_in_one_line(tiny_model_dir, capsys, monkeypatch, args, message):
    # As on a machine with a CUDA device: int8 quantization runs on the CPU only, refused before the model loads.
    monkeypatch.setattr(nmt.device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nmt.device.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("NMT_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("NMT_INT8", "1")
    monkeypatch.setenv("NMT_DEVICE", "cuda")
    assert nmt_main([str(tiny_model_dir) if a == "MODEL" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
