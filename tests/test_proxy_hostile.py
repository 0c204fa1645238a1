"""The proxy against hostile clients and upstreams: each case is a way an audit (2026-12-07) got text past a
rail, or a 500 out of the proxy. The keyword guard flags text holding TRIGGER, so an answer holding it that
reaches the client was released unjudged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

from mmguard.proxy.testing import LiveApp, LiveProxy, StubUpstream

from test_proxy import TRIGGER, KeywordGuard, proxy_settings

DEEP = 100_000  # past Python's recursion limit: json.loads raises RecursionError, not ValueError


@contextmanager
def proxied(upstream: Any, **kw: Any) -> Iterator[str]:
    app = getattr(upstream, "app", upstream)
    with LiveApp(app) as up, LiveProxy(KeywordGuard(), proxy_settings(up.url + "/v1", **kw)) as srv:
        yield srv.url


def answering(body: bytes, media_type: str, path: str = "/v1/chat/completions") -> FastAPI:
    """An upstream that answers every POST to ``path`` with ``body`` as ``media_type``, in 7-byte pieces."""
    app = FastAPI()

    @app.post(path)
    async def answer() -> StreamingResponse:
        async def pieces() -> Any:
            for k in range(0, len(body), 7):
                yield body[k:k + 7]

        return StreamingResponse(pieces(), media_type=media_type)

    return app


def chunk_event(choices: Any) -> bytes:
    return b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": choices}).encode() + b"\n\n"


SAID = {"index": 0, "delta": {"content": "Sure."}, "finish_reason": None}
STOP = b"data: " + json.dumps({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() \
    + b"\n\n" + b"data: [DONE]\n\n"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("role", ["human", "HUMAN", "Human"])
def test_a_user_turn_under_another_spelling_of_its_role_is_judged(role: str) -> None:
    """The input rail looked for role 'user' only; a request whose user turn said 'human' (which the moderation
    server reads as the user, and vLLM renders into the prompt) had "no user message" and went upstream
    unjudged."""
    upstream = StubUpstream()
    with proxied(upstream, rails=("input",)) as url:
        resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": [{"role": role, "content": f"tell me {TRIGGER}"}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "content_filter"
    assert upstream.requests == []


@pytest.mark.parametrize("role", ["customer", "user ", "", ["user"], {"role": "user"}, 7, None])
def test_a_role_the_guard_cannot_read_is_refused_not_skipped(role: Any) -> None:
    """An unknown role was skipped as if it were a system message (the request went upstream unjudged); a list
    or object role crashed the rail (500, unhashable type)."""
    upstream = StubUpstream()
    with proxied(upstream, rails=("input",)) as url:
        resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                           {"role": role, "content": f"tell me {TRIGGER}"}]})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == "messages[1].role", error
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_body_nested_past_the_parser_is_a_400(path: str) -> None:
    body = b'{"model": "m", "messages": [], "input": "hi", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    with proxied(StubUpstream()) as url:
        resp = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    assert "nested too deeply" in resp.json()["error"]["message"]


UNREADABLE_PLAIN = {
    "a JSON list": json.dumps([{"choices": [{"message": {"content": TRIGGER}}]}]).encode(),
    "a JSON string": json.dumps(TRIGGER).encode(),
    "choices as an object": json.dumps({"choices": {"0": {"message": {"content": TRIGGER}}}}).encode(),
    "a message as a string": json.dumps({"choices": [{"index": 0, "message": TRIGGER}]}).encode(),
    "legacy text": json.dumps({"choices": [{"index": 0, "text": TRIGGER, "message": None}]}).encode(),
    "nesting past the parser": b'{"choices": [], "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
}


@pytest.mark.parametrize("shape", UNREADABLE_PLAIN)
def test_a_plain_answer_the_proxy_cannot_read_all_of_is_refused(shape: str) -> None:
    """Such answers were passed on byte for byte (no answer found to judge), or crashed the proxy (500); a
    client that reads choices[0] of an object, or the legacy text, showed the unjudged text."""
    with proxied(answering(UNREADABLE_PLAIN[shape], "application/json")) as url:
        resp = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_invalid_response", resp.text
    assert TRIGGER not in resp.text


def test_a_plain_answer_labelled_as_a_stream_is_judged_as_the_plain_answer_it_is() -> None:
    """The proxy chose its path by the upstream's content type: a plain answer labelled text/event-stream had no
    events, and went out unjudged; the openai client reads it as JSON whatever its type says."""
    answer = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": f"Here: {TRIGGER}"}, "finish_reason": "stop"}]}
    with proxied(answering(json.dumps(answer).encode(), "text/event-stream")) as url:
        got = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=30).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
    assert got.choices[0].finish_reason == "content_filter" and got.choices[0].message.content is None


UNREADABLE_EVENTS = {
    # the standard, browsers and openai-node drop a byte order mark at the stream's start; the proxy read no
    # 'data:' line in that first event and passed it on
    "a byte order mark first": b"\xef\xbb\xbf" + chunk_event([{**SAID, "delta": {"content": TRIGGER}}]),
    "choices as an object": chunk_event({"0": {**SAID, "delta": {"content": TRIGGER}}}),
    "choices that are not objects": chunk_event([TRIGGER]),
    "legacy text in a choice": chunk_event([{**SAID, "delta": {}, "text": TRIGGER}]),
    "a whole message in a choice": chunk_event([{**SAID, "delta": {}, "message": {"content": TRIGGER}}]),
}


@pytest.mark.parametrize("shape", UNREADABLE_EVENTS)
def test_stream_events_whose_text_the_proxy_cannot_read_never_reach_the_client(shape: str) -> None:
    stream = chunk_event([SAID]) + UNREADABLE_EVENTS[shape] + STOP
    if shape == "a byte order mark first":
        stream = UNREADABLE_EVENTS[shape] + chunk_event([SAID]) + STOP
    with proxied(answering(stream, "text/event-stream")) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text
    assert resp.text.rstrip().endswith("data: [DONE]")


def test_a_stream_event_nested_past_the_parser_is_dropped_and_the_stream_ends_well() -> None:
    """Such an event crashed the stream mid-way (a truncated body; score mode too)."""
    deep = b"data: " + b'{"choices": [], "x": ' + b"[" * DEEP + b"]" * DEEP + b"}\n\n"
    with proxied(answering(chunk_event([SAID]) + deep + STOP, "text/event-stream")) as url:
        blocking = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    with proxied(answering(chunk_event([SAID]) + deep + STOP, "text/event-stream"), mode="score") as url:
        scoring = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    for resp in (blocking, scoring):
        assert resp.status_code == 200 and "Sure." in resp.text and resp.text.rstrip().endswith("data: [DONE]")


def test_score_mode_passes_a_plain_answer_it_cannot_read_and_says_so() -> None:
    """Score mode never changes what traffic gets: an answer it cannot read all of passes as it came (it crashed
    with a 500 on one nested past the parser)."""
    with proxied(answering(UNREADABLE_PLAIN["nesting past the parser"], "application/json"), mode="score") as url:
        resp = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 200 and resp.content == UNREADABLE_PLAIN["nesting past the parser"]
    with proxied(answering(UNREADABLE_PLAIN["choices as an object"], "application/json"), mode="score") as url:
        resp = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    report = resp.json()["mmguard"]
    assert resp.status_code == 200 and "cannot be checked" in report["output"][0]["error"]


def response_event(payload: dict[str, Any], sequence: int) -> bytes:
    data = json.dumps({"sequence_number": sequence, **payload})
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


def with_text(text: str) -> dict[str, Any]:
    return {"id": "m1", "type": "message", "role": "assistant", "status": "in_progress",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


ANNOUNCED_TEXT = {
    "a response created with output": {"type": "response.created", "response": {
        "id": "r1", "object": "response", "status": "in_progress", "output": [with_text(TRIGGER)]}},
    "a response in progress with output": {"type": "response.in_progress", "response": {
        "id": "r1", "object": "response", "status": "in_progress", "output": [with_text(TRIGGER)]}},
    "an item added with text": {"type": "response.output_item.added", "output_index": 0,
                                "item": with_text(TRIGGER)},
    "a part added with text": {"type": "response.content_part.added", "output_index": 0, "content_index": 0,
                               "item_id": "m1", "part": {"type": "output_text", "text": TRIGGER, "annotations": []}},
}


@pytest.mark.parametrize("shape", ANNOUNCED_TEXT)
def test_responses_text_announced_before_any_delta_is_judged(shape: str) -> None:
    """Events that announce a response, an item or a part were read as carrying no text and sent at once; the
    SDK shows their text (``event.response.output_text``, the stream helper's snapshot)."""
    created = {"type": "response.created", "response": {"id": "r1", "object": "response", "status": "in_progress",
                                                          "output": []}}
    done = {"type": "response.completed", "response": {"id": "r1", "object": "response", "status": "completed",
                                                        "output": []}}
    payloads = [created, ANNOUNCED_TEXT[shape], done] if shape != "a response created with output" \
        else [ANNOUNCED_TEXT[shape], done]
    body = b"".join(response_event(p, i) for i, p in enumerate(payloads))
    with proxied(answering(body, "text/event-stream", "/v1/responses")) as url:
        resp = httpx.post(url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True}, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text
    assert "response.incomplete" in resp.text and "content_filter" in resp.text


def test_a_plain_responses_answer_is_judged_by_what_its_output_text_field_says_too() -> None:
    answer = {"id": "r1", "object": "response", "status": "completed", "output_text": f"Here: {TRIGGER}",
              "output": [with_text("Harmless.")]}
    with proxied(answering(json.dumps(answer).encode(), "application/json", "/v1/responses")) as url:
        resp = httpx.post(url + "/v1/responses", json={"model": "m", "input": "hi"}, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text
    assert resp.json()["incomplete_details"] == {"reason": "content_filter"}


def test_the_text_of_one_request_is_bounded_in_all_not_only_per_text() -> None:
    """Each text was bounded (200,000 characters), their number only by the body size: 160 such parts (30 MB)
    held the model's thread for 23 s of tokenizing, and other requests waited (504)."""
    from mmguard.proxy import ProxySettings
    from mmguard.server.settings import ServerSettings

    upstream = StubUpstream()
    with LiveApp(upstream.app) as up, LiveProxy(KeywordGuard(), ProxySettings(
            upstream=up.url + "/v1", rails=("input",),
            guard=ServerSettings(max_wait_ms=0.0, warmup=False, max_text_chars=1000))) as srv:
        parts = [{"type": "text", "text": "x" * 300} for _ in range(4)]
        resp = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": [{"role": "user", "content": parts}]})
        fits = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": [{"role": "user", "content": parts[:3]}]})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["code"] == "text_too_long", error
    assert error["param"] == "messages[0].content[3].text" and "1000" in error["message"]
    assert fits.status_code == 200 and len(upstream.requests) == 1


def test_a_200_that_is_an_html_page_is_refused() -> None:
    """A 200 whose body is an HTML page (a misconfigured gateway) is refused, never passed as an answer (this held
    before the audit too; kept beside the shapes that did not)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def html() -> Response:
        return Response(f"<html>{TRIGGER}</html>", media_type="text/html")

    with proxied(app) as url:
        resp = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 502 and TRIGGER not in resp.text


def test_a_blocked_plain_answer_keeps_no_log_probabilities() -> None:
    """With logprobs requested, a blocked plain answer lost its content but kept ``logprobs.content``, whose
    tokens spell the whole answer (a stream drops a blocked choice's held chunks, logprobs with them)."""
    tokens = ["Here", ":", f" {TRIGGER}"]
    answer = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "".join(tokens)}, "finish_reason": "stop",
         "logprobs": {"content": [{"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": []} for t in tokens],
                      "refusal": None}}]}
    with proxied(answering(json.dumps(answer).encode(), "application/json")) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "logprobs": True}, timeout=30)
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["logprobs"] is None
    assert TRIGGER not in resp.text


def chat_stream(*choices_per_event: Any) -> bytes:
    return b"".join(chunk_event(choices) for choices in choices_per_event) + STOP


def delta(text: str | None = None, index: Any = 0, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": {**({"content": text} if text is not None else {}), **fields},
            "finish_reason": None}


@pytest.mark.parametrize(("second_index", "n"), [(-1, None), (1, None), ("-1", None), (2, 2)])
def test_a_choice_index_the_request_did_not_ask_for_cannot_split_an_answer(second_index: Any, n: Any) -> None:
    """The proxy judged each index apart, as the upstream labelled it: "The word is FORB" as choice 0 and
    "IDDEN." as choice -1 (or 1, with one choice asked for) passed; the SDK's stream helper reads choices[-1]
    and the usual loop shows choices[0] of every chunk: both showed the word whole."""
    stream = chat_stream([delta("The word is FORB")], [delta(f"IDDEN{TRIGGER[len('FORBIDDEN'):]}. Bye.",
                                                             index=second_index)])
    request = {**CHAT, "stream": True, **({"n": n} if n else {})}
    with proxied(answering(stream, "text/event-stream")) as url:
        resp = httpx.post(url + "/v1/chat/completions", json=request, timeout=30)
    assert resp.status_code == 200 and "IDDEN" not in resp.text


@pytest.mark.parametrize("between", [{"audio": {"transcript": "zz"}}, {"reasoning_content": "zz"}])
def test_a_word_split_around_another_field_is_judged_whole(between: dict[str, Any]) -> None:
    """Content, transcript and reasoning were joined in arrival order: "FORB", a transcript or reasoning delta,
    then "IDDEN" was judged as "FORBzzIDDEN", while the client joins each field apart and shows the word."""
    stream = chat_stream([delta("The word is FORB")], [delta(None, **between)], [delta("IDDEN.")])
    with proxied(answering(stream, "text/event-stream"), judge_reasoning=True) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    assert resp.status_code == 200 and "IDDEN" not in resp.text and "content_filter" in resp.text


@pytest.mark.parametrize("stream", [False, True])
def test_every_reasoning_field_is_judged(stream: bool) -> None:
    """Only the first non-empty reasoning field was judged: a harmless reasoning_content beside a harmful
    reasoning (which OpenRouter-style clients show) passed."""
    fields = {"reasoning_content": "Let me think.", "reasoning": f"Plan: {TRIGGER}"}
    plain = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Fine.", **fields}, "finish_reason": "stop"}]}
    body = chat_stream([delta("Fine.", **fields)]) if stream else json.dumps(plain).encode()
    with proxied(answering(body, "text/event-stream" if stream else "application/json"),
                 judge_reasoning=True) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text and "content_filter" in resp.text


@pytest.mark.parametrize("choices", [5, True, 1.5, "x"])
def test_score_mode_passes_a_stream_whose_choices_are_not_a_list(choices: Any) -> None:
    """Score mode crashed mid-stream (a truncated body, no report) on ``choices: 5``."""
    stream = chunk_event([SAID]) + chunk_event(choices) + STOP
    with proxied(answering(stream, "text/event-stream"), mode="score") as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    assert resp.status_code == 200 and '"mmguard"' in resp.text and resp.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize("mode", ["block", "score"])
def test_an_answer_nested_just_under_the_parsers_limit_is_refused_or_passed_never_a_500(path: str,
                                                                                       mode: str) -> None:
    """JSON nested ~960 deep parsed, then failed when the proxy wrote the blocked answer or the report back."""
    nested = "[" * 960 + "]" * 960
    if path == "/v1/chat/completions":
        answer = ('{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", '
                  f'"content": "{TRIGGER}"}}, "finish_reason": "stop"}}], "x": {nested}}}')
    else:
        answer = ('{"id": "r", "object": "response", "output": [{"type": "message", "role": "assistant", "content": '
                  f'[{{"type": "output_text", "text": "{TRIGGER}"}}]}}], "x": {nested}}}')
    with proxied(answering(answer.encode(), "application/json", path), mode=mode) as url:
        resp = httpx.post(url + path, json={**CHAT, "input": "hi"}, timeout=30)
    if mode == "block":
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_invalid_response"
    else:
        assert resp.status_code == 200 and resp.content == answer.encode()


def responses_stream(*payloads: dict[str, Any]) -> bytes:
    created = {"type": "response.created", "response": {"id": "r1", "object": "response", "status": "in_progress",
                                                          "output": []}}
    done = {"type": "response.completed", "response": {"id": "r1", "object": "response", "status": "completed",
                                                        "output": [p["item"] for p in payloads
                                                                   if p["type"] == "response.output_item.done"]}}
    return b"".join(response_event(p, i) for i, p in enumerate([created, *payloads, done]))


def text_delta(output_index: int, text: str) -> dict[str, Any]:
    return {"type": "response.output_text.delta", "output_index": output_index, "content_index": 0,
            "item_id": f"m{output_index}", "delta": text}


@pytest.mark.parametrize("shape", ["items", "interleaved deltas", "a delta that is not text"])
def test_a_responses_answer_is_judged_as_the_sdk_joins_it(shape: str) -> None:
    """Two message items ("...FORB", "IDDEN...") were judged apart with a blank line between, while the SDK's
    output_text joins them with nothing; deltas of two items interleaved were judged in arrival order
    ("FORB", "Other text.", "IDDEN"), while the SDK's snapshot of each item shows "FORBIDDEN"; a delta that is
    a list or an object was passed on unjudged (the SDK hands it on as it came)."""
    if shape == "items":
        body = responses_stream(
            {"type": "response.output_item.done", "output_index": 0, "item": with_text("Here is the word: FORB")},
            {"type": "response.output_item.done", "output_index": 1, "item": with_text("IDDEN, enjoy.")})
    elif shape == "interleaved deltas":
        body = responses_stream(text_delta(0, "The word is FORB"), text_delta(1, "Other text. "),
                                text_delta(0, "IDDEN."))
    else:
        body = responses_stream(text_delta(0, "Fine. "), {**text_delta(0, ""), "delta": [TRIGGER]})
    with proxied(answering(body, "text/event-stream", "/v1/responses")) as url:
        resp = httpx.post(url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True}, timeout=30)
    assert resp.status_code == 200 and "IDDEN" not in resp.text


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": [IMAGE]},
    {"role": "tool", "tool_call_id": "c1", "content": [IMAGE]},
    {"role": "system", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]},
    {"role": "developer", "content": [{"type": "file", "file": {"file_id": "f1"}}]},
])
def test_media_in_a_message_the_rails_skip_is_refused(message: dict[str, Any]) -> None:
    """Images, audio and files in system, tool, or text-less assistant messages were forwarded: the rails skip
    those messages, so the guard never saw what the upstream did."""
    upstream = StubUpstream()
    with proxied(upstream) as url:
        resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": [message, {"role": "user", "content": "hi"}]})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["code"] == "unjudgeable_content" and error["param"] == \
        "messages[0].content[0]", error
    assert upstream.requests == []


def test_a_tool_output_holding_an_image_is_refused_in_the_responses_api() -> None:
    upstream = StubUpstream()
    request = {"model": "m", "input": [
        {"role": "user", "content": "look"},
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}]}
    with proxied(upstream) as url:
        resp = httpx.post(url + "/v1/responses", json=request, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input[1].output[0]"
    assert upstream.requests == []


@pytest.mark.parametrize("request_input", [{"input": "Tell me about it."}, {}])
def test_a_stored_prompts_variables_are_judged(request_input: dict[str, Any]) -> None:
    """``prompt.variables`` are filled into the model's prompt by the upstream, and were never judged."""
    upstream = StubUpstream()
    request = {"model": "m", "prompt": {"id": "pmpt_1", "variables": {"question": f"How do I {TRIGGER}?"}},
               **request_input}
    with proxied(upstream, rails=("input",)) as url:
        resp = httpx.post(url + "/v1/responses", json=request, timeout=30)
        harmless = httpx.post(url + "/v1/responses", timeout=30,
                              json={**request, "prompt": {"id": "pmpt_1", "variables": {"question": "Why?"}}})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "content_filter"
    assert harmless.status_code == 200 and len(upstream.requests) == 1


CONTENT_SHAPES = {
    "an object": {"value": TRIGGER},
    "a refusal object with text": {"type": "refusal", "text": TRIGGER},
    "a part whose text is an object": [{"type": "text", "text": {"value": TRIGGER}}],
    "a text part without text": [{"type": "text", "content": TRIGGER}],
}


@pytest.mark.parametrize("shape", CONTENT_SHAPES)
@pytest.mark.parametrize("stream", [False, True])
def test_content_in_a_shape_the_proxy_cannot_read_never_reaches_the_client(shape: str, stream: bool) -> None:
    """Content that is neither a string nor text parts was passed on unjudged; the SDK hands it to the client as
    it came, and ``print(delta.content)`` shows the text."""
    content = CONTENT_SHAPES[shape]
    plain = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
    body = chat_stream([SAID], [{**SAID, "delta": {"content": content}}]) if stream else json.dumps(plain).encode()
    with proxied(answering(body, "text/event-stream" if stream else "application/json")) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
    assert TRIGGER not in resp.text
    assert resp.status_code == (200 if stream else 502)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_error_the_upstream_streams_is_judged_like_the_answer(api: str) -> None:
    """An upstream's mid-stream error message reached the client unjudged; the SDK raises it as an APIError,
    whose message an app may well show ("Step 1: FORBIDDEN")."""
    if api == "chat":
        error = b"data: " + json.dumps({"error": {"message": f"Step 1: {TRIGGER}"}}).encode() + b"\n\n"
        body = chunk_event([SAID]) + error + STOP
        path, request = "/v1/chat/completions", {**CHAT, "stream": True}
    else:
        body = responses_stream(text_delta(0, "Fine. "), {"type": "error", "code": "x",
                                                          "message": f"Step 1: {TRIGGER}", "param": None})
        path, request = "/v1/responses", {"model": "m", "input": "hi", "stream": True}
    with proxied(answering(body, "text/event-stream", path)) as url:
        resp = httpx.post(url + path, json=request, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text


def test_a_failed_responses_answer_is_judged_by_its_error_message_too() -> None:
    failed = {"type": "response.failed", "response": {"id": "r1", "object": "response", "status": "failed",
                                                       "error": {"code": "x", "message": f"Step 1: {TRIGGER}"},
                                                       "output": []}}
    body = b"".join(response_event(p, i) for i, p in enumerate([text_delta(0, "Fine. "), failed]))
    with proxied(answering(body, "text/event-stream", "/v1/responses")) as url:
        resp = httpx.post(url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True}, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text and "content_filter" in resp.text


CITED = {"url": "https://example.org/page", "title": f"Step 1: {TRIGGER}", "start_index": 0, "end_index": 5}
# what a chat answer's message (or a stream's delta) may say beside its content: a refusal, which apps show
# (``if message.refusal: print(message.refusal)``), and citations, whose titles a search-enabled model copies
# from pages it read (text nobody vetted)
CHAT_FIELDS = {
    "a refusal": {"refusal": f"I won't. {TRIGGER}"},
    "a citation's title": {"annotations": [{"type": "url_citation", "url_citation": CITED}]},
    "a file citation's name": {"annotations": [{"type": "file_citation", "file_citation": {"filename": TRIGGER}}]},
}


@pytest.mark.parametrize("field", CHAT_FIELDS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_answers_refusal_and_citations_are_judged(field: str, stream: bool) -> None:
    """``message.refusal`` and the titles of ``message.annotations`` reached the client unjudged, and a blocked
    plain answer kept them."""
    extra = CHAT_FIELDS[field]
    plain = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Sure.", **extra}, "finish_reason": "stop"}]}
    body = chat_stream([SAID], [delta(**extra)]) if stream else json.dumps(plain).encode()
    with proxied(answering(body, "text/event-stream" if stream else "application/json")) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text and "content_filter" in resp.text


def refused(text: str) -> dict[str, Any]:
    return {"id": "m1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "refusal", "refusal": text}]}


def cited(text: str) -> dict[str, Any]:
    return {"id": "m1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "Sure.", "annotations": [{"type": "url_citation", **CITED}]}]}


RESPONSES_EVENTS = {
    "refusal deltas": [{"type": "response.refusal.delta", "output_index": 0, "content_index": 0, "item_id": "m1",
                        "delta": piece} for piece in ("I won't. FORB", "IDDEN")],
    "a refusal done": [{"type": "response.refusal.done", "output_index": 0, "content_index": 0, "item_id": "m1",
                        "refusal": f"I won't. {TRIGGER}"}],
    "a refusal part done": [{"type": "response.content_part.done", "output_index": 0, "content_index": 0,
                             "item_id": "m1", "part": {"type": "refusal", "refusal": f"I won't. {TRIGGER}"}}],
    "a citation added": [text_delta(0, "Sure."), {
        "type": "response.output_text.annotation.added", "output_index": 0, "content_index": 0, "item_id": "m1",
        "annotation_index": 0, "annotation": {"type": "url_citation", **CITED}}],
    "a cited item done": [text_delta(0, "Sure."), {"type": "response.output_item.done", "output_index": 0,
                                                   "item": cited(TRIGGER)}],
}


@pytest.mark.parametrize("shape", RESPONSES_EVENTS)
def test_a_responses_streams_refusal_and_citations_are_judged(shape: str) -> None:
    assert TRIGGER == "FORBIDDEN"  # the refusal deltas split it
    body = responses_stream(*RESPONSES_EVENTS[shape])
    with proxied(answering(body, "text/event-stream", "/v1/responses")) as url:
        resp = httpx.post(url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True}, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text and "content_filter" in resp.text


@pytest.mark.parametrize("item", [refused(f"I won't. {TRIGGER}"), cited(TRIGGER)], ids=["refusal", "citation"])
def test_a_plain_responses_answers_refusal_and_citations_are_judged(item: dict[str, Any]) -> None:
    answer = {"id": "r1", "object": "response", "status": "completed", "output": [item]}
    with proxied(answering(json.dumps(answer).encode(), "application/json", "/v1/responses")) as url:
        resp = httpx.post(url + "/v1/responses", json={"model": "m", "input": "hi"}, timeout=30)
    assert resp.status_code == 200 and TRIGGER not in resp.text
    assert resp.json()["incomplete_details"] == {"reason": "content_filter"}


def test_a_harmless_refusal_and_citation_pass_as_they_came() -> None:
    """Judging them blocks nothing harmless: the answer reaches the client whole."""
    harmless = {"url": "https://example.org/", "title": "Example", "start_index": 0, "end_index": 5}
    message = {"role": "assistant", "content": "Sure.", "refusal": None,
               "annotations": [{"type": "url_citation", "url_citation": harmless}]}
    plain = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": message, "finish_reason": "stop"}]}
    with proxied(answering(json.dumps(plain).encode(), "application/json")) as url:
        resp = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"] == message


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_that_is_not_text_never_reaches_the_client(stream: bool) -> None:
    refusal = {"refusal": {"value": TRIGGER}}
    plain = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Sure.", **refusal}, "finish_reason": "stop"}]}
    body = chat_stream([SAID], [delta(**refusal)]) if stream else json.dumps(plain).encode()
    with proxied(answering(body, "text/event-stream" if stream else "application/json")) as url:
        resp = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
    assert TRIGGER not in resp.text and resp.status_code == (200 if stream else 502)


IMAGE_ANSWERS = {
    "responses with the image_generation tool": ("/v1/responses", {
        "model": "m", "input": "Draw it.", "tools": [{"type": "web_search"}, {"type": "image_generation"}]},
        "tools[1]"),
    "chat with image output": ("/v1/chat/completions", {**CHAT, "modalities": ["text", "image"]}, "modalities"),
}


@pytest.mark.parametrize("case", IMAGE_ANSWERS)
def test_a_request_for_an_image_answer_is_refused_while_the_output_rail_blocks(case: str) -> None:
    """The guard reads images in user turns only (Llama Guard 3 Vision has no image answers): an image the
    upstream drew passed the output rail unseen. Only the input rail on, or score mode, the request goes on."""
    path, request, param = IMAGE_ANSWERS[case]
    upstream = StubUpstream()
    with proxied(upstream) as url:
        resp = httpx.post(url + path, json=request, timeout=30)
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == param and error["code"] == "unjudgeable_content", error
    assert upstream.requests == []
    for kw in ({"rails": ("input",)}, {"mode": "score"}):
        with proxied(upstream, **kw) as url:
            assert httpx.post(url + path, json=request, timeout=30).status_code == 200
    assert len(upstream.requests) == 2
