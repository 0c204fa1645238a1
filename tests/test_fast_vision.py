"""Mask-free vision attention equals the model's masked attention (fp32, tiny checkpoint, 1-4 tiles)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mmguard.fast.vision import fast_vision_forward, patch_vision_attention, two_call_attention
from mmguard.tiny import noise_image

TOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _inputs(seed: int = 0):
    torch.manual_seed(seed)
    px = torch.randn(4, 1, 4, 3, 56, 56)  # padded tiles hold noise too: they must still be handled exactly
    ar_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).reshape(4, 1, 4)
    ar_ids = torch.tensor([1, 2, 5, 6]).reshape(4, 1)  # aspect ratios 1x1, 1x2, 1x3, 2x2 (ids offset by 1)
    return px, ar_ids, ar_mask


def test_two_call_attention_equals_masked_sdpa() -> None:
    torch.manual_seed(0)
    b, h, length, d, real = 2, 3, 24, 8, 17
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    pad = torch.arange(length) >= real
    mask = (pad[:, None] & pad[None, :]).float() * torch.finfo(torch.float32).min
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = two_call_attention(q, k, v, real, d ** -0.5)
    assert (ref - out).abs().max() < TOL


def test_vision_outputs_equal_for_1_to_4_tiles(model) -> None:
    px, ar_ids, ar_mask = _inputs()
    vm = model.model.vision_model
    patched = copy.deepcopy(model)
    patch_vision_attention(patched)
    with torch.inference_mode():
        ref = vm(pixel_values=px, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask).last_hidden_state
        via_hf = patched.model.vision_model(pixel_values=px, aspect_ratio_ids=ar_ids,
                                            aspect_ratio_mask=ar_mask).last_hidden_state
        fast = fast_vision_forward(patched, px, ar_ids, ar_mask)
        for b in range(4):  # one image per call too: no cross-row effects
            single = fast_vision_forward(patched, px[b:b + 1], ar_ids[b:b + 1], ar_mask[b:b + 1])
            assert (single[0] - ref[b]).abs().max() < TOL
    assert fast.shape == ref.shape
    # every position, padded tiles included (their outputs are defined by the model as well)
    assert (via_hf - ref).abs().max() < TOL
    assert (fast - ref).abs().max() < TOL


def test_padded_tile_pixels_still_matter_in_exact_path(model) -> None:
    """The model lets real patches attend to padded tiles; the exact path must keep that dependency."""
    px, ar_ids, ar_mask = _inputs()
    px2 = px.clone()
    px2[0, 0, 3] += 1.0  # a padded tile of the 1-tile image
    patched = copy.deepcopy(model)
    with torch.inference_mode():
        a = fast_vision_forward(patched, px[:1], ar_ids[:1], ar_mask[:1])
        b = fast_vision_forward(patched, px2[:1], ar_ids[:1], ar_mask[:1])
        ref = model.model.vision_model(pixel_values=px2[:1], aspect_ratio_ids=ar_ids[:1],
                                       aspect_ratio_mask=ar_mask[:1]).last_hidden_state
    assert (a[0, 0, 0] - b[0, 0, 0]).abs().max() > 1e-4
    assert (b - ref).abs().max() < TOL



def test_skipping_padded_tiles_cuts_exactly_their_influence(model) -> None:
    """skip="padded_tiles" (opt-in approximation): a padded tile's pixels no longer reach the real tiles,
    a 4-tile image (no padded tile) is encoded exactly, and the real tiles' own pad patches still count
    (which skip="padding" drops: it changes even the 4-tile image)."""
    px, ar_ids, ar_mask = _inputs()
    px2 = px.clone()
    px2[0, 0, 3] += 1.0  # a padded tile of the 1-tile image
    patched = copy.deepcopy(model)
    with torch.inference_mode():
        exact = fast_vision_forward(patched, px, ar_ids, ar_mask)
        tiles = fast_vision_forward(patched, px, ar_ids, ar_mask, skip="padded_tiles")
        tiles2 = fast_vision_forward(patched, px2, ar_ids, ar_mask, skip="padded_tiles")
        tokens = fast_vision_forward(patched, px, ar_ids, ar_mask, skip="padding")
    assert (tiles[0, 0, 0] - tiles2[0, 0, 0]).abs().max() == 0  # the padded tile is not read at all
    assert (tiles[3] - exact[3]).abs().max() < TOL  # 4 real tiles: nothing skipped
    for b in range(3):  # 1-3 real tiles: the real tiles' outputs change (they attended to the padded ones)
        real = int(ar_mask[b, 0].sum())
        assert (tiles[b, 0, :real] - exact[b, 0, :real]).abs().max() > 1e-4
    assert (tokens[3] - exact[3]).abs().max() > 1e-4  # the pad patches of real tiles are dropped too
    with pytest.raises(ValueError, match="skip must be one of"):
        fast_vision_forward(patched, px, ar_ids, ar_mask, skip="tiles")


@pytest.fixture(scope="module")
def guards(tiny_model_dir: Path):
    from mmguard.fast import enable_fast_path
    from mmguard.guard import Guard

    plain = Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    fast = enable_fast_path(Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32"))
    return plain, fast


@pytest.mark.parametrize(("size", "tiles"), [((56, 56), 1), ((112, 56), 2), ((168, 56), 3), ((112, 112), 4)])
def test_p_unsafe_equal_through_guard(guards, size, tiles) -> None:
    from mmguard.conversation import Conversation

    plain, fast = guards
    img = noise_image(*size, seed=tiles)
    out = fast.engine.image_processor(images=[[img]], return_tensors="pt")
    assert int(out["num_tiles"][0][0]) == tiles
    conv = Conversation.prompt("what is in this picture?", image=img)
    a = plain.classify(conv, categories=False)
    b = fast.classify(conv, categories=False)
    assert abs(a.unsafe_probability - b.unsafe_probability) < TOL
    # in log-odds too: the tiny model's probabilities are near 1e-5, where an absolute tolerance hid a 2e-4
    # logit difference on 1-tile images (the engine cut their padded tiles, which some tokens attend to)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert abs(logit(a.unsafe_probability) - logit(b.unsafe_probability)) < 1e-5
