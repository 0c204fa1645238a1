"""Model soups: the weights of fine-tuned guards averaged into one (Wortsman et al. 2022, "Model soups").

Ingredients must share an architecture and a starting point (for mmguard-mini: stages warm-started from the
same adapters), so that a weighted mean of their weights is itself a good model. A soup costs nothing at
inference: the result is one checkpoint of the same shape and size.

Only ``adapter_model.safetensors`` (LoRA or PEFT checkpoints) and ``model.safetensors`` (full checkpoints) are
averaged; every other file (configuration, tokenizer, ``mmguard.json``) is copied from the first ingredient,
and a ``soup.json`` records the ingredients and weights. LoRA factors are averaged apart (mean of A times mean
of B, not the mean of the products B·A): for ingredients close to each other the cross terms are small, and the
soup keeps the rank and file size of one ingredient. ``lora_cross_term_error`` measures how small.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import read_json_object

__all__ = ["WEIGHT_FILES", "SoupConfig", "SoupError", "lora_cross_term_error", "make_soup"]

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


class SoupError(ValueError):
    """Ingredients that cannot be averaged (missing files, other tensors or shapes, bad weights)."""


@dataclass
class SoupConfig:
    """What to average: checkpoint folders and their weights (uniform when ``weights`` is empty)."""

    ingredients: Sequence[Path]
    out: Path
    weights: Sequence[float] = field(default_factory=tuple)

    def normalized_weights(self) -> list[float]:
        n = len(self.ingredients)
        if n < 2:
            raise SoupError(f"a soup needs at least 2 ingredients, got {n}")
        weights = list(self.weights) or [1.0] * n
        if len(weights) != n:
            raise SoupError(f"{len(weights)} weights for {n} ingredients")
        if any(not (w >= 0 and math.isfinite(w)) for w in weights) or max(weights) <= 0:  # NaN fails both
            raise SoupError(f"weights must be finite and >= 0 with a positive sum, got {weights}")
        largest = max(weights)
        scaled = [w / largest for w in weights]  # first: 1e308 + 1e308 overflows to inf, and every weight to 0
        total = sum(scaled)
        return [w / total for w in scaled]


def _weight_file(folder: Path) -> str:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return name
    raise SoupError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


# what decides how an ingredient's weights are read: ingredients must agree on it, as only the first one's files
# are copied (lora_alpha 32 against 3200 was averaged and written under the first's scaling)
_SETUP_KEYS = {
    "adapter_config.json": ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "layers_to_transform",
                            "layers_pattern", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "bias"),
    "mmguard.json": ("base", "adapter"),
}
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}


def _setup(folder: Path) -> dict[str, object]:
    """What of an ingredient's configuration files must match the others'."""
    out: dict[str, object] = {}
    for name in (*_SETUP_KEYS, "config.json"):
        path = folder / name
        if not path.exists():
            out[name] = None
            continue
        try:
            data = read_json_object(path)
        except ValueError as err:
            raise SoupError(str(err)) from None
        keys = _SETUP_KEYS.get(name) or sorted(set(data) - _CONFIG_IGNORED)
        out[name] = {k: sorted(map(str, v)) if isinstance(v, (list, set)) and k == "target_modules" else v
                     for k in keys if (v := data.get(k)) is not None}
    return out


def _load_ingredients(folders: Sequence[Path]) -> tuple[str, list[dict[str, torch.Tensor]]]:
    names = {_weight_file(Path(f)) for f in folders}
    if len(names) != 1:
        raise SoupError(f"ingredients mix checkpoint kinds: {sorted(names)}")
    setup = _setup(Path(folders[0]))
    for folder in folders[1:]:
        other = _setup(Path(folder))
        for file, wanted in setup.items():
            if other[file] != wanted:
                got = other[file]
                diff = (sorted(k for k in set(wanted) | set(got) if wanted.get(k) != got.get(k))[:4]
                        if isinstance(wanted, dict) and isinstance(got, dict) else "present in one only")
                raise SoupError(f"{folder}: its {file} differs from {folders[0]}'s ({diff}): ingredients must share "
                                "a setup")
    name = names.pop()
    states = []
    for folder in folders:
        try:
            states.append(load_file(str(Path(folder) / name)))
        except (SafetensorError, OSError) as err:  # truncated, not safetensors, unreadable
            raise SoupError(f"{folder}: cannot read {name}: {err}") from None
    first = states[0]
    for folder, state in zip(folders[1:], states[1:], strict=True):
        if state.keys() != first.keys():
            extra = sorted(state.keys() ^ first.keys())[:3]
            raise SoupError(f"{folder}: other tensors than {folders[0]} (e.g. {extra})")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise SoupError(f"{folder}: {key} has shape {tuple(tensor.shape)}, not {tuple(first[key].shape)}")
    for folder, state in zip(folders, states, strict=True):
        bad = next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:  # it would spread into every soup weight it touches
            raise SoupError(f"{folder}: {bad} holds NaN or infinite values")
    return name, states


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for tensor, weight in zip(tensors, weights, strict=True):
        total.add_(tensor.float(), alpha=weight)
    return total


def make_soup(config: SoupConfig) -> Path:
    """Write the weighted mean of the ingredients' weights to ``config.out``; returns that folder.

    Means are taken in float32 and stored in each tensor's own dtype (the first ingredient's).
    """
    weights = config.normalized_weights()
    folders = [Path(f) for f in config.ingredients]
    name, states = _load_ingredients(folders)
    out = Path(config.out)
    if out.resolve() in {f.resolve() for f in folders}:
        raise SoupError(f"{out} is an ingredient: write the soup to a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoupError(f"cannot make {out}: {err.strerror or err}") from None
    soup: dict[str, torch.Tensor] = {}
    for key, tensor in states[0].items():
        if not tensor.is_floating_point():
            soup[key] = tensor  # integer buffers (counters, ids) are not averaged
            continue
        soup[key] = _weighted_sum([s[key] for s in states], weights).to(tensor.dtype).contiguous()
    for item in folders[0].iterdir():
        if item.is_file() and item.name not in WEIGHT_FILES and item.name != "soup.json":
            shutil.copy2(item, out / item.name)
    save_file(soup, str(out / name), metadata={"format": "pt"})
    record = {
        "ingredients": [str(f) for f in folders],
        "weights": weights,
        "weight_file": name,
        "lora_cross_term_error_max": lora_cross_term_error(states, weights),
    }
    (out / "soup.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def lora_cross_term_error(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> float | None:
    """Largest relative error, over LoRA pairs, of averaging A and B apart instead of the products B·A.

    ``None`` when the checkpoints hold no LoRA factors.
    """
    worst: float | None = None
    for key in states[0]:
        if ".lora_A." not in key:
            continue
        key_b = key.replace(".lora_A.", ".lora_B.")
        if key_b not in states[0]:
            continue
        exact = _weighted_sum([s[key_b].float() @ s[key].float() for s in states], weights)
        mean_a = _weighted_sum([s[key] for s in states], weights)
        mean_b = _weighted_sum([s[key_b] for s in states], weights)
        norm = float(exact.norm())
        if norm == 0.0:
            continue
        err = float((mean_b @ mean_a - exact).norm()) / norm
        worst = err if worst is None else max(worst, err)
    return worst
