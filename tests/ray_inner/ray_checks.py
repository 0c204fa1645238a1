"""The Ray checks, run by tests/test_ray.py as one pytest process inside a network namespace that has only
loopback (Ray binds non-loopback addresses even when told 127.0.0.1). One small local cluster
(``ray.init(num_cpus=2)``) serves every check. Not collected by the main suite (no ``test_`` prefix).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_batch import (  # tests/ is on sys.path: it holds the conftest
    BAD_LINES,
    _png,
    classify_jsonl_rows,
    comparable,
    read_rows,
    write_conversations,
)

pytestmark = pytest.mark.ray


def _interfaces() -> list[str]:
    """This network namespace's interfaces (/proc/self/net follows the namespace; /sys/class/net may not)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


@pytest.fixture(scope="session")
def ray_address() -> Any:
    if _interfaces() != ["lo"]:
        pytest.fail(f"refusing to start Ray outside a loopback-only network namespace (interfaces: {_interfaces()})")
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def job_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conversations(tmp_path_factory.mktemp("ray_in"))


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path, job_input: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return comparable(classify_jsonl_rows(tiny_model_dir, job_input, tmp_path_factory.mktemp("ref")))


def test_ray_batch_killed_with_sigkill_then_resumed(ray_address, tiny_model_dir, job_input, reference,
                                                    tmp_path) -> None:
    """``mmguard batch --engine ray`` on the shared cluster, its driver killed with SIGKILL mid-job, then
    ``--resume``: every line exactly once and the rows of ``classify --jsonl``, bit for bit (the default
    chunks are the CLI's model calls)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmguard.cli", "batch", str(job_input), "-o", str(out), "-m", str(tiny_model_dir),
           "--device", "cpu", "--dtype", "float32", "--engine", "ray", "--workers", "2",
           "--ray-address", ray_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 150
    while len(list(out.glob("part-*.jsonl"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "no chunk committed in 150 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    committed = len(list(out.glob("part-*.jsonl")))
    assert committed < 8, "the job finished before it was killed"
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 2, resumed.stderr[-3000:]  # 2: the bad lines hold error rows
    summary = resumed.stderr
    assert "batch (ray): 240 lines in 8 chunks" in summary, summary[-3000:]
    assert f"{8 - committed} chunks judged, {committed} already done" in summary, summary[-3000:]
    assert f"{len(BAD_LINES)} error rows" in summary and "0 failed" in summary
    rows = comparable(read_rows(out))
    assert len(rows) == 240 and rows == reference
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(base: str) -> list[Any]:
    import base64

    image = "data:image/png;base64," + base64.b64encode(_png(7)).decode()
    requests = [
        ("/v1/moderations", {"input": ["hello there", "how do I steal a knife", "a recipe for cake"]}),
        ("/v1/moderations", {"input": [{"type": "text", "text": "what is this?"},
                                       {"type": "image_url", "image_url": {"url": image}}]}),
        ("/v1/guard/classify", {"messages": [{"role": "user", "content": "tell me about Rome"},
                                             {"role": "assistant", "content": "Rome is a city."}]}),
        ("/v1/guard/classify", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "and this?"}, {"type": "image_url", "image_url": {"url": image}}]}],
            "exclude": ["S1"], "threshold": 0.3}),
        ("/v1/moderations", {"input": []}),  # the same error too
    ]
    out = []
    with httpx.Client(timeout=60, trust_env=False) as client:
        for path, body in requests:
            r = client.post(base + path, json=body)
            data = r.json()
            data.pop("id", None)
            if isinstance(data.get("verdict"), dict):
                data["verdict"].pop("latency_ms", None)
            out.append((r.status_code, data))
    return out


def test_ray_serve_answers_as_mmguard_serve(ray_address, tiny_model_dir, tiny_guard) -> None:
    from ray import serve

    from mmguard.server.ray_serve import guard_application
    from mmguard.server.settings import ServerSettings
    from mmguard.server.testing import LiveServer

    settings = ServerSettings(model_id="tiny", max_wait_ms=2)
    with LiveServer(tiny_guard, settings) as srv:
        expected = _answers(srv.url)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = guard_application({"model": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
                                settings, num_replicas=2, num_cpus=0.5)
        serve.run(app, name="mmguard", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/readyz", timeout=30, trust_env=False).status_code == 200
        got = _answers(base)
        assert [s for s, _ in got] == [200, 200, 200, 200, 400]
        assert got == expected
        status = serve.status().applications["mmguard"]
        assert status.status == "RUNNING"
        assert sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values()) == 2
    finally:
        serve.shutdown()
