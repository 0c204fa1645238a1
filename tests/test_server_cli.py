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
