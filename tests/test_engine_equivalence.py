"""One-pass scoring equals greedy ``generate()`` parsed, and batched results equal one-at-a-time results.

The model is a tiny Mllama briefly trained on toy trigger-word data so that it writes the Llama Guard
answer format (``\\n\\nunsafe\\nS1,S9<|eot_id|>``); its verdicts mean nothing, it proves plumbing.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mmguard.conversation import Conversation
from mmguard.guard import Guard
from mmguard.tiny import imprint_format, make_tiny_checkpoint, synthetic_conversation
from mmguard.tokenizer import encode_text
from mmguard.verdict import parse_output

CODES = tuple(f"S{i}" for i in range(1, 14))


@pytest.fixture(scope="module")
def imprinted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("imprinted") / "model", seed=1)
    return imprint_format(path, steps=120, lr=1e-2, seed=1)


@pytest.fixture(scope="module")
def guard(imprinted_dir: Path) -> Guard:
    return Guard.from_pretrained(imprinted_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def conversations():
    rng = random.Random(7)
    return [synthetic_conversation(rng)[0] for _ in range(32)]


def _generate(guard: Guard, conv, forced: list[int], max_new_tokens: int = 20) -> tuple[list[int], list[torch.Tensor]]:
    engine = guard.engine
    item = engine.encode(guard.render(conv), conv.image)
    # the model-card recipe: the prompt alone, greedy decoding (``forced`` continues a given answer prefix)
    prompt_len = len(item.input_ids) - len(engine.decision_prefix_ids("\n\n"))
    item.input_ids = item.input_ids[:prompt_len] + forced
    batch = engine.collate([item])
    batch.pop("position_ids")
    with torch.inference_mode():
        out = engine.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                                    return_dict_in_generate=True, pad_token_id=engine.pad_id)
    new = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    return new, list(out.scores)


def test_one_pass_verdict_and_probability_equal_generate(guard: Guard, conversations) -> None:
    verdicts = guard.classify_batch(conversations)
    compared = 0
    for conv, v in zip(conversations, verdicts, strict=True):
        new, scores = _generate(guard, conv, [])
        assert new[0] == 271, "the imprinted model writes \\n\\n first, like Llama Guard 3 Vision"
        p_gen = torch.softmax(scores[1][0].float(), -1)[39257].item()
        assert v.unsafe_probability == pytest.approx(p_gen, abs=1e-5)
        text = guard.engine.tokenizer.decode(new, skip_special_tokens=False)
        parsed = parse_output(text)
        if abs(v.unsafe_probability - torch.softmax(scores[1][0].float(), -1)[19193].item()) > 1e-4:
            assert parsed.label == v.label, text
            if v.is_unsafe and parsed.unknown_codes == () and text.rstrip().endswith("<|eot_id|>"):
                assert v.codes == parsed.codes, text
            compared += 1
    assert compared >= 24
    labels = {v.label for v in verdicts}
    assert labels == {"safe", "unsafe"}, "the test set should exercise both verdicts"


def test_constrained_code_decode_equals_greedy_generate_after_unsafe(guard: Guard, conversations) -> None:
    """Force ``unsafe\\n`` and compare the codes with those greedy generation writes."""
    tok = guard.engine.tokenizer
    forced = [271, *encode_text(tok, "unsafe\n")]
    items = [guard.engine.encode(guard.render(c), c.image) for c in conversations]
    decoded = guard.engine.decode_codes(items, CODES)
    agreed = 0
    for conv, (codes, probs, raw) in zip(conversations, decoded, strict=True):
        new, scores = _generate(guard, conv, forced)
        text = tok.decode(new, skip_special_tokens=False)
        parsed = parse_output("unsafe\n" + text)
        if "<|eot_id|>" in text and not parsed.unknown_codes and len(set(parsed.codes)) == len(parsed.codes):
            assert codes == parsed.codes, (text, raw)
            agreed += 1
        # per-category probabilities: P(first code) read at the category position
        first = torch.softmax(scores[0][0].float(), -1)  # distribution over "S"
        p_s = first[encode_text(tok, "S")[0]].item()
        assert sum(probs.values()) <= 1.0 + 1e-6
        assert max(probs.values()) <= p_s + 1e-6
    assert agreed >= 24


def test_batched_equals_one_at_a_time(guard: Guard, conversations) -> None:
    batched = guard.classify_batch(conversations, batch_size=7)
    for conv, b in zip(conversations, batched, strict=True):
        single = guard.classify(conv)
        assert single.unsafe_probability == pytest.approx(b.unsafe_probability, abs=1e-5)
        assert single.codes == b.codes
        assert single.category_probabilities.keys() == b.category_probabilities.keys()
        for k, p in single.category_probabilities.items():
            assert b.category_probabilities[k] == pytest.approx(p, abs=1e-5)


def test_codes_constrained_to_active_policy(guard: Guard, conversations) -> None:
    verdicts = guard.classify_batch(conversations, exclude=["S1", "S2", "S10"], threshold=0.0)
    for v in verdicts:
        assert v.is_unsafe and v.codes, "threshold 0 makes every verdict unsafe"
        assert not set(v.codes) & {"S1", "S2", "S10"}
        assert set(v.category_probabilities) <= set(CODES) - {"S1", "S2", "S10"}


def test_threshold_is_configurable(guard: Guard, conversations) -> None:
    ps = [v.unsafe_probability for v in guard.classify_batch(conversations)]
    mid = sorted(ps)[len(ps) // 2]
    verdicts = guard.classify_batch(conversations, threshold=mid)
    assert [v.is_unsafe for v in verdicts] == [p >= mid for p in ps]


def test_bf16_close_to_fp32(imprinted_dir: Path, conversations, guard: Guard) -> None:
    bf16 = Guard.from_pretrained(imprinted_dir, device="cpu", dtype="bfloat16")
    a = guard.classify_batch(conversations[:8])
    b = bf16.classify_batch(conversations[:8])
    for x, y in zip(a, b, strict=True):
        assert abs(x.unsafe_probability - y.unsafe_probability) < 0.08


def test_parser_is_lenient() -> None:
    assert parse_output("\n\nunsafe\nS1,S10<|eot_id|>").codes == ("S1", "S10")
    assert parse_output("safe  ").label == "safe"
    p = parse_output(" Unsafe \n s2, S99 ,S3 ")
    assert p.label == "unsafe" and p.codes == ("S2", "S3") and p.unknown_codes == ("S99",)
    assert parse_output("I cannot help").label is None
    assert parse_output("unsafe S9").codes == ("S9",)


def test_cached_decode_equals_uncached_reference(guard: Guard, conversations) -> None:
    """The decode that continues the decision pass's KV cache (after selecting the unsafe rows of a mixed
    batch) writes the same codes as a reference that re-runs the whole sequence at every step."""
    from mmguard.engine import _DecodeState

    engine = guard.engine
    verdicts = guard.classify_batch(conversations, threshold=0.0, batch_size=5)
    grammar = engine.grammar(CODES)
    for conv, v in zip(conversations[:12], verdicts[:12], strict=True):
        item = engine.encode(guard.render(conv), conv.image)
        state = _DecodeState(grammar, engine.eot_id)
        forced = [*engine.format.unsafe_ids, *engine.format.newline_ids]
        for _ in range(12):
            batch = engine.collate([item], extra=[forced + state.tokens])
            with torch.inference_mode():
                logits = engine.model(**batch, use_cache=False, logits_to_keep=1).logits[0, -1].float()
            tok = max(state.allowed(), key=lambda t: float(logits[t]))
            state.push(tok)
            if state.done:
                break
        assert tuple(state.codes) == v.codes


def test_parser_edge_cases() -> None:
    assert parse_output("unsafeS1<|eot_id|>").codes == ("S1",)
    assert parse_output("unsafe: S3").codes == ("S3",)
    assert parse_output("safety first").label is None
    assert parse_output("unsafely").label is None
    assert parse_output("Safe.").label == "safe"
    assert parse_output("").label is None


def test_batches_are_bounded_in_padded_tokens(tiny_guard) -> None:
    """One long prompt does not pad a whole batch to its length: rows x longest row <= max_batch_tokens."""
    from types import SimpleNamespace

    engine = tiny_guard.engine
    lengths = [10] * 20 + [3000, 5000, 20000]
    items = [SimpleNamespace(input_ids=[0] * n, image=None) for n in lengths]
    groups = engine.batch_groups(items, 16)
    assert sorted(i for g in groups for i in g) == list(range(len(items)))  # every item exactly once
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) <= 16 and (len(g) == 1 or len(g) * longest <= engine.max_batch_tokens)
    assert [len(g) for g in groups] == [16, 5, 1, 1]  # 4 x 10 tokens join the 3000 (5 x 3000 <= 16384)
    # the results do not depend on the bound: a long conversation scored alone or with others
    convs = [Conversation.prompt("word " * 900), Conversation.prompt("hi"), Conversation.prompt("hello there")]
    plain = tiny_guard.classify_batch(convs, batch_size=8)
    old = engine.max_batch_tokens
    engine.max_batch_tokens = 1000  # forces the long one into a batch of its own
    try:
        bounded = tiny_guard.classify_batch(convs, batch_size=8)
    finally:
        engine.max_batch_tokens = old
    for a, b in zip(plain, bounded, strict=True):
        assert abs(a.unsafe_probability - b.unsafe_probability) < 1e-5
