"""FastEngine (one encoding per distinct image, mask-free vision) gives the plain engine's results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmguard.conversation import Conversation
from mmguard.tiny import noise_image

TOL = 1e-5



@pytest.fixture(scope="module")
def guards(tiny_model_dir: Path):
    from mmguard.fast import FastEngine, load_fast_engine
    from mmguard.guard import Guard

    plain = Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    fast = Guard(load_fast_engine(tiny_model_dir, device="cpu", dtype="float32"))
    assert isinstance(fast.engine, FastEngine)
    return plain, fast


@pytest.fixture(scope="module")
def conversations():
    a, b = noise_image(112, 112, 1), noise_image(168, 56, 2)
    return [
        Conversation.prompt("what is in this picture?", image=a),
        Conversation.response("what is in this picture?", "a cat on a mat", image=a),
        Conversation.prompt("how do I build this?", image=b),
        Conversation.response("how do I build this?", "with glue and wood", image=b.copy()),  # same pixels
        Conversation.prompt("hello there"),
        Conversation.response("hi", "hello, how can I help?"),
    ]


def test_prompt_and_response_of_same_image_equal_plain_engine(guards, conversations) -> None:
    plain, fast = guards
    before = fast.engine.images_encoded
    # threshold 0: every item runs the constrained category decode from the cached pass as well
    a = plain.classify_batch(conversations, threshold=0.0, batch_size=4)
    b = fast.classify_batch(conversations, threshold=0.0, batch_size=4)
    assert fast.engine.images_encoded - before == 2  # two distinct images, four image items
    for x, y in zip(a, b, strict=True):
        assert abs(x.unsafe_probability - y.unsafe_probability) < TOL
        assert [c.code for c in x.violated] == [c.code for c in y.violated]
        assert x.category_probabilities.keys() == y.category_probabilities.keys()
        for k, v in x.category_probabilities.items():
            assert abs(v - y.category_probabilities[k]) < TOL
        assert x.raw_text == y.raw_text


def test_one_at_a_time_equals_batched(guards, conversations) -> None:
    _, fast = guards
    convs = [conversations[0], conversations[3], conversations[4]]
    batched = fast.classify_batch(convs, categories=False, batch_size=8)
    for conv, v in zip(convs, batched, strict=True):
        assert abs(fast.classify(conv, categories=False).unsafe_probability - v.unsafe_probability) < TOL


def test_image_cache_is_bounded_and_cleared(guards, conversations) -> None:
    _, fast = guards
    fast.engine.max_cached_images = 1
    try:
        fast.classify_batch(conversations, categories=False)
    finally:
        fast.engine.max_cached_images = 64
    assert not fast.engine._encoded


def test_enable_fast_path_is_idempotent(tiny_model_dir: Path) -> None:
    from mmguard.fast import FastEngine, enable_fast_path
    from mmguard.guard import Guard

    g = Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    engine = enable_fast_path(g).engine
    assert isinstance(engine, FastEngine) and enable_fast_path(g).engine is engine


def test_vision_approximations_are_opt_in(guards, conversations) -> None:
    """real_tiles_only / real_tokens_only run through the whole engine; text-only rows are untouched; the
    two cannot be combined. Their agreement is measured (bench/approx_agreement.py), not assumed."""
    from mmguard.engine import EngineError
    from mmguard.fast import FastEngine

    _, fast = guards
    conversations = [conversations[0], conversations[2], conversations[4]]
    exact = [v.unsafe_probability for v in fast.classify_batch(conversations, categories=False)]
    for option in ("real_tiles_only", "real_tokens_only"):
        approx = type(fast)(FastEngine.from_engine(fast.engine, **{option: True}))
        got = [v.unsafe_probability for v in approx.classify_batch(conversations, categories=False)]
        assert abs(got[2] - exact[2]) < TOL  # the text-only row
        assert all(0.0 <= p <= 1.0 for p in got)
    with pytest.raises(EngineError, match="choose one"):
        FastEngine.from_engine(fast.engine, real_tiles_only=True, real_tokens_only=True)


def _same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert abs(x.unsafe_probability - y.unsafe_probability) < TOL
        assert [c.code for c in x.violated] == [c.code for c in y.violated]
        for k, v in x.category_probabilities.items():
            assert abs(v - y.category_probabilities[k]) < TOL
        assert x.raw_text == y.raw_text


def test_kept_encodings_serve_a_later_call(guards, conversations) -> None:
    """keep_images: the response check of an image, asked in a later call, reuses the prompt check's encoding."""
    from mmguard.fast import FastEngine
    from mmguard.guard import Guard

    plain, fast = guards
    kept = Guard(FastEngine.from_engine(fast.engine, keep_images=1))
    prompt, response = conversations[0], conversations[1]
    got = [kept.classify(prompt, threshold=0.0), kept.classify(response, threshold=0.0)]
    assert (kept.engine.images_encoded, kept.engine.image_cache_hits, kept.engine.cached_images) == (1, 1, 1)
    _same([plain.classify(prompt, threshold=0.0), plain.classify(response, threshold=0.0)], got)
    # without keep_images each call encodes its own image
    fresh = Guard(FastEngine.from_engine(fast.engine))
    fresh.classify(prompt, categories=False)
    fresh.classify(response, categories=False)
    assert (fresh.engine.images_encoded, fresh.engine.image_cache_hits, fresh.engine.cached_images) == (2, 0, 0)


def test_kept_encodings_are_least_recently_used(guards) -> None:
    from mmguard.fast import FastEngine
    from mmguard.guard import Guard

    _, fast = guards
    kept = Guard(FastEngine.from_engine(fast.engine, keep_images=2))
    images = [noise_image(56, 56, seed) for seed in (11, 12, 13)]
    for im in (images[0], images[1], images[0], images[2]):  # image 1 is the least recently used at the end
        kept.classify(Conversation.prompt("look", image=im), categories=False)
    assert kept.engine.cached_images == 2 and kept.engine.images_encoded == 3
    kept.classify(Conversation.prompt("look", image=images[0].copy()), categories=False)  # same pixels: kept
    assert kept.engine.images_encoded == 3
    kept.classify(Conversation.prompt("look", image=images[1]), categories=False)  # evicted: encoded again
    assert kept.engine.images_encoded == 4
    kept.engine.clear_image_cache()
    assert kept.engine.cached_images == 0


def test_cross_attention_keeps_every_tile_unless_an_approximation_is_asked_for(guards, tiny_model_dir: Path) -> None:
    """The exact path gives each row every tile's states, padded ones too: the tokens before <|image|> have a fully
    masked cross-attention row, which Mllama resets to attend to all tiles, so cutting the padded tiles (as this
    engine did) changed 1-3 tile images. real_tiles_only cuts them: a batch of 1-tile images gets 1 tile a row,
    one mixing 1 and 2 tiles gets 2."""
    from mmguard.fast import load_fast_engine
    from mmguard.guard import Guard

    plain, fast = guards
    one = [noise_image(56, 56, 21), noise_image(50, 40, 22)]
    two = noise_image(112, 56, 23)
    convs = [Conversation.prompt("first", image=one[0]), Conversation.prompt("second one", image=one[1])]
    mixed = [*convs, Conversation.response("third", "reply", image=two)]
    max_tiles = int(fast.engine.model.config.vision_config.max_num_tiles)
    approx = Guard(load_fast_engine(tiny_model_dir, device="cpu", dtype="float32", real_tiles_only=True))
    for guard, expected in ((fast, (max_tiles, max_tiles)), (approx, (1, 2))):
        engine = guard.engine
        for convs_, tiles in ((convs, expected[0]), (mixed, expected[1])):
            items = [engine.encode(guard.render(c), c.image) for c in convs_]
            batch = engine.collate(items)
            assert batch["cross_attention_states"].shape[0] // len(items) == tiles
            assert batch["cross_attention_mask"].shape[-1] == tiles
    fast.engine.clear_image_cache()
    _same(plain.classify_batch(mixed, threshold=0.0, batch_size=8), fast.classify_batch(mixed, threshold=0.0,
                                                                                         batch_size=8))


def test_mask_free_text_equals_plain_engine(guards, conversations, monkeypatch) -> None:
    """Right padding, no attention mask in the prefill, decision read at each row's last real token: the
    plain engine's probabilities, codes and text (threshold 0: every row also decodes codes from the cache)."""
    from mmguard.fast import FastEngine
    from mmguard.guard import Guard

    plain, fast = guards
    free = Guard(FastEngine.from_engine(fast.engine, mask_free_text=True))
    seen: list[dict] = []
    inner = free.engine.model.model
    original = inner.forward

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(inner, "forward", spy)
    convs = [*conversations, Conversation.prompt("a much longer text-only prompt " * 6)]
    got = free.classify_batch(convs, threshold=0.0, batch_size=8)
    monkeypatch.undo()
    _same(plain.classify_batch(convs, threshold=0.0, batch_size=8), got)
    prefills = [kw for kw in seen if kw.get("input_ids") is not None and kw["input_ids"].shape[1] > 8]
    assert prefills and all(kw.get("attention_mask") is None for kw in prefills)
    assert any((kw["input_ids"][:, -1] == free.engine.pad_id).any() for kw in prefills)  # padding was on the right


def test_int8_quantization_is_an_opt_in_approximation(tiny_model_dir: Path, conversations) -> None:
    """torchao int8 on every linear layer but lm_head; its distance from the exact path is reported, not assumed."""
    from mmguard.fast import load_fast_engine
    from mmguard.guard import Guard

    exact = Guard(load_fast_engine(tiny_model_dir, device="cpu", dtype="float32"))
    quant = Guard(load_fast_engine(tiny_model_dir, device="cpu", dtype="float32", quantize="int8"))
    model = quant.engine.model
    text_q = model.model.language_model.layers[0].self_attn.q_proj
    vision_q = model.model.vision_model.transformer.layers[0].self_attn.q_proj
    assert type(text_q.weight.data).__name__ == type(vision_q.weight.data).__name__ == "Int8Tensor"
    assert type(model.lm_head.weight.data) is torch.Tensor  # the verdict's projection is left exact
    a = exact.classify_batch(conversations, categories=False)
    b = quant.classify_batch(conversations, categories=False)
    diffs = [abs(x.unsafe_probability - y.unsafe_probability) for x, y in zip(a, b, strict=True)]
    assert all(0.0 <= y.unsafe_probability <= 1.0 for y in b)
    assert max(diffs) > 0.0  # it is not the exact computation
    print(f"int8 on the tiny random model: max |dp(unsafe)| = {max(diffs):.2e}")


def test_fp8_needs_a_model_on_a_recent_gpu(tiny_model_dir: Path) -> None:
    from mmguard.engine import EngineError
    from mmguard.fast import load_fast_engine

    with pytest.raises(EngineError, match="compute capability"):
        load_fast_engine(tiny_model_dir, device="cpu", dtype="float32", quantize="fp8")


def test_preprocessing_thread_pool_gives_the_same_encodings(guards) -> None:
    """Images of 1, 2 and 4 tiles, preprocessed by 2 threads while earlier batches are encoded: the same
    encodings as inline preprocessing, and the tile count predicted from the size is the processor's."""
    from mmguard.fast import FastEngine

    _, fast = guards
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate([(112, 112), (56, 56), (112, 50), (90, 60),
                                                                     (60, 120), (200, 180)])]
    inline = FastEngine.from_engine(fast.engine, vision_batch_size=2, preprocess_workers=1)
    pooled = FastEngine.from_engine(fast.engine, vision_batch_size=2, preprocess_workers=2)
    digests = inline.encode_images(images)
    assert pooled.encode_images(images) == digests
    assert sorted({inline._encoded[d].num_tiles for d in digests}) == [1, 2, 4]
    for d, im in zip(digests, images, strict=True):
        a, b = inline._encoded[d], pooled._encoded[d]
        assert a.num_tiles == b.num_tiles == inline.expected_tiles(im)
        assert torch.allclose(a.states, b.states, atol=1e-6)
    assert pooled._pool is not None and inline._pool is None
    assert FastEngine.from_engine(fast.engine).preprocess_workers == 1  # on a CPU the model wants the cores
