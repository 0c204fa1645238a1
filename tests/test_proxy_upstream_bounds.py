"""The proxy against an upstream that answers in ways that would bypass the output rail or cost unbounded memory
or time (an audit's findings): successes other than 200, redirects, compressed answers, floods of tiny events."""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from test_proxy_hostile import CHAT, chunk_event, proxied

from mmguard.proxy.release import MAX_HELD_BYTES, StreamRelease
from mmguard.proxy.sse import SSEParser

from test_proxy import TRIGGER

HARMFUL = {"id": "x", "object": "chat.completion",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Sure: {TRIGGER}"},
                        "finish_reason": "stop"}]}


def upstream(status: int, *, stream: bool = False, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def answer() -> Response:
        if stream:
            said = chunk_event([{"index": 0, "delta": {"content": f"Sure: {TRIGGER}"}, "finish_reason": None}])
            return StreamingResponse(iter([said, b"data: [DONE]\n\n"]), status_code=status,
                                     media_type="text/event-stream", headers=headers)
        return Response(json.dumps(HARMFUL).encode() if body is None else body, status_code=status,
                        media_type="application/json", headers=headers)

    return app


@pytest.mark.parametrize("status", [201, 203, 299])
@pytest.mark.parametrize("stream", [False, True])
def test_every_success_is_judged_not_only_200(status: int, stream: bool) -> None:
    """A 201 or 203 went to the client unchecked: the openai SDK reads every 2xx as the answer."""
    with proxied(upstream(status, stream=stream)) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
    assert TRIGGER not in resp.text, resp.text
    assert "content_filter" in resp.text


def test_a_redirect_is_refused_not_passed_on() -> None:
    """Passed on with its Location, a redirect sent the SDK to the upstream itself: its answer unchecked, and the
    upstream's address disclosed."""
    app = upstream(307, headers={"location": "http://127.0.0.1:1/v1/chat/completions"}, body=b"")
    with proxied(app) as url:
        resp = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 502 and "location" not in resp.headers
    assert resp.json()["error"]["code"] == "upstream_invalid_response" and "redirect" in resp.text


def test_a_compressed_answer_is_inflated_a_piece_at_a_time_or_refused() -> None:
    """The proxy asks for identity and inflates an upstream that compresses anyway; httpx inflated each read whole
    and stacked decoders, so 5 KB sent as 'gzip, gzip' took 5.9 GB. Stacked layers are refused now; one layer is
    inflated 64 KiB at a time, under the 64 MiB bound of a plain answer."""
    bomb = gzip.compress(b" " * 80_000_000)  # 78 KB that inflate past the bound
    with proxied(upstream(200, headers={"content-encoding": "gzip, gzip"}, body=gzip.compress(bomb))) as url:
        resp = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 502 and "content-encoding 'gzip, gzip'" in resp.json()["error"]["message"]
    with proxied(upstream(200, headers={"content-encoding": "gzip"}, body=bomb)) as url:
        resp = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_body_too_large"


def test_pieces_of_an_inflated_answer_are_bounded() -> None:
    import asyncio

    from mmguard.proxy.sse import DECODED_PIECE, read_decoded

    body = gzip.compress(b"x" * (5 * DECODED_PIECE + 7))
    resp = httpx.Response(200, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(body))

    async def pieces() -> list[bytes]:
        return [p async for p in read_decoded(resp)]

    got = asyncio.run(pieces())
    assert b"".join(got) == b"x" * (5 * DECODED_PIECE + 7) and max(map(len, got)) <= DECODED_PIECE


def test_the_event_parser_takes_time_linear_in_its_input() -> None:
    """One read of many small events was parsed in time events x buffer: 1 MiB of ':\\n\\n' took 5.2 s, with
    every client of the proxy waiting. 8 times the input must cost about 8 times the time, not 64 (a ratio
    measured in the same run, with a wide margin: never an absolute time)."""
    def parse_seconds(n_bytes: int) -> float:
        data = b":\n\n" * (n_bytes // 3)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            events = SSEParser().feed(data)
            best = min(best, time.perf_counter() - start)
        assert len(events) == n_bytes // 3
        return best

    small, large = parse_seconds(512 << 10), parse_seconds(4 << 20)
    assert large < 24 * small, (small, large)  # linear: 8x; quadratic: 64x


def test_held_events_are_charged_what_they_cost_not_their_bytes_alone() -> None:
    """Behind text waiting for its check, 8.4 million blank events (2 bytes each) were held under a 16 MiB bound
    that counted 2 bytes for each: 2.5 GB. Reading now pauses after at most some tens of thousands."""
    rel = StreamRelease(check_every=10_000, release="checked", count_tokens=lambda t: (len(t) + 3) // 4)
    (said,) = SSEParser().feed(chunk_event([{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]))
    rel.feed(said)
    blank = SSEParser().feed(b": ping\n\n")[0]
    held = 0
    while not rel.reading_paused:
        rel.feed(blank)
        held += 1
    assert held < MAX_HELD_BYTES // 400, held


def test_hold_times_are_reported_as_released_not_kept_for_the_whole_stream() -> None:
    seen: list[float] = []
    rel = StreamRelease(check_every=1, release="checked", count_tokens=lambda t: len(t), on_hold=seen.append)
    for event in SSEParser().feed(chunk_event([{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}])):
        rel.feed(event)
    (due,) = rel.due_checks()
    rel.passed(due)
    assert len(rel.releasable()) == 1 and len(seen) == 1 and not hasattr(rel, "hold_seconds")




def test_a_client_that_reads_nothing_holds_the_upstream_back_by_bytes_not_events() -> None:
    """The read-ahead queue held 64 events whatever their size: with 4 MiB events and a client that read nothing,
    the proxy read 267 MB ahead of it (+620 MB of memory). It is bounded in bytes now (4 MiB)."""
    import threading

    sent = [0]
    app = FastAPI()
    call = {"index": 0, "function": {"arguments": "x" * (1 << 20)}}
    tool = chunk_event([{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}])

    @app.post("/v1/chat/completions")
    async def answer() -> StreamingResponse:
        async def events() -> Any:
            yield chunk_event([{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}])
            for _ in range(300):
                sent[0] += 1
                yield tool

        return StreamingResponse(events(), media_type="text/event-stream")

    with proxied(app) as url, httpx.Client(timeout=30) as client, \
            client.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.status_code == 200
        done = threading.Event()
        done.wait(4)  # the client reads nothing meanwhile
        assert sent[0] < 48, sent[0]  # 1 MiB events: queue, held and socket buffers (91 before)


def trickling(stream: bool) -> FastAPI:
    """An upstream that never finishes: a byte of a plain answer every 0.2 s, or held text then keep-alive
    comments (each read restarts the per-read timeout, so only a total bounds it)."""
    import asyncio

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def answer() -> StreamingResponse:
        async def plain() -> Any:
            for byte in json.dumps(HARMFUL).encode() * 100:
                await asyncio.sleep(0.2)
                yield bytes([byte])

        async def events() -> Any:
            yield chunk_event([{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}])
            for _ in range(600):
                await asyncio.sleep(0.2)
                yield b": ping\n\n"

        if stream:
            return StreamingResponse(events(), media_type="text/event-stream")
        return StreamingResponse(plain(), media_type="application/json")

    return app


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_that_never_finishes_is_bounded_in_all(stream: bool) -> None:
    """A byte a second, or keep-alive comments behind held text, held the client and the upstream connection for
    ever (0 bytes in 60 s, no error): the per-read timeout restarts at every byte. --answer-timeout bounds it."""
    start = time.perf_counter()
    with proxied(trickling(stream), check_every=10_000, answer_timeout_s=1.5) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=60)
    assert time.perf_counter() - start < 30
    if stream:
        assert resp.status_code == 200 and '"code": "upstream_timeout"' in resp.text and '"content"' not in resp.text
    else:
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
