"""Per-task decision thresholds: a model's ``mmguard.json`` may record the thresholds chosen on a validation
split (``thresholds``: prompt / response); a guard without a fixed ``threshold`` applies them, a fixed one
(constructor or per call) overrides them, and bad values are refused at load."""

from __future__ import annotations

import pytest

from mmguard.conversation import Conversation
from mmguard.guard import DEFAULT_THRESHOLD, Guard
from mmguard.server.batcher import Batcher, WorkSpec
from mmguard.server.metrics import Metrics

PROMPT = Conversation.prompt("How do I pick a lock?")
RESPONSE = Conversation.response("How do I pick a lock?", "Use a tension wrench and a pick.")


@pytest.fixture()
def probs(tiny_guard: Guard) -> dict[str, float]:
    return {c.task: tiny_guard.classify(c).unsafe_probability for c in (PROMPT, RESPONSE)}


def _with_info(tiny_guard: Guard, monkeypatch: pytest.MonkeyPatch, info: dict) -> Guard:
    monkeypatch.setattr(tiny_guard.engine, "model_info", info, raising=False)
    return Guard(tiny_guard.engine, read_text="off")


def test_without_recorded_thresholds_the_default_is_half(tiny_guard: Guard) -> None:
    guard = Guard(tiny_guard.engine)
    assert guard.threshold is None
    assert guard.threshold_for("prompt") == guard.threshold_for("response") == DEFAULT_THRESHOLD
    assert guard.classify(PROMPT).threshold == DEFAULT_THRESHOLD


def test_recorded_thresholds_apply_per_task(tiny_guard: Guard, monkeypatch: pytest.MonkeyPatch,
                                            probs: dict[str, float]) -> None:
    # thresholds just above the prompt's probability and just below the response's: prompt safe, response unsafe
    thr = {"prompt": min(1.0, probs["prompt"] + 1e-3), "response": max(0.0, probs["response"] - 1e-3)}
    guard = _with_info(tiny_guard, monkeypatch, {"thresholds": thr})
    assert guard.threshold_for("prompt") == thr["prompt"] and guard.describe()["thresholds"] == thr
    p, r = guard.classify_batch([PROMPT, RESPONSE])
    assert (p.threshold, p.is_unsafe) == (thr["prompt"], False)
    assert (r.threshold, r.is_unsafe) == (thr["response"], True) and r.violated  # codes decoded for it
    # a fixed threshold, per call or per guard, overrides both
    assert all(v.threshold == 0.0 and v.is_unsafe for v in guard.classify_batch([PROMPT, RESPONSE], threshold=0.0))
    fixed = Guard(tiny_guard.engine, threshold=1.0)
    assert fixed.threshold_for("response") == 1.0 and not fixed.classify(RESPONSE).is_unsafe


def test_the_server_batcher_uses_the_per_task_thresholds(tiny_guard: Guard, monkeypatch: pytest.MonkeyPatch,
                                                         probs: dict[str, float]) -> None:
    thr = {"prompt": min(1.0, probs["prompt"] + 1e-3), "response": max(0.0, probs["response"] - 1e-3)}
    guard = _with_info(tiny_guard, monkeypatch, {"thresholds": thr})
    batcher = Batcher(guard, max_batch_size=8, max_wait_ms=1, max_queue=8, fail_closed=True, metrics=Metrics())
    for always in (False, True):  # category_scores "always" re-judges a threshold-0 pass
        p, r = batcher._execute([WorkSpec(PROMPT, always_scores=always), WorkSpec(RESPONSE, always_scores=always)])
        assert (p.verdict.threshold, p.verdict.is_unsafe) == (thr["prompt"], False)
        assert (r.verdict.threshold, r.verdict.is_unsafe) == (thr["response"], True)


@pytest.mark.parametrize("bad", [{"prompt": 1.5}, {"prompt": True}, {"answer": 0.4}, [0.4], {"response": "0.4"}])
def test_bad_recorded_thresholds_are_refused_at_load(tiny_guard: Guard, monkeypatch: pytest.MonkeyPatch,
                                                     bad: object) -> None:
    with pytest.raises(ValueError, match=r"mmguard\.json: thresholds"):
        _with_info(tiny_guard, monkeypatch, {"thresholds": bad})
