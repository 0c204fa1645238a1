"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on a request's headers.

uvicorn times nothing before a request's headers are complete: a connection that sends nothing, or a header
byte every few seconds (slowloris), stayed open for good (90 s measured, and no end in sight), and enough of
them exhaust the process's connections. Here a connection must deliver each request's headers within
``HEADER_TIMEOUT_S`` of connecting (or of its previous answer); the body then has the gateway's own deadline
(``--body-timeout``). Used by ``mmguard serve`` and ``mmguard proxy``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT_S", "HeaderDeadlineProtocol"]

HEADER_TIMEOUT_S = 10.0


class HeaderDeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` that closes a connection whose request headers take over ``header_timeout_s``."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._stop_header_timer()  # a request's headers are in: its body has the gateway's deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_header_timer()  # the next request's headers (keep-alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _stop_header_timer(self) -> None:
        timer: Any = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
