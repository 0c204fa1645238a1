"""The prefix cache gives the plain engine's results (tiny random models: plumbing and exactness only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mmguard.conversation import Conversation
from mmguard.guard import Guard
from mmguard.prefix_cache import PrefixCachingEngine, enable_prefix_cache
from mmguard.tiny import noise_image

TOL = 1e-5


@pytest.fixture(scope="module")
def cached_guard(tiny_model_dir: Path) -> Guard:
    return Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32", prefix_cache=True)


def assert_same(plain: list[Any], cached: list[Any]) -> None:
    for a, b in zip(plain, cached, strict=True):
        assert abs(a.unsafe_probability - b.unsafe_probability) < TOL
        assert a.codes == b.codes and a.is_unsafe == b.is_unsafe
        assert a.category_probabilities.keys() == b.category_probabilities.keys()
        for code, p in a.category_probabilities.items():
            assert abs(p - b.category_probabilities[code]) < TOL


def mixed_conversations() -> list[Conversation]:
    image = noise_image(80, 60, 2)
    convs = [Conversation.prompt("question " * (1 + i) + str(i)) for i in range(5)]
    convs += [Conversation.response("q?", "answer " * k) for k in (3, 11, 30)]
    convs += [Conversation.response("what is it", "it is " + "a thing " * k, image=image) for k in (2, 9)]
    convs.append(Conversation.prompt("and this?", image=image))
    return convs


@pytest.mark.parametrize("threshold", [0.5, 0.0])  # 0.0: every row runs the category decode from the cache
def test_same_results_as_plain_engine(tiny_guard: Guard, cached_guard: Guard, threshold: float) -> None:
    convs = mixed_conversations()
    plain = tiny_guard.classify_batch(convs, threshold=threshold, batch_size=4)
    for _ in range(2):  # cold, then with every prefix kept
        assert_same(plain, cached_guard.classify_batch(convs, threshold=threshold, batch_size=4))
    engine = cached_guard.engine
    assert isinstance(engine, PrefixCachingEngine)
    assert engine.stats.hits > 0 and engine.stats.reused_tokens > 0


def test_policies_roles_and_exclusions_do_not_mix(tiny_guard: Guard, cached_guard: Guard) -> None:
    convs = [Conversation.prompt("hello there"), Conversation.response("hello there", "hi")]
    for kwargs in ({}, {"exclude": ["S6", "S13"]}, {"threshold": 0.0}):
        assert_same(tiny_guard.classify_batch(convs, **kwargs), cached_guard.classify_batch(convs, **kwargs))


def test_streamed_answer_checks_are_incremental(tiny_guard: Guard, cached_guard: Guard) -> None:
    engine = cached_guard.engine
    assert isinstance(engine, PrefixCachingEngine)
    words = [f" word{i}" for i in range(96)]
    image = noise_image(64, 64, 5)
    for img in (None, image):
        computed = []
        for n in range(16, len(words) + 1, 16):
            conv = Conversation.response("tell me a story", "".join(words[:n]).strip(), image=img)
            before = engine.stats.computed_tokens
            assert_same(tiny_guard.classify_batch([conv], threshold=0.0), cached_guard.classify_batch(
                [conv], threshold=0.0))
            computed.append(engine.stats.computed_tokens - before)
        full = len(cached_guard.prompt_ids(conv))
        # after the first check, each check computes ~16 words (~2 tokens each) plus the closing template part
        assert max(computed[1:]) < 100 < full, (computed, full)


def test_images_never_share_a_prefix(tiny_guard: Guard, cached_guard: Guard) -> None:
    engine = cached_guard.engine
    assert isinstance(engine, PrefixCachingEngine)
    a, b = noise_image(64, 48, 7), noise_image(64, 48, 8)
    cached_guard.classify(Conversation.response("what is it", "a pattern of dots", image=a))
    hits = engine.stats.hits
    conv_b = Conversation.response("what is it", "a pattern of dots", image=b)
    assert_same(tiny_guard.classify_batch([conv_b]), cached_guard.classify_batch([conv_b]))
    assert engine.stats.hits == hits  # same text, another image: computed from scratch


def test_memory_is_bounded(tiny_model_dir: Path) -> None:
    guard = enable_prefix_cache(Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32"),
                                max_tokens=600)
    engine = guard.engine
    assert isinstance(engine, PrefixCachingEngine)
    guard.classify_batch([Conversation.prompt(f"a different question {i}") for i in range(12)])
    assert 0 < engine.cached_tokens <= 600
    with pytest.raises(TypeError):
        enable_prefix_cache(type("G", (), {"engine": object()})())


def test_loading_options(tiny_model_dir: Path, cached_guard: Guard) -> None:
    from mmguard.prefix_cache import DEFAULT_PREFIX_CACHE_TOKENS

    assert cached_guard.describe()["prefix_cache_tokens"] == DEFAULT_PREFIX_CACHE_TOKENS
    small = Guard.from_pretrained(tiny_model_dir, device="cpu", prefix_cache=True, prefix_cache_tokens=999)
    assert small.describe()["prefix_cache_tokens"] == 999
    plain = Guard.from_pretrained(tiny_model_dir, device="cpu")
    assert plain.describe()["prefix_cache_tokens"] is None
    assert enable_prefix_cache(plain).describe()["prefix_cache_tokens"] == 32768
    with pytest.raises(ValueError, match="plain engine"):
        Guard.from_pretrained(tiny_model_dir, device="cpu", fast=True, prefix_cache=True)


def test_bench_script_runs(tmp_path: Path) -> None:
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "bench" / "prefix_cache.py"
    spec = importlib.util.spec_from_file_location("bench_prefix_cache", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "report.json"
    assert bench.main(["--tiny", "--no-large", "--batch", "4", "--batches", "1", "--reps", "1",
                       "--answer-tokens", "64", "--check-every", "16", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    for part in ("text_batches", "stream"):
        assert run[part]["ratio"] > 0 and run[part]["identical_labels_and_codes"]
        assert run[part]["max_abs_dp_unsafe"] < TOL
    assert run["stream"]["tokens_incremental"] < run["stream"]["tokens_full_recheck"]
