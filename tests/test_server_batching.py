"""Dynamic batching under load, the bounded queue (429), timeouts (504) and model errors (503 or
fail-closed), on a live loopback server. The guard is a tiny random-weight model: plumbing only."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections.abc import Sequence
from typing import Any

import httpx
import openai
import pytest
import torch
from PIL import Image

from mmguard.conversation import Conversation
from mmguard.server import ServerSettings
from mmguard.server.testing import LiveServer


def data_url(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40 + color[0] % 50, 40), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class WrappedGuard:
    """Delegates to the tiny guard, optionally slowly or failing on conversations that contain 'BOOM'."""

    def __init__(self, guard: Any, *, delay: float = 0.0) -> None:
        self.guard = guard
        self.policy = guard.policy
        self.threshold = guard.threshold
        self.threshold_for = guard.threshold_for
        self.delay = delay
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return self.guard.describe()

    def classify_batch(self, conversations: Sequence[Conversation], **kw: Any) -> list[Any]:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if any("BOOM" in t.text for c in conversations for t in c.turns):
            raise RuntimeError("simulated CUDA error")
        return self.guard.classify_batch(conversations, **kw)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


def test_64_concurrent_requests_are_batched_and_correct(tiny_guard) -> None:
    # one torch thread: on a 2-core host OpenMP threads on every core starve the event loop
    settings = ServerSettings(max_batch_size=16, max_wait_ms=25.0, max_queue=256, torch_threads=1)
    texts = [f"message number {i}: {'tell me about ' * (i % 5)}topic {i}" for i in range(48)]
    colors = [(i * 37 % 256, i * 91 % 256, 120) for i in range(16)]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core host shared with other jobs: OpenMP barriers stall badly otherwise
    try:
        expected_text = [tiny_guard.classify(Conversation.prompt(t)) for t in texts]
        image_convs = [
            Conversation.from_messages(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(c)}},
                            {"type": "text", "text": "what is this"},
                        ],
                    }
                ]
            )
            for c in colors
        ]
        expected_image = [tiny_guard.classify(c) for c in image_convs]
    finally:
        torch.set_num_threads(previous)

    async def run(url: str) -> tuple[list[Any], list[httpx.Response]]:
        oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        async with httpx.AsyncClient(timeout=60) as http:
            mods = [oai.moderations.create(input=t) for t in texts[:32]]
            guards = [
                http.post(url + "/v1/guard/classify", json={"messages": [{"role": "user", "content": t}]})
                for t in texts[32:]
            ]
            images = [
                http.post(
                    url + "/v1/guard/classify",
                    json={
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "image_url", "image_url": {"url": data_url(c)}},
                                    {"type": "text", "text": "what is this"},
                                ],
                            }
                        ]
                    },
                )
                for c in colors
            ]
            results = await asyncio.gather(*mods, *guards, *images)
        await oai.close()
        return list(results[:32]), list(results[32:])

    with LiveServer(tiny_guard, settings) as srv:
        mod_results, responses = asyncio.run(asyncio.wait_for(run(srv.url), 120))
        metrics = httpx.get(srv.url + "/metrics").text
    assert len(mod_results) + len(responses) == 64
    for res, exp in zip(mod_results, expected_text[:32], strict=True):
        assert res.results[0].flagged == exp.is_unsafe
    for r, exp in zip(responses, expected_text[32:] + expected_image, strict=True):
        assert r.status_code == 200, r.text
        v = r.json()["verdict"]
        assert v["has_image"] == exp.has_image
        assert v["is_unsafe"] == exp.is_unsafe
        assert v["unsafe_probability"] == pytest.approx(exp.unsafe_probability, rel=1e-3, abs=1e-7)
    batches = metric(metrics, "mmguard_batch_size_count")
    singles = metric(metrics, 'mmguard_batch_size_bucket{le="1.0"}')
    assert batches - singles >= 1, "no batch larger than 1 was observed"
    # 64 conversations (+1 warm-up call outside the batcher) were run in fewer batches than conversations
    assert metric(metrics, "mmguard_batch_size_sum") == 64 and batches < 64
    assert metric(metrics, 'mmguard_conversations_total{kind="image"}') == 16


def test_queue_full_answers_429_with_retry_after(tiny_guard) -> None:
    slow = WrappedGuard(tiny_guard, delay=0.3)
    settings = ServerSettings(max_batch_size=2, max_wait_ms=0.0, max_queue=3, warmup=False)

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            return list(
                await asyncio.gather(
                    *[http.post(url + "/v1/moderations", json={"input": f"x{i}"}) for i in range(16)]
                )
            )

    with LiveServer(slow, settings) as srv:
        responses = asyncio.run(asyncio.wait_for(burst(srv.url), 60))
        # a single request larger than the queue can never be admitted
        big = httpx.post(srv.url + "/v1/moderations", json={"input": ["a"] * 4}, timeout=30)
        metrics = httpx.get(srv.url + "/metrics").text
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert big.status_code == 429
    assert metric(metrics, 'mmguard_rejected_total{reason="queue_full"}') >= statuses.count(429)


def test_request_timeout_answers_504(tiny_guard) -> None:
    slow = WrappedGuard(tiny_guard, delay=1.0)
    with LiveServer(slow, ServerSettings(request_timeout_s=0.2, warmup=False)) as srv:
        r = httpx.post(srv.url + "/v1/moderations", json={"input": "slow"}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        time.sleep(1.0)  # the model thread finishes; the server still answers afterwards
        assert httpx.get(srv.url + "/readyz").status_code == 200


def test_model_error_is_isolated_and_answers_503(tiny_guard) -> None:
    flaky = WrappedGuard(tiny_guard)
    settings = ServerSettings(max_batch_size=8, max_wait_ms=50.0, warmup=False)

    async def mixed(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            reqs = [
                http.post(url + "/v1/moderations", json={"input": "BOOM" if i == 3 else f"fine {i}"})
                for i in range(6)
            ]
            return list(await asyncio.gather(*reqs))

    with LiveServer(flaky, settings) as srv:
        responses = asyncio.run(asyncio.wait_for(mixed(srv.url), 60))
        metrics = httpx.get(srv.url + "/metrics").text
    assert [r.status_code for r in responses] == [200, 200, 200, 503, 200, 200]
    err = responses[3].json()["error"]
    assert err["code"] == "model_error" and err["type"] == "server_error"
    assert metric(metrics, "mmguard_model_errors_total") >= 1


def test_fail_closed_flags_on_model_error(tiny_guard) -> None:
    flaky = WrappedGuard(tiny_guard)
    with LiveServer(flaky, ServerSettings(fail_closed=True, warmup=False)) as srv:
        r = httpx.post(srv.url + "/v1/moderations", json={"input": ["BOOM", "fine"]}, timeout=30)
        assert r.status_code == 200
        boom, fine = r.json()["results"]
        assert r.headers["x-mmguard-fail-closed"] == "true"
        assert boom["flagged"] is True and all(boom["categories"].values())
        assert fine["flagged"] is False
        r = httpx.post(
            srv.url + "/v1/guard/classify", json={"messages": [{"role": "user", "content": "BOOM"}]}
        )
        assert r.status_code == 200 and r.json()["fail_closed"] is True
        assert r.json()["verdict"]["is_unsafe"] is True
        r = httpx.post(
            srv.url + "/v1/safety/run-shield",
            json={
                "shield_id": "meta-llama/Llama-Guard-3-11B-Vision",
                "messages": [{"role": "user", "content": "BOOM"}],
            },
        )
        assert r.json()["violation"]["metadata"]["fail_closed"] is True
        assert metric(httpx.get(srv.url + "/metrics").text, "mmguard_fail_closed_total") == 3


def test_multi_image_each_merges_per_image_results(tiny_guard) -> None:
    urls = [data_url((250, 0, 0)), data_url((0, 0, 250))]
    with LiveServer(tiny_guard, ServerSettings(multi_image="each", threshold=0.0, warmup=False)) as srv:
        r = httpx.post(
            srv.url + "/v1/moderations",
            timeout=30,
            json={
                "input": [
                    {"type": "text", "text": "two pictures"},
                    *({"type": "image_url", "image_url": {"url": u}} for u in urls),
                ]
            },
        )
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    per_image = [
        tiny_guard.classify(
            Conversation.from_messages(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": u}},
                            {"type": "text", "text": "two pictures"},
                        ],
                    }
                ]
            ),
            threshold=0.0,
        )
        for u in urls
    ]
    for code in res["category_scores"]:
        best = max(v.category_probabilities.get(code, 0.0) for v in per_image)
        assert res["category_scores"][code] == pytest.approx(best, rel=1e-3, abs=1e-12)
    assert res["flagged"] is True


def test_queued_images_are_bounded_apart_from_the_queue(tiny_guard) -> None:
    """Each queued image request held its decoded image (about 31 MB at the largest canvas) and the queue took
    512 of them (about 16 GB); past max_queued_images a request with an image gets 429 while text still queues."""
    slow = WrappedGuard(tiny_guard, delay=0.5)
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0.0, max_queue=64, max_queued_images=2, warmup=False)

    def with_image(i: int) -> dict[str, Any]:
        return {"input": [{"type": "text", "text": f"x{i}"},
                          {"type": "image_url", "image_url": {"url": data_url((i * 40 % 255, 10, 10))}}]}

    async def burst(url: str) -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as http:
            images = [http.post(url + "/v1/moderations", json=with_image(i)) for i in range(8)]
            texts = [http.post(url + "/v1/moderations", json={"input": f"t{i}"}) for i in range(4)]
            done = await asyncio.gather(*images, *texts)
            return list(done[:8]), list(done[8:])

    with LiveServer(slow, settings) as srv:
        images, texts = asyncio.run(asyncio.wait_for(burst(srv.url), 60))
    statuses = sorted(r.status_code for r in images)
    assert 429 in statuses and 200 in statuses, statuses
    assert all(r.status_code == 200 for r in texts), [r.status_code for r in texts]


def test_work_of_a_client_that_left_is_not_run(tiny_guard) -> None:
    """Requests whose clients had disconnected still went through the model (20 of 20 abandoned image requests
    were encoded and judged); now their queued items are dropped."""
    slow = WrappedGuard(tiny_guard, delay=0.5)
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0.0, max_queue=64, warmup=False)

    async def leave_early(url: str) -> None:
        async with httpx.AsyncClient(timeout=0.3) as http:
            calls = [http.post(url + "/v1/moderations", json={"input": f"abandoned {i}"}) for i in range(8)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, httpx.TimeoutException) for r in results), results

    with LiveServer(slow, settings) as srv:
        asyncio.run(leave_early(srv.url))
        time.sleep(2.0)  # what was queued would have run by now (0.5 s a batch of one)
        ran = slow.calls
        metrics = httpx.get(srv.url + "/metrics").text
    assert ran <= 2, ran  # the one in flight when they left (and perhaps the next)
    assert metric(metrics, 'mmguard_rejected_total{reason="client_gone"}') >= 6
