"""Run the service under uvicorn (the `nmt serve` command)."""

from __future__ import annotations

import copy
import errno
import logging
import math
import os
import socket
import sys
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from nmt import LOG_FORMAT
from nmt.device import check_int8, pick_device, usable_cpus
from nmt.errors import NMTError
from nmt.translator import locate_model, read_model
from service.app import create_app
from service.http import RefusalLogFilter
from service.request_id import RequestIdFilter
from service.settings import Settings, env_file_variables, unknown_names

log = logging.getLogger(__name__)

APP = "service.server:build_app"  # the app factory uvicorn imports in each worker


def build_app() -> FastAPI:
    """create_app for uvicorn: an app that cannot be built fails the same way in every worker it would start, but
    uvicorn's supervisor started them again for ever (`--workers N`, never listening); it is a startup failure."""
    try:
        return create_app()
    except Exception:
        log.exception("the service could not be set up")
        sys.exit(STARTUP_FAILURE)


def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve NMT_MODEL_DIR until SIGINT/SIGTERM, once `check` has passed (it exports MODEL as NMT_MODEL_DIR); each
    worker process loads its own copy.

    Settings travel to the workers through the environment. On SIGTERM uvicorn stops accepting connections and
    finishes the requests in flight before the model is unloaded: each is answered within NMT_REQUEST_TIMEOUT_S,
    and a connection whose client stops reading is dropped after NMT_SEND_TIMEOUT_S, so what is still there
    after both (a client reading a trickle) is cut off rather than holding the exit for ever.
    """
    settings = Settings()
    options: dict[str, Any] = {
        "factory": True, "host": host, "port": port, "http": "service.http:HeaderDeadlineProtocol",
        "ws": "none",  # no WebSocket endpoint: an Upgrade request is served as HTTP (uvicorn's own 403 was plain text)
        "timeout_graceful_shutdown": math.ceil(settings.request_timeout_s + settings.send_timeout_s),
        "log_config": _log_config()}
    if workers == 1:
        # Not uvicorn.run, which swallows the KeyboardInterrupt that Server.run raises again after a Ctrl-C's
        # graceful stop: the command exited 0, as if the service had ended on its own (SIGTERM still ends it by
        # that signal, which Server.run raises again too).
        server = uvicorn.Server(uvicorn.Config(APP, **options))
        server.run()
        if not server.started:
            raise NMTError("the service did not start: its error is in the log above")
        return
    config = uvicorn.Config(APP, workers=workers, **options)
    supervisor = _Supervisor(config, sockets=[config.bind_socket()])  # its signal handlers are set from here on
    supervisor.run()
    if supervisor.interrupted:
        raise KeyboardInterrupt
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):  # uvicorn then stops, status 0
        raise NMTError("a worker process did not start: its error is in the log above")


def _log_config() -> dict[str, Any]:
    """uvicorn's logging with the time and logger of the service's own lines (its access lines had no time, and could
    not be told apart in `docker logs` without -t), each line written for a request ending with its id."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["default"].update(fmt=LOG_FORMAT + "%(request_id)s", use_colors=False)
    access = LOG_FORMAT.replace("%(message)s", '%(client_addr)s - "%(request_line)s" %(status_code)s%(request_id)s')
    config["formatters"]["access"].update(fmt=access, use_colors=False)
    config["filters"] = {"request_id": {"()": RequestIdFilter}, "refusals": {"()": RefusalLogFilter}}
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    config["loggers"]["uvicorn.error"]["filters"] = ["refusals"]
    # The service's own lines (and nmt's) through the same handler, so that they name their request too; at the
    # level the command set (nmt --verbose).
    config["root"] = {"handlers": ["default"], "level": logging.getLevelName(logging.getLogger().level)}
    return config


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, which also lets go of the listening socket when it stops them:
    they close their copies as they stop, but the supervisor's kept it listening, so that connections made while
    the workers finished their requests were taken, left waiting until the end, then reset (instead of refused at
    once, as with one worker, for a load balancer to go elsewhere); and which says whether Ctrl-C stopped it."""

    interrupted = False  # stopped by Ctrl-C (SIGINT): the command then exits 130, not 0

    def handle_int(self) -> None:
        self.interrupted = True
        super().handle_int()

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def check(model: str | None = None, port: int = 8000, workers: int = 1, host: str = "127.0.0.1") -> None:
    """Check what serve is given (arguments, NMT_* settings, model path, device) before anything starts: a mistake
    is one NMTError line, not a traceback from the app's startup. MODEL is exported as NMT_MODEL_DIR."""
    if model is not None:
        os.environ["NMT_MODEL_DIR"] = model
    try:
        settings = Settings()
    except ValidationError as exc:
        raise NMTError("invalid setting: " + "; ".join(
            f"NMT_{'_'.join(map(str, err['loc'])).upper()}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors())) from None
    for where, variables in (("", os.environ), (" in .env", env_file_variables())):
        for name, meant in unknown_names(variables):
            if meant:  # a misspelling, as a rule: NMT_API_KEY started the service open to all
                raise NMTError(f"{name}{where} is not a setting of nmt serve: did you mean {meant}? (rename or unset "
                               "it)")
            log.warning("%s%s is not a setting of nmt serve: ignored", name, where)
    locate_model(settings.model_dir)
    device = pick_device(settings.device, "NMT_DEVICE")
    if settings.int8:
        check_int8(device, "NMT_INT8", "NMT_DEVICE=cpu")
    if workers < 1:
        raise NMTError(f"--workers must be >= 1, got {workers}")
    cpus = usable_cpus()
    if workers > cpus:  # each loads its own model: --workers 100000 brought the machine to a standstill
        raise NMTError(f"--workers {workers} is more than the {cpus} CPUs this process may use (its CPU affinity, "
                       "within its cgroup's quota): each worker loads its own copy of the model and decodes on at "
                       "least one CPU")
    if not 0 <= port <= 65535:
        raise NMTError(f"--port must be between 0 and 65535, got {port}")
    check_address(host, port)
    # Every file of the model, read once here, last as the slowest check: a broken one inside the directory was a
    # traceback from the app's startup (exit 3), and, with --workers, an exit status of 0. Read on this thread alone:
    # torch's parallel ops would give it an OpenMP team that stays, idle, beside the model thread's, and with more
    # OpenMP threads than cores libgomp stops spin-waiting between parallel regions: batched decoding ran a third
    # slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        read_model(settings.model_dir)
    finally:
        torch.set_num_threads(threads)


def check_address(host: str, port: int) -> None:
    """NMTError when the service could not listen on host:port (a name that does not resolve, an address not this
    machine's, a port in use): found before the model loads, not by uvicorn after it. Each address the host
    resolves to is tried as asyncio binds them (IPv6 sockets IPv6 only; an address family the machine lacks is
    skipped, unless it is all there is)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise NMTError(f"--host {host}: {getattr(exc, 'strerror', None) or exc}") from None
    skipped: list[OSError] = []
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise NMTError(f"cannot listen on {shown}: {exc.strerror or exc}") from None
            skipped.append(exc)
    if addresses and len(skipped) == len(addresses):  # none of its addresses is this machine's
        raise NMTError(f"cannot listen on {shown}: {skipped[0].strerror or skipped[0]}")
