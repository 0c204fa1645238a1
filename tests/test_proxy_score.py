"""``mmguard proxy --mode score``: both rails judge, nothing is blocked or held back, and the verdicts are
reported in an ``mmguard`` field (plain) or a last chunk before ``[DONE]`` (streamed), and in the metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from mmguard.conversation import MAX_TEXT_CHARS
from mmguard.proxy import ProxySettings
from mmguard.proxy.testing import LiveApp, LiveProxy, StubUpstream

from test_proxy import TRIGGER, KeywordGuard, proxy_settings

ANSWER = f"Here is how: {TRIGGER} in three steps."
PROMPT = {"model": "m", "messages": [{"role": "user", "content": f"tell me {TRIGGER}"}]}


@contextmanager
def score_proxy(upstream: StubUpstream, guard: KeywordGuard, **kw: Any) -> Iterator[str]:
    """The proxy's URL, in score mode in front of ``upstream``."""
    with LiveApp(upstream.app) as up, LiveProxy(guard, proxy_settings(up.url + "/v1", mode="score", **kw)) as srv:
        yield srv.url


def test_score_mode_reports_and_never_blocks() -> None:
    upstream, guard = StubUpstream(ANSWER), KeywordGuard()
    with score_proxy(upstream, guard) as url:
        plain = httpx.post(url + "/v1/chat/completions", json={**PROMPT, "n": 2}, timeout=30)
        chunks = [c.model_dump() for c in openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
                  .chat.completions.create(**PROMPT, stream=True)]
        metrics = httpx.get(url + "/metrics", timeout=30).text
    assert plain.status_code == 200 and len(upstream.requests) == 2  # the flagged prompt was forwarded
    body = plain.json()
    assert [c["message"]["content"] for c in body["choices"]] == [ANSWER, ANSWER]  # unchanged
    report = body["mmguard"]
    assert report["mode"] == "score" and report["input"]["flagged"] and report["input"]["rail"] == "input"
    assert [(o["index"], o["flagged"], o["codes"]) for o in report["output"]] == [(0, True, ["S1"]), (1, True, ["S1"])]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ANSWER  # streamed whole, nothing held back or cut
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    last = chunks[-1]
    assert last["choices"] == [] and last["mmguard"]["input"]["flagged"]
    assert [(o["index"], o["flagged"]) for o in last["mmguard"]["output"]] == [(0, True)]
    assert 'mmguard_proxy_flags_total{rail="input"} 2.0' in metrics
    assert 'mmguard_proxy_flags_total{rail="output"} 3.0' in metrics
    assert "mmguard_proxy_blocks_total{" not in metrics  # counted as flags, never as blocks


def test_score_mode_reports_an_output_check_that_could_not_run_and_a_safe_answer() -> None:
    long_answer = "w " * (MAX_TEXT_CHARS // 2 + 10)  # over the conversation limit: cannot be judged
    upstream, guard = StubUpstream(long_answer), KeywordGuard()
    with score_proxy(upstream, guard) as url:
        plain = httpx.post(url + "/v1/chat/completions", json=PROMPT, timeout=60)
        stream = httpx.post(url + "/v1/chat/completions", json={**PROMPT, "stream": True}, timeout=60)
        upstream.answer = "fine weather today"
        safe = httpx.post(url + "/v1/chat/completions", json={**PROMPT, "messages": [
            {"role": "user", "content": "hello"}]}, timeout=30).json()
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == long_answer
    (error,) = plain.json()["mmguard"]["output"]
    assert error["index"] == 0 and error["error"].startswith("the output check failed: ") and \
        f"limit of {MAX_TEXT_CHARS}" in error["error"]
    events = [x[6:] for x in stream.text.splitlines() if x.startswith("data: ")]
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])["mmguard"]["output"][0]
    assert safe["mmguard"]["input"]["flagged"] is False and safe["mmguard"]["output"][0]["flagged"] is False


def test_mode_is_validated_and_on_the_cli() -> None:
    from typer.testing import CliRunner

    from mmguard.cli import _register_tools, app

    with pytest.raises(ValueError, match="mode must be 'block' or 'score'"):
        ProxySettings(upstream="http://127.0.0.1:1/v1", mode="log")  # type: ignore[arg-type]
    _register_tools(["proxy"])
    res = CliRunner().invoke(app, ["proxy", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert "--mode" in res.output and "--judge-reasoning" in res.output


def test_score_mode_judges_at_most_128_choices() -> None:
    """A hostile upstream's thousand choices are not a thousand checks: the first 128 are judged, the rest
    reported as not judged."""
    upstream, guard = StubUpstream("ok"), KeywordGuard()
    with score_proxy(upstream, guard) as url:
        plain = httpx.post(url + "/v1/chat/completions", json={**PROMPT, "n": 200}, timeout=60).json()
        stream = httpx.post(url + "/v1/chat/completions", json={**PROMPT, "n": 200, "stream": True}, timeout=60)
    assert len(plain["choices"]) == 200 and len(plain["mmguard"]["output"]) == 129
    assert plain["mmguard"]["output"][-1]["error"] == "72 choices past the first 128 not judged"
    report = json.loads([x[6:] for x in stream.text.splitlines() if x.startswith("data: {")][-1])["mmguard"]
    assert len(report["output"]) == 129 and report["output"][-1]["error"].startswith("72 choices past")


def test_score_mode_with_the_input_rail_only_reports_the_input() -> None:
    upstream, guard = StubUpstream(ANSWER), KeywordGuard()
    with score_proxy(upstream, guard, rails=("input",)) as url:
        plain = httpx.post(url + "/v1/chat/completions", json=PROMPT, timeout=30).json()
        stream = httpx.post(url + "/v1/chat/completions", json={**PROMPT, "stream": True}, timeout=30)
    assert plain["mmguard"]["input"]["flagged"] and plain["mmguard"]["output"] == []
    report = json.loads([x[6:] for x in stream.text.splitlines() if x.startswith("data: {")][-1])["mmguard"]
    assert report["input"]["flagged"] and report["output"] == []
    assert not [c for c in guard.seen if c.judged_role == "agent"]  # no answer was judged


def test_score_mode_judges_reasoning_as_block_mode_does() -> None:
    """With judge_reasoning, a streamed answer is judged as its reasoning, a blank line, and the answer: the text
    block mode judges, so what a shadow deployment measures is what blocking would decide on."""
    from test_proxy import scripted_upstream, through_proxy

    thought, answer = f"They want {TRIGGER} steps.", "I can't help with that."
    app = scripted_upstream({"reasoning_content": thought, "content": answer},
                            [*({"reasoning_content": w + " "} for w in thought.split(" ")), {"content": answer}])
    judged: dict[str, list[str]] = {}
    for mode in ("block", "score"):
        guard = KeywordGuard()
        through_proxy(app, guard, mode=mode, judge_reasoning=True, check_every=1000)
        judged[mode] = [c.turns[-1].text for c in guard.seen if c.judged_role == "agent"]
    assert judged["score"] == judged["block"] == [f"{thought}\n\n{answer}", f"{thought} \n\n{answer}"]


class BrokenGuard(KeywordGuard):
    def classify_batch(self, conversations: Any, **kw: Any) -> Any:
        raise RuntimeError("the model's device went away")


def test_a_shadow_never_changes_what_traffic_gets() -> None:
    """A request the guard cannot read (two images) and a guard that fails: block mode answers 400 and 503, score
    mode forwards the request as it came and reports that the checks could not run."""
    from test_proxy import png_data_url

    two = [{"role": "user", "content": [{"type": "text", "text": "compare"},
                                        {"type": "image_url", "image_url": {"url": png_data_url()}},
                                        {"type": "image_url", "image_url": {"url": png_data_url()}}]}]
    upstream = StubUpstream("fine")
    with score_proxy(upstream, KeywordGuard()) as url:
        unreadable = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": two}, timeout=30)
    assert unreadable.status_code == 200 and len(upstream.requests) == 1
    assert upstream.requests[0]["body"]["messages"] == two  # forwarded as it came
    report = unreadable.json()["mmguard"]
    assert report["input"]["error"].startswith("the input check failed: ") and "image" in report["input"]["error"]
    assert report["output"][0]["flagged"] is False  # the answer is still judged, after an empty user turn
    with score_proxy(upstream, BrokenGuard()) as url:
        plain = httpx.post(url + "/v1/chat/completions", json=PROMPT, timeout=30)
        stream = httpx.post(url + "/v1/chat/completions", json={**PROMPT, "stream": True}, timeout=30)
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "fine"
    report = plain.json()["mmguard"]
    assert "error" in report["input"] and "error" in report["output"][0]
    last = json.loads([x[6:] for x in stream.text.splitlines() if x.startswith("data: {")][-1])["mmguard"]
    assert stream.status_code == 200 and "error" in last["input"] and stream.text.endswith("data: [DONE]\n\n")
    with LiveApp(upstream.app) as up, LiveProxy(BrokenGuard(), proxy_settings(up.url + "/v1")) as srv:
        assert httpx.post(srv.url + "/v1/chat/completions", json=PROMPT, timeout=30).status_code == 503
        assert httpx.post(srv.url + "/v1/chat/completions", json={"model": "m", "messages": two},
                          timeout=30).status_code == 400


def test_the_access_log_counts_what_a_shadow_would_have_blocked(caplog: pytest.LogCaptureFixture) -> None:
    """What an operator sums from a shadow deployment, one JSON line per request: the rails that flagged, the
    codes, the checks that could not run; never the content."""
    import logging

    from mmguard.server.jsonlog import JsonFormatter

    caplog.set_level(logging.INFO, logger="mmguard.server.access")
    upstream = StubUpstream(ANSWER)
    with score_proxy(upstream, KeywordGuard()) as url:
        httpx.post(url + "/v1/chat/completions", json=PROMPT, timeout=30)
        httpx.post(url + "/v1/chat/completions", json={**PROMPT, "stream": True}, timeout=30)
        upstream.answer = "fine"
        httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "hello"}]}, timeout=30)
    fmt = JsonFormatter()
    records = [json.loads(fmt.format(r)) for r in caplog.records if r.name == "mmguard.server.access"]
    chats = [r for r in records if r.get("path") == "/v1/chat/completions"]
    assert [(r["mode"], r.get("rail"), r.get("flagged"), r.get("codes")) for r in chats] == [
        ("score", "input,output", 2, ["S1"]), ("score", "input,output", 2, ["S1"]), ("score", None, None, None)]
    assert not any(TRIGGER in json.dumps(r) for r in chats)
