"""/v1/guard/classify, llama-stack routes, probes, metrics, API keys, remote images and logs, on a live
loopback server. The guard has random weights: these tests check plumbing, not verdict quality."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from mmguard.conversation import Conversation
from mmguard.server import ServerSettings
from mmguard.server.app import SHIELD_USER_MESSAGE
from mmguard.server.jsonlog import JsonFormatter
from mmguard.server.settings import served_model_id
from mmguard.server.testing import LiveServer


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (20, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def server(tiny_guard) -> Iterator[LiveServer]:
    with LiveServer(tiny_guard, ServerSettings(shield_ids=("my-shield",))) as srv:
        yield srv


@pytest.fixture(scope="module")
def unsafe_server(tiny_guard) -> Iterator[LiveServer]:
    # threshold 0.0: every verdict is "unsafe" with the random model (exercises the unsafe path only)
    with LiveServer(tiny_guard, ServerSettings(threshold=0.0)) as srv:
        yield srv


def post(srv: LiveServer, path: str, payload: object, **kw: object) -> httpx.Response:
    return httpx.post(srv.url + path, json=payload, timeout=30, **kw)  # type: ignore[arg-type]


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -- /v1/guard/classify ----------------------------------------------------------------------------------


def test_classify_matches_in_process(server: LiveServer, tiny_guard) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in the picture?"},
                {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
            ],
        },
        {"role": "assistant", "content": "a blue rectangle"},
    ]
    r = post(server, "/v1/guard/classify", {"messages": messages})
    assert r.status_code == 200, r.text
    body = r.json()
    v = body["verdict"]
    assert v["role"] == "agent" and v["task"] == "response" and v["has_image"] is True
    assert body["policy"]["active_codes"] == [f"S{i}" for i in range(1, 14)]
    conv = Conversation.from_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": png_bytes()},
                    {"type": "text", "text": "what is in the picture?"},
                ],
            },
            {"role": "assistant", "content": "a blue rectangle"},
        ]
    )
    expected = tiny_guard.classify(conv)
    assert v["unsafe_probability"] == pytest.approx(expected.unsafe_probability, rel=1e-4, abs=1e-9)
    assert v["is_unsafe"] == expected.is_unsafe


def test_classify_role_policy_exclude_threshold(server: LiveServer, tiny_guard) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    r = post(server, "/v1/guard/classify", {"messages": messages, "role": "user"})
    assert r.status_code == 200 and r.json()["verdict"]["role"] == "user"
    expected = tiny_guard.classify(Conversation.prompt("hi"))
    assert r.json()["verdict"]["unsafe_probability"] == pytest.approx(expected.unsafe_probability, rel=1e-4)

    policy = {
        "name": "mine",
        "categories": [{"code": "X1", "label": "Bad things."}, {"code": "X2", "label": "Worse things."}],
    }
    r = post(
        server,
        "/v1/guard/classify",
        {"messages": messages, "policy": policy, "threshold": 0.0, "category_scores": "always"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy"] == {"name": "mine", "active_codes": ["X1", "X2"], "excluded": []}
    # threshold 0.0 (plumbing): unsafe, and the codes written come from the per-request policy
    assert body["verdict"]["is_unsafe"] is True and set(body["verdict"]["codes"]) <= {"X1", "X2"}
    assert set(body["verdict"]["category_probabilities"]) == {"X1", "X2"}

    r = post(server, "/v1/guard/classify", {"messages": messages, "exclude": ["S1", "S2"], "threshold": 0.0})
    assert r.status_code == 200
    assert r.json()["policy"]["excluded"] == ["S1", "S2"]
    assert not {"S1", "S2"} & set(r.json()["verdict"]["codes"])


def test_category_scores_always_keeps_safe_verdicts_safe(server: LiveServer) -> None:
    messages = [{"role": "user", "content": "hello"}]
    r = post(server, "/v1/guard/classify", {"messages": messages, "category_scores": "always"})
    v = r.json()["verdict"]
    assert r.status_code == 200 and v["is_unsafe"] is False and v["codes"] == []
    assert len(v["category_probabilities"]) == 13  # computed even though safe
    assert sum(v["category_probabilities"].values()) <= v["unsafe_probability"] + 1e-9


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"messages": []}, None),
        ({"messages": "hi"}, None),
        ({"messages": [{"role": "system", "content": "x"}]}, None),
        ({"messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"messages": [{"role": "user", "content": 5}]}, None),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, None),
        ({"messages": [{"role": "user", "content": "a"}], "role": "agent"}, None),
        ({"messages": [{"role": "user", "content": "a"}], "role": "judge"}, None),
        ({"messages": [{"role": "user", "content": "a"}], "exclude": ["S99"]}, None),
        ({"messages": [{"role": "user", "content": "a"}], "policy": {"categories": []}}, None),
        ({"messages": [{"role": "user", "content": "a"}], "threshold": 2}, None),
        ({"messages": [{"role": "user", "content": "a"}], "surprise": 1}, None),
        ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, None),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                        ],
                    }
                ]
            },
            "too_many_images",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "image", "path": "/etc/hostname"}]}]}, None),
    ],
)
def test_classify_bad_inputs(server: LiveServer, payload: dict, code: str | None) -> None:
    assert_error(post(server, "/v1/guard/classify", payload), 400, code)


# -- llama-stack -------------------------------------------------------------------------------------------


def test_shields_listing(server: LiveServer, tiny_guard) -> None:
    r = httpx.get(server.url + "/v1/shields")
    ids = [s["identifier"] for s in r.json()["data"]]
    assert r.status_code == 200 and ids == [served_model_id(tiny_guard.describe()["model"]), "my-shield"]
    assert all(s["type"] == "shield" and s["provider_id"] == "mmguard" for s in r.json()["data"])
    assert httpx.get(server.url + "/v1/shields/my-shield").json()["identifier"] == "my-shield"
    assert_error(httpx.get(server.url + "/v1/shields/nope"), 404, "shield_not_found")


def test_run_shield_safe_and_llama_stack_image_format(server: LiveServer) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},  # dropped, as llama-stack's provider
        {
            "role": "user",
            "content": [
                {"type": "image", "image": {"url": {"uri": data_url(png_bytes())}}},
                {"type": "text", "text": "describe this"},
            ],
        },
    ]
    r = post(server, "/v1/safety/run-shield", {"shield_id": "my-shield", "messages": messages, "params": {}})
    assert r.status_code == 200, r.text
    assert r.json() == {"violation": None}


def test_run_shield_violation_shape(unsafe_server: LiveServer, tiny_guard) -> None:
    """threshold 0.0 forces a violation from the random model: plumbing of the response shape."""
    r = post(
        unsafe_server,
        "/v1/safety/run-shield",
        {
            "shield_id": "meta-llama/Llama-Guard-3-11B-Vision",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "params": {"excluded_categories": ["S13"]},
        },
    )
    assert r.status_code == 200, r.text
    violation = r.json()["violation"]
    assert violation["violation_level"] == "error"
    assert violation["user_message"] == SHIELD_USER_MESSAGE
    expected = tiny_guard.classify(Conversation.response("q", "a"), threshold=0.0, exclude=["S13"])
    assert violation["metadata"]["violation_type"] == ",".join(expected.codes)
    assert "S13" not in violation["metadata"]["category_scores"]


def test_run_shield_errors(server: LiveServer) -> None:
    assert_error(post(server, "/v1/safety/run-shield", {"shield_id": "unknown", "messages": []}), 404)
    assert_error(post(server, "/v1/safety/run-shield", {"messages": []}), 400, "missing_required_parameter")
    assert_error(
        post(
            server,
            "/v1/safety/run-shield",
            {
                "shield_id": "my-shield",
                "messages": [{"role": "user", "content": "x"}],
                "params": {"excluded_categories": "S1"},
            },
        ),
        400,
    )


def test_llama_stack_moderations_route(server: LiveServer) -> None:
    r = post(server, "/v1/openai/v1/moderations", {"input": ["a", "b"], "model": "my-shield"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


# -- probes, metrics, docs -----------------------------------------------------------------------------------


def test_probes_metrics_and_docs(server: LiveServer) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    post(server, "/v1/moderations", {"input": "count me"})
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "mmguard_requests_total",
        "mmguard_request_latency_seconds_bucket",
        "mmguard_batch_size_bucket",
        "mmguard_queue_depth",
        "mmguard_verdicts_total",
    ):
        assert name in text
    assert 'route="/v1/moderations",status="200"' in text
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/moderations", "/v1/guard/classify", "/v1/safety/run-shield", "/v1/shields"} <= set(
        spec["paths"]
    )
    assert httpx.get(server.url + "/docs").status_code == 200


# -- API keys ------------------------------------------------------------------------------------------------


def test_api_keys(tiny_guard) -> None:
    settings = ServerSettings(api_keys=("k-one", "k-two"), metrics_public=False, warmup=False)
    with LiveServer(tiny_guard, settings) as srv:
        assert_error(post(srv, "/v1/moderations", {"input": "x"}), 401, "invalid_api_key")
        assert_error(
            post(srv, "/v1/moderations", {"input": "x"}, headers={"Authorization": "Bearer nope"}), 401
        )
        assert_error(
            post(srv, "/v1/moderations", {"input": "x"}, headers={"Authorization": "Basic k-one"}), 401
        )
        for key in ("k-one", "k-two"):
            r = post(srv, "/v1/moderations", {"input": "x"}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        assert httpx.get(srv.url + "/healthz").status_code == 200  # probes stay open
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer k-two"}).status_code == 200


# -- remote images ----------------------------------------------------------------------------------


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/cat.png":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big.png":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x89PNG" + b"\x00" * 200_000)
        elif self.path == "/slow.png":
            time.sleep(6.0)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/cat.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    t.join(timeout=5)


def test_remote_images(tiny_guard, image_host: str) -> None:
    settings = ServerSettings(
        remote_images=True,
        remote_image_hosts=("127.0.0.1",),
        remote_image_timeout_s=3.0,  # the whole fetch: leave a loaded CI core time for the good ones
        max_image_bytes=100_000,
        warmup=False,
    )

    def moderate(srv: LiveServer, url: str) -> httpx.Response:
        return post(
            srv,
            "/v1/moderations",
            {"input": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]},
        )

    with LiveServer(tiny_guard, settings) as srv:
        r = moderate(srv, image_host + "/cat.png")
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["category_applied_input_types"]["S1"] == ["text", "image"]
        assert_error(
            moderate(srv, image_host.replace("127.0.0.1", "localhost") + "/cat.png"),
            400,
            "image_host_not_allowed",
        )
        assert_error(moderate(srv, image_host + "/big.png"), 400, "image_too_large")
        assert_error(moderate(srv, image_host + "/slow.png"), 400, "image_fetch_timeout")
        assert_error(moderate(srv, image_host + "/redirect.png"), 400, "image_fetch_failed")
        assert_error(moderate(srv, image_host + "/missing.png"), 400, "image_fetch_failed")


# -- logs leave content out by default -------------------------------------------------------------


def _access_records(caplog: pytest.LogCaptureFixture) -> list[dict]:
    fmt = JsonFormatter()
    return [json.loads(fmt.format(r)) for r in caplog.records if r.name == "mmguard.server.access"]


def test_logs_leave_content_out(tiny_guard, caplog: pytest.LogCaptureFixture) -> None:
    secret = "my-very-secret-prompt-text"
    caplog.set_level(logging.INFO, logger="mmguard.server.access")
    with LiveServer(tiny_guard, ServerSettings(warmup=False)) as srv:
        assert post(srv, "/v1/moderations", {"input": secret}).status_code == 200
    records = _access_records(caplog)
    assert records and records[-1]["path"] == "/v1/moderations" and records[-1]["status"] == 200
    assert records[-1]["items"] == 1 and "request_id" in records[-1]
    assert all(secret not in json.dumps(r) for r in records)
    caplog.clear()
    with LiveServer(tiny_guard, ServerSettings(warmup=False, log_content=True)) as srv:
        assert post(srv, "/v1/moderations", {"input": secret}).status_code == 200
    assert any(secret in json.dumps(r) for r in _access_records(caplog))


# -- FastEngine behind the server ----------------------------------------------------------------------------


def test_response_check_after_prompt_check_reuses_the_image_encoding(tiny_guard, tiny_model_dir) -> None:
    """Two requests, the prompt check then the response check of one image: one encoding (keep_images), the
    plain engine's probabilities, and the reuse visible in /metrics."""
    from mmguard.fast import FastEngine
    from mmguard.guard import Guard

    # a model of its own: FastEngine patches its model's vision attention (equal within float rounding), and the
    # session's tiny_guard must stay the plain engine (test_batch compares it bit for bit with a fresh load)
    own = Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32").engine
    fast = Guard(FastEngine.from_engine(own, keep_images=4))
    user = {"role": "user", "content": [{"type": "text", "text": "what is in the picture?"},
                                        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}
    answer = {"role": "assistant", "content": "a blue rectangle"}
    with LiveServer(fast, ServerSettings(warmup=False)) as srv:
        got = [post(srv, "/v1/guard/classify", {"messages": m}).json()["verdict"] for m in ([user], [user, answer])]
        text = httpx.get(srv.url + "/metrics").text
    assert [v["task"] for v in got] == ["prompt", "response"]
    assert "mmguard_image_encodings_total 1.0" in text
    assert "mmguard_image_encoding_reuses_total 1.0" in text
    image = png_bytes()
    convs = [Conversation.from_messages([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "what is in the picture?"}]}, *extra])
        for extra in ([], [answer])]
    for v, conv in zip(got, convs, strict=True):
        assert v["unsafe_probability"] == pytest.approx(tiny_guard.classify(conv).unsafe_probability, abs=1e-5)
