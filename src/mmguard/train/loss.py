"""The training loss: cross-entropy on the answer tokens only, the vocabulary projected only there."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["answer_logits", "answer_loss"]


def answer_logits(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` at the supervised positions only (the vocabulary projection runs only there)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    prefix = inputs.pop("prefix_ids", None)
    base = model
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    if prefix is not None:
        inputs.update(_shared_prefix_inputs(base, prefix, inputs["input_ids"]))
    hidden = base.model(**inputs, use_cache=prefix is not None).last_hidden_state
    target = labels[:, 1:]
    mask = target != -100
    return base.lm_head(hidden[:, :-1][mask]), target[mask]


def _shared_prefix_inputs(base: Any, prefix: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
    """The prefix's KV, computed once (with gradients) and broadcast over the rows, as a cache the rows'
    forward extends; their positions continue the prefix's."""
    from transformers import DynamicCache

    from ..engine import _cache_of

    cache = _cache_of(base.model(input_ids=prefix, use_cache=True))
    cross = set(base.config.text_config.cross_attention_layers)
    n = rows.shape[0]
    data = [(None, None) if idx in cross else (layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1))
            for idx, layer in enumerate(cache.layers)]
    start = prefix.shape[1]
    positions = torch.arange(start, start + rows.shape[1], device=rows.device)[None].expand(n, -1)
    return {"cache": DynamicCache(ddp_cache_data=data, config=base.config), "position_ids": positions}


def answer_loss(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over supervised positions."""
    logits, target = answer_logits(model, inputs)
    return torch.nn.functional.cross_entropy(logits.float(), target)
