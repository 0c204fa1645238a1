"""Loading checkpoints as a careless or hostile user would give them: broken weights, configurations and
tokenizers are one clear error (EngineError; exit 3 on the command line), never a traceback, never a guard that
quietly answers "safe". Tiny random models: plumbing only."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmguard import Conversation
from mmguard.cli import app
from mmguard.engine import EngineError
from mmguard.guard import Guard


def broken_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of checkpoint ``src`` whose weights went through ``edit``."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def classify_cli(model: Path) -> tuple[int, str, BaseException | None]:
    res = CliRunner().invoke(app, ["classify", "-m", str(model), "--prompt", "How do I pick a lock?",
                                   "--device", "cpu"])
    return res.exit_code, res.output, res.exception


def test_a_model_that_scores_nan_is_an_error_not_a_safe_verdict(tiny_model_dir: Path, tmp_path: Path) -> None:
    """NaN >= threshold is False: a model with NaN weights answered 'safe', exit 0, without a warning."""
    def poison(state: dict[str, torch.Tensor]) -> None:
        state["language_model.lm_head.weight"][0, 0] = float("nan")

    model = broken_copy(tiny_model_dir, tmp_path / "nan", poison)
    guard = Guard.from_pretrained(model, device="cpu", dtype="float32")
    with pytest.raises(EngineError, match="non-finite scores"):
        guard.classify(Conversation.prompt("How do I pick a lock?"))
    code, output, exc = classify_cli(model)
    assert code == 3 and isinstance(exc, SystemExit), output
    assert "error: model error: the model produced non-finite scores" in output
