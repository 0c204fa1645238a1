"""``mmguard data sample``: seeded shares of each kind of train item, other splits whole, images still found."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmguard.data.cli import app
from mmguard.data.sample import parse_shares, sample_train, share_of
from mmguard.data.schema import DataError, Example, read_examples, write_examples


def _example(i: int, task: str, image: bool, split: str = "train") -> Example:
    content: list[dict] = [{"type": "text", "text": f"question {i}"}]
    if image:
        content.insert(0, {"type": "image", "path": "images/a.png"})
    messages = [{"role": "user", "content": content}]
    if task == "response":
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]})
    return Example(id=f"x{i}", source="s", license="MIT", split=split, task=task, messages=messages,  # type: ignore[arg-type]
                   label="safe", modality="image+text" if image else "text")


def _mix() -> list[Example]:
    kinds = [("prompt", False), ("prompt", True), ("response", False)]
    return [_example(i, *kinds[i % 3]) for i in range(600)] + [_example(1000 + i, "response", False, "validation")
                                                                 for i in range(10)]


def test_shares_apply_per_kind_with_one_seeded_draw_per_train_item() -> None:
    shares = parse_shares(["response=0.2", "prompt/image+text=0.5"])
    kept = list(sample_train(_mix(), shares, seed=3))
    # the same draws by hand: one number per train item, in order
    rng = random.Random(3)
    expected = [e.id for e in _mix() if e.split != "train" or rng.random() < share_of(e, shares)]
    assert [e.id for e in kept] == expected
    count = {k: sum(1 for e in kept if e.split == "train" and (e.task, e.modality) == k)
             for k in [("prompt", "text"), ("prompt", "image+text"), ("response", "text")]}
    assert count[("prompt", "text")] == 200  # not named: kept whole
    assert 60 < count[("prompt", "image+text")] < 140 and 15 < count[("response", "text")] < 70
    assert sum(e.split == "validation" for e in kept) == 10  # other splits untouched
    assert [e.id for e in sample_train(_mix(), shares, seed=3)] == [e.id for e in kept]  # deterministic


def test_the_most_specific_share_wins() -> None:
    shares = parse_shares(["prompt=0", "prompt/image+text=1"])
    kept = list(sample_train(_mix(), shares, seed=0))
    kinds = {(e.task, e.modality) for e in kept if e.split == "train"}
    assert kinds == {("prompt", "image+text"), ("response", "text")}


@pytest.mark.parametrize("spec, message", [("answer=0.5", "KIND=FRACTION"), ("prompt", "KIND=FRACTION"),
                                           ("prompt=half", "not a number"), ("prompt=1.5", "within 0 and 1")])
def test_bad_shares_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_shares([spec])


def test_a_kind_given_twice_is_an_error() -> None:
    with pytest.raises(DataError, match="given twice"):
        parse_shares(["prompt=0.1", "prompt=0.2"])


def test_cli_writes_a_file_whose_images_resolve_from_its_own_folder(tmp_path: Path) -> None:
    src = tmp_path / "build"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.png").write_bytes(b"png")
    write_examples(src / "train.jsonl", _mix())
    out = tmp_path / "elsewhere" / "mix" / "train.jsonl"
    res = CliRunner().invoke(app, ["sample", str(src / "train.jsonl"), "--out", str(out), "--share", "prompt=0.5",
                                   "--seed", "1"])
    assert res.exit_code == 0, res.output
    kept = list(read_examples(out))
    assert [e.id for e in kept] == [e.id for e in sample_train(_mix(), {"prompt": 0.5}, seed=1)]
    images = [p for e in kept for p in e.image_paths()]
    assert images and all((out.parent / p).resolve() == (src / "images" / "a.png").resolve() for p in images)
    res = CliRunner().invoke(app, ["sample", str(src / "train.jsonl"), "--out", str(out), "--share", "prompt=2"])
    assert res.exit_code == 2 and "within 0 and 1" in res.output
    res = CliRunner().invoke(app, ["sample", str(src / "train.jsonl"), "--out", str(src / "train.jsonl"),
                                   "--share", "prompt=0.5"])
    assert res.exit_code == 2 and "FILE itself" in res.output
    json.loads(out.read_text().splitlines()[0])  # still one JSON object a line
