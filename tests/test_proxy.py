"""`mmguard proxy` against an in-test stub upstream, driven by the real openai client.

The release and rail logic is tested with a keyword guard (a test double that flags text containing
FORBIDDEN, so that which check blocks is known exactly); the plumbing through a real (tiny, random-weight)
Guard is tested at thresholds that make its verdict certain.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from fastapi import Request

from mmguard.conversation import Conversation, Turn
from mmguard.policy import DEFAULT_POLICY
from mmguard.proxy import ProxySettings
from mmguard.proxy.release import StreamRelease
from mmguard.proxy.sse import SSEParser
from mmguard.proxy.testing import LiveApp, LiveProxy, StubUpstream
from mmguard.server.settings import ServerSettings
from mmguard.tiny import noise_image
from mmguard.verdict import Verdict, ViolatedCategory

TRIGGER = "FORBIDDEN"
ANSWER = " ".join(f"w{i}" for i in range(40)) + f" {TRIGGER} " + " ".join(f"x{i}" for i in range(20))


@dataclass
class KeywordGuard:
    """Flags a conversation whose judged (last) turn contains TRIGGER; records what it was asked."""

    policy: Any = DEFAULT_POLICY
    threshold: float = 0.5
    seen: list[Conversation] = field(default_factory=list)

    def classify_batch(self, conversations: Sequence[Conversation], *, policy: Any = None, exclude: Any = (),
                       threshold: float | None = None, **_: Any) -> list[Verdict]:
        out = []
        for conv in conversations:
            self.seen.append(conv)
            bad = TRIGGER in conv.turns[-1].text
            out.append(Verdict(is_unsafe=bad, unsafe_probability=0.9 if bad else 0.1,
                               threshold=self.threshold if threshold is None else threshold, role=conv.judged_role,
                               violated=(ViolatedCategory("S1", "Violent Crimes"),) if bad else (),
                               category_probabilities={"S1": 0.8} if bad else {}, has_image=conv.has_image))
        return out

    def describe(self) -> dict[str, Any]:
        return {"model": "keyword"}


def png_data_url() -> str:
    buf = io.BytesIO()
    noise_image(40, 30, 1).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[StubUpstream, str]]:
    upstream = StubUpstream(required_key="upstream-key")
    with LiveApp(upstream.app) as srv:
        yield upstream, srv.url + "/v1"


@pytest.fixture(scope="module")
def keyword_guard() -> KeywordGuard:
    return KeywordGuard()


def proxy_settings(upstream: str, **kw: Any) -> ProxySettings:
    return ProxySettings(upstream=upstream, guard=ServerSettings(max_wait_ms=0.0, warmup=False), **kw)


@pytest.fixture(scope="module")
def proxy(stub: tuple[StubUpstream, str], keyword_guard: KeywordGuard) -> Iterator[str]:
    with LiveProxy(keyword_guard, proxy_settings(stub[1], check_every=8)) as srv:
        yield srv.url


def client(url: str, key: str = "upstream-key", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def dumps(chunks: Any) -> list[dict[str, Any]]:
    return [c.model_dump() for c in chunks]


def finishing(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The last choice event (a usage chunk without choices may follow it)."""
    return [c for c in chunks if c["choices"]][-1]["choices"][0]


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])


def test_passthrough_equals_upstream_with_image(stub: tuple[StubUpstream, str], proxy: str) -> None:
    upstream, direct = stub
    upstream.answer = "A cat on a mat."
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": png_data_url()}}]}]
    extra = {"temperature": 0.0, "max_tokens": 12, "tools": [{"type": "function", "function": {"name": "f",
                                                              "parameters": {"type": "object"}}}]}
    via = client(proxy).chat.completions.create(model="m", messages=messages, **extra)  # type: ignore[arg-type]
    received = upstream.requests[-1]["body"]
    assert received == {"model": "m", "messages": messages, **extra}  # forwarded unchanged, image part included
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer upstream-key"
    same = client(direct.removesuffix("/v1")).chat.completions.create(model="m", messages=messages, **extra)  # type: ignore[arg-type]
    assert via.model_dump() == same.model_dump()
    stream_via = dumps(client(proxy).chat.completions.create(model="m", messages=messages, stream=True))  # type: ignore[arg-type]
    stream_direct = dumps(client(direct.removesuffix("/v1")).chat.completions.create(
        model="m", messages=messages, stream=True))  # type: ignore[arg-type]
    assert stream_via == stream_direct and streamed_text(stream_via) == "A cat on a mat."


def test_input_rail_blocks_before_the_upstream(stub: tuple[StubUpstream, str], proxy: str) -> None:
    upstream, _ = stub
    before = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as info:
        client(proxy).chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"tell me {TRIGGER} things"}], stream=True)
    assert len(upstream.requests) == before  # the upstream received nothing
    err = info.value
    assert err.status_code == 400 and err.code == "content_filter"
    body: Any = err.body
    assert body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert body["innererror"]["content_filter_result"]["S1"] == {"filtered": True, "probability": 0.8}
    assert body["mmguard"]["rail"] == "input" and body["mmguard"]["codes"] == ["S1"]


def test_output_rail_stream_ends_with_content_filter_and_sends_only_checked_text(
        stub: tuple[StubUpstream, str], proxy: str, keyword_guard: KeywordGuard) -> None:
    upstream, _ = stub
    upstream.answer = ANSWER
    keyword_guard.seen.clear()
    chunks = dumps(client(proxy).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count"}], stream=True))
    last = finishing(chunks)
    assert last["finish_reason"] == "content_filter"
    assert last["mmguard"]["rail"] == "output" and last["mmguard"]["codes"] == ["S1"]
    sent = streamed_text(chunks)
    assert TRIGGER not in sent
    answers = [c.turns[-1].text for c in keyword_guard.seen if c.judged_role == "agent"]
    passed = [a for a in answers if TRIGGER not in a]
    # every character sent was covered by a check that passed
    assert passed and ANSWER.startswith(sent) and len(sent) <= max(len(a) for a in passed)
    assert all(c["choices"][0]["finish_reason"] != "stop" for c in chunks if c["choices"])


def test_output_rail_plain_response_filtered(stub: tuple[StubUpstream, str], proxy: str) -> None:
    upstream, _ = stub
    upstream.answer = ANSWER
    out = client(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "count"}], n=2)
    for choice in out.choices:
        assert choice.finish_reason == "content_filter" and choice.message.content is None
        assert choice.model_dump()["mmguard"]["unsafe_probability"] == 0.9


def test_eager_release_leaks_at_most_one_window(stub: tuple[StubUpstream, str], keyword_guard: KeywordGuard) -> None:
    upstream, url = stub
    upstream.answer = ANSWER
    with LiveProxy(keyword_guard, proxy_settings(url, check_every=4, release="eager", rails=("output",))) as srv:
        chunks = dumps(client(srv.url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"{TRIGGER} is fine here: input rail off"}],
            stream=True))
    assert finishing(chunks)["finish_reason"] == "content_filter"
    sent = streamed_text(chunks)
    assert ANSWER.startswith(sent) and len(sent) < len(ANSWER)


def test_streams_of_several_choices_are_judged_apart(stub: tuple[StubUpstream, str], proxy: str) -> None:
    upstream, _ = stub
    upstream.answer = "all good here"
    chunks = dumps(client(proxy).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, n=2))
    texts = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                        if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)}
    assert texts == {0: "all good here", 1: "all good here"}


def test_what_is_judged(stub: tuple[StubUpstream, str], proxy: str, keyword_guard: KeywordGuard) -> None:
    upstream, _ = stub
    upstream.answer = "ok"
    keyword_guard.seen.clear()
    messages = [{"role": "system", "content": f"{TRIGGER} system text is not judged"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": f"{TRIGGER} tool output is not judged"},
                {"role": "assistant", "content": "an earlier answer"},
                {"role": "user", "content": "second question"}]
    client(proxy).chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    prompt_check, answer_check = keyword_guard.seen
    assert [(t.role, t.text) for t in prompt_check.turns] == [
        ("user", "first question"), ("agent", "an earlier answer"), ("user", "second question")]
    assert [(t.role, t.text) for t in answer_check.turns] == [*[(t.role, t.text) for t in prompt_check.turns],
                                                                ("agent", "ok")]


def test_errors_pass_through_and_bad_input(stub: tuple[StubUpstream, str], proxy: str) -> None:
    with pytest.raises(openai.AuthenticationError) as info:  # the upstream's own 401, untouched
        client(proxy, key="wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "invalid_api_key"
    models = client(proxy).models.list()
    assert [m.id for m in models.data] == ["stub"]
    bad = httpx.post(proxy + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                        {"type": "image_url", "image_url": {"url": png_data_url()}}]}]
    resp = httpx.post(proxy + "/v1/chat/completions", json={"model": "m", "messages": two}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_images"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]
    resp = httpx.post(proxy + "/v1/chat/completions", json={"model": "m", "messages": audio}, timeout=10)
    assert resp.status_code == 400
    after_system = [{"role": "system", "content": "be brief"}, *audio]  # named by its index in the request
    resp = httpx.post(proxy + "/v1/chat/completions", json={"model": "m", "messages": after_system}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages[1].content[0].type"
    resp = httpx.post(proxy + "/v1/chat/completions", json={"model": "m", "messages": "hi"}, timeout=10)
    assert resp.status_code == 400
    with pytest.raises(openai.NotFoundError, match="does not forward /v1/completions") as missing:
        client(proxy).completions.create(model="m", prompt="hi")  # a route the rails do not cover: said, not bare
    assert missing.value.code == "route_not_proxied"


def test_proxy_key_and_unreachable_upstream(keyword_guard: KeywordGuard, stub: tuple[StubUpstream, str]) -> None:
    upstream, url = stub
    settings = ProxySettings(upstream=url, api_keys=("proxy-key",),
                             guard=ServerSettings(max_wait_ms=0.0, warmup=False))
    with LiveProxy(keyword_guard, settings) as srv:
        before = len(upstream.requests)
        with pytest.raises(openai.AuthenticationError):
            client(srv.url).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert len(upstream.requests) == before
        upstream.answer = "fine"
        ok = client(srv.url, default_headers={"X-MMGuard-API-Key": "proxy-key"}).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
        assert ok.choices[0].message.content == "fine"
    with LiveProxy(keyword_guard, proxy_settings("http://127.0.0.1:9/v1")) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", timeout=20,
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_unavailable"


def test_metrics_per_rail(proxy: str) -> None:
    text = httpx.get(proxy + "/metrics", timeout=10).text
    for line in ('mmguard_proxy_checks_total{rail="input"}', 'mmguard_proxy_checks_total{rail="output"}',
                 'mmguard_proxy_blocks_total{rail="input"}', 'mmguard_proxy_blocks_total{rail="output"}',
                 "mmguard_proxy_added_seconds_count", "mmguard_proxy_stream_hold_seconds_count",
                 'mmguard_requests_total{route="/v1/chat/completions",status="200"}'):
        assert line in text


def test_tiny_guard_end_to_end(stub: tuple[StubUpstream, str], tiny_guard: Any) -> None:
    """A real (random-weight) guard: threshold 1.0 passes everything, 0.0 blocks everything."""
    upstream, url = stub
    upstream.answer = "a calm answer in several words"
    tiny_guard.threshold = 1.0
    try:
        with LiveProxy(tiny_guard, proxy_settings(url, check_every=2)) as srv:
            chunks = dumps(client(srv.url).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
            assert streamed_text(chunks) == upstream.answer
        tiny_guard.threshold = 0.0
        with LiveProxy(tiny_guard, proxy_settings(url, rails=("output",), check_every=2)) as srv:
            chunks = dumps(client(srv.url).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
            assert streamed_text(chunks) == "" and finishing(chunks)["finish_reason"] == "content_filter"
    finally:
        tiny_guard.threshold = 0.5


def test_release_logic_unit() -> None:
    rel = StreamRelease(check_every=2, release="checked", count_tokens=lambda s: len(s.split()))
    parser = SSEParser()
    raw = b"".join(b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}).encode() + b"\r\n\r\n"
                   for w in ("a ", "b ", "c "))
    events = parser.feed(raw[:7]) + parser.feed(raw[7:])
    assert len(events) == 3
    for ev in events:
        rel.feed(ev)
    assert rel.releasable() == []  # nothing checked yet
    (due,) = rel.due_checks()
    assert due.text == "a b c " and not due.final
    rel.passed(due)
    assert rel.releasable() == [e.raw for e in events]
    rel.feed(parser.feed(b'data: {"choices": [{"index": 0, "delta": {"content": "d"}}]}\n\n')[0])
    assert rel.due_checks() == []  # one new token: the window is not full
    rel.feed(parser.feed(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')[0])
    rel.finish()
    assert rel.releasable() == [] and not rel.complete  # "d" and the finish wait for the final check
    (final,) = rel.due_checks()
    assert final.final and final.text == "a b c d"
    rel.passed(final)
    assert len(rel.releasable()) == 2 and rel.complete


def test_release_block_drops_held_text() -> None:
    rel = StreamRelease(check_every=1, release="checked", count_tokens=lambda s: len(s.split()))
    for w in ("fine ", "bad "):
        rel.feed(SSEParser().feed(b"data: " + json.dumps({"id": "x", "choices": [
            {"index": 0, "delta": {"content": w}}]}).encode() + b"\n\n")[0])
    (due,) = rel.due_checks()
    verdict = KeywordGuard().classify_batch([Conversation.response("q", TRIGGER)])[0]
    rel.blocked(due, verdict)
    (closing,) = rel.releasable()
    chunk = json.loads(closing.removeprefix(b"data: "))
    assert chunk["id"] == "x" and chunk["choices"][0]["finish_reason"] == "content_filter"
    assert rel.all_blocked and rel.due_checks() == []


def test_an_answer_past_the_guards_context_is_never_released_unchecked(tiny_guard: Any) -> None:
    """The tiny guard's context is 4,096 positions; a 3,000-word answer does not fit. The plain answer is an error
    naming the limit; the stream stops at the last checked window with an error event: nothing unjudged leaves."""
    upstream = StubUpstream(" ".join(f"w{i}" for i in range(3000)))
    tiny_guard.threshold = 1.0  # everything that is judged passes: only the limit can stop the answer
    try:
        with LiveApp(upstream.app) as up, LiveProxy(tiny_guard, proxy_settings(up.url + "/v1", check_every=500)) as srv:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            plain = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
            stream = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120)
    finally:
        tiny_guard.threshold = 0.5
    assert plain.status_code == 400
    message = plain.json()["error"]["message"]
    assert message.startswith("the output check failed: ") and "over this model's limit of 4032" in message
    assert "w2999" not in plain.text
    assert stream.status_code == 200
    events = [json.loads(line[6:]) for line in stream.text.splitlines()
              if line.startswith("data: {")]
    released = "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e.get("choices"))
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and "over this model's limit of 4032" in errors[0]["message"]
    assert "w2999" not in released and upstream.answer.startswith(released)


def scripted_upstream(message: dict[str, Any], deltas: list[dict[str, Any]]) -> Any:
    """An upstream answering ``message`` (plain) or the ``deltas`` of choice 0 then ``stop`` and ``[DONE]``."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        if not body.get("stream"):
            return {"id": "x", "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}]}

        async def events() -> Any:
            for delta in deltas:
                yield event(delta)
            yield event({}, "stop")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def through_proxy(upstream: Any, guard: Any, **settings: Any) -> tuple[dict[str, Any], str]:
    """A plain and a streamed request through a proxy with ``settings``: the plain answer, the stream's text."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with LiveApp(upstream) as up, LiveProxy(guard, proxy_settings(up.url + "/v1", **settings)) as srv:
        plain = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).json()
        stream = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30).text
    return plain, stream


def test_answer_text_in_content_parts_is_judged(keyword_guard: KeywordGuard) -> None:
    """Some upstreams (Mistral's reasoning models, and any server that follows the request's part format) answer
    with ``content`` as a list of parts: that text was passed through unjudged, plain and streamed."""
    from mmguard.proxy.answers import answer_text

    parts = [{"type": "thinking", "thinking": [{"type": "text", "text": "let me see"}]},
             {"type": "text", "text": f"here: {TRIGGER} plan"}, {"type": "refusal", "refusal": "no"}]
    assert answer_text(parts, "\n") == f"let me see\nhere: {TRIGGER} plan" and answer_text(None) == ""
    plain, stream = through_proxy(scripted_upstream({"content": parts}, [{"content": [p]} for p in parts]),
                                  keyword_guard)
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] is None
    assert TRIGGER not in stream and '"finish_reason": "content_filter"' in stream


def test_a_compressing_upstream_is_decoded_judged_and_passed_on_readable(keyword_guard: KeywordGuard) -> None:
    """httpx asks for gzip by default, and OpenAI's API and most reverse proxies compress: the proxy read gzip
    bytes as the answer (a plain answer became 502 'not JSON') and forwarded compressed bytes without their
    content-encoding header. Now it asks for identity and decodes an upstream that compresses anyway."""
    import gzip

    from fastapi import FastAPI
    from fastapi.responses import Response, StreamingResponse

    app = FastAPI()
    seen: list[str] = []
    answer = f"Sure. {TRIGGER} is how. " * 20

    def gz(payload: Any) -> bytes:
        return gzip.compress(json.dumps(payload).encode())

    @app.get("/v1/models")
    async def models():  # type: ignore[no-untyped-def]  # compressed whatever the client asked
        return Response(gz({"object": "list", "data": [{"id": "z", "object": "model"}]}),
                        media_type="application/json", headers={"content-encoding": "gzip"})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # type: ignore[no-untyped-def]  # annotations resolve at module level
        seen.append(request.headers.get("accept-encoding", ""))
        body = await request.json()
        if not body.get("stream"):
            return Response(gz({"id": "x", "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}),
                media_type="application/json", headers={"content-encoding": "gzip"})
        events = b"".join(b"data: " + json.dumps({"id": "x", "choices": [{"index": 0, "delta": {"content": w}}]}
                                                 ).encode() + b"\n\n" for w in answer.split(" "))
        compressed = gzip.compress(events + b"data: [DONE]\n\n")

        async def stream() -> Any:
            for k in range(0, len(compressed), 64):
                yield compressed[k:k + 64]

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"content-encoding": "gzip"})

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with LiveApp(app) as up, LiveProxy(keyword_guard, proxy_settings(up.url + "/v1")) as srv:
        listed = httpx.get(srv.url + "/v1/models", timeout=30)
        plain = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        stream = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30)
    assert listed.status_code == 200 and listed.json()["data"][0]["id"] == "z"
    assert "content-encoding" not in listed.headers
    assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] == "content_filter"
    assert stream.status_code == 200 and TRIGGER not in stream.text and "content_filter" in stream.text
    assert seen == ["identity", "identity"]


def test_reasoning_is_judged_only_when_asked(keyword_guard: KeywordGuard) -> None:
    """A reasoning model's chain of thought (vLLM / DeepSeek ``reasoning_content``) passes unjudged by default;
    with ``judge_reasoning`` it is judged with the answer and held back like it, and a blocked plain answer
    loses its reasoning too."""
    thought, answer = f"They want {TRIGGER} steps.", "I can't help with that."
    app = scripted_upstream({"reasoning_content": thought, "content": answer},
                            [*({"reasoning_content": w + " "} for w in thought.split(" ")), {"content": answer}])
    for judge, text in ((False, "answer"), (True, "think\n\nanswer")):
        rel = StreamRelease(check_every=100, release="checked", count_tokens=len, judge_reasoning=judge)
        for delta in ({"reasoning_content": "think"}, {"content": "answer"}):
            rel.feed(SSEParser().feed(b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode()
                                      + b"\n\n")[0])
        assert rel.choices[0].text == text
    for judge in (False, True):
        keyword_guard.seen.clear()
        plain, stream = through_proxy(app, keyword_guard, check_every=2, judge_reasoning=judge)
        message = plain["choices"][0]["message"]
        judged = [c.turns[-1].text for c in keyword_guard.seen if c.judged_role == "agent"]
        if not judge:
            assert message == {"role": "assistant", "reasoning_content": thought, "content": answer}
            assert TRIGGER in stream and '"finish_reason": "stop"' in stream
            assert judged and all(t == answer for t in judged)
        else:
            assert plain["choices"][0]["finish_reason"] == "content_filter"
            assert message["content"] is None and message["reasoning_content"] is None
            assert TRIGGER not in stream and "content_filter" in stream and '"finish_reason": "stop"' not in stream
            assert f"{thought}\n\n{answer}" in judged  # the plain answer: reasoning, a blank line, the answer


def test_a_stalled_release_ends_the_stream_with_an_error_not_silently(
        stub: tuple[StubUpstream, str], proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the release logic ever hold text with nothing left to wait for, the client is told (an error event),
    instead of a stream that ends as if complete."""
    upstream, _ = stub
    upstream.answer = "one two three"
    monkeypatch.setattr(StreamRelease, "complete", property(lambda self: False))
    r = httpx.post(proxy + "/v1/chat/completions", json={"model": "m", "stream": True, "messages": [
        {"role": "user", "content": "hi"}]}, headers={"authorization": "Bearer upstream-key"}, timeout=30)
    errors = [json.loads(x[6:])["error"] for x in r.text.splitlines() if x.startswith('data: {"error"')]
    assert len(errors) == 1 and errors[0]["code"] == "output_check_failed", r.text


def test_the_transcript_of_an_audio_answer_is_judged(keyword_guard: KeywordGuard) -> None:
    """OpenAI's audio answers carry their words in ``audio.transcript`` with ``content`` null: they passed
    unjudged. The transcript is judged (the audio itself cannot be), and a blocked answer loses its audio."""
    spoken = f"Sure, {TRIGGER} goes like this."
    audio = {"id": "audio_1", "data": "UklGRg==", "expires_at": 0, "transcript": spoken}
    plain, stream = through_proxy(scripted_upstream({"content": None, "audio": audio},
                                                    [{"audio": {"id": "audio_1", "transcript": w + " "}}
                                                     for w in spoken.split(" ")]), keyword_guard)
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["audio"] is None
    assert TRIGGER not in stream and '"finish_reason": "content_filter"' in stream


def raw_stream_upstream(body: bytes, path: str = "/v1/chat/completions") -> Any:
    """An upstream that answers any POST to ``path`` with exactly ``body``, as a stream."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.post(path)
    async def answer() -> Any:
        async def events() -> Any:
            yield body

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r"])
def test_text_after_a_unicode_line_separator_or_in_cr_framed_events_is_judged(keyword_guard: KeywordGuard,
                                                                                line_end: str) -> None:
    """Servers that write JSON unescaped (pydantic, vLLM) send U+2028, NEL or \\x1c raw inside a string, and
    server-sent events may end lines with CR alone. The proxy split lines as str.splitlines does, found no JSON
    in such an event, and released it unjudged after the other text passed; the client's SDK reads it whole."""
    chunks = [{"id": "x", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
              for text in ("Sure.", f"\u2028Step one: {TRIGGER}\x85", "\x1c done")]
    chunks.append({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(c, ensure_ascii=False)}{line_end}{line_end}" for c in chunks)
    body += f"data: [DONE]{line_end}{line_end}"
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with LiveApp(raw_stream_upstream(body.encode())) as up, \
            LiveProxy(keyword_guard, proxy_settings(up.url + "/v1")) as srv:
        stream = dumps(client(srv.url).chat.completions.create(**request))  # type: ignore[call-overload]
    assert TRIGGER not in json.dumps(stream)
    assert finishing(stream)["finish_reason"] == "content_filter"


@pytest.mark.parametrize("history_chars", [0, 2000])
def test_a_long_chat_history_is_refused_or_judged_by_its_recent_turns(tiny_guard: Any, history_chars: int) -> None:
    """The tiny guard's context is 4,096 positions. A chat session whose history outgrew it is refused whole
    (the default: nothing is judged in part); with --history-chars the turns before the judged one are cut to
    their last characters, and the session goes on."""
    upstream = StubUpstream("Sure.")
    history: list[dict[str, Any]] = []
    for i in range(20):
        history += [{"role": "user", "content": " ".join(f"q{i}w{j}" for j in range(150))},
                    {"role": "assistant", "content": " ".join(f"a{i}w{j}" for j in range(150))}]
    body = {"model": "m", "messages": [*history, {"role": "user", "content": "And the last question?"}]}
    tiny_guard.threshold = 1.0  # everything judged passes: only the limit can stop the request
    try:
        with LiveApp(upstream.app) as up, \
                LiveProxy(tiny_guard, proxy_settings(up.url + "/v1", history_chars=history_chars)) as srv:
            answer = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
    finally:
        tiny_guard.threshold = 0.5
    if history_chars:
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "Sure."
    else:
        assert answer.status_code == 400 and "limit" in answer.json()["error"]["message"]
        assert upstream.requests == []  # never forwarded unjudged


def test_recent_history_keeps_the_judged_turn_and_the_image_whole() -> None:
    from mmguard.proxy.judged import JudgedPrompt, recent_history

    picture = noise_image(8, 8, 0)
    conversation = Conversation((Turn("user", ("u1 " * 100,), picture), Turn("agent", ("a1 " * 100,)),
                                 Turn("user", ("last " * 100,))))
    cut = recent_history(JudgedPrompt(conversation), 30).conversation
    assert cut is not None and [t.role for t in cut.turns] == ["user", "agent", "user"]
    assert cut.turns[0].text == "" and cut.turns[0].image is picture  # the image stays, on a user turn
    assert cut.turns[1].text == ("a1 " * 100)[-30:] and cut.turns[2].text == "last " * 100
    assert recent_history(JudgedPrompt(conversation), 10_000).conversation is conversation  # nothing to cut
