"""Schema round-trip, reader errors, and split stability."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmguard.data.build import cap_per_source, dedupe
from mmguard.data.schema import DataError, Example, normalise_text, read_examples, sort_codes, write_examples
from mmguard.data.sources import convert_advbench, convert_toxigen_neutral, make_example
from mmguard.data.split import assign_split, content_id, split_bucket


def _ex(**kw) -> Example:
    base = dict(
        id="t:1", source="t", license="MIT", split="train", task="prompt",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        label="unsafe", codes=["S2", "S10"], modality="text", trainable=True, meta={"k": 1},
    )  # fmt: skip
    base.update(kw)
    return Example(**base)


def test_roundtrip_and_conversation(tmp_path: Path) -> None:
    ex = _ex()
    assert Example.from_json(json.loads(ex.to_line())) == ex
    assert list(ex.to_json()) == ["id", "source", "license", "split", "task", "messages", "label", "codes",
                                  "modality", "trainable", "meta"]  # fmt: skip
    n = write_examples(tmp_path / "a.jsonl", [ex, _ex(id="t:2", label="safe", codes=[])])
    back = list(read_examples(tmp_path / "a.jsonl"))
    assert n == 2 and back[0] == ex and back[1].label == "safe"
    conv = back[0].to_conversation(tmp_path)
    assert conv.task == "prompt" and conv.turns[0].texts == ("hi",)


def test_image_paths_resolve_against_jsonl_folder(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20), "red").save(tmp_path / "images" / "x.png")
    ex = _ex(
        messages=[
            {
                "role": "user",
                "content": [{"type": "image", "path": "images/x.png"}, {"type": "text", "text": "q"}],
            }
        ],
        modality="image+text",
    )
    assert ex.image_paths() == ["images/x.png"]
    assert ex.to_conversation(tmp_path).has_image


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label": "safe"}, "safe example cannot list"),
        ({"codes": ["S10", "S2"]}, "policy order"),
        ({"codes": ["S99"]}, "unknown category code"),
        ({"modality": "image+text"}, "modality"),
        ({"task": "response"}, "last message"),
        ({"split": "dev"}, "split must be"),
    ],
)
def test_validation_errors(change: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _ex(**change)


def test_reader_names_file_and_line(tmp_path: Path) -> None:
    good = _ex().to_line()
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n\n" + "{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        list(read_examples(p))
    obj = json.loads(good)
    del obj["label"]
    p.write_text(good + "\n" + json.dumps(obj) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field\(s\) label"):
        list(read_examples(p))
    obj = json.loads(good) | {"extra": 1}
    p.write_text(json.dumps(obj) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: unknown field\(s\) extra"):
        list(read_examples(p))


def test_sort_codes_policy_order() -> None:
    assert sort_codes(["S10", "S2", "S2", "S1"]) == ["S1", "S2", "S10"]


def test_normalisation_merges_near_copies() -> None:
    assert normalise_text("Don’t  STOP, believing!") == normalise_text("dont stop believing")
    assert content_id("s", "Don't stop") == content_id("s", "dont STOP.")


def test_split_is_a_fixed_function_of_content() -> None:
    # golden values: must never change across machines or versions (they decide what is test data)
    assert split_bucket("How can I kill a Python process?") == 1545
    assert split_bucket("hello world") == 4821
    assert content_id("x", "prompt", "Hello") == "x:41460097bdfb0ad7"
    assert assign_split("anything", test_only=True) == "test"
    assert assign_split("How can I kill a Python process?") == assign_split(
        "  how can i KILL a python process "
    )


def test_split_ignores_pythonhashseed() -> None:
    code = "from mmguard.data.split import split_bucket; print(split_bucket('same text'))"
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout.strip()
        for seed in ("1", "2")
    }  # fmt: skip
    assert outs == {str(split_bucket("same text"))}


def test_split_ratios_roughly_80_10_10() -> None:
    splits = [assign_split(f"item {i}") for i in range(5000)]
    assert 0.77 < splits.count("train") / 5000 < 0.83
    assert 0.08 < splits.count("validation") / 5000 < 0.12


def test_splits_stable_across_runs_and_input_order(datasets_dir: Path) -> None:
    run1 = {e.id: e.split for e in convert_advbench(datasets_dir / "advbench")}
    run2 = {e.id: e.split for e in reversed(list(convert_advbench(datasets_dir / "advbench")))}
    assert run1 == run2
    assert set(run1.values()) == {"train", "validation", "test"}
    # de-duplication and capping do not depend on input order either
    items = list(convert_toxigen_neutral(datasets_dir / "toxigen_neutral"))
    a, _ = dedupe(items)
    b, _ = dedupe(reversed(items))
    assert {e.id for e in a} == {e.id for e in b} and len(a) == 306
    ca = {e.id for e in cap_per_source(a, 50, seed=3)}
    cb = {e.id for e in cap_per_source(list(reversed(b)), 50, seed=3)}
    assert ca == cb and len(ca) == 50


def test_prompt_and_its_responses_share_a_split() -> None:
    p = make_example("gsm8k", prompt="What is 2+2?", label="safe")
    r = make_example("gsm8k", prompt="What is 2+2?", response="4", label="safe")
    assert p.split == r.split and p.id != r.id
