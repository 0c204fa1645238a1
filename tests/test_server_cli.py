"""``mmguard serve``: options reach the app (uvicorn itself is replaced, nothing listens)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

pytest.importorskip("uvicorn")

from mmguard.server.cli import command

app = typer.Typer()
app.command("serve")(command)
app.command("unused")(lambda: None)  # two commands: typer then expects the command name, as mmguard does


def _run_lifespan(monkeypatch, started: dict[str, Any]) -> None:
    """uvicorn.Server.run replaced by a TestClient: the app's lifespan (and its background model load) runs
    in process, nothing listens beyond the socket `serve` binds first."""
    import uvicorn
    from fastapi.testclient import TestClient

    def fake_run(self: uvicorn.Server, sockets: Any = None) -> None:
        app_ = self.config.app
        started.update(app=app_, port=sockets[0].getsockname()[1], host=sockets[0].getsockname()[0])
        with TestClient(app_) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
                time.sleep(0.05)
            started["guard"] = app_.state.mmguard.guard
            started["models"] = client.get("/v1/models").json()
        for sock in sockets:
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)


@pytest.mark.parametrize("fast", [False, True])
def test_serve_builds_the_app_with_the_chosen_engine(tiny_model_dir, monkeypatch, fast: bool) -> None:
    from mmguard.fast import FastEngine

    started: dict[str, Any] = {}
    _run_lifespan(monkeypatch, started)
    args = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "0"]
    res = CliRunner().invoke(app, args + (["--fast"] if fast else []))
    assert res.exit_code == 0, res.output
    assert started["host"] == "127.0.0.1" and started["port"] > 0
    assert isinstance(started["guard"].engine, FastEngine) == fast
    # defect 7 of issue 14: the model id is the loaded model's (its directory name), not the 11B's
    assert [m["id"] for m in started["models"]["data"]] == [tiny_model_dir.name]


def test_serve_model_id_overrides(tiny_model_dir, monkeypatch) -> None:
    started: dict[str, Any] = {}
    _run_lifespan(monkeypatch, started)
    args = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "0", "--model-id", "my-guard"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert [m["id"] for m in started["models"]["data"]] == ["my-guard"]


def test_serve_passes_fast_engine_options(tiny_model_dir, monkeypatch) -> None:
    started: dict[str, Any] = {}
    _run_lifespan(monkeypatch, started)
    args = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "0", "--fast",
            "--keep-images", "5", "--mask-free-text"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    engine = started["guard"].engine
    assert (engine.keep_images, engine.mask_free_text, engine.quantize) == (5, True, None)


def test_serve_on_a_busy_port_fails_fast_before_loading(monkeypatch) -> None:
    import socket

    import mmguard.guard

    def must_not_load(*a: Any, **kw: Any) -> None:
        raise AssertionError("the model was loaded although the port is busy")

    monkeypatch.setattr(mmguard.guard.Guard, "from_pretrained", must_not_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", "--device", "cpu", "--port", str(port)])
    assert res.exit_code == 2, res.output
    assert f"cannot listen on 127.0.0.1:{port}" in res.output and len(res.output.strip().splitlines()) == 1


def test_serve_with_a_missing_policy_fails_before_loading(monkeypatch, tmp_path) -> None:
    import mmguard.guard

    def must_not_load(*a: Any, **kw: Any) -> None:
        raise AssertionError("the model was loaded although the policy file is missing")

    monkeypatch.setattr(mmguard.guard.Guard, "from_pretrained", must_not_load)
    res = CliRunner().invoke(app, ["serve", "--device", "cpu", "--port", "0", "--policy", str(tmp_path / "no.yaml")])
    assert res.exit_code == 2, res.output
    assert "--policy" in res.output and "not found" in res.output and len(res.output.strip().splitlines()) == 1


def test_serve_refuses_fp8_on_a_cpu(tiny_model_dir, monkeypatch) -> None:
    started: dict[str, Any] = {}
    _run_lifespan(monkeypatch, started)
    res = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "0",
                                   "--quantize", "fp8"])
    assert res.exit_code == 3
    assert "compute capability" in res.output
