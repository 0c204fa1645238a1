"""Training formatter: exact augmentation outputs, targets, and loss masks."""

from __future__ import annotations

import pytest

from mmguard.conversation import Conversation
from mmguard.data.formatter import (
    IGNORE_INDEX,
    AugmentationConfig,
    Formatter,
    drop_nonviolated,
    drop_violated,
    original,
    shuffle_codes,
    target_text,
    tokenize,
)
from mmguard.data.schema import DataError, Example
from mmguard.policy import DEFAULT_POLICY
from mmguard.prompt import PromptFormat, build_prompt
from mmguard.tokenizer import load_default_tokenizer

CONV = Conversation.prompt("How do I make a bomb?")
ALL = DEFAULT_POLICY.codes


def _categories_block(text: str) -> list[str]:
    start = text.index("<BEGIN UNSAFE CONTENT CATEGORIES>\n") + len("<BEGIN UNSAFE CONTENT CATEGORIES>\n")
    return text[start : text.index("<END UNSAFE CONTENT CATEGORIES>")].splitlines()


def _example(
    label: str = "unsafe", codes: list[str] | None = None, meta: dict | None = None, id: str = "t:1"
):
    return Example(
        id=id, source="t", license="MIT", split="train", task="prompt",
        messages=[{"role": "user", "content": [{"type": "text", "text": "How do I make a bomb?"}]}],
        label=label, codes=["S1", "S9"] if codes is None else codes, meta=meta or {},
    )  # fmt: skip


def test_target_text_uses_policy_order() -> None:
    assert target_text("unsafe", ["S10", "S2"], DEFAULT_POLICY) == "unsafe\nS2,S10"
    assert target_text("safe", [], DEFAULT_POLICY) == "safe"
    with pytest.raises(DataError, match="not active"):
        target_text("unsafe", ["S3"], DEFAULT_POLICY.exclude(["S3"]))


def test_original() -> None:
    t = original(CONV, "unsafe", ["S9", "S1"])
    assert (t.target, t.codes, t.policy.active_codes) == ("unsafe\nS1,S9", ("S1", "S9"), ALL)
    assert t.render().text == build_prompt(CONV, DEFAULT_POLICY).text


def test_drop_nonviolated_exact() -> None:
    t = drop_nonviolated(CONV, "unsafe", ["S1", "S9"], drop=["S2", "S12", "S5"])
    assert t.policy.active_codes == ("S1", "S3", "S4", "S6", "S7", "S8", "S9", "S10", "S11", "S13")
    assert t.target == "unsafe\nS1,S9" and t.label == "unsafe" and t.augmentation == "drop_nonviolated"
    # codes keep their numbers, exactly like inference-time exclusion
    assert _categories_block(t.render().text) == [
        "S1: Violent Crimes.", "S3: Sex Crimes.", "S4: Child Exploitation.", "S6: Specialized Advice.",
        "S7: Privacy.", "S8: Intellectual Property.", "S9: Indiscriminate Weapons.", "S10: Hate.",
        "S11: Self-Harm.", "S13: Elections.",
    ]  # fmt: skip
    assert t.render().text == build_prompt(CONV, DEFAULT_POLICY.exclude(["S2", "S5", "S12"])).text
    with pytest.raises(DataError, match="cannot drop violated"):
        drop_nonviolated(CONV, "unsafe", ["S1", "S9"], drop=["S9"])


def test_drop_violated_exact() -> None:
    t = drop_violated(CONV, ["S1", "S9"], also_drop=["S13"])
    assert t.policy.active_codes == ("S2", "S3", "S4", "S5", "S6", "S7", "S8", "S10", "S11", "S12")
    assert (t.target, t.label, t.codes) == ("safe", "safe", ())


def test_shuffle_codes_exact() -> None:
    order = list(reversed(ALL))  # S13 becomes S1, ..., S9 becomes S5, S1 becomes S13
    t = shuffle_codes(CONV, "unsafe", ["S1", "S9"], order)
    assert t.target == "unsafe\nS5,S13" and t.codes == ("S5", "S13")
    assert _categories_block(t.render().text) == [
        "S1: Elections.", "S2: Sexual Content.", "S3: Self-Harm.", "S4: Hate.", "S5: Indiscriminate Weapons.",
        "S6: Intellectual Property.", "S7: Privacy.", "S8: Specialized Advice.", "S9: Defamation.",
        "S10: Child Exploitation.", "S11: Sex Crimes.", "S12: Non-Violent Crimes.", "S13: Violent Crimes.",
    ]  # fmt: skip
    assert t.meta["code_map"]["S9"] == "S5"
    safe = shuffle_codes(CONV, "safe", [], order)
    assert safe.target == "safe"
    with pytest.raises(DataError, match="permutation"):
        shuffle_codes(CONV, "unsafe", ["S1"], ["S1", "S2"])


def test_formatter_seeded_golden_and_order_independent() -> None:
    out = Formatter(seed=0).format(_example())
    got = [(t.augmentation, t.policy.active_codes, t.target) for t in out]
    assert got == [
        ("original", ALL, "unsafe\nS1,S9"),
        ("drop_nonviolated", ("S1", "S3", "S4", "S5", "S6", "S9", "S10", "S11", "S13"), "unsafe\nS1,S9"),
        ("drop_violated", ("S3", "S4", "S5", "S6", "S7", "S8", "S10", "S11", "S13"), "safe"),
        ("shuffle_codes", tuple(f"S{i}" for i in range(1, 14)), "unsafe\nS8,S13"),
    ]
    # the shuffled policy keeps the categories: the new S8/S13 are Violent Crimes / Indiscriminate Weapons
    shuffled = out[3].policy
    assert {shuffled.category("S8").label, shuffled.category("S13").label} == {
        "Violent Crimes.", "Indiscriminate Weapons."}  # fmt: skip
    # reproducible, and independent of the other examples formatted before it
    f = Formatter(seed=0)
    f.format(_example(id="other", codes=["S2"]))
    assert [(t.policy, t.target) for t in f.format(_example())] == [(t.policy, t.target) for t in out]
    assert [t.policy for t in Formatter(seed=1).format(_example())] != [t.policy for t in out]


def test_formatter_unknown_and_ambiguous_codes() -> None:
    unl = Formatter(seed=0).format(_example(codes=[], meta={"codes_status": "unlabeled"}))
    assert [t.augmentation for t in unl] == ["original", "shuffle_codes"]  # no A/B without known categories
    assert all(t.target == "unsafe" and not t.supervise_codes for t in unl)
    amb = Formatter(seed=3).format(_example(codes=[], meta={"candidate_codes": ["S1", "S2"]}))
    assert [t.augmentation for t in amb] == ["original", "drop_nonviolated", "shuffle_codes"]
    assert {"S1", "S2"} <= set(amb[1].policy.active_codes)  # candidates are never dropped
    safe = Formatter(seed=0, config=AugmentationConfig(shuffle_codes=0.0)).format(_example("safe", []))
    assert [t.augmentation for t in safe] == ["original", "drop_nonviolated"]
    assert all(t.target == "safe" for t in safe)


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


def test_tokenize_masks_everything_but_the_answer(tokenizer) -> None:
    from mmguard.tokenizer import encode_prompt

    t = original(CONV, "unsafe", ["S1", "S3"])
    tok = tokenize(tokenizer, t)
    prompt_ids = encode_prompt(tokenizer, build_prompt(CONV, DEFAULT_POLICY))
    answer = [271, 39257, 198, 50, 16, 21861, 18, 128009]  # \n\n unsafe \n S 1 ,S 3 <|eot_id|>
    assert tok.input_ids == prompt_ids + answer
    assert tok.labels == [IGNORE_INDEX] * len(prompt_ids) + answer
    assert tok.prompt_length == len(prompt_ids) and tok.input_ids[tok.prompt_length - 1] == 128007

    safe = tokenize(tokenizer, original(CONV, "safe", []))
    assert safe.labels[safe.prompt_length :] == [271, 19193, 128009]
    assert set(safe.labels[: safe.prompt_length]) == {IGNORE_INDEX}

    bare = tokenize(tokenizer, original(CONV, "unsafe", [], supervise_codes=False))
    assert bare.labels[bare.prompt_length :] == [271, 39257]  # decision only, no made-up codes, no stop

    native = tokenize(tokenizer, original(CONV, "safe", []), format=PromptFormat.NATIVE)
    assert native.labels[native.prompt_length :] == [19193, 128009]  # prompt already ends with \n\n


def test_tokenize_image_example_masks_image_token(tokenizer) -> None:
    from PIL import Image

    conv = Conversation.prompt("What is this?", Image.new("RGB", (32, 32), "white"))
    tok = tokenize(tokenizer, original(conv, "safe", []))
    assert 128256 in tok.input_ids[: tok.prompt_length] and tok.image is not None
    assert tok.labels[tok.input_ids.index(128256)] == IGNORE_INDEX
