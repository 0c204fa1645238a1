"""``mmguard soup``: weighted means of checkpoint weights (model soups), and the errors of bad ingredients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmguard.train.soup import SoupConfig, SoupError, lora_cross_term_error, make_soup

LORA_A = "base_model.model.layers.0.q_proj.lora_A.weight"
LORA_B = "base_model.model.layers.0.q_proj.lora_B.weight"


def _adapter(folder: Path, seed: int, *, extra: str | None = None, alpha: int = 8, base: str = "smollm2",
             nan: bool = False) -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {
        LORA_A: torch.randn(4, 8, generator=g).to(torch.bfloat16),
        LORA_B: torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "base_model.model.vision.proj.weight": torch.randn(3, 3, generator=g),  # float32, a full tensor
        "base_model.model.counter": torch.tensor([seed]),  # an integer buffer
    }
    if extra:
        state[extra] = torch.zeros(2)
    if nan:
        state[LORA_B][0, 0] = float("nan")
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": alpha, "seed": seed}))
    (folder / "mmguard.json").write_text(json.dumps({"base": base, "seed": seed}))
    return folder


def test_soup_is_the_weighted_mean_in_each_tensors_dtype(tmp_path: Path) -> None:
    a, b = _adapter(tmp_path / "a", 0), _adapter(tmp_path / "b", 1)
    out = make_soup(SoupConfig([a, b], tmp_path / "soup", weights=[3, 1]))
    soup, sa, sb = (load_file(str(f / "adapter_model.safetensors")) for f in (out, a, b))
    assert soup.keys() == sa.keys()
    for key in (LORA_A, LORA_B, "base_model.model.vision.proj.weight"):
        assert soup[key].dtype == sa[key].dtype
        expected = (0.75 * sa[key].float() + 0.25 * sb[key].float()).to(sa[key].dtype)
        assert torch.equal(soup[key], expected), key
    assert torch.equal(soup["base_model.model.counter"], sa["base_model.model.counter"])  # not averaged
    # the other files come from the first ingredient; soup.json says what went in
    assert json.loads((out / "adapter_config.json").read_text())["seed"] == 0
    record = json.loads((out / "soup.json").read_text())
    assert record["weights"] == [0.75, 0.25] and record["ingredients"] == [str(a), str(b)]
    assert record["weight_file"] == "adapter_model.safetensors"
    assert record["lora_cross_term_error_max"] > 0  # random, unrelated factors: the cross terms are not small


def test_cross_term_error_is_zero_for_equal_ingredients_and_matches_a_hand_computation() -> None:
    a = {LORA_A: torch.tensor([[1.0, 0.0]]), LORA_B: torch.tensor([[1.0]])}
    b = {LORA_A: torch.tensor([[0.0, 1.0]]), LORA_B: torch.tensor([[1.0]])}
    assert lora_cross_term_error([a, a], [0.5, 0.5]) == 0.0
    # mean of products: [[0.5, 0.5]]; product of means: [[0.5, 0.5]] (B equal): no error
    assert lora_cross_term_error([a, b], [0.5, 0.5]) == pytest.approx(0.0)
    c = {LORA_A: torch.tensor([[0.0, 1.0]]), LORA_B: torch.tensor([[3.0]])}
    # mean of products [[0.5, 1.5]]; product of means 2 * [[0.5, 0.5]] = [[1, 1]]: error |(.5,-.5)| / |(.5,1.5)|
    assert lora_cross_term_error([a, c], [0.5, 0.5]) == pytest.approx((0.5**0.5) / (2.5**0.5))
    assert lora_cross_term_error([{"w": torch.ones(2)}] * 2, [0.5, 0.5]) is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: SoupConfig([_adapter(t / "a", 0)], t / "o"), "at least 2"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), _adapter(t / "b", 1)], t / "o", weights=[1]), "1 weights"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), _adapter(t / "b", 1)], t / "o", weights=[1, -1]), ">= 0"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), _adapter(t / "b", 1)], t / "o", weights=[0, 0]), "positive"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), _adapter(t / "b", 1)], t / "o", weights=[1, float("nan")]),
         ">= 0"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), _adapter(t / "b", 1, extra="x")], t / "o"), "other tensors"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), t / "a"], t / "a"), "is an ingredient"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), t], t / "o"), "no adapter_model.safetensors"),
        # the first one's configuration is copied: the others must be read the same way
        (lambda t: SoupConfig([_adapter(t / "a", 0), _adapter(t / "b", 1, alpha=800)], t / "o"),
         r"adapter_config.json differs .*lora_alpha"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), _adapter(t / "b", 1, base="other")], t / "o"),
         r"mmguard.json differs .*base"),
        (lambda t: SoupConfig([_adapter(t / "a", 0), _adapter(t / "b", 1, nan=True)], t / "o"),
         "lora_B.weight holds NaN"),
    ],
)
def test_bad_ingredients_are_clear_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(SoupError, match=message):
        make_soup(make(tmp_path))


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    a = _adapter(tmp_path / "a", 0)
    b = tmp_path / "b"
    b.mkdir()
    state = load_file(str(a / "adapter_model.safetensors"))
    state[LORA_A] = torch.zeros(5, 8, dtype=torch.bfloat16)
    save_file(state, str(b / "adapter_model.safetensors"))
    for name in ("adapter_config.json", "mmguard.json"):
        (b / name).write_text((a / name).read_text())
    with pytest.raises(SoupError, match=r"lora_A.weight has shape \(5, 8\), not \(4, 8\)"):
        make_soup(SoupConfig([a, b], tmp_path / "o"))


def test_a_soup_of_full_checkpoints_loads_as_a_guard(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Plumbing on tiny random models: a soup weighted (1, 0) classifies exactly as its first ingredient,
    and the CLI writes a loadable guard (random weights: nothing here is about quality)."""
    from mmguard.cli import _register_tools, app
    from mmguard.conversation import Conversation
    from mmguard.guard import Guard
    from mmguard.tiny import make_tiny_checkpoint

    if not any(c.name == "eval" for c in app.registered_commands):
        _register_tools([])  # every tool, as tests/test_hardening_cli.py expects to find them
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    runner = CliRunner()
    result = runner.invoke(app, ["soup", str(tiny_model_dir), str(other), "--out", str(tmp_path / "first"),
                                 "--weight", "1", "--weight", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["weight_file"] == "model.safetensors"
    conv = Conversation.prompt("How do I pick a lock?")
    p = {name: Guard.from_pretrained(folder, device="cpu", dtype="float32").classify(conv).unsafe_probability
         for name, folder in (("tiny", tiny_model_dir), ("other", other), ("first", tmp_path / "first"))}
    assert p["first"] == p["tiny"] and p["other"] != p["tiny"]

    result = runner.invoke(app, ["soup", str(tiny_model_dir), str(other), "--out", str(tmp_path / "half")])
    assert result.exit_code == 0, result.output
    half = Guard.from_pretrained(tmp_path / "half", device="cpu", dtype="float32").classify(conv)
    assert 0.0 <= half.unsafe_probability <= 1.0

    result = runner.invoke(app, ["soup", str(tiny_model_dir), str(tmp_path / "nowhere"), "--out", "x"])
    assert result.exit_code == 2 and "not a folder" in result.output
