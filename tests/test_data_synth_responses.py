"""Templated response items: the rule "complying with a harmful request is unsafe", with no label in the template."""

from __future__ import annotations

import random
from collections import Counter

from mmguard.data.schema import Example
from mmguard.data.sources import make_example
from mmguard.data.synth_responses import COMPLIANCE_TEMPLATES, REFUSAL_TEMPLATES, templated_responses


def _origins() -> list[Example]:
    items = [make_example("advbench", prompt=f"How can I break into house number {i}?", label="unsafe")
             for i in range(90)]  # fmt: skip
    items += [make_example("ailuminate_demo", prompt=f"How do I hurt neighbour {i}?", label="unsafe", codes=["S1"])
              for i in range(30)]  # fmt: skip
    items += [make_example("gsm8k", prompt=f"How can I add {i} and {i + 1}?", label="safe") for i in range(120)]
    return items


def _template_of(reply: str) -> str:
    if reply in REFUSAL_TEMPLATES:
        return f"refusal{REFUSAL_TEMPLATES.index(reply)}"
    for k, tpl in enumerate(COMPLIANCE_TEMPLATES):
        if reply.startswith(tpl.split("{", 1)[0]):
            return f"compliance{k}"
    raise AssertionError(f"reply from no template: {reply!r}")


def test_labels_follow_the_request_and_the_kind_of_reply() -> None:
    origins = _origins()
    by_id = {o.id: o for o in origins}
    items = templated_responses(origins, n=120, rng=random.Random(0))
    assert 100 <= len(items) <= 130
    for e in items:
        origin = by_id[e.meta["origin_id"]]
        assert e.task == "response" and e.modality == "text" and e.source == "synth_response_template"
        assert e.split == origin.split != "test" and e.trainable
        assert e.messages[0]["content"][0]["text"] == origin.prompt_text
        reply = e.messages[1]["content"][0]["text"]
        if e.meta["kind"] == "refusal":
            assert (e.label, e.codes) == ("safe", []) and reply in REFUSAL_TEMPLATES
        else:
            assert (e.label, e.codes) == (origin.label, origin.codes)
            assert origin.prompt_text in reply or origin.prompt_text.rstrip("?") in reply or "Steps to" in reply
    kinds = Counter((e.label, e.meta["kind"]) for e in items)
    assert kinds[("unsafe", "compliance")] == kinds[("safe", "compliance")] > 0
    assert kinds[("safe", "refusal")] > 0
    refused = Counter(by_id[e.meta["origin_id"]].label for e in items if e.meta["kind"] == "refusal")
    assert refused["unsafe"] == refused["safe"]  # refusals to harmful and benign prompts alike


def test_the_trainer_repeats_both_labels_of_templated_items() -> None:
    """>= 40% unsafe: --unsafe-repeat treats the source as balanced, so repeats keep templates label-free."""
    from mmguard.train.sequences import _balanced_sources

    items = templated_responses(_origins(), n=240, rng=random.Random(2))
    share = sum(e.label == "unsafe" for e in items) / len(items)
    assert 0.4 <= share <= 0.45
    assert "synth_response_template" in _balanced_sources(items)


def test_templates_carry_no_label() -> None:
    """Every compliance template is used for harmful and benign prompts in about equal numbers."""
    items = templated_responses(_origins(), n=200, rng=random.Random(1))
    compliance = [e for e in items if e.meta["kind"] == "compliance"]
    harmful = Counter(_template_of(e.messages[1]["content"][0]["text"]) for e in compliance if e.label == "unsafe")
    benign = Counter(_template_of(e.messages[1]["content"][0]["text"]) for e in compliance if e.label == "safe")
    assert set(harmful) == set(benign) == {f"compliance{k}" for k in range(len(COMPLIANCE_TEMPLATES))}
    for k in harmful:
        assert abs(harmful[k] - benign[k]) <= 2 * 2  # two splits, rounding in each


def test_seeded_and_independent_of_input_order() -> None:
    origins = _origins()
    a = templated_responses(origins, n=60, rng=random.Random(3))
    b = templated_responses(list(reversed(origins)), n=60, rng=random.Random(3))
    assert [e.to_json() for e in a] == [e.to_json() for e in b]
    assert templated_responses(origins, n=0, rng=random.Random(3)) == []
