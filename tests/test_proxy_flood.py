"""An upstream that answers faster or longer than the guard can judge: the proxy's memory stays bounded (it
stops reading, and TCP makes the upstream wait) and an answer over the conversation limits ends the stream
with an error event or the plain answer with a 400, never a cut connection or a 500.

Measured with this file's FloodUpstream and a 0.5 s guard on 2 cores (peak RSS of the process): 300 MB of
streamed tool-call deltas behind two characters of text grew it by 792 MB before the fix (every event held
until the end), 56 MB after; an answer streamed past 200,000 characters cut the connection with an
unhandled ConversationError, and a plain one answered 500.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from mmguard.conversation import MAX_TEXT_CHARS, Conversation
from mmguard.policy import DEFAULT_POLICY
from mmguard.proxy.release import StreamRelease
from mmguard.proxy.sse import SSEParser
from mmguard.proxy.testing import LiveApp, LiveProxy, StubUpstream
from mmguard.verdict import Verdict

from test_proxy import proxy_settings

MB = 1024 * 1024


def event(delta: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps({"id": "x", "choices": [{"index": 0, "delta": delta}]}).encode() + b"\n\n"


def parsed(raw: bytes) -> Any:
    (ev,) = SSEParser().feed(raw)
    return ev


class FloodUpstream:
    """Streams ``text`` as one delta, then ``total`` bytes of tool-call deltas as fast as it may, counting
    what it has produced (what the proxy has read, less what TCP buffers hold)."""

    def __init__(self, text: str, total: int, piece: dict[str, Any] | None = None) -> None:
        self.produced = 0
        self.app = FastAPI()
        filler = event(piece or {"tool_calls": [{"index": 0, "function": {"arguments": "x" * 1000}}]})

        @self.app.post("/v1/chat/completions")
        async def chat() -> StreamingResponse:
            async def events() -> Any:
                first = event({"content": text})
                self.produced += len(first)
                yield first
                while self.produced < total:
                    self.produced += len(filler)
                    yield filler
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")


class SlowGuard:
    """Passes everything after ``delay_s``, noting how much the upstream had produced at each output check."""

    policy: Any = DEFAULT_POLICY
    threshold = 0.5

    def __init__(self, upstream: FloodUpstream | None = None, delay_s: float = 0.2) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.produced_at_checks: list[int] = []
        self.lock = threading.Lock()

    def classify_batch(self, conversations: Sequence[Conversation], **_: Any) -> list[Verdict]:
        if any(c.judged_role == "agent" for c in conversations):
            with self.lock:
                self.produced_at_checks.append(self.upstream.produced if self.upstream else 0)
        time.sleep(self.delay_s)
        return [Verdict(is_unsafe=False, unsafe_probability=0.1, threshold=0.5, role=c.judged_role, violated=(),
                        category_probabilities={}, has_image=c.has_image) for c in conversations]

    def describe(self) -> dict[str, Any]:
        return {"model": "slow"}


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_reading_pauses_when_unchecked_text_runs_ahead_and_a_check_is_forced() -> None:
    rel = StreamRelease(check_every=10_000, release="checked", count_tokens=lambda t: (len(t) + 3) // 4,
                        max_ahead=100)
    rel.feed(parsed(event({"content": "a" * 80})))
    assert not rel.reading_paused and rel.due_checks() == []  # 20 tokens: no window is full
    rel.feed(parsed(event({"content": "b" * 40})))
    assert rel.reading_paused  # 120 unchecked characters > 100
    (due,) = rel.due_checks()  # forced, though far below check_every
    assert due.text == "a" * 80 + "b" * 40 and not due.final
    rel.passed(due)
    assert not rel.reading_paused and len(rel.releasable()) == 2


def test_reading_pauses_when_held_events_pass_their_byte_bound() -> None:
    rel = StreamRelease(check_every=10_000, release="checked", count_tokens=lambda t: (len(t) + 3) // 4,
                        max_held_bytes=5_000)
    rel.feed(parsed(event({"content": "hi"})))
    tool = event({"tool_calls": [{"index": 0, "function": {"arguments": "x" * 1000}}]})
    for _ in range(5):
        rel.feed(parsed(tool))  # each waits for "hi" to be checked
    assert rel.releasable() == [] and rel.reading_paused
    (due,) = rel.due_checks()
    rel.passed(due)
    assert len(rel.releasable()) == 6 and not rel.reading_paused


def test_a_fast_upstream_is_read_only_as_far_as_the_checks_allow() -> None:
    """80 MB of tool-call deltas behind two characters: the proxy judges "hi" once its held events pass 16 MiB
    and reads no further meanwhile; before, it held all 80 MB until the stream ended."""
    total = 80 * MB
    upstream = FloodUpstream("hi", total)
    guard = SlowGuard(upstream, delay_s=0.5)
    received, tail = 0, b""
    with LiveApp(upstream.app) as up, LiveProxy(guard, proxy_settings(up.url + "/v1")) as px, \
            httpx.stream("POST", px.url + "/v1/chat/completions", json={**BODY, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            received += len(chunk)
            tail = (tail + chunk)[-100:]
    assert guard.produced_at_checks and guard.produced_at_checks[0] < 40 * MB, guard.produced_at_checks
    assert received >= total and tail.endswith(b"data: [DONE]\n\n")  # everything passed, in full


def test_an_answer_over_the_conversation_limit_is_an_error_event_or_a_400() -> None:
    words = (MAX_TEXT_CHARS // 5 + 1000) * " word"  # ~5,000 characters past the limit
    flood = FloodUpstream(words[:2000], 8 * MB, piece={"content": " word" * 200})
    with LiveApp(flood.app) as up, LiveProxy(SlowGuard(flood, delay_s=0.05), proxy_settings(up.url + "/v1")) as px:
        r = httpx.post(px.url + "/v1/chat/completions", json={**BODY, "stream": True}, timeout=120)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    errors = [json.loads(x[6:])["error"] for x in r.text.splitlines() if x.startswith('data: {"error"')]
    assert len(errors) == 1 and errors[0]["code"] == "invalid_input"
    assert errors[0]["message"].startswith("the output check failed: ") and f"limit of {MAX_TEXT_CHARS}" in \
        errors[0]["message"]
    plain = StubUpstream(words)
    with LiveApp(plain.app) as up, LiveProxy(SlowGuard(delay_s=0.0), proxy_settings(up.url + "/v1")) as px:
        r = httpx.post(px.url + "/v1/chat/completions", json=BODY, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_input" and f"limit of {MAX_TEXT_CHARS}" in r.json()["error"]["message"]
