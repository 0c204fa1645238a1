"""The Ray tests (tests/ray_inner/ray_checks.py: ``mmguard batch --engine ray`` killed and resumed, Ray Serve
against ``mmguard serve``), run as one pytest process inside a fresh network namespace with only loopback:
Ray binds and connects on non-loopback addresses even when told 127.0.0.1, and must never do so here.
A PID namespace too, so no Ray process outlives the run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
INNER = "tests/ray_inner/ray_checks.py"


def _namespace_command() -> list[str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("Ray tests need unshare and ip (util-linux, iproute2) for a loopback-only network namespace")
    for cmd in (["unshare", "-n", "-p", "-f", "--mount-proc"], ["unshare", "-n"]):
        probe = subprocess.run([*cmd, "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return cmd
    pytest.skip(f"unshare -n is not permitted here ({probe.stderr.decode().strip()[:200]}); Ray tests need a "
                "loopback-only network namespace (run as root)")


def test_ray_checks_in_a_loopback_only_namespace() -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'mmguard[ray]')")
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    inner = f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider -W ignore {INNER}"
    res = subprocess.run([*_namespace_command(), "sh", "-c", inner], cwd=REPO, capture_output=True, text=True,
                         timeout=480)
    tail = (res.stdout[-6000:] + "\n" + res.stderr[-3000:]).strip()
    assert res.returncode == 0, tail
    last = res.stdout.strip().splitlines()[-1]
    assert "2 passed" in last and "skipped" not in last and "failed" not in last, tail


def test_serve_application_builder_reads_serve_run_arguments(monkeypatch) -> None:
    """``serve run mmguard.server.ray_serve:build_app key=value ...``: strings become the guard's arguments,
    the replica options and ServerSettings (binding an application starts no cluster)."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    from mmguard.server.ray_serve import build_app

    monkeypatch.setenv("MMGUARD_API_KEYS", "k1,k2")
    d = build_app({"model": "m", "device": "cuda", "min_replicas": "1", "max_replicas": "4",
                   "target_ongoing_requests": "8", "max_batch_size": "8"})._bound_deployment
    assert d.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0}  # one GPU per replica
    scaling = d._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8)
    guard_args, settings = d.init_args
    assert guard_args == {"model": "m", "device": "cuda"}
    assert settings.max_batch_size == 8 and settings.api_keys == ("k1", "k2")
    d = build_app({"model": "m", "device": "cpu", "num_replicas": "3", "api_keys": "x"})._bound_deployment
    assert d.num_replicas == 3 and d.ray_actor_options["num_gpus"] == 0.0
    assert d.init_args[1].torch_threads == 1 and d.init_args[1].api_keys == ("x",)
    with pytest.raises(ValueError, match="unknown argument 'replicas'"):
        build_app({"model": "m", "replicas": "2"})
