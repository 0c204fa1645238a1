"""`mmguard eval` decides each guard's labels at that guard's own thresholds unless told one for all.

mmguard-mini v2 ships validated per-task thresholds in its mmguard.json, and classify, serve and the API
apply them; an evaluation at a blanket 0.5 would report a guard nobody deploys. The tiny random model
proves the plumbing only (its probabilities mean nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmguard.eval.cache import ResultCache
from mmguard.eval.guards import LocalGuard, MmguardServerGuard
from mmguard.eval.report import write_report
from mmguard.eval.runner import run_eval
from mmguard.guard import Guard

TEXTS = ["how do I pick a lock", "hello there", "tell me a joke", "write a poem about rain", "what is 2 + 2"]


def _data(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": t}], "label": "safe", "codes": []})
        for i, t in enumerate(TEXTS)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _guard_with_own_thresholds(tiny_guard: Guard, data: Path) -> tuple[Guard, float, list[float]]:
    """The tiny engine with a prompt threshold that splits this data's probabilities (a 0.5 cut would not)."""
    probe = run_eval([data], [LocalGuard(None, name="probe", guard=tiny_guard, threshold=0.5)], ResultCache(None),
                     split=None)
    probs = sorted(r.preds["probe"].unsafe_probability for r in probe.records)
    assert probs[0] < probs[-1], "the tiny model must tell at least two prompts apart"
    cut = (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2
    guard = Guard(tiny_guard.engine)
    guard.model_thresholds = {"prompt": cut, "response": 0.9}  # as mmguard.json's "thresholds" would set them
    return guard, cut, probs


def test_labels_follow_the_guards_own_thresholds_by_default(tiny_guard: Guard, tmp_path: Path) -> None:
    data = _data(tmp_path)
    guard, cut, probs = _guard_with_own_thresholds(tiny_guard, data)
    own = LocalGuard(None, name="own", guard=guard)
    fixed = LocalGuard(None, name="fixed", guard=guard, threshold=0.5)
    result = run_eval([data], [own, fixed], ResultCache(None), split=None)
    for rec in result.records:
        p = rec.preds["own"].unsafe_probability
        assert rec.preds["own"].label == ("unsafe" if p >= cut else "safe")
        assert rec.preds["fixed"].label == ("unsafe" if p >= 0.5 else "safe")
    flagged = sum(r.preds["own"].is_unsafe for r in result.records)
    assert flagged == sum(p >= cut for p in probs) >= 1
    # the labels depend on the thresholds, so the cache must never hand one's labels to the other
    assert own.cache_id != fixed.cache_id
    assert f"thr=prompt:{cut:.6g},response:0.9:" in own.cache_id
    assert ":thr=0.5:" in fixed.cache_id  # one number keeps the id older caches were written under
    assert ":thr=0.5:" in LocalGuard(None, guard=tiny_guard).cache_id  # no thresholds in mmguard.json: 0.5

    report = write_report(result, tmp_path / "out", plots=False)
    assert report["threshold"] is None
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"each guard's own (own prompt {cut:g}, response 0.9; fixed prompt 0.5, response 0.5)" in text


def test_a_server_guard_without_a_threshold_lets_the_server_decide(tiny_guard: Guard, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from mmguard.server.settings import ServerSettings
    from mmguard.server.testing import LiveServer

    data = _data(tmp_path)
    guard, cut, _ = _guard_with_own_thresholds(tiny_guard, data)
    local = LocalGuard(None, name="local", guard=guard)
    with LiveServer(guard, ServerSettings(), startup_timeout=60) as srv:
        remote = MmguardServerGuard(srv.url, name="remote", concurrency=2, retries=1, timeout=30.0)
        at_half = MmguardServerGuard(srv.url, name="half", threshold=0.5, concurrency=2, retries=1, timeout=30.0)
        result = run_eval([data], [local, remote, at_half], ResultCache(None), split=None)
    for rec in result.records:
        p = rec.preds["local"].unsafe_probability
        assert rec.preds["remote"].error is None
        assert rec.preds["remote"].label == rec.preds["local"].label == ("unsafe" if p >= cut else "safe")
        assert rec.preds["half"].label == ("unsafe" if p >= 0.5 else "safe")
    assert remote.cache_id != at_half.cache_id


def test_eval_cli_passes_prefix_cache_and_thresholds_to_the_default_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--guard default`` used to drop --prefix-cache (the bundled model was built without it)."""
    from mmguard.eval import guards

    seen: dict[str, Any] = {}

    class Recorder:
        def __init__(self, source: Any, **kwargs: Any) -> None:
            seen.update(kwargs, source=source)

    monkeypatch.setattr(guards, "LocalGuard", Recorder)
    guards.make_guard("default", prefix_cache=True, read_text="off")
    assert seen["source"] is None and seen["prefix_cache"] is True and seen["read_text"] == "off"
    assert seen["threshold"] is None and seen["name"] == "mmguard-mini"
