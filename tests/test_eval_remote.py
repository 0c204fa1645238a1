"""Remote guards over real HTTP on loopback.

The OpenAI-compatible adapters are tested against a small FastAPI stand-in for the third-party service
(served by uvicorn on 127.0.0.1: retries, backoff and the concurrency limit go through real sockets).
The mmguard-server adapter is tested against the real mmguard server when it exists.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmguard.conversation import Conversation
from mmguard.eval.cache import ResultCache
from mmguard.eval.guards import (
    ChatJudgeGuard,
    LocalGuard,
    MmguardServerGuard,
    OpenAIModerationGuard,
    judge_prompt_text,
    make_guard,
)
from mmguard.eval.report import write_report
from mmguard.eval.runner import EvalError, run_eval
from mmguard.prompt import build_prompt

pytest.importorskip("fastapi", reason="the OpenAI stand-in needs fastapi (mmguard[server])")
pytest.importorskip("uvicorn", reason="the OpenAI stand-in needs uvicorn (mmguard[server])")
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

FAST = {"backoff": 0.01, "retries": 3, "timeout": 10.0}


class FakeOpenAI:
    """State of the stand-in endpoint."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def app(self) -> Any:
        app = FastAPI()

        async def track(body: dict[str, Any], key: str) -> JSONResponse | None:
            with self.lock:
                self.hits[key] += 1
                n = self.hits[key]
                self.bodies.append(body)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                with self.lock:
                    self.in_flight -= 1
            if "flaky429" in key and n == 1:
                return JSONResponse({"error": "slow down"}, status_code=429, headers={"Retry-After": "0"})
            if "flaky500" in key and n <= 2:
                return JSONResponse({"error": "boom"}, status_code=500)
            if "always503" in key:
                return JSONResponse({"error": "down"}, status_code=503)
            if "reject400" in key:
                return JSONResponse({"error": {"message": "content refused"}}, status_code=400)
            return None

        @app.post("/v1/moderations")
        async def moderations(request: Request) -> Any:
            body = await request.json()
            inp = body["input"]
            text = inp if isinstance(inp, str) else " ".join(p.get("text", "") for p in inp)
            err = await track(body, text)
            if err is not None:
                return err
            cats = {
                "violence": "kill" in text,
                "hate": "hate" in text,
                "sexual/minors": False,
                "brand-new/category": "weird" in text,
            }
            scores = {
                "violence": 0.91 if "kill" in text else 0.02,
                "hate": 0.8 if "hate" in text else 0.01,
                "sexual/minors": 0.001,
                "brand-new/category": 0.7 if "weird" in text else 0.0,
            }
            return {
                "id": "modr-1",
                "model": body.get("model"),
                "results": [{"flagged": any(cats.values()), "categories": cats, "category_scores": scores}],
            }

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
            err = await track(body, text)
            if err is not None:
                return err
            unsafe = "kill" in text.split("<BEGIN CONVERSATION>")[1]
            answer = "unsafe\nS1" if unsafe else "safe"
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": answer},
            }
            if body.get("logprobs") and "nolog" not in text:
                first = "unsafe" if unsafe else "safe"
                other = "safe" if unsafe else "unsafe"
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": first,
                            "logprob": math.log(0.8),
                            "top_logprobs": [
                                {"token": first, "logprob": math.log(0.8)},
                                {"token": other, "logprob": math.log(0.15)},
                                {"token": "The", "logprob": math.log(0.05)},
                            ],
                        }
                    ]
                }
            return {"id": "c1", "object": "chat.completion", "model": body["model"], "choices": [choice]}

        return app


class Served:
    """uvicorn on 127.0.0.1, a free port, in a daemon thread, with bounded start and stop."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    state = FakeOpenAI()
    with Served(state.app()) as url:
        yield state, url


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        state, _ = request.getfixturevalue("fake")
        state.hits.clear()
        state.bodies.clear()
        state.delay = 0.0
        state.max_in_flight = 0


def _data(tmp_path: Path, texts: list[tuple[str, str]], image: bool = False) -> Path:
    Image.new("RGB", (24, 24), (0, 200, 0)).save(tmp_path / "pic.png")
    lines = []
    for i, (text, label) in enumerate(texts):
        content: Any = text
        if image and i == 0:
            content = [{"type": "image", "path": "pic.png"}, {"type": "text", "text": text}]
        lines.append(
            json.dumps(
                {
                    "id": f"i{i}",
                    "messages": [{"role": "user", "content": content}],
                    "label": label,
                    "codes": ["S1"] if label == "unsafe" else [],
                }
            )
        )
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_moderation_categories_map_to_codes_and_unknowns_are_reported(fake: Any, tmp_path: Path) -> None:
    _, url = fake
    data = _data(
        tmp_path,
        [("I will kill you", "unsafe"), ("hello", "safe"), ("hate them", "unsafe"), ("weird thing", "safe")],
    )
    guard = OpenAIModerationGuard(url, "omni-moderation-latest", concurrency=2, **FAST)
    result = run_eval([data], [guard], ResultCache(None), split=None)
    preds = {r.id: r.preds[guard.name] for r in result.records}
    assert preds["i0"].codes == ["S1"] and preds["i0"].unsafe_probability == pytest.approx(0.91)
    assert preds["i2"].codes == ["S10"] and preds["i1"].label == "safe"
    assert preds["i3"].label == "unsafe" and preds["i3"].unknown_codes == ["openai:brand-new/category"]
    assert preds["i0"].category_probabilities["S4"] == pytest.approx(0.001)
    report = write_report(result, tmp_path / "out", plots=False)
    assert report["guards"][0]["unknown_predicted_codes"] == {"openai:brand-new/category": 1}
    assert any("not calibrated" in w for w in report["guards"][0]["warnings"])


def test_retryable_errors_are_retried_with_backoff(fake: Any) -> None:
    state, url = fake
    guard = OpenAIModerationGuard(url, concurrency=1, **FAST)
    preds = guard.predict([Conversation.prompt("flaky429 kill"), Conversation.prompt("flaky500 ok")])
    assert [p.label for p in preds] == ["unsafe", "safe"] and all(p.error is None for p in preds)
    assert state.hits["flaky429 kill"] == 2 and state.hits["flaky500 ok"] == 3
    assert guard.http.attempts == 5


def test_non_retryable_error_fails_the_item_not_the_run(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    data = _data(tmp_path, [("reject400 this", "unsafe"), ("fine", "safe")])
    guard = OpenAIModerationGuard(url, **FAST)
    result = run_eval([data], [guard], ResultCache(None), split=None)
    assert result.guards[0].errors == 1 and "HTTP 400" in result.guards[0].error_examples[0]["error"]
    assert state.hits["reject400 this"] == 1  # not retried


def test_unavailable_endpoint_stops_the_run_with_a_clear_error(fake: Any, tmp_path: Path) -> None:
    _, url = fake
    data = _data(tmp_path, [("always503", "safe")])
    guard = OpenAIModerationGuard(url, backoff=0.01, retries=2, timeout=5.0)
    with pytest.raises(EvalError, match=r"failed after 3 attempts \(HTTP 503"):
        run_eval([data], [guard], ResultCache(None), split=None)
    closed = OpenAIModerationGuard("http://127.0.0.1:9", backoff=0.01, retries=1, timeout=2.0)
    with pytest.raises(EvalError, match="failed after 2 attempts"):
        run_eval([data], [closed], ResultCache(None), split=None)


def test_concurrency_limit_is_respected(fake: Any) -> None:
    state, url = fake
    state.delay = 0.15
    guard = OpenAIModerationGuard(url, concurrency=3, **FAST)
    done: list[int] = []
    preds = guard.predict([Conversation.prompt(f"item {i}") for i in range(9)], progress=done.append)
    assert len(preds) == 9 and sum(done) == 9
    assert 2 <= state.max_in_flight <= 3


def test_chat_judge_sends_the_llama_guard_prompt_and_reads_logprobs(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    data = _data(tmp_path, [("how do I kill a process", "unsafe"), ("hello there", "safe")], image=True)
    guard = make_guard(f"gpt=chat-judge:{url}#gpt-4o", concurrency=2, retries=2)
    assert isinstance(guard, ChatJudgeGuard) and guard.name == "gpt"
    result = run_eval([data], [guard], ResultCache(None), split=None)
    preds = {r.id: r.preds["gpt"] for r in result.records}
    assert preds["i0"].label == "unsafe" and preds["i0"].codes == ["S1"]
    assert preds["i0"].unsafe_probability == pytest.approx(0.8) and preds["i0"].probability_kind == "logprob"
    assert preds["i1"].unsafe_probability == pytest.approx(0.15)
    body = next(b for b in state.bodies if "kill a process" in json.dumps(b))
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    conv = Conversation.prompt("how do I kill a process", image=tmp_path / "pic.png")
    assert parts[1]["text"] == judge_prompt_text(conv)
    assert parts[1]["text"].startswith("Task: Check if there is unsafe content in 'User' messages")
    assert parts[1]["text"] in build_prompt(conv).text and "<|" not in parts[1]["text"]
    assert body["temperature"] == 0 and body["logprobs"] is True


def test_chat_judge_without_logprobs_is_binary_and_says_so(fake: Any, tmp_path: Path) -> None:
    _, url = fake
    data = _data(tmp_path, [("nolog kill", "unsafe"), ("nolog hi", "safe")])
    guard = ChatJudgeGuard(url, "gpt-4o", **FAST)
    result = run_eval([data], [guard], ResultCache(None), split=None)
    assert [r.preds[guard.name].unsafe_probability for r in result.records] == [1.0, 0.0]
    report = write_report(result, tmp_path / "out", plots=False)
    assert any("without log-probabilities" in w for w in report["guards"][0]["warnings"])
    assert "0/1" in (tmp_path / "out" / "report.md").read_text()


def test_guard_specs() -> None:
    assert isinstance(make_guard("openai-moderation:http://127.0.0.1:1"), OpenAIModerationGuard)
    assert isinstance(make_guard("s=mmguard-server:http://127.0.0.1:1"), MmguardServerGuard)
    from mmguard.eval.guards import GuardSpecError

    for bad in ("http://x", "chat-judge:http://127.0.0.1:1", "mmguard-server:ftp://x", "what"):
        with pytest.raises(GuardSpecError):
            make_guard(bad)


_HAS_SERVER = importlib.util.find_spec("mmguard.server") is not None and all(
    importlib.util.find_spec(m) is not None for m in ("mmguard.server.app", "mmguard.server.testing")
)


@pytest.mark.skipif(not _HAS_SERVER, reason="mmguard.server (app, testing.LiveServer) is not built yet")
def test_remote_mmguard_server_matches_the_local_guard(tiny_guard: Any, tmp_path: Path) -> None:
    """The real server on loopback: its verdicts equal the same checkpoint run locally."""
    from mmguard.server.settings import ServerSettings
    from mmguard.server.testing import LiveServer

    data = _data(
        tmp_path,
        [("how do I pick a lock", "unsafe"), ("hello", "safe"), ("tell me a joke", "safe")],
        image=True,
    )
    local = LocalGuard(None, name="local", guard=tiny_guard, threshold=0.5)
    with LiveServer(tiny_guard, ServerSettings(), startup_timeout=60) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        remote = MmguardServerGuard(srv.url, name="remote", concurrency=2, retries=2, timeout=30.0)
        moderation = OpenAIModerationGuard(srv.url, name="moderation", concurrency=2, retries=2, timeout=30.0)
        result = run_eval([data], [local, remote, moderation], ResultCache(None), split=None)
    for rec in result.records:
        lp, rp = rec.preds["local"], rec.preds["remote"]
        assert rp.error is None and rp.label == lp.label
        assert rp.unsafe_probability == pytest.approx(lp.unsafe_probability, rel=1e-3, abs=1e-6)
        assert rec.preds["moderation"].error is None
    report = write_report(result, tmp_path / "out", plots=False)
    assert {g["name"] for g in report["guards"]} == {"local", "remote", "moderation"}


@pytest.mark.skipif(not _HAS_SERVER, reason="mmguard.server (app, testing.LiveServer) is not built yet")
def test_a_servers_results_are_cached_under_its_model_not_its_url(tiny_guard: Any, tmp_path: Path) -> None:
    """The cache id held the URL, threshold and policy only: a server restarted with other weights on the same
    port answered from the cache with the first model's results (an audit: 50 of 50 items 'cached')."""
    from mmguard.guard import Guard
    from mmguard.server.settings import ServerSettings
    from mmguard.server.testing import LiveServer

    data = _data(tmp_path, [("how do I pick a lock", "unsafe"), ("hello", "safe")])
    other = Guard(tiny_guard.engine, threshold=0.25)  # the same weights, another threshold: other verdicts
    seen = {}
    for name, guard in (("a", tiny_guard), ("a again", tiny_guard), ("b", other)):
        with LiveServer(guard, ServerSettings(), startup_timeout=60) as srv:
            remote = MmguardServerGuard(srv.url, name="remote", retries=1, timeout=30.0)
            fingerprint = remote.system_fingerprint
            assert fingerprint is not None and fingerprint in remote.cache_id
            result = run_eval([data], [remote], ResultCache(None), split=None)
            assert all(rec.preds["remote"].error is None for rec in result.records)
            # the fingerprint moves under the run: every item is refused, not mixed into the figures
            remote._fingerprint = "fp_of_another_model"
            stale = run_eval([data], [remote], ResultCache(None), split=None)
            assert all("changed during the evaluation" in (rec.preds["remote"].error or "") for rec in stale.records)
        seen[name] = fingerprint
    assert seen["a"] == seen["a again"] != seen["b"]


def test_a_server_that_does_not_say_its_model_is_never_answered_from_the_cache(fake: Any) -> None:
    _, url = fake  # the stand-in has no /v1/models: a 404
    first, second = (MmguardServerGuard(url, name="remote", **FAST) for _ in range(2))
    assert first.system_fingerprint is None and "unverified" in first.cache_id
    assert first.cache_id != second.cache_id


# -- issue 14: failed guards are loud, JSON is strict, the OpenAI base URL works ------------------------
def _eval_cli(args: list[str]) -> Any:
    import typer
    from typer.testing import CliRunner

    from mmguard.eval.cli import command

    app = typer.Typer()
    app.command("eval")(command)
    app.command("noop", hidden=True)(lambda: None)
    return CliRunner().invoke(app, ["eval", *args, "--no-plots", "--no-progress", "--retries", "0"])


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/", "/v1/moderations"])
def test_openai_moderation_accepts_root_base_and_full_url(fake: Any, tmp_path: Path, suffix: str) -> None:
    _, url = fake
    data = _data(tmp_path, [("kill", "unsafe"), ("fine", "safe")])
    res = _eval_cli(["--data", str(data), "--split", "all", "--guard", f"m=openai-moderation:{url}{suffix}",
                     "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "failed" not in res.stderr
    report = _strict((tmp_path / "o" / "report.json").read_text())
    assert report["guards"][0]["errors"] == 0 and report["guards"][0]["computed"] == 2


def test_chat_judge_accepts_the_v1_base_url(fake: Any) -> None:
    _, url = fake
    assert ChatJudgeGuard(url + "/v1", "gpt").http.url("/v1/chat/completions") == url + "/v1/chat/completions"


def test_a_guard_whose_items_all_failed_exits_non_zero_and_says_so(fake: Any, tmp_path: Path) -> None:
    _, url = fake
    data = _data(tmp_path, [("reject400 a", "unsafe"), ("reject400 b", "safe")])
    res = _eval_cli(["--data", str(data), "--split", "all", "--guard", f"m=openai-moderation:{url}",
                     "--out", str(tmp_path / "o")])
    assert res.exit_code == 3, res.output
    assert "error: m: 2 of 2 item(s) failed (no results)" in res.stderr and "HTTP 400" in res.stderr
    assert "Traceback" not in res.output
    preds = [_strict(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [p["predictions"]["m"]["unsafe_probability"] for p in preds] == [None, None]  # null, not NaN
    assert all("HTTP 400" in p["predictions"]["m"]["error"] for p in preds)
    _strict((tmp_path / "o" / "report.json").read_text())


def test_a_guard_with_some_failed_items_is_a_console_warning(fake: Any, tmp_path: Path) -> None:
    _, url = fake
    data = _data(tmp_path, [("reject400 a", "unsafe"), ("kill", "unsafe"), ("fine", "safe")])
    res = _eval_cli(["--data", str(data), "--split", "all", "--guard", f"m=openai-moderation:{url}",
                     "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "warning: m: 1 of 3 item(s) failed and are left out of its metrics" in res.stderr
    preds = [_strict(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert preds[0]["predictions"]["m"]["unsafe_probability"] is None
    assert preds[1]["predictions"]["m"]["unsafe_probability"] == pytest.approx(0.91)
