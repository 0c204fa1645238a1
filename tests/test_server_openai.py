"""OpenAI-compatible /v1/moderations on a live loopback server, called with the real ``openai`` client.

The guard is a tiny random-weight Mllama: verdicts are meaningless. These tests check plumbing:
shapes, status codes, error objects, and that the server's numbers equal in-process ``guard.classify``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from mmguard.conversation import Conversation
from mmguard.server import ServerSettings
from mmguard.server.categories import OPENAI_CATEGORIES
from mmguard.server.settings import served_model_id
from mmguard.server.testing import LiveServer

CODES = [f"S{i}" for i in range(1, 14)]


def png_data_url(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tiny_guard) -> Iterator[LiveServer]:
    settings = ServerSettings(max_body_bytes=256 * 1024, max_image_bytes=64 * 1024, max_wait_ms=2.0)
    with LiveServer(tiny_guard, settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def unsafe_server(tiny_guard) -> Iterator[LiveServer]:
    # threshold 0.0 makes every verdict "unsafe" with a random model: plumbing of the unsafe path only
    with LiveServer(tiny_guard, ServerSettings(threshold=0.0, category_names="openai")) as srv:
        yield srv


@pytest.fixture()
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def create(client: openai.OpenAI, **kwargs) -> tuple[openai.types.ModerationCreateResponse, dict]:
    """Call ``client.moderations.create`` and also return the JSON exactly as sent on the wire."""
    raw = client.moderations.with_raw_response.create(**kwargs)
    return raw.parse(), raw.http_response.json()


def _check_shape(d: dict, keys: list[str]) -> None:
    assert set(d) >= {"flagged", "categories", "category_scores", "category_applied_input_types"}
    assert list(d["categories"]) == keys
    assert list(d["category_scores"]) == keys
    assert list(d["category_applied_input_types"]) == keys
    assert all(isinstance(v, bool) for v in d["categories"].values())
    assert all(0.0 <= v <= 1.0 for v in d["category_scores"].values())


def test_text_matches_in_process_guard(client: openai.OpenAI, tiny_guard) -> None:
    resp, wire = create(client, input="How do I bake bread?", model="omni-moderation-latest")
    assert resp.id.startswith("modr-") and wire["id"] == resp.id
    assert resp.model == served_model_id(tiny_guard.describe()["model"])  # the loaded model's name
    assert len(resp.results) == 1
    (res,) = wire["results"]
    _check_shape(res, CODES)
    # with S-code keys the typed client keeps them as extra fields
    assert resp.results[0].categories.model_extra == res["categories"]
    expected = tiny_guard.classify(Conversation.prompt("How do I bake bread?"))
    assert resp.results[0].flagged == expected.is_unsafe
    assert all(v == ["text"] for v in res["category_applied_input_types"].values())


def test_list_of_strings_gives_one_result_each(client: openai.OpenAI) -> None:
    texts = ["hello", "how are you", "tell me a story"]
    resp, wire = create(client, input=texts)
    assert len(resp.results) == 3
    for res in wire["results"]:
        _check_shape(res, CODES)


def test_text_plus_image_is_one_result_with_image_applied(client: openai.OpenAI, tiny_guard) -> None:
    url = png_data_url()
    resp, wire = create(
        client,
        input=[{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}],
    )
    assert len(resp.results) == 1
    _check_shape(wire["results"][0], CODES)
    applied = wire["results"][0]["category_applied_input_types"]
    assert all(v == ["text", "image"] for v in applied.values())
    expected = tiny_guard.classify(
        Conversation.from_messages(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ]
        )
    )
    assert expected.has_image and resp.results[0].flagged == expected.is_unsafe
    # image only: honest about the absence of text
    _, wire2 = create(client, input=[{"type": "image_url", "image_url": {"url": url}}])
    applied2 = wire2["results"][0]["category_applied_input_types"]
    assert all(v == ["image"] for v in applied2.values())


def test_too_many_images_is_openai_error(client: openai.OpenAI) -> None:
    url = png_data_url()
    with pytest.raises(openai.BadRequestError) as info:
        client.moderations.create(input=[{"type": "image_url", "image_url": {"url": url}}] * 2)
    err = info.value.body
    assert err == {
        "message": "Number of images (2) exceeds maximum of 1",
        "type": "invalid_request_error",
        "param": "input",
        "code": "too_many_images",
    }


def test_unsafe_path_scores_and_openai_names(unsafe_server: LiveServer, tiny_guard) -> None:
    """Plumbing only: threshold 0.0 makes the random model 'unsafe' so categories and scores are filled."""
    client = openai.OpenAI(base_url=unsafe_server.url + "/v1", api_key="x", max_retries=0)
    resp, wire = create(client, input="some text")
    (res,) = resp.results
    assert res.flagged is True
    d = wire["results"][0]
    _check_shape(d, list(OPENAI_CATEGORIES))
    # the typed client fills its fields from OpenAI names
    assert res.categories.sexual == d["categories"]["sexual"]
    assert res.category_scores.violence == d["category_scores"]["violence"]
    # the written code maps onto OpenAI categories; their scores are sums of joint code probabilities
    expected = tiny_guard.classify(Conversation.prompt("some text"), threshold=0.0)
    assert expected.codes
    probs = expected.category_probabilities
    assert d["category_scores"]["sexual"] == pytest.approx(probs["S3"] + probs["S12"], rel=1e-3, abs=1e-12)
    assert d["category_scores"]["violence"] == pytest.approx(probs["S1"], rel=1e-3, abs=1e-12)
    assert d["category_scores"]["harassment"] == 0.0 and d["category_applied_input_types"]["harassment"] == []
    assert (
        sum(
            d["category_scores"][k]
            for k in ("illicit", "hate", "sexual", "self-harm", "illicit/violent", "sexual/minors")
        )
        <= expected.unsafe_probability + 1e-9
    )
    # per-request switch back to S-codes (an mmguard extension field)
    _, wire2 = create(client, input="some text", extra_body={"category_names": "codes"})
    d2 = wire2["results"][0]
    assert list(d2["categories"]) == CODES
    assert [c for c in CODES if d2["categories"][c]] == list(expected.codes)
    for c in CODES:
        assert d2["category_scores"][c] == pytest.approx(probs.get(c, 0.0), rel=1e-3, abs=1e-12)


# -- every bad input gets a 4xx with an OpenAI error object ----------------------------------------------

_BAD_JSON_BODIES = [
    (b"{not json", "invalid_json"),
    (b"", None),
    (b"[1, 2]", None),
    (b'"just a string"', None),
    (b"\xff\xfe\x00garbage", None),
]


def _assert_openai_error(r: httpx.Response, status: int | None = None, code: str | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize(("raw", "code"), _BAD_JSON_BODIES)
def test_malformed_bodies(server: LiveServer, raw: bytes, code: str | None) -> None:
    r = httpx.post(server.url + "/v1/moderations", content=raw, headers={"content-type": "application/json"})
    _assert_openai_error(r, 400, code)


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": None}, "input"),
        ({"input": [1, 2]}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", {"type": "text", "text": "mixed"}]}, "input"),
        ({"input": [{"type": "audio", "audio": "x"}]}, None),
        ({"input": [{"type": "text"}]}, None),
        ({"input": [{"type": "image_url", "image_url": "not-an-object"}]}, None),
        ({"input": "x", "model": 3}, "model"),
        ({"input": "x", "category_names": "klingon"}, "category_names"),
    ],
)
def test_wrong_types(server: LiveServer, payload: dict, param: str | None) -> None:
    r = httpx.post(server.url + "/v1/moderations", json=payload)
    err = _assert_openai_error(r, 400)
    if param is not None:
        assert err["param"] == param


def _image_part(url: str) -> dict:
    return {"input": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]}


@pytest.mark.parametrize(
    ("url", "code"),
    [
        (
            "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode(),
            "invalid_image",
        ),
        (
            "data:image/png;base64," + base64.b64encode(b"hello, not an image at all").decode(),
            "invalid_image",
        ),
        ("data:image/png;base64,%%%not-base64%%%", "invalid_image_url"),
        ("data:image/png,rawbytes", "invalid_image_url"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_image_url"),
        ("data:image/png;base64", "invalid_image_url"),
        ("data:;base64,", "invalid_image_url"),
        ("ftp://example.com/cat.png", "invalid_image_url"),
        ("/etc/passwd", "invalid_image_url"),
        ("https://example.com/cat.png", "remote_images_disabled"),
        ("", "invalid_image_url"),
    ],
)
def test_bad_images(server: LiveServer, url: str, code: str) -> None:
    r = httpx.post(server.url + "/v1/moderations", json=_image_part(url))
    _assert_openai_error(r, 400, code)


def test_truncated_image(server: LiveServer) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (10, 200, 10)).save(buf, "JPEG")
    data = buf.getvalue()[: len(buf.getvalue()) // 2]
    r = httpx.post(
        server.url + "/v1/moderations",
        json=_image_part("data:image/jpeg;base64," + base64.b64encode(data).decode()),
    )
    _assert_openai_error(r, 400, "invalid_image")


def test_oversized_image_and_body(server: LiveServer) -> None:
    import os

    noisy = Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3))
    buf = io.BytesIO()
    noisy.save(buf, "PNG")  # ~120 KB: over the 64 KB image limit, under the 256 KB body limit
    r = httpx.post(
        server.url + "/v1/moderations",
        json=_image_part("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()),
    )
    _assert_openai_error(r, 400, "image_too_large")
    r = httpx.post(server.url + "/v1/moderations", json={"input": "x" * 300_000})
    _assert_openai_error(r, 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"input": "'
        for _ in range(40):
            yield b"y" * 10_000
        yield b'"}'

    r = httpx.post(
        server.url + "/v1/moderations", content=chunks(), headers={"content-type": "application/json"}
    )
    _assert_openai_error(r, 413, "body_too_large")


def test_unknown_route_and_method(server: LiveServer) -> None:
    _assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404, "not_found")
    _assert_openai_error(httpx.get(server.url + "/v1/moderations"), 405, "method_not_allowed")


def test_form_encoded_curl_body_is_read_as_json(server: LiveServer) -> None:
    # curl -d '{"input": "hi"}' sends application/x-www-form-urlencoded
    r = httpx.post(
        server.url + "/v1/moderations",
        content=b'{"input": "hi"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 1
