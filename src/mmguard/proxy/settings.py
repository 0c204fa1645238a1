"""Proxy settings: where the upstream is, which rails run, how streamed answers are released.

Guard options (threshold, image limits, remote images, batching, queue, timeouts, fail-closed) are the
moderation server's own :class:`mmguard.server.ServerSettings`, held in ``guard``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from ..server.settings import ServerSettings

__all__ = ["MODES", "RAILS", "Mode", "ProxySettings", "Release"]

RAILS = ("input", "output")
MODES = ("block", "score")
Release = Literal["checked", "eager"]
Mode = Literal["block", "score"]


@dataclass(frozen=True)
class ProxySettings:
    """Everything ``mmguard proxy`` can be told.

    upstream: base URL of the OpenAI-compatible server, up to and including ``/v1``
        (``http://127.0.0.1:8000/v1``); ``/chat/completions`` and ``/models`` are appended.
    rails: ``input`` judges the last user turn before forwarding; ``output`` judges the answer.
    check_every: streamed answers are checked each time this many new answer tokens (the guard's tokenizer)
        arrived, and at the end of the answer.
    release: ``checked`` sends text to the client only once a check covering it passed; ``eager`` sends it
        at once and may leak up to one window (``check_every`` tokens) before a block.
    api_keys: the proxy's own keys, presented in the ``X-MMGuard-API-Key`` header (``Authorization``
        belongs to the upstream and is forwarded untouched).
    upstream_timeout_s: connect/read timeout towards the upstream (each read of a stream, not its total).
    answer_timeout_s: the longest a plain answer may take to arrive whole, and a stream may go without the
        proxy sending its client anything checked: past it, 504 ``upstream_timeout`` (or that error event).
        The per-read timeout restarts at every byte, so an upstream trickling a byte a second, or keep-alive
        comments behind held text, held a connection for ever.
    mode: ``block`` (default) stops what a rail flags; ``score`` judges and reports without blocking (a shadow
        deployment: :mod:`mmguard.proxy.scored`).
    judge_reasoning: also judge (and hold back) the answer's reasoning text (``reasoning_content`` or
        ``reasoning``, as vLLM, DeepSeek and OpenRouter send it), for clients that show it; off, it passes
        unjudged. Reasoning about a harmful request may itself be flagged: measure before turning it on.
    remember_responses: Responses API answers whose conversation the proxy keeps (least recently used first
        out; 0: none), so that a request continuing one (``previous_response_id``) is judged with its earlier
        turns (:mod:`mmguard.proxy.response_store`).
    history_chars: judge only the last this many characters of the turns before the judged one (0: all of
        them). A conversation past the guard's context is refused (400) when the whole history is judged; a
        long chat session then stops working through the proxy. The judged turn, the answer and the image stay
        whole either way.
    guard: the guard options, shared with ``mmguard serve``.
    """

    upstream: str
    rails: tuple[str, ...] = RAILS
    check_every: int = 32
    release: Release = "checked"
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    upstream_timeout_s: float = 120.0
    answer_timeout_s: float = 600.0
    judge_reasoning: bool = False
    mode: Mode = "block"
    remember_responses: int = 10_000
    history_chars: int = 0
    guard: ServerSettings = field(default_factory=ServerSettings)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.upstream!r}")
        unknown = [r for r in self.rails if r not in RAILS]
        if unknown:
            raise ValueError(f"unknown rail(s) {', '.join(unknown)}; use input, output or both")
        if self.check_every < 1:
            raise ValueError(f"check_every must be at least 1 token, got {self.check_every}")
        if self.release not in ("checked", "eager"):
            raise ValueError(f"release must be 'checked' or 'eager', got {self.release!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'block' or 'score', got {self.mode!r}")
        if self.history_chars < 0:
            raise ValueError(f"history_chars must be >= 0, got {self.history_chars}")
        if self.remember_responses < 0:
            raise ValueError(f"remember_responses must be >= 0, got {self.remember_responses}")
        if not self.upstream_timeout_s > 0 or not self.answer_timeout_s > 0:
            raise ValueError("upstream_timeout_s and answer_timeout_s must be > 0")

    @property
    def upstream_base(self) -> str:
        return self.upstream.rstrip("/")

    @property
    def blocking(self) -> bool:
        return self.mode == "block"

    @property
    def input_rail(self) -> bool:
        return "input" in self.rails

    @property
    def output_rail(self) -> bool:
        return "output" in self.rails
