"""What the remote guards share: conversations in OpenAI's chat form, and JSON POSTs with retries,
backoff and a concurrency limit.

Remote guards send ``Authorization: Bearer $MMGUARD_EVAL_API_KEY`` (or ``$OPENAI_API_KEY``) when one of
those variables is set, retry 429/5xx/connection errors with exponential backoff (honouring
``Retry-After``), and run at most ``concurrency`` requests at once.
"""

from __future__ import annotations

import base64
import io
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...conversation import Conversation
from ...jsonl import loads_strict
from .base import GuardSpecError, Prediction, ProgressFn, RemoteError, RemoteUnavailable

__all__ = ["MAX_ANSWER_BYTES", "RetryingHttp", "conversation_to_messages", "image_data_url", "probability"]

MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a guard's answer to one item is a few KB


def image_data_url(conv: Conversation) -> str | None:
    img = conv.image
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def conversation_to_messages(conv: Conversation) -> list[dict[str, Any]]:
    """OpenAI chat form with the image inlined as a PNG data URL (what the remote guards receive)."""
    out: list[dict[str, Any]] = []
    for t in conv.turns:
        parts: list[dict[str, Any]] = [{"type": "text", "text": s} for s in t.texts]
        if t.image is not None:
            parts.insert(0, {"type": "image_url", "image_url": {"url": image_data_url(conv)}})
        out.append({"role": "user" if t.role == "user" else "assistant", "content": parts})
    return out


def _api_key() -> str | None:
    return os.environ.get("MMGUARD_EVAL_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


class RetryingHttp:
    """POST JSON with retries, exponential backoff and a concurrency limit (a thread pool)."""

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(
        self,
        base_url: str,
        *,
        concurrency: int = 4,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 60.0,
        api_key: str | None = None,
    ) -> None:
        import httpx

        if not re.match(r"^https?://", base_url):
            raise GuardSpecError(f"remote guard URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.concurrency = max(1, int(concurrency))
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"Content-Type": "application/json"}
        key = api_key if api_key is not None else _api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout
        self.client = httpx.Client(
            timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=self.concurrency)
        )
        self.attempts = 0  # total HTTP attempts (for reports and tests)
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        """``path`` under the base URL: the server root, the usual OpenAI base ``.../v1`` (not doubled) or
        the full endpoint URL are all accepted."""
        if self.base_url.endswith(path):
            return self.base_url
        if path.startswith("/v1/") and self.base_url.endswith("/v1"):
            return self.base_url + path[len("/v1"):]
        return self.base_url + path

    def _sleep_for(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + random.random() / 2)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.call("POST", path, body)

    def get(self, path: str) -> Any:
        return self.call("GET", path, None)

    def call(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        """``method`` on ``path`` with retries; the answer's JSON (a RemoteError otherwise)."""
        import httpx

        url = self.url(path)
        last = ""
        for attempt in range(self.retries + 1):
            with self._lock:
                self.attempts += 1
            retry_after = None
            try:
                status, headers, raw = self._send(url, body, method)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                shown = raw[:300].decode("utf-8", "replace")
                if status < 400:
                    try:
                        return loads_strict(raw)
                    except ValueError as err:  # not JSON, NaN, 1e999, nested past the parser
                        raise RemoteError(f"{url} answered invalid JSON ({err}): {shown[:200]!r}") from None
                if status not in self.RETRY_STATUS:
                    raise RemoteError(f"{url} answered HTTP {status}: {shown}")
                last = f"HTTP {status}: {shown[:200]}"
                retry_after = headers.get("retry-after")
            if attempt < self.retries:
                time.sleep(self._sleep_for(attempt, retry_after))
        raise RemoteUnavailable(f"{url} failed after {self.retries + 1} attempts ({last})")

    def _send(self, url: str, body: Mapping[str, Any] | None, method: str = "POST") -> tuple[int, Any, bytes]:
        """One attempt: status, headers and the body, read within ``timeout`` in all and at most
        :data:`MAX_ANSWER_BYTES` once decoded (httpx's timeout is per read: a body trickled a byte a second, or one
        that never ends, held the run or filled memory; a 2 MB gzip body inflated to 2 GB)."""
        import httpx

        deadline = time.monotonic() + self.timeout
        with self.client.stream(method, url, json=body) as resp:
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise RemoteError(f"{url} answered more than {MAX_ANSWER_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"the answer took longer than {self.timeout:g}s")
                chunks.append(chunk)
            return resp.status_code, resp.headers, b"".join(chunks)

    def map(
        self,
        fn: Callable[[Conversation], Prediction],
        conversations: Sequence[Conversation],
        progress: ProgressFn | None,
    ) -> list[Prediction]:
        def one(conv: Conversation) -> Prediction:
            try:
                pred = fn(conv)
            except RemoteError as err:
                pred = Prediction(label="error", unsafe_probability=math.nan, error=str(err))
            except (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError) as err:
                # valid JSON of a shape the guard's reader did not expect ("codes": 5, a logprob of 1000): that
                # item's error, never the run's end
                pred = Prediction(label="error", unsafe_probability=math.nan,
                                  error=f"unexpected answer: {type(err).__name__}: {str(err)[:200]}")
            if progress is not None:
                progress(1)
            return pred

        if self.concurrency == 1 or len(conversations) <= 1:
            return [one(c) for c in conversations]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, conversations))


def probability(value: Any, what: str) -> float:
    """A remote guard's probability or score: a number from 0 to 1, else a ``ValueError`` (that item's
    "unexpected answer" error: a score of 1e300 would be averaged into every report's figures)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is not a number: {str(value)[:40]!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range
        raise ValueError(f"{what} is not a probability: {str(value)[:40]}...") from None
    if not 0.0 <= number <= 1.0:  # NaN fails it too
        raise ValueError(f"{what} is not a probability from 0 to 1: {number!r}")
    return number
