"""``mmguard serve``: options reach the app (uvicorn itself is replaced, nothing listens)."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

pytest.importorskip("uvicorn")

from mmguard.server.cli import command

app = typer.Typer()
app.command("serve")(command)
app.command("unused")(lambda: None)  # two commands: typer then expects the command name, as mmguard does


@pytest.mark.parametrize("fast", [False, True])
def test_serve_builds_the_app_with_the_chosen_engine(tiny_model_dir, monkeypatch, fast: bool) -> None:
    import uvicorn

    import mmguard.server.app as server_app
    from mmguard.fast import FastEngine

    started: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: started.update(app=app_, **kw))
    real_create_app = server_app.create_app
    monkeypatch.setattr(server_app, "create_app",
                        lambda guard, settings=None: started.update(guard=guard) or real_create_app(guard, settings))
    args = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "8123"]
    res = CliRunner().invoke(app, args + (["--fast"] if fast else []))
    assert res.exit_code == 0, res.output
    assert started["port"] == 8123 and started["host"] == "127.0.0.1"
    assert started["app"] is not None
    assert isinstance(started["guard"].engine, FastEngine) == fast


def test_serve_passes_fast_engine_options(tiny_model_dir, monkeypatch) -> None:
    import uvicorn

    import mmguard.server.app as server_app

    started: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: started.update(app=app_, **kw))
    real_create_app = server_app.create_app
    monkeypatch.setattr(server_app, "create_app",
                        lambda guard, settings=None: started.update(guard=guard) or real_create_app(guard, settings))
    args = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--fast", "--keep-images", "5",
            "--mask-free-text"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    engine = started["guard"].engine
    assert (engine.keep_images, engine.mask_free_text, engine.quantize) == (5, True, None)


def test_serve_refuses_fp8_on_a_cpu(tiny_model_dir) -> None:
    res = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--quantize", "fp8"])
    assert res.exit_code == 3
    assert "compute capability" in res.output
