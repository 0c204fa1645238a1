"""Mask-free, exact attention for Mllama's tiled vision encoder.

What the model's dense mask means (transformers' ``_prepare_aspect_ratio_attention_mask``, the same as
Meta's ``build_encoder_attention_mask``): a token is *padding* when it is one of the pad patches appended
to each tile (1601 -> 1608 tokens at 560 px) or any token of a padded tile (``aspect_ratio_mask == 0``).
The mask is the outer product of that padding indicator: it blocks only the pairs where BOTH the query
and the key are padding. So real queries attend to every key (padding included), and padding queries
attend to the real keys only.

Exact without the mask: put the real tokens first (a permutation; every other operation of an encoder
layer is token-wise), then

* ``sdpa(q[:R], k, v)``            real queries over all keys, no mask;
* ``sdpa(q[R:], k[:R], v[:R])``    padding queries over the real keys, no mask.

Both calls take PyTorch's flash / memory-efficient kernels, which the dense float mask rules out.

Two ways in:

* :func:`patch_vision_attention` replaces the ``forward`` of the vision attention modules of one loaded
  model instance (transformers is not edited). Through the ordinary HF forward the patched modules read the
  padding indicator off the diagonal of the dense mask and permute per layer (exact, partly faster).
* :func:`fast_vision_forward` is the HF vision forward re-written to build no dense mask at all: it
  permutes the tokens once, runs every encoder layer in the real-first layout, and undoes the
  permutation where the model needs the tile layout. Rows are grouped by their number of real tiles.
  ``skip="padded_tiles"`` / ``skip="padding"`` are opt-in approximations (not exact): an image's padded
  tiles are not encoded / no padding token is.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

SKIPS = (None, "padded_tiles", "padding")

__all__ = ["SKIPS", "fast_vision_forward", "is_patched", "patch_vision_attention", "two_call_attention",
           "unpatch_vision_attention"]


class _FastState:
    """Shared by the patched attention modules of one vision model: how many leading tokens are real."""

    def __init__(self) -> None:
        self.real: int | None = None  # set by fast_vision_forward: tokens are pre-sorted real-first
        self.plain: bool = False  # set by fast_vision_forward(skip="padding"): no padding present at all


def two_call_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: int, scale: float) -> torch.Tensor:
    """Attention of (B, H, L, D) tensors whose first ``real`` tokens are real and the rest padding, with
    the Mllama vision mask semantics (only padding-padding pairs blocked), without a mask tensor."""
    length = q.shape[2]
    if real >= length or real <= 0:
        # real <= 0 (an image without any real tile) does not occur: tile 0 is always real
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    a = F.scaled_dot_product_attention(q[:, :, :real], k, v, scale=scale)
    b = F.scaled_dot_product_attention(q[:, :, real:], k[:, :, :real], v[:, :, :real], scale=scale)
    return torch.cat([a, b], dim=2)


def _attention_from_dense_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Same result as the masked call, reading the padding indicator off the mask's diagonal
    (a token is padding iff its self-pair is blocked), then permuting per group of equal real counts."""
    pad = mask[:, 0].diagonal(dim1=-2, dim2=-1) != 0  # (B, L)
    counts = (~pad).sum(-1)
    out = torch.empty_like(q)
    for real in sorted(set(counts.tolist())):
        rows = (counts == real).nonzero().flatten()
        perm = torch.argsort(pad[rows].to(torch.int8), dim=-1, stable=True)  # real tokens first, order kept
        idx = perm[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
        qs, ks, vs = (t[rows].gather(2, idx) for t in (q, k, v))
        o = two_call_attention(qs, ks, vs, int(real), scale)
        out[rows] = torch.empty_like(o).scatter_(2, idx, o)
    return out


def _patched_forward(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    bsz, length, _ = hidden_states.shape
    shape = (bsz, length, self.num_heads, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    state: _FastState = self._mmguard_fast_state
    if state.plain:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    elif state.real is not None:
        out = two_call_attention(q, k, v, state.real, self.scaling)
    elif attention_mask is not None:
        out = _attention_from_dense_mask(q, k, v, attention_mask, self.scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    out = out.transpose(1, 2).reshape(bsz, length, -1)
    return self.o_proj(out), None


def _vision_model(model: Any) -> Any:
    for path in ("model.vision_model", "vision_model"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    if hasattr(model, "transformer") and hasattr(model, "global_transformer"):
        return model
    raise TypeError("not an Mllama model or vision model")


def is_patched(model: Any) -> bool:
    return hasattr(_vision_model(model), "_mmguard_fast_state")


def patch_vision_attention(model: Any) -> Any:
    """Install the mask-free exact attention in every vision encoder layer of this model instance.
    Accepts an ``MllamaForConditionalGeneration``, ``MllamaModel`` or ``MllamaVisionModel``. Idempotent."""
    vm = _vision_model(model)
    if hasattr(vm, "_mmguard_fast_state"):
        return model
    state = _FastState()
    for enc in (vm.transformer, vm.global_transformer):
        for layer in enc.layers:
            attn = layer.self_attn
            attn._mmguard_fast_state = state
            attn.forward = types.MethodType(_patched_forward, attn)
    vm._mmguard_fast_state = state
    return model


def unpatch_vision_attention(model: Any) -> Any:
    """Undo :func:`patch_vision_attention` on this instance (the class's masked forward is used again)."""
    vm = _vision_model(model)
    if not hasattr(vm, "_mmguard_fast_state"):
        return model
    for enc in (vm.transformer, vm.global_transformer):
        for layer in enc.layers:
            del layer.self_attn.forward
            del layer.self_attn._mmguard_fast_state
    del vm._mmguard_fast_state
    return model


def _padding_indicator(aspect_ratio_mask: torch.Tensor, num_patches: int, tile_len: int) -> torch.Tensor:
    """(N, T * tile_len) bool: True for pad patches and for every token of a padded tile."""
    real_tile = aspect_ratio_mask.bool()[:, :, None]  # (N, T, 1)
    real_patch = (torch.arange(tile_len, device=aspect_ratio_mask.device) < num_patches)[None, None, :]
    return ~(real_tile & real_patch).reshape(aspect_ratio_mask.shape[0], -1)


@torch.inference_mode()
def fast_vision_forward(vm: Any, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                        aspect_ratio_mask: torch.Tensor, *, skip: str | None = None) -> torch.Tensor:
    """``MllamaVisionModel.forward(...).last_hidden_state`` without the dense mask. Exact unless ``skip``:
    ``"padded_tiles"`` does not encode an image's padded tiles (real tiles are encoded whole, their pad
    patches included), ``"padding"`` drops every padding token. Both change what real tokens attend to.
    Shapes as the HF forward: pixel_values (B, 1, T, C, H, W) -> (B, 1, T, P, D_out)."""
    if skip not in SKIPS:
        raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")
    patch_vision_attention(vm)
    vm = _vision_model(vm)
    b, m, t, c, h, w = pixel_values.shape
    n = b * m
    ar_ids = aspect_ratio_ids.reshape(n, -1)
    ar_mask = aspect_ratio_mask.reshape(n, -1)
    pad = _padding_indicator(ar_mask, vm.num_patches, vm.num_patches + (8 - vm.num_patches % 8) % 8)
    counts = (~pad).sum(-1)
    outs: torch.Tensor | None = None
    for real in sorted(set(counts.tolist())):
        rows = (counts == real).nonzero().flatten()
        o = _forward_group(vm, pixel_values.reshape(n, t, c, h, w)[rows], ar_ids[rows], pad[rows], int(real),
                           skip)
        if outs is None:
            outs = o.new_empty((n, *o.shape[1:]))
        outs[rows] = o
    assert outs is not None
    return outs.reshape(b, m, t, vm.num_patches, -1)


def _forward_group(vm: Any, px: torch.Tensor, ar_ids: torch.Tensor, pad: torch.Tensor, real: int,
                   skip: str | None) -> torch.Tensor:
    """One group of rows with the same number of real tokens. Mirrors MllamaVisionModel.forward."""
    n, t, c, h, w = px.shape
    dtype = vm.patch_embedding.weight.dtype
    x = vm.patch_embedding(px.reshape(n * t, c, h, w).to(dtype)).flatten(2).transpose(1, 2)
    _, p, dim = x.shape
    x = vm.pre_tile_positional_embedding(x.reshape(n, t, p, dim), ar_ids)
    x = vm.apply_class_embedding(x.reshape(n * t, p, dim))
    p += 1
    x = vm.gated_positional_embedding(x.reshape(n, t, p, dim), ar_ids)
    x = vm.layernorm_pre(x)
    npad = (8 - p % 8) % 8
    x = F.pad(x, (0, 0, 0, npad))
    tl = p + npad
    x = x.reshape(n, t * tl, dim)

    perm = torch.argsort(pad.to(torch.int8), dim=-1, stable=True)  # real tokens first
    inv = torch.argsort(perm, dim=-1)

    def permute(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return y.gather(1, index[:, :, None].expand(-1, -1, y.shape[-1]))

    state: _FastState = vm._mmguard_fast_state
    if skip == "padding":
        keep = real
    elif skip == "padded_tiles":  # real tiles are the leading ones: their pad patches sort right after the real
        keep = real + (real // p) * npad  # tokens (stable sort), before the padded tiles' tokens
    else:
        keep = t * tl

    def unsort(y: torch.Tensor) -> torch.Tensor:
        if keep < t * tl:  # skipped positions were never computed
            y = torch.cat([y, y.new_zeros(n, t * tl - keep, y.shape[-1])], dim=1)
        return permute(y, inv)

    try:
        state.real, state.plain = (None, True) if skip == "padding" else (real, False)
        y = permute(x, perm)[:, :keep]
        wanted = set(vm.intermediate_layers_indices)
        inter: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(vm.transformer.layers):
            y = layer(y, attention_mask=None)
            if i in wanted:
                inter[i] = y
        y = vm.layernorm_post(unsort(y))
        y = vm.post_tile_positional_embedding(y.reshape(n, t, tl, dim), ar_ids).reshape(n, t * tl, dim)
        y = permute(y, perm)[:, :keep]
        for layer in vm.global_transformer.layers:
            y = layer(y, attention_mask=None)
        y = unsort(y)
    finally:
        state.real, state.plain = None, False
    y = y.reshape(n, t, tl, dim)[:, :, :p]
    stacked = torch.stack([unsort(inter[i]) for i in vm.intermediate_layers_indices], dim=-1)
    stacked = stacked.reshape(n, t, tl, -1)[:, :, :p]
    return torch.cat([y, stacked], dim=-1)
