"""uvicorn's HTTP protocol (httptools) with a deadline for each request's headers and one for a client to read its
answer on, and JSON for the errors it answers itself.

uvicorn bounds the idle time between two requests of a connection (its keep-alive timeout) but not the time a
request's headers take: a client that sends them a byte at a time, or opens a connection and sends nothing,
held it open for as long as it liked, and enough such connections (slowloris) used up the process's file
descriptors: nobody else was served (400 of them under `ulimit -n 256`: connections reset; with a deadline of
2 s, served again 4 s later, the 400 still open on the client's side). As nginx's client_header_timeout, a
request whose headers are not complete NMT_HEADER_TIMEOUT_S after the connection opened (after its first byte,
for the later requests of a connection) gets 408 and the connection is closed; a connection on which no request
has begun is closed without an answer.

Nor did anything bound how long an answer may wait for its client to read it: one that read nothing kept the
connection, and the megabytes of its unsent answer, for ever, and held up a graceful shutdown as long (SIGTERM:
"Waiting for connections to close", still there 30 s later). As nginx's send_timeout, a connection whose unsent
bytes passed the transport's high-water mark (64 KiB) and did not fall under its low-water mark (16 KiB)
within NMT_SEND_TIMEOUT_S is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import http
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import httptools
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import request_id
from service.errors import error_response
from service.metrics import ANSWERED_OUTSIDE
from service.settings import Settings

log = logging.getLogger(__name__)

# A request line as RFC 9112 has it, a method, a target and the version, with bounded parts: matched where a read
# begins, it costs at most their length (unbounded and searched for, a 130 KB packet held the event loop 90 s).
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}) [^ \r\n]{1,8192} HTTP/1\.[01]\r?\n")
LOG_EVERY_S = 60.0  # a flood of slow clients is one warning line, with a count, at most this often


@functools.cache
def _setting(name: str) -> Any:
    """A setting read once per process from the environment as the app reads them (nmt serve has checked them;
    where they do not validate, the app fails its startup anyway)."""
    try:
        return getattr(Settings(), name)
    except ValidationError:
        return Settings.model_fields[name].default


def header_timeout_s() -> float:
    return _setting("header_timeout_s")


def max_header_bytes() -> int:
    return _setting("max_header_bytes")


def send_timeout_s() -> float:
    return _setting("send_timeout_s")


class RefusalLogFilter(logging.Filter):
    """Drops uvicorn's own line for each malformed request ("Invalid HTTP request received."): a client could
    write the log full with them; HeaderDeadlineProtocol counts them and logs one line a minute at most."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


class _Timer:
    """One delayed call on an event loop, started again or stopped as a connection's state changes."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._handle: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self, delay: float, callback: Callable[[], None]) -> None:
        self.stop()
        self._handle = self.loop.call_later(delay, self._fire, callback)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self, callback: Callable[[], None]) -> None:
        self._handle = None
        callback()


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol closing a connection whose request headers take longer than the deadline, counted from
    the connection's opening for its first request and from a request's first byte for later ones. Bytes that
    arrive between requests (the rest of a body the app answered without reading, stray line ends) start the same
    deadline: uvicorn's keep-alive timeout, which any byte cancels, no longer bounds that connection.

    Nor did anything bound the headers' size: httptools keeps them whole, so that ten connections sending 80 MB
    of one header each took the process from 475 to 945 MB. Past NMT_MAX_HEADER_BYTES, 431 and the connection
    closed, as nginx answers past its header buffers; the parser's further callbacks on that connection are then
    ignored."""

    _last_log = float("-inf")
    _unlogged = 0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._header_timer = _Timer(self.loop)
        self._begun = False  # a request's first byte has arrived and its headers have not all
        self._in_body = False  # a request's headers are complete and its body is not
        self._completed = 0  # requests whose body has all arrived, on this connection
        self._header_bytes = 0  # received in reads that fall within a request's line and headers
        self._parsed_bytes = 0  # of its request line and headers, as the parser hands them over
        self._too_large = False  # refused with 431: the parser's further callbacks are ignored
        self._send_timer = _Timer(self.loop)  # running while the client reads too little
        # An error for bytes after pipelined requests (no request, or headers too large): sent after their answers.
        self._deferred: tuple[int, bytes, str] | None = None
        self._cycles: list[Any] = []  # this connection's requests not yet answered, the one under way first
        self._counted_by_app = False  # the next answer made here is a request's the app counts
        self._received = b""  # the last bytes read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.stop()
        self._send_timer.stop()
        # uvicorn tells the newest request alone: one under way with another pipelined behind it went on for nobody
        # (its model work to the end, counted as 200, then a traceback for the closed connection).
        for cycle in self._cycles:
            if cycle is not self.cycle and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """A graceful shutdown: uvicorn closes a connection with no request under way, which dropped one whose
        headers were still arriving without a word; that one is answered 503 instead."""
        if self._begun and not self._too_large and not self._answers_due():
            self._disarm()
            self._answer(503, b"Service Unavailable", "the service is shutting down; retry shortly")
            return
        super().shutdown()

    def _unsupported_upgrade_warning(self) -> None:
        """A request that asks to switch protocols (Upgrade: h2c, as `curl --http2` sends; websocket), which the
        service does not do (uvicorn logged two warnings for each, one of them advice to install a WebSocket
        library). The parser stops at its headers, so nothing after them is read as HTTP: one without a body is
        answered, and its connection closed after; one with a body reached the app without it (422 "empty"), and
        gets 400 instead."""
        cycle = self.cycle
        if cycle is None or cycle.disconnected or cycle.response_complete:  # said already, or answered
            return
        cycle.keep_alive = False
        headers = dict(self.headers)
        if b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() not in (b"", b"0"):
            self._abandon(cycle)
            protocol = headers.get(b"upgrade", b"").decode("latin-1")
            self._answer(400, b"Bad Request", f"the request asks to switch protocols (Upgrade: {protocol}), which "
                         "this service does not do, and its body is then not read: send it without Upgrade (curl: "
                         "without --http2)")

    def pause_writing(self) -> None:
        """The unsent bytes passed the high-water mark: the client has that long to read enough of them."""
        super().pause_writing()
        if not self._send_timer.running:
            self._send_timer.start(send_timeout_s(), self._drop_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_timer.stop()

    def _drop_stalled(self) -> None:
        log.warning("connection from %s dropped: it read too little of its answer for %g s (%d bytes unsent)",
                    self._client_name(), send_timeout_s(),
                    self.transport.get_write_buffer_size())
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._too_large:
            return
        in_body, completed = self._in_body, self._completed
        self._received = data  # what send_400_response may look at, for the request line the parser refused
        super().data_received(data)
        if self.transport.is_closing():
            return
        # A read that began outside any body, in which no request ended and after which a request's headers are
        # still incomplete, holds nothing but header bytes (and perhaps line ends between requests). Those of a
        # read that holds the end of a body are counted as the parser hands them over (_counted).
        if self._begun and not in_body and self._completed == completed:
            self._header_bytes += len(data)
            if self._header_bytes > max_header_bytes():
                self._refuse_large_headers()
                return
        between_requests = self.cycle is None or self.cycle.response_complete
        if not self._header_timer.running and between_requests:
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun, self._parsed_bytes = True, 0
        if not self._header_timer.running:  # a deadline running since the connection opened keeps running
            self._arm()

    def on_url(self, url: bytes) -> None:
        if self._counted(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._counted(len(name) + len(value) + 4):  # ": " and the line end
            super().on_header(name, value)

    def _counted(self, size: int) -> bool:
        """Count a request's line and headers as the parser hands them over (those that arrive whole in one read
        are no incomplete bytes; a chunked body's trailers, after the headers, are not counted); whether the
        request may go on: past the limit it gets 431."""
        if self._too_large:
            return False
        if self._begun:
            self._parsed_bytes += size
            if self._parsed_bytes > max_header_bytes():
                self._refuse_large_headers()
                return False
        return True

    def on_headers_complete(self) -> None:
        if self._too_large:  # refused: no app call
            return
        self._begun, self._header_bytes, self._parsed_bytes, self._in_body = False, 0, 0, True
        self._disarm()
        super().on_headers_complete()
        self._cycles = [cycle for cycle in self._cycles if not cycle.response_complete] + [self.cycle]

    def on_body(self, body: bytes) -> None:
        if not self._too_large:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._completed += 1
        if not self._too_large:
            super().on_message_complete()

    def _arm(self) -> None:
        self._header_timer.start(header_timeout_s(), self._expire)

    def _disarm(self) -> None:
        self._header_timer.stop()

    def _expire(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The late request is pipelined behind an answer still being sent: a 408 now would cut into it.
            self._arm()
            return
        if not self._begun:
            self.transport.close()
            return
        self._answer(408, b"Request Timeout", f"the request headers did not all arrive within {header_timeout_s():g} s")

    def _refuse_large_headers(self) -> None:
        self._too_large = True
        self._disarm()
        self._answer(431, b"Request Header Fields Too Large",
                     f"the request line and headers exceed {max_header_bytes()} bytes")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are no valid HTTP request (a negative or repeated Content-Length, a
        malformed request line), in the service's JSON error shape instead of plain text; after the answers to the
        requests before them on the connection."""
        if self._too_large:  # answered already
            return
        if self._in_body and self.cycle is not None:  # the newest request's body broke off
            if self.cycle.response_started:  # answered without its body (a 401; a GET): no second answer
                self.cycle.keep_alive = False
                if self.cycle.response_complete:
                    self.transport.close()
                return
            self._abandon(self.cycle)  # else it waits for the rest of a body that cannot come, until its deadline
        # uvicorn calls this from its handler of the parser's error, which tells an unknown method; that is a 501
        # (RFC 9110) in a well-formed request line (one a read begins with), and bytes that are no HTTP (TLS, say)
        # otherwise.
        unknown_method = isinstance(sys.exc_info()[1], httptools.HttpParserInvalidMethodError)
        line = _REQUEST_LINE.match(self._received) if unknown_method else None
        if line is not None and line[1].decode("ascii") not in http.HTTPMethod.__members__:
            self._answer(501, b"Not Implemented", "the request's method is unknown to this service (its "
                                                  "endpoints take GET, HEAD and POST, and OPTIONS for CORS)")
            return
        self._answer(400, b"Bad Request", f"{msg.rstrip('.')}: malformed request line, headers or framing")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred is not None and not self.transport.is_closing() and not self._answers_due():
            deferred, self._deferred = self._deferred, None
            self._answer(*deferred)

    def _abandon(self, cycle: Any) -> None:
        """Tell the app a request will get no more of its body (as if its client had left): the 400 answers it,
        counted in the metrics by its route when the app had begun it."""
        cycle.disconnected = True
        cycle.message_event.set()
        waiting = len(self.pipeline)
        self.pipeline = collections.deque(item for item in self.pipeline if item[0] is not cycle)
        if len(self.pipeline) == waiting:
            cycle.scope[ANSWERED_OUTSIDE] = 400
            self._counted_by_app = True

    def _answers_due(self) -> bool:
        """Whether a request of this connection is still to be answered (under way, or pipelined behind it)."""
        return bool(self.pipeline) or any(not c.response_complete and not c.disconnected for c in self._cycles)

    def _answer(self, status: int, reason: bytes, message: str) -> None:
        """Write a JSON error outside any request cycle and close the connection; after the answers to the requests
        before it on the connection (uvicorn closed it at once: a pipelined request's answer was lost)."""
        if self._answers_due():
            self._deferred = status, reason, message
            return
        self._count(status, message)
        # No request reached the app, to take an id from: the answer gets a new one (its log line has none).
        response = error_response(status, message, headers={"connection": "close",
                                                            request_id.HEADER: request_id.id_for(None)})
        head = b"".join(b"%s: %s\r\n" % pair for pair in [*self.server_state.default_headers, *response.raw_headers])
        self.transport.write(b"HTTP/1.1 %d %s\r\n" % (status, reason) + head + b"\r\n" + response.body)
        self.transport.close()

    def _client_name(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "an unknown client"

    def _count(self, status: int, message: str) -> None:
        """An answer made here, before any route: in the app's metrics (route "unparsed") and in a log line at most
        every LOG_EVERY_S, with a count (slowloris or oversized headers were seen in neither)."""
        app = self.app
        while app is not None and getattr(getattr(app, "state", None), "metrics", None) is None:
            app = getattr(app, "app", None)  # past uvicorn's own middleware (proxy headers, message logger)
        if app is not None and not self._counted_by_app:
            app.state.metrics.requests.labels("unparsed", "other", str(status)).inc()
        self._counted_by_app = False
        cls = HeaderDeadlineProtocol
        cls._unlogged += 1
        now = time.monotonic()
        if now - cls._last_log >= LOG_EVERY_S:
            log.warning("%d request(s) refused before reaching the app, their connections closed (the last: %d from "
                        "%s: %s)", cls._unlogged, status, self._client_name(), message)
            cls._last_log, cls._unlogged = now, 0
