"""uvicorn's HTTP protocol (httptools) with a deadline for each request's headers.

uvicorn bounds the idle time between two requests of a connection (its keep-alive timeout) but not the time a
request's headers take: a client that sends them a byte at a time, or opens a connection and sends nothing,
held it open for as long as it liked, and enough such connections (slowloris) used up the process's file
descriptors: nobody else was served (400 of them under `ulimit -n 256`: connections reset; with a deadline of
2 s, served again 4 s later, the 400 still open on the client's side). As nginx's client_header_timeout, a
request whose headers are not complete NMT_HEADER_TIMEOUT_S after its first byte (or after the connection
opened) gets 408 and the connection is closed; a connection on which no request has begun is closed without an
answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger(__name__)

STATE_KEY = "nmt.header_timeout_s"  # where the app's lifespan state holds the deadline (service.app)
DEFAULT_TIMEOUT_S: float = Settings.model_fields["header_timeout_s"].default  # for an app that puts none there


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol closing a connection whose request headers take longer than the deadline."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._begun = False  # a request's first byte has arrived and its headers have not all

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        self._arm()

    def on_headers_complete(self) -> None:
        self._begun = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        timeout = self.app_state.get(STATE_KEY, DEFAULT_TIMEOUT_S)
        self._header_timer = self.loop.call_later(timeout, self._expire, timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self, timeout: float) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The late request is pipelined behind an answer still being sent: a 408 now would cut into it.
            self._arm()
            return
        if not self._begun:
            self.transport.close()
            return
        log.warning("%s: request headers not complete within %g s; closing the connection",
                    f"{self.client[0]}:{self.client[1]}" if self.client else "a client", timeout)
        body = json.dumps({"error": {"code": "timeout", "message": f"the request headers did not all arrive within "
                                                                   f"{timeout:g} s", "fields": []}}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()
