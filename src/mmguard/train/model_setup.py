"""The model a run trains: mmguard-mini's architecture (from scratch), and which of a model's parameters train
(freezing, LoRA)."""

from __future__ import annotations

import functools
from typing import Any

from .config import TrainConfig

__all__ = ["MINI_TILE_SIZE", "apply_freeze", "apply_lora", "build_mini_model", "mini_config"]


MINI_TILE_SIZE = 112


def mini_config() -> Any:
    """The mmguard-mini architecture: Llama 3 vocabulary, hidden 48, 112 px tiles (see the model card).

    Four 112 px tiles show a square image at 224 px, where FigStep-size typography is still legible;
    at 56 px tiles (v1-v3) it was not, and the model learned to ignore images.
    """
    from ..tiny import small_mllama_config

    return small_mllama_config(
        vision={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "image_size": MINI_TILE_SIZE},
        text={
            "hidden_size": 48,  # the two 128k-row vocabulary matrices are ~95% of the bytes: keep the file < 30 MB
            "num_hidden_layers": 10,  # depth is nearly free in bytes
            "cross_attention_layers": [2, 5, 8],
            "intermediate_size": 256,
            "max_position_embeddings": 8192,
        },
    )


def build_mini_model(seed: int = 0, gate_init: float = 0.5) -> Any:
    """A freshly initialised mmguard-mini (random weights, deterministic given ``seed``)."""
    from ..tiny import random_mllama

    return random_mllama(mini_config(), seed=seed, gate_init=gate_init)


def _is_cross_attention(name: str, cross_layers: set[int]) -> bool:
    marker = "language_model.layers."
    if marker not in name:
        return False
    idx = int(name.split(marker, 1)[1].split(".", 1)[0])
    return idx in cross_layers


def apply_freeze(model: Any, freeze: list[str]) -> dict[str, int]:
    """Freeze parts of an Mllama model; returns counts of trainable and frozen parameters."""
    cross = set(model.config.text_config.cross_attention_layers)
    for name, p in model.named_parameters():
        part = "other"
        if "vision_model" in name or "multi_modal_projector" in name:
            part = "vision"
        elif _is_cross_attention(name, cross):
            part = "cross-attention"
        elif "language_model" in name or "lm_head" in name:
            part = "language"
        if part in freeze:
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    """LoRA on the language model. For ``--init mini2`` the adapters go on the pretrained (self-attention)
    layers only (``lora_from_layer``: those from that layer up), and the layers the base adds fresh
    (cross-attention, vision tower, projector) are trained whole (``modules_to_save``): together they are
    all a mini v2 checkpoint ships. Below the lowest layer with a trainable weight autograd runs no backward:
    on text-only batches (cross-attention layers skipped) that is ``lora_from_layer``; an image batch still
    backpropagates down to the first cross-attention layer, whose weights train."""
    from peft import LoraConfig, get_peft_model

    targets, modules_to_save = lora_targets(model, cfg)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", modules_to_save=modules_to_save)
    return saves_without_embeddings(get_peft_model(model, lcfg))


def saves_without_embeddings(peft_model: Any) -> Any:
    """The embeddings are never a target and stay frozen, so no save needs them. peft's default ("auto") asks the
    Hub for the base's config at every save (checkpoints included) when the base is not a local folder (mini2's
    is named by BASE_NAME): offline that is a failed lookup and two warnings each time, or a DNS wait."""
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
    return peft_model


def warm_start_lora(model: Any, cfg: TrainConfig) -> Any:
    """``--warm-start``'s adapters and new layers on ``model``, trainable again, checked against what this run's
    options would build: a warm start keeps its adapters' shape, and ``--lora-r 8 --lora-from-layer 20`` were
    ignored without a word; tensors that do not match their configuration are refused (peft drops them)."""
    from pathlib import Path

    from peft import PeftModel

    from ..checkpoints import check_adapters
    from ..engine import EngineError
    from ..files import read_json_object

    folder = Path(cfg.warm_start)  # type: ignore[arg-type]
    try:
        saved = read_json_object(folder / "adapter_config.json")
    except ValueError as err:
        raise EngineError(f"--warm-start: {err}") from None
    targets = lora_targets(model, cfg)[0]
    wanted = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": targets}
    names = {"r": "--lora-r", "lora_alpha": "--lora-alpha", "target_modules": "--lora-from-layer"}
    for key, value in wanted.items():
        if saved.get(key) != value:
            raise EngineError(f"--warm-start {folder}: its adapters have {key} {str(saved.get(key))[:80]}, but "
                              f"this run's {names[key]} asks for {str(value)[:80]}; a warm start keeps its "
                              "adapters' shape (pass the same options, or start afresh without --warm-start)")
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except Exception as err:
        raise EngineError(f"--warm-start {folder}: cannot load its adapters ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    check_adapters(peft_model, folder)
    return saves_without_embeddings(peft_model)


def lora_targets(model: Any, cfg: TrainConfig) -> tuple[str, list[str] | None]:
    """The adapted modules (a regex) and the modules trained whole, for ``cfg`` on ``model``."""
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    modules_to_save = None
    if cfg.init == "mini2":
        tc = model.config.text_config
        layers = [i for i in range(cfg.lora_from_layer, tc.num_hidden_layers) if i not in tc.cross_attention_layers]
        if not layers:
            raise ValueError(f"--lora-from-layer {cfg.lora_from_layer}: the model has {tc.num_hidden_layers} layers")
        pretrained = "|".join(str(i) for i in layers)
        targets = rf".*language_model\.layers\.({pretrained})\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
        modules_to_save = ["vision_model", "multi_modal_projector",
                           *(f"language_model.layers.{i}" for i in tc.cross_attention_layers)]
    return targets, modules_to_save
