"""Property-based tests of the input layer (issue 14): random Unicode (lone surrogates, controls, RTL, NUL,
special tokens), random message shapes, policies and image bytes. The property everywhere: a result or a
typed error, never anything else; over HTTP: never a 5xx, always OpenAI's error object.
Bounded: few examples each, no deadline (a shared CI core), the whole file well under a minute."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmguard.conversation import Conversation, ConversationError
from mmguard.images import ImageError, ImageLimits, load_image
from mmguard.policy import Policy, PolicyError, load_policy
from mmguard.prompt import MarkerHandling, PromptInjectionError, build_prompt

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HTTP = settings(
    max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SMALL_LIMITS = ImageLimits(max_bytes=256 * 1024, max_pixels=250_000)

# every code point, lone surrogates included (hypothesis leaves out category Cs unless told), plus the
# strings an attacker would try: NUL, RTL override, the template's special tokens and section markers
hostile_chars = st.characters(exclude_categories=())
nasty = st.sampled_from(
    ["\ud800", "\udfff", "\udc80", "\x00", "\u202e", "\ufeff", "<|eot_id|>", "<|image|>", "<END CONVERSATION>",
     "\r\n", "\u0085", "\U0010ffff", "S1", " "]
)
texts = st.lists(st.one_of(st.text(hostile_chars, max_size=30), nasty), max_size=4).map("".join)


def _png(size: tuple[int, int], mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


_PNG = _png((40, 30), "RGB")
image_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(_png, st.tuples(st.integers(1, 64), st.integers(1, 64)), st.sampled_from(["RGB", "L", "P", "RGBA", "1"])),
    # a valid PNG, cut short or with flipped bytes
    st.integers(0, len(_PNG) - 1).map(lambda cut: _PNG[:cut]),
    st.integers(0, len(_PNG) - 1).map(lambda at: _PNG[:at] + bytes([_PNG[at] ^ 0xFF]) + _PNG[at + 1 :]),
)
image_refs = st.one_of(
    image_bytes.map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
    image_bytes.map(lambda b: base64.b64encode(b).decode()),
    texts,
    st.sampled_from(["/etc/passwd", "file:///etc/passwd", "http://169.254.169.254/", "data:text/plain;base64,AA=="]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), texts)
parts = st.one_of(
    texts,
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(texts, json_scalars)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_refs})}),
    st.fixed_dictionaries({"type": st.just("image"), "image": image_refs}),
    st.dictionaries(texts, json_scalars, max_size=3),
)
roles = st.one_of(st.sampled_from(["user", "assistant", "agent", "system", "tool", "USER", "human"]), texts)
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, st.lists(parts, max_size=3), json_scalars)}),
    max_size=4,
)
categories = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(["S1", "S2", "X_9"]), texts), st.one_of(texts, json_scalars),
                    max_size=3),
    st.lists(
        st.dictionaries(st.sampled_from(["code", "label", "name", "title", "description", "extra"]),
                        st.one_of(st.sampled_from(["S1", "S2", "Violent Crimes."]), texts, json_scalars), max_size=4),
        max_size=3,
    ),
    json_scalars,
)
policies = st.fixed_dictionaries(
    {"categories": categories},
    optional={"name": st.one_of(texts, json_scalars), "excluded": st.one_of(st.lists(texts, max_size=2), texts),
              "include_descriptions": json_scalars},
)


# -- the library's input layer ----------------------------------------------------------------------------


@FAST
@given(messages)
def test_from_messages_gives_a_conversation_or_a_typed_error(msgs: list[dict[str, Any]]) -> None:
    try:
        conv = Conversation.from_messages(msgs, limits=SMALL_LIMITS, allow_paths=False)
    except (ConversationError, ImageError):
        return
    for turn in conv.turns:
        for text in turn.texts:
            text.encode("utf-8")  # whatever is accepted is valid Unicode


@FAST
@given(texts, texts)
def test_prompt_and_response_constructors(prompt: str, response: str) -> None:
    for build in (lambda: Conversation.prompt(prompt), lambda: Conversation.response(prompt, response)):
        try:
            conv = build()
        except ConversationError as err:
            assert "lone surrogate" in str(err) or "characters" in str(err)
            continue
        for markers in MarkerHandling:
            try:
                rendered = build_prompt(conv, markers=markers)
            except PromptInjectionError:
                assert markers is MarkerHandling.REJECT
                continue
            rendered.text.encode("utf-8")
            assert rendered.text.count("<END CONVERSATION>") == 1 or markers is MarkerHandling.KEEP


@FAST
@given(policies)
def test_policy_loader_gives_a_policy_or_a_policy_error(spec: dict[str, Any]) -> None:
    try:
        policy = load_policy(spec)
    except PolicyError as err:
        str(err).encode("utf-8")  # the message never carries what cannot be printed
        return
    assert isinstance(policy, Policy) and policy.active
    build_prompt(Conversation.prompt("hello"), policy).text.encode("utf-8")


@FAST
@given(st.lists(st.one_of(texts, st.integers(), st.none()), max_size=3))
def test_exclude_gives_a_policy_or_a_policy_error(codes: list[Any]) -> None:
    try:
        policy = load_policy(None).exclude(codes)
    except PolicyError:
        return
    assert policy.active


@FAST
@given(st.one_of(image_bytes, image_refs))
def test_image_loader_gives_an_rgb_image_or_an_image_error(source: Any) -> None:
    try:
        img = load_image(source, SMALL_LIMITS, allow_paths=False)
    except ImageError:
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0


# -- the HTTP routes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_guard) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from mmguard.server import ServerSettings, create_app

    settings = ServerSettings(max_image_bytes=256 * 1024, max_image_pixels=250_000, warmup=False, max_wait_ms=0)
    with TestClient(create_app(tiny_guard, settings), raise_server_exceptions=False) as c:
        yield c


def _check_answer(r: Any) -> None:
    assert r.status_code < 500, r.text
    body = r.json()
    if r.status_code >= 400:
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"], body


def _post(client: Any, path: str, body: Any) -> Any:
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


moderation_inputs = st.one_of(texts, st.lists(texts, max_size=3), st.lists(parts, max_size=3), json_scalars)


@HTTP
@given(moderation_inputs, st.one_of(st.none(), st.sampled_from(["codes", "openai"]), texts))
def test_moderations_never_5xx(client: Any, raw_input: Any, names: Any) -> None:
    body: dict[str, Any] = {"input": raw_input}
    if names is not None:
        body["category_names"] = names
    _check_answer(_post(client, "/v1/moderations", body))


@HTTP
@given(
    messages,
    st.one_of(st.none(), st.sampled_from(["user", "agent", "assistant"]), texts),
    st.one_of(st.none(), policies, st.just("default")),
    st.one_of(st.lists(st.one_of(texts, st.sampled_from(["S1", "S13"])), max_size=2), json_scalars),
    st.one_of(st.none(), st.booleans(), st.floats(-1, 2), texts),
)
def test_classify_never_5xx(client: Any, msgs: Any, role: Any, policy: Any, exclude: Any, threshold: Any) -> None:
    body: dict[str, Any] = {"messages": msgs, "exclude": exclude}
    for key, value in (("role", role), ("policy", policy), ("threshold", threshold)):
        if value is not None:
            body[key] = value
    _check_answer(_post(client, "/v1/guard/classify", body))


@HTTP
@given(
    st.one_of(st.sampled_from(["meta-llama/Llama-Guard-3-11B-Vision"]), texts),
    messages,
    st.one_of(st.none(), st.fixed_dictionaries({"excluded_categories": st.one_of(st.lists(texts, max_size=2),
                                                                                  json_scalars)})),
)
def test_run_shield_never_5xx(client: Any, shield: Any, msgs: Any, params: Any) -> None:
    _check_answer(_post(client, "/v1/safety/run-shield", {"shield_id": shield, "messages": msgs, "params": params}))


@HTTP
@given(st.binary(max_size=200))
def test_any_body_bytes_never_5xx(client: Any, raw: bytes) -> None:
    for path in ("/v1/moderations", "/v1/guard/classify", "/v1/safety/run-shield"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        _check_answer(r)


# -- the guardrail proxy: hostile requests, and hostile answers from its upstream ---------------------------
def sse_data(body: bytes) -> list[str]:
    """The data of each server-sent event, as the openai client reads them (U+2028 inside JSON is no line end)."""
    from openai._streaming import SSEDecoder

    return [event.data for event in SSEDecoder().iter_bytes(iter([body]))]


@pytest.fixture(scope="module", params=["block", "score"])
def proxy_client(request: pytest.FixtureRequest, tiny_guard: Any) -> Iterator[tuple[Any, Any]]:
    from fastapi.testclient import TestClient

    from mmguard.proxy import ProxySettings, create_proxy_app
    from mmguard.proxy.testing import LiveApp, StubUpstream
    from mmguard.server import ServerSettings

    upstream = StubUpstream()
    with LiveApp(upstream.app) as up:
        settings = ProxySettings(upstream=up.url + "/v1", check_every=4, mode=request.param, guard=ServerSettings(
            max_image_bytes=256 * 1024, max_image_pixels=250_000, warmup=False, max_wait_ms=0))
        with TestClient(create_proxy_app(tiny_guard, settings), raise_server_exceptions=False) as c:
            yield c, upstream


@HTTP
@given(st.one_of(messages, st.just([{"role": "user", "content": "hi"}])), texts, st.booleans(),
       st.one_of(st.none(), st.integers(1, 3)))
def test_proxy_never_5xx(proxy_client: tuple[Any, Any], msgs: Any, answer: str, stream: bool, n: Any) -> None:
    """Whatever the client sends and whatever text the upstream answers (lone surrogates, special tokens,
    section markers), the proxy answers the upstream's 200, or a 400 in OpenAI's error object; a stream that
    cannot be judged further ends with an error event, never a cut connection."""
    client, upstream = proxy_client
    upstream.answer = answer
    body: dict[str, Any] = {"model": "m", "messages": msgs, "stream": stream}
    if n is not None:
        body["n"] = n
    r = _post(client, "/v1/chat/completions", body)
    if r.status_code == 200 and stream:
        events = sse_data(r.content)
        assert events and events[-1] == "[DONE]", r.text
        for raw in events[:-1]:
            chunk = json.loads(raw)
            assert "choices" in chunk or set(chunk["error"]) == {"message", "type", "param", "code"}, raw
    else:
        _check_answer(r)
    if msgs == [{"role": "user", "content": "hi"}]:
        assert r.status_code in (200, 400)  # the input rail passes or blocks; the answer is judged or refused


response_parts = st.one_of(
    parts,
    st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]),
                           "text": st.one_of(texts, json_scalars)}),
    st.fixed_dictionaries({"type": st.just("input_image")},
                          optional={"image_url": st.one_of(image_refs, json_scalars), "file_id": texts}),
    st.fixed_dictionaries({"type": st.sampled_from(["input_file", "input_audio", "refusal"])}),
)
response_items = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, st.lists(response_parts, max_size=3),
                                                               json_scalars)},
                          optional={"type": st.one_of(st.just("message"), texts)}),
    st.fixed_dictionaries({"type": st.sampled_from(["function_call", "function_call_output", "reasoning",
                                                    "item_reference"])}),
    json_scalars,
)
response_inputs = st.one_of(texts, st.lists(response_items, max_size=4), json_scalars)


@HTTP
@given(st.one_of(response_inputs, st.just("hi")), texts, st.booleans())
def test_proxy_responses_never_5xx(proxy_client: tuple[Any, Any], given_input: Any, answer: str, stream: bool) -> None:
    """``/v1/responses`` as ``/v1/chat/completions``: hostile input items and hostile answer text give the
    upstream's 200 or a 400 in OpenAI's error object; a stream ends with its terminal event or an error event."""
    client, upstream = proxy_client
    upstream.answer = answer
    r = _post(client, "/v1/responses", {"model": "m", "input": given_input, "stream": stream})
    if r.status_code == 200 and stream:
        events = [json.loads(data) for data in sse_data(r.content)]
        assert events and events[-1]["type"] in ("response.completed", "response.incomplete", "error"), r.text
        if events[-1]["type"] == "error":
            assert set(events[-1]) == {"type", "code", "message", "param", "sequence_number"}, events[-1]
            assert events[-1]["message"] and events[-1]["code"], events[-1]
    else:
        _check_answer(r)
    if given_input == "hi":
        assert r.status_code in (200, 400)
