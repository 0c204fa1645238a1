"""bench/proxy_overhead.py runs end to end (stub upstream, tiny guard: plumbing only, its timings mean nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest


def run_bench(tmp_path: Path, tiny_model_dir: Path, *extra: str) -> dict[str, Any]:
    path = Path(__file__).resolve().parents[1] / "bench" / "proxy_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_proxy_overhead", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "overhead.json"
    assert bench.main(["--stub", "--model", str(tiny_model_dir), "--threshold", "1.0", "--tokens", "40",
                       "--check-every", "8", "--reps", "1", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_proxy_overhead_bench_runs(tmp_path: Path, tiny_model_dir: Path, api: str) -> None:
    report = run_bench(tmp_path, tiny_model_dir, "--api", api)
    assert report["api"] == api and report["same_text"]
    assert report["content_chunks"] == report["proxy_content_chunks"] == 40
    assert report["finish_reason_direct"] == report["finish_reason_proxy"] == {"chat": "stop",
                                                                               "responses": "completed"}[api]
    assert report["direct_s"] > 0 and report["proxy_s"] > 0
    assert any('rail="output"' in line for line in report["checks"])
