"""What one request may use, set per request by the gateway and read wherever the request's work happens: its
deadline (image fetches and the wait for verdicts share it) and its text budget (``--max-text-chars``)."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

from .errors import APIError

__all__ = ["CLIENT_GONE", "REQUEST_DEADLINE", "REQUEST_TEXT", "TextBudget", "request_timeout_error"]


# time.monotonic() by which the current request must be answered (set by the server's middleware once the
# body is read): image fetches and the wait for verdicts share it, so --request-timeout bounds the whole request
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("mmguard_request_deadline", default=None)
# set when the request's client has disconnected (the gateway watches for it): its queued work is dropped
CLIENT_GONE: ContextVar[asyncio.Event | None] = ContextVar("mmguard_client_gone", default=None)


def request_timeout_error(seconds: float) -> APIError:
    return APIError(504, f"request timed out after {seconds:g}s", type="server_error", code="timeout")


class TextBudget:
    """The characters of text the current request may still hold (``--max-text-chars``)."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit

    def take(self, text: str, param: str) -> None:
        self.left -= len(text)
        if self.left < 0:
            raise APIError(400, f"the request holds more than {self.limit} characters of text in all (the server's "
                                "--max-text-chars); send less text, or split it over requests",
                           param=param, code="text_too_long")


# set by the gateway for each request once its body is read; every text the request holds is counted against it
REQUEST_TEXT: ContextVar[TextBudget | None] = ContextVar("mmguard_request_text", default=None)
