"""Issue 14, the input boundary and the server: one text rule, bounded fetches and decodes, the server's
answers to hostile or malformed requests. The guard has random weights: plumbing, never quality."""

from __future__ import annotations

import json

import pytest

from mmguard.conversation import Conversation, ConversationError, InvalidTextError, Turn, check_text
from mmguard.policy import DEFAULT_POLICY, PolicyError, load_policy

# -- defect 1: lone surrogates, one rule at the input boundary ------------------------------------------


def test_check_text_names_field_and_position() -> None:
    with pytest.raises(InvalidTextError) as info:
        check_text("abcd\ud800", "message 1 part 1")
    assert str(info.value) == (
        "message 1 part 1: text holds a lone surrogate (U+D800) at character 5; text must be valid Unicode"
    )
    # bytes that did not decode as UTF-8 (surrogateescape) are named as such
    with pytest.raises(InvalidTextError, match=r"undecodable byte 0xFF"):
        check_text(b"a\xff".decode("utf-8", "surrogateescape"), "prompt")
    valid = "ok \U0001f600 \u202e RTL \x00 NUL \u0007"
    assert check_text(valid, "x") is valid


@pytest.mark.parametrize(
    "build, where",
    [
        (lambda: Conversation.prompt("hi\ud800"), "prompt"),
        (lambda: Conversation.response("hi", "\udfffthere"), "response"),
        (lambda: Conversation.from_turns([("user", "a"), ("agent", "b\ud83d")]), "turn 2"),
        (lambda: Conversation.from_messages([{"role": "user", "content": "x\udc80"}]), "message 1"),
        (
            lambda: Conversation.from_messages(
                [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "\ud800"}]}]
            ),
            "message 1 part 2",
        ),
        (lambda: Conversation((Turn("user", ("a", "b\ud800")),)), "turn 1 part 2"),
    ],
)
def test_every_conversation_constructor_rejects_surrogates(build, where: str) -> None:
    with pytest.raises(ConversationError, match=rf"^{where}: text holds a lone surrogate"):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: DEFAULT_POLICY.exclude(["S1", "\ud800"]),
        lambda: DEFAULT_POLICY.exclude([3]),  # type: ignore[list-item]
        lambda: load_policy({"name": "x\udc80", "categories": {"S1": "Crimes."}}),
        lambda: load_policy({"categories": {"S1": "Crimes\ud800."}}),
        lambda: load_policy({"categories": [{"code": "S1", "label": "a", "description": "\udfff"}]}),
        lambda: load_policy({"categories": [{"code": "S1", "label": "a", "\ud800": 1}]}),
        lambda: load_policy({"categories": {"S1": "a"}, "excluded": ["\ud800"]}),
        lambda: load_policy("no\x00such-file.yaml"),
    ],
)
def test_policy_text_is_checked(build) -> None:
    with pytest.raises(PolicyError) as info:
        build()
    str(info.value).encode("utf-8")  # the message itself is valid text (reprs escape what they echo)


# -- defect 1 over HTTP: 400 with a code, never 5xx / Retry-After, never fail-closed ---------------------

SHIELD = "meta-llama/Llama-Guard-3-11B-Vision"  # a default shield id, whatever the model


def _client(guard, **settings):
    from fastapi.testclient import TestClient

    from mmguard.server import ServerSettings, create_app

    return TestClient(create_app(guard, ServerSettings(**settings)), raise_server_exceptions=False)


def _post_json(client, path: str, body: object):
    import json

    # json.dumps escapes a lone surrogate as \\ud800: valid JSON that decodes to an invalid string
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


SURROGATE_REQUESTS = [
    ("/v1/moderations", {"input": "a\ud800"}, "invalid_text", "input"),
    ("/v1/moderations", {"input": ["fine", "a\ud800"]}, "invalid_text", "input[1]"),
    ("/v1/moderations", {"input": [{"type": "text", "text": "\udfff"}]}, "invalid_text", "input[0].text"),
    ("/v1/guard/classify", {"messages": _user("x\ud800")}, "invalid_text", "messages[0].content"),
    (
        "/v1/guard/classify",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
        "invalid_text",
        "messages[0].content[0].text",
    ),
    ("/v1/guard/classify", {"messages": _user("x"), "exclude": ["\ud800"]}, "invalid_policy", "exclude"),
    (
        "/v1/guard/classify",
        {"messages": _user("x"), "policy": {"name": "\ud800", "categories": {"S1": "Crimes."}}},
        "invalid_policy",
        "policy",
    ),
    (
        "/v1/guard/classify",
        {"messages": _user("x"), "policy": {"categories": [{"code": "S1", "label": "a", "\ud800": 1}]}},
        "invalid_policy",
        "policy",
    ),
    (
        "/v1/guard/classify",
        {"messages": _user("x"), "policy": {"categories": {"S1": "a"}, "excluded": ["S1", "\ud800"]}},
        "invalid_policy",
        "policy",
    ),
    ("/v1/safety/run-shield", {"shield_id": SHIELD, "messages": _user("x\ud800")}, "invalid_text",
     "messages[0].content"),
    (
        "/v1/safety/run-shield",
        {"shield_id": SHIELD, "messages": _user("x"), "params": {"excluded_categories": ["\ud800"]}},
        "invalid_policy",
        "params.excluded_categories",
    ),
]


@pytest.mark.parametrize("fail_closed", [False, True])
def test_invalid_text_is_a_400_naming_the_field(tiny_guard, fail_closed: bool) -> None:
    with _client(tiny_guard, fail_closed=fail_closed, warmup=False) as client:
        for path, body, code, param in SURROGATE_REQUESTS:
            r = _post_json(client, path, body)
            assert r.status_code == 400, (path, body, r.text)
            assert "retry-after" not in r.headers and "x-mmguard-fail-closed" not in r.headers
            err = r.json()["error"]
            assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error"), err
            if code == "invalid_text":
                assert "lone surrogate" in err["message"] and err["message"].startswith(param)
        metrics = client.get("/metrics").text
    assert "mmguard_model_errors_total 0.0" in metrics and "mmguard_fail_closed_total 0.0" in metrics


class RefusingGuard:
    """A guard whose classify_batch refuses some input with a typed error (as Guard does for bad text)."""

    def __init__(self, guard) -> None:
        self.guard, self.policy, self.threshold = guard, guard.policy, guard.threshold
        self.threshold_for = guard.threshold_for

    def describe(self):
        return self.guard.describe()

    def classify_batch(self, conversations, **kw):
        if any("REFUSE" in t.text for c in conversations for t in c.turns):
            raise ConversationError("turn 1: refused by the guard")
        return self.guard.classify_batch(conversations, **kw)


def test_input_refused_by_the_guard_is_a_400_even_fail_closed(tiny_guard) -> None:
    with _client(RefusingGuard(tiny_guard), fail_closed=True, warmup=False) as client:
        r = _post_json(client, "/v1/moderations", {"input": ["fine", "REFUSE"]})
        assert r.status_code == 400 and "retry-after" not in r.headers, r.text
        assert r.json()["error"]["code"] == "invalid_input"
        assert r.json()["error"]["message"] == "item 2: turn 1: refused by the guard"
        ok = _post_json(client, "/v1/moderations", {"input": ["fine"]})
        assert ok.status_code == 200 and "x-mmguard-fail-closed" not in ok.headers
        assert "mmguard_fail_closed_total 0.0" in client.get("/metrics").text


# -- defect 8: malformed bodies, slow bodies, loading, the OpenAPI document, /docs offline --------------


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "request body is empty; expected a JSON object"),
        (b'{"input": "\xff"}', "it is not UTF-8 (byte 0xFF at offset 11)"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"{not json", "request body is not valid JSON"),
    ],
)
def test_malformed_bodies_are_invalid_json(tiny_guard, raw: bytes, message: str) -> None:
    with _client(tiny_guard, warmup=False) as client:
        for path in ("/v1/moderations", "/v1/guard/classify", "/v1/safety/run-shield"):
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_json" and message in err["message"], err


def test_threshold_must_be_a_number_not_a_bool(tiny_guard) -> None:
    with _client(tiny_guard, warmup=False) as client:
        r = _post_json(client, "/v1/guard/classify", {"messages": _user("x"), "threshold": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "threshold", r.text
        assert _post_json(client, "/v1/guard/classify", {"messages": _user("x"), "threshold": 1}).status_code == 200


def test_a_trickled_body_is_timed_out(tiny_guard) -> None:
    import socket
    import time

    from mmguard.server import ServerSettings
    from mmguard.server.testing import LiveServer

    with (
        LiveServer(tiny_guard, ServerSettings(body_timeout_s=1.0, warmup=False)) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock,
    ):
        start = time.monotonic()
        sock.sendall(b"POST /v1/moderations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        answer = b""
        sock.settimeout(0.3)
        while b"\r\n\r\n" not in answer and time.monotonic() - start < 8:
            try:
                answer += sock.recv(4096)  # nothing yet: send one more byte, a trickle
            except TimeoutError:
                sock.sendall(b" ")
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed < 4.0, elapsed  # the body timeout is 1 s; unbounded before


def test_readyz_answers_while_the_model_loads(tiny_guard) -> None:
    import threading
    import time

    import httpx

    from mmguard.server import ServerSettings
    from mmguard.server.testing import LiveServer

    release = threading.Event()

    def slow_load():
        release.wait(30)
        return tiny_guard

    with LiveServer(None, ServerSettings(warmup=False), loader=slow_load, wait_ready=False) as srv:
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/moderations", json={"input": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        assert httpx.get(srv.url + "/healthz").status_code == 200
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(srv.url + "/v1/moderations", json={"input": "hi"}).status_code == 200


def test_a_failed_load_leaves_the_server_not_ready(tiny_guard) -> None:
    import time

    from mmguard.server.testing import LiveServer

    def broken_load():
        raise OSError("no such model")

    with LiveServer(None, loader=broken_load, wait_ready=False) as srv:
        import httpx

        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(srv.url + "/readyz").json()["status"] == "not_ready"
        assert srv.app.state.mmguard.load_error == "OSError: no such model"
        r = httpx.post(srv.url + "/v1/guard/classify", json={"messages": _user("x")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_openapi_documents_every_route_and_answer(tiny_guard) -> None:
    with _client(tiny_guard, warmup=False) as client:
        spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert "/v1/openai/v1/moderations" in paths
    assert "404" in paths["/v1/shields/{identifier}"]["get"]["responses"]
    assert "404" in paths["/v1/safety/run-shield"]["post"]["responses"]
    for path in ("/v1/moderations", "/v1/guard/classify", "/v1/safety/run-shield"):
        assert {"400", "408", "413", "429", "503", "504"} <= set(paths[path]["post"]["responses"])
    assert "503" in paths["/readyz"]["get"]["responses"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    # FastAPI documents a 422 for every route with a body; the server answers each invalid body with a 400
    assert not [(p, m) for p, ops in paths.items() for m, op in ops.items() if "422" in op.get("responses", {})]
    assert "HTTPValidationError" not in spec.get("components", {}).get("schemas", {})


def test_docs_are_served_without_a_network(tiny_guard) -> None:
    pytest.importorskip("swagger_ui_bundle")
    with _client(tiny_guard, warmup=False) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert "cdn" not in page.text.lower() and "/docs/assets/swagger-ui-bundle.js" in page.text
        js = client.get("/docs/assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000
        assert client.get("/docs/assets/swagger-ui.css").status_code == 200
        assert client.get("/redoc").status_code == 404  # ReDoc only exists as a CDN script: off


def test_model_id_defaults_to_the_loaded_model(tiny_guard, tiny_model_dir) -> None:
    with _client(tiny_guard, warmup=False) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [tiny_model_dir.name]
        assert _post_json(client, "/v1/moderations", {"input": "hi"}).json()["model"] == tiny_model_dir.name
    with _client(tiny_guard, warmup=False, model_id="custom-id") as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "custom-id"


# -- defect 3: a remote image fetch is bounded as a whole, and by the request timeout --------------------


@pytest.fixture(scope="module")
def trickling_host():
    """127.0.0.1 serving an 'image' of 10,000 bytes at one byte a second."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "10000")
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(1.0)
            except OSError:  # the server hung up, as it must
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize(
    "fetch_timeout, request_timeout, status, code",
    [(2.0, 30.0, 400, "image_fetch_timeout"), (10.0, 2.0, 504, "timeout")],
)
def test_a_trickling_image_host_is_cut_off(
    tiny_guard, trickling_host: str, fetch_timeout: float, request_timeout: float, status: int, code: str
) -> None:
    import time

    import httpx

    from mmguard.server import ServerSettings
    from mmguard.server.testing import LiveServer

    settings = ServerSettings(
        remote_images=True, remote_image_hosts=(trickling_host,), remote_image_timeout_s=fetch_timeout,
        request_timeout_s=request_timeout, warmup=False,
    )
    part = {"type": "image_url", "image_url": {"url": f"http://{trickling_host}/cat.png"}}
    with LiveServer(tiny_guard, settings) as srv:
        start = time.monotonic()
        r = httpx.post(srv.url + "/v1/moderations", json={"input": [part]}, timeout=60)
        elapsed = time.monotonic() - start
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    bound = min(fetch_timeout, request_timeout)
    # slack for a loaded CI core; without the total deadline the request runs for the whole 10,000 s trickle
    assert elapsed < bound + 3.0, f"the request took {elapsed:.1f}s; the bound is {bound:g}s"


def test_a_compressed_image_body_is_refused_before_it_is_inflated(tiny_guard) -> None:
    """The fetcher asks for identity; a host that gzips anyway (here 64 MiB of zeros in ~64 KiB) is refused
    without inflating it (httpx decoded each chunk whole before the byte limit saw it), and a host that
    honours the request is served."""
    import gzip
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    from mmguard.server import ServerSettings
    from mmguard.server.testing import LiveServer
    from mmguard.tiny import noise_image

    bomb = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=9)
    picture = io.BytesIO()
    noise_image(40, 30, 1).save(picture, "PNG")
    asked: list[str | None] = []

    class Host(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.headers.get("Accept-Encoding"))
            body, gzipped = (bomb, True) if self.path == "/bomb.png" else (picture.getvalue(), False)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Host)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{httpd.server_address[1]}"
    settings = ServerSettings(remote_images=True, remote_image_hosts=(host,), warmup=False)
    try:
        with LiveServer(tiny_guard, settings) as srv:
            answers = [httpx.post(srv.url + "/v1/moderations", timeout=60, json={"input": [
                {"type": "image_url", "image_url": {"url": f"http://{host}/{name}"}}]})
                for name in ("bomb.png", "ok.png")]
    finally:
        httpd.shutdown()
    refused, served = answers
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "image_fetch_failed"
    assert "content-encoding 'gzip'" in refused.json()["error"]["message"]
    assert served.status_code == 200, served.text
    assert asked == ["identity", "identity"]


# -- defect 4: 8 concurrent 6000x6000 PNGs: bounded peak, memory given back -----------------------------


def _rss_mib(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_concurrent_large_images_keep_server_memory_bounded(tiny_model_dir) -> None:
    import base64
    import concurrent.futures
    import io
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import numpy as np
    from PIL import Image

    # 6000x6000 (36 MP, within the 40 MP default) that PNG-compresses to ~2 MB: 10x10 px random blocks
    blocks = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks).resize((6000, 6000), Image.Resampling.NEAREST).save(buf, "PNG", compress_level=1)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"input": [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "mmguard.cli", "serve", "--model", str(tiny_model_dir), "--device", "cpu",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the server exited"
            time.sleep(0.2)
        assert httpx.post(base + "/v1/moderations", json={"input": "warm"}, timeout=30).status_code == 200
        time.sleep(0.5)
        before = _rss_mib(proc.pid)["VmRSS"]
        with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(
                lambda _: httpx.post(base + "/v1/moderations", json=body, timeout=60).status_code, range(8)
            ))
        time.sleep(1.0)
        after = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(20)
    assert statuses == [200] * 8
    peak_growth, left = after["VmHWM"] - before, after["VmRSS"] - before
    print(f"RSS before {before:.0f} MiB, peak +{peak_growth:.0f} MiB, after {left:+.0f} MiB")
    assert peak_growth <= 1024, f"peak RSS grew by {peak_growth:.0f} MiB (limit 1024)"
    assert left <= 300, f"RSS stayed {left:.0f} MiB above its level before (limit 300)"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/moderations", {"input": ["x" * 400] * 3}, "input[2]"),
    ("/v1/moderations", {"input": [{"type": "text", "text": "x" * 400}] * 3}, "input[2].text"),
    ("/v1/guard/classify", {"messages": [{"role": "user", "content": "x" * 400},
                                         {"role": "assistant", "content": "x" * 400},
                                         {"role": "user", "content": "x" * 400}]}, "messages[2].content"),
])
def test_the_text_of_one_request_is_bounded_in_all(tiny_guard, path: str, body: dict, param: str) -> None:
    """Each text was bounded, their number only by the body size: 160 texts of 199,999 characters (30 MB) held
    the model's thread for 23 s of tokenizing before their 400, and other requests waited past their timeout."""
    with _client(tiny_guard, max_text_chars=1000, warmup=False) as client:  # lifespan: the batcher runs
        resp = _post_json(client, path, body)
        fits = _post_json(client, "/v1/moderations", {"input": ["x" * 400] * 2})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["code"] == "text_too_long" and error["param"] == param, error
    assert "1000" in error["message"] and "--max-text-chars" in error["message"]
    assert fits.status_code == 200 and len(fits.json()["results"]) == 2


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_request_bodies_held_at_once_are_bounded(tiny_guard, framing: str) -> None:
    """Nothing bounded how many requests the server held at once: each costs several times its body while it waits
    and runs (a 25 MB image request peaked at 222 MB; 6 concurrent ones +775 MB). Past max_inflight_bytes a request
    gets 429 server_busy, unread; a chunked body is counted as it arrives."""
    import socket

    import httpx

    from mmguard.server import ServerSettings
    from mmguard.server.testing import LiveServer

    settings = ServerSettings(max_inflight_bytes=1_000_000, body_timeout_s=20.0, warmup=False)
    with (
        LiveServer(tiny_guard, settings) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as held,
    ):
        # a request whose 900 kB body is still on its way holds its share of the budget
        held.sendall(b"POST /v1/guard/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 900000\r\n\r\n{")
        body = {"messages": _user("x" * 200_000)}
        if framing == "chunked":
            raw = json.dumps(body).encode()
            busy = httpx.post(srv.url + "/v1/guard/classify", content=iter([raw[:100_000], raw[100_000:]]),
                              headers={"content-type": "application/json"}, timeout=30)
        else:
            busy = httpx.post(srv.url + "/v1/guard/classify", json=body, timeout=30)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy", busy.text
        small = httpx.post(srv.url + "/v1/guard/classify", json={"messages": _user("hi")}, timeout=30)
        assert small.status_code == 200, small.text  # 900 kB + a small body fit
        held.close()
        for _ in range(50):  # the held request ends (its client left): its share comes back
            again = httpx.post(srv.url + "/v1/guard/classify", json=body, timeout=30)
            if again.status_code != 429:
                break
        assert again.status_code != 429, again.text  # admitted (its text is too long for the tiny model: a 400)


@pytest.mark.parametrize("client", ["silent", "trickling its headers"])
def test_a_connection_must_send_its_headers_in_time(tiny_guard, monkeypatch, client: str) -> None:
    """uvicorn timed nothing before a request's headers were complete: a silent connection, or one sending a header
    byte every 3 s, was still open after 90 s (slowloris). The header deadline is 10 s, 1 s here."""
    import socket
    import time

    import httpx

    from mmguard.server import ServerSettings
    from mmguard.server.http_protocol import HeaderDeadlineProtocol
    from mmguard.server.testing import LiveServer

    monkeypatch.setattr(HeaderDeadlineProtocol, "header_timeout_s", 1.0)
    with (
        LiveServer(tiny_guard, ServerSettings(warmup=False)) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock,
    ):
        start = time.monotonic()
        sock.settimeout(0.3)
        closed = False
        header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        sent = 0
        while time.monotonic() - start < 8 and not closed:
            try:
                closed = sock.recv(4096) == b""
            except TimeoutError:
                if client != "silent":
                    sock.sendall(header[sent:sent + 1])
                    sent += 1
            except ConnectionResetError:
                closed = True
        elapsed = time.monotonic() - start
        with httpx.Client(timeout=10) as http:  # a client that sends its requests goes on (keep-alive too)
            assert http.get(srv.url + "/healthz").status_code == 200
            time.sleep(0.5)
            assert http.get(srv.url + "/healthz").status_code == 200
    assert closed and elapsed < 4.0, elapsed
