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


# -- the base rebuilt into the cache (mmguard-mini v2's SmolLM2): checked at every load ------------------------
@pytest.fixture
def fake_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The cache in tmp_path, and a build that writes small stand-in files (the real one takes ~40 s)."""
    import mmguard.base_models as bm

    monkeypatch.setenv("MMGUARD_CACHE", str(tmp_path / "cache"))
    calls = {"builds": 0}

    def build(target: Path) -> Path:
        calls["builds"] += 1

        def save(folder: Path) -> None:
            folder.mkdir(parents=True)
            for name in bm._REQUIRED:
                (folder / name).write_bytes(b"x" * 4096 if name == "model.safetensors" else b"{}")

        return bm.install_base(target, save, {"base": bm.BASE_NAME})

    monkeypatch.setattr(bm, "build_smollm2_mllama", build)
    return calls


def test_the_cached_base_is_built_once_and_rebuilt_when_damaged(fake_base: dict[str, int]) -> None:
    """A damaged cached base was used as it was (a megabyte flipped: the verdict changed, exit 0), and one without
    its marker was rebuilt at every load and then thrown away (the rename onto it failed, silently)."""
    import os

    from mmguard.base_models import MARKER, smollm2_mllama_base

    target = smollm2_mllama_base()
    assert fake_base["builds"] == 1 and smollm2_mllama_base() == target and fake_base["builds"] == 1
    weights = target / "model.safetensors"
    with weights.open("r+b") as fh:  # changed in place, same size
        fh.seek(1000)
        fh.write(b"y" * 100)
    os.utime(weights, ns=(0, 1))  # a time unlike the one recorded at build
    smollm2_mllama_base()
    assert fake_base["builds"] == 2 and weights.read_bytes() == b"x" * 4096
    with weights.open("r+b") as fh:  # truncated
        fh.truncate(100)
    smollm2_mllama_base()
    assert fake_base["builds"] == 3 and weights.stat().st_size == 4096
    (target / MARKER).unlink()  # unmarked: replaced whole, once
    (target / "leftover").write_text("junk")
    smollm2_mllama_base()
    assert fake_base["builds"] == 4 and not (target / "leftover").exists()
    smollm2_mllama_base()
    assert fake_base["builds"] == 4
    (target / "config.json").unlink()
    smollm2_mllama_base()
    assert fake_base["builds"] == 5 and (target / "config.json").is_file()


def test_a_dead_builds_temp_folder_is_removed_and_an_unwritable_cache_is_one_line(
        fake_base: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from mmguard.base_models import BASE_NAME, BaseModelError, smollm2_mllama_base

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / "cache" / f"{BASE_NAME}.tmp{dead.pid}"  # a build killed mid-save: kept for ever
    orphan.mkdir(parents=True)
    smollm2_mllama_base()
    assert not orphan.exists()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MMGUARD_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(BaseModelError, match=r"cannot write the model cache .*set MMGUARD_CACHE"):
        smollm2_mllama_base()
    assert fake_base["builds"] == 1  # refused before building


def test_an_installed_wheel_without_its_model_file_says_to_reinstall(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.machinery

    import mmguard.base_models as bm

    spec = importlib.machinery.ModuleSpec(bm.GGUF_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(bm.BaseModelError, match=r"has no .*reinstall it: pip install --force-reinstall"):
        bm.smollm2_gguf_path()
