"""FastEngine (one encoding per distinct image, mask-free vision) gives the plain engine's results."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_real_tiles_only_is_an_opt_in_approximation(guards, conversations) -> None:
    """Runs and reports how far it moves p(unsafe); the agreement is measured, not assumed."""
    from mmguard.fast import FastEngine

    _, fast = guards
    approx = FastEngine.from_engine(fast.engine, real_tiles_only=True)
    conversations = [conversations[0], conversations[2], conversations[4]]
    exact = [v.unsafe_probability for v in fast.classify_batch(conversations, categories=False)]
    approx_guard = type(fast)(approx)
    got = [v.unsafe_probability for v in approx_guard.classify_batch(conversations, categories=False)]
    diffs = [abs(x - y) for x, y in zip(exact, got, strict=True)]
    assert diffs[2] < TOL  # text-only rows are untouched
    assert all(0.0 <= p <= 1.0 for p in got)
