"""``mmguard eval``'s remote guards against a hostile endpoint (an audit, 2026-12-07): every answer gets an error on
its item, or the run stops with a clear error in bounded time and memory; never a traceback, never a hang."""

from __future__ import annotations

import gzip
import math
import time
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from mmguard.conversation import Conversation
from mmguard.eval.guards import ChatJudgeGuard, MmguardServerGuard, OpenAIModerationGuard, RemoteUnavailable
from mmguard.eval.guards.http import MAX_ANSWER_BYTES
from mmguard.proxy.testing import LiveApp

DEEP = b"[" * 100_000 + b"]" * 100_000


def hostile() -> FastAPI:
    app = FastAPI()

    @app.post("/{mode}/v1/{rest:path}")
    async def answer(mode: str, request: Request) -> Any:
        if mode == "endless":
            async def forever() -> Any:
                import asyncio

                for _ in range(100_000):  # 6.5 GB, were it read whole
                    yield b" " * 65536
                    await asyncio.sleep(0)  # the server's other requests go on

            return StreamingResponse(forever(), media_type="application/json")
        if mode == "trickle":
            async def slowly() -> Any:
                import asyncio

                for _ in range(1000):
                    yield b" "
                    await asyncio.sleep(0.2)

            return StreamingResponse(slowly(), media_type="application/json")
        if mode == "huge":
            return Response(b" " * (MAX_ANSWER_BYTES + 1), media_type="application/json")
        if mode == "gzipbomb":
            return Response(gzip.compress(b" " * (MAX_ANSWER_BYTES + 1)), media_type="application/json",
                            headers={"content-encoding": "gzip"})
        if mode == "deep":
            return Response(DEEP, media_type="application/json")
        if mode == "nan":
            return Response(b'{"choices": [{"message": {"content": "unsafe"}, "logprobs": {"content": '
                            b'[{"token": "unsafe", "logprob": NaN}]}}]}', media_type="application/json")
        if mode == "overflow":
            return {"choices": [{"message": {"content": "unsafe"},
                                 "logprobs": {"content": [{"token": "unsafe", "logprob": 1000.0}]}}]}
        if mode == "codes":
            return {"verdict": {"label": "unsafe", "unsafe_probability": 0.9, "codes": 5}}
        if mode == "improbable":  # a probability no model gives: reports averaged it into their figures
            return {"verdict": {"label": "unsafe", "unsafe_probability": 1e300, "codes": []}}
        if mode == "hugeint":  # an integer past a float's range: float() raises OverflowError
            return Response(b'{"verdict": {"label": "unsafe", "unsafe_probability": 1' + b"0" * 400 + b"}}",
                            media_type="application/json")
        if mode == "positivelogprob":  # exp(0.5) = 1.65: "safe" at that gave P(unsafe) = -0.65
            return {"choices": [{"message": {"content": "safe"},
                                 "logprobs": {"content": [{"token": "safe", "logprob": 0.5}]}}]}
        if mode == "negativescore":
            return {"results": [{"flagged": True, "categories": {"violence": True},
                                 "category_scores": {"violence": -5.0}}]}
        raise AssertionError(mode)

    return app


@pytest.fixture(scope="module")
def server() -> Any:
    with LiveApp(hostile()) as srv:
        yield srv.url


def judged(guard: Any) -> Any:
    started = time.monotonic()
    (pred,) = guard.predict([Conversation.prompt("hi")])
    return pred, time.monotonic() - started


@pytest.mark.parametrize(("mode", "message"), [
    ("huge", f"more than {MAX_ANSWER_BYTES} bytes"),  # a 500 MB answer took 5.6 GB
    ("endless", f"more than {MAX_ANSWER_BYTES} bytes"),  # one that never ended: 5.7 GB in 20 s
    ("gzipbomb", f"more than {MAX_ANSWER_BYTES} bytes"),  # 2 MB on the wire, 2 GB inflated
    ("deep", "nested too deeply"),  # RecursionError: a traceback that ended the run
    ("nan", "NaN is not JSON"),  # NaN was cached as the probability, then broke every report
])
def test_answers_too_big_or_not_json_are_the_items_errors(server: str, mode: str, message: str) -> None:
    pred, _ = judged(OpenAIModerationGuard(f"{server}/{mode}", "m", retries=0, concurrency=1, timeout=30))
    assert pred.error is not None and message in pred.error and math.isnan(pred.unsafe_probability), pred


@pytest.mark.parametrize(("kind", "mode"), [(ChatJudgeGuard, "overflow"), (MmguardServerGuard, "codes"),
                                             (MmguardServerGuard, "improbable"), (MmguardServerGuard, "hugeint"),
                                             (OpenAIModerationGuard, "negativescore"),
                                             (ChatJudgeGuard, "positivelogprob")])
def test_answers_of_an_unexpected_shape_are_the_items_errors(server: str, kind: Any, mode: str) -> None:
    """A logprob of 1000 (math.exp overflows) or "codes": 5 ended the run with a traceback; a probability of 1e300
    or a score of -5 was taken as it came (or clamped to 0 while flagged) into every report's figures."""
    url = f"{server}/{mode}"
    guard = kind(url, retries=0) if kind is MmguardServerGuard else kind(url, "m", retries=0)
    pred, _ = judged(guard)
    assert pred.error is not None and pred.error.startswith("unexpected answer"), pred


def test_an_answer_trickled_a_byte_at_a_time_stops_at_the_timeout(server: str) -> None:
    """httpx's timeout is per read: an answer trickled a byte at a time held the run for ever."""
    guard = OpenAIModerationGuard(f"{server}/trickle", "m", retries=0, concurrency=1, timeout=2)
    started = time.monotonic()
    with pytest.raises(RemoteUnavailable, match=r"longer than 2s"):
        guard.predict([Conversation.prompt("hi")])
    assert time.monotonic() - started < 20
