"""The evaluation data reader: streaming, clear errors naming file and line, unknown codes kept."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from PIL import Image

from mmguard.eval.data import DataError, iter_records, scan


def _line(text: str, label: str = "safe", codes: list[str] | None = None, **extra: object) -> str:
    obj = {"messages": [{"role": "user", "content": text}], "label": label, "codes": codes or [], **extra}
    return json.dumps(obj)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_minimal_lines_get_defaults_and_stream(tmp_path: Path) -> None:
    f = _write(tmp_path / "set.jsonl", [_line("hi"), "", _line("bad", "unsafe", ["s1", "S10"])])
    it = iter_records(f)
    assert isinstance(it, types.GeneratorType)  # streamed, not loaded
    a, b = list(it)
    assert (a.id, a.source, a.line, a.label, a.codes) == ("set.jsonl:1", "set", 1, "safe", ())
    assert b.line == 3 and b.codes == ("S1", "S10") and b.y == 1
    assert b.conversation().task == "prompt"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "'label' must be 'safe' or 'unsafe'"),
        (json.dumps({"label": "safe"}), "'messages' must be a non-empty list"),
        (_line("x", "safe", ["S1"]), "label is 'safe' but codes"),
        (_line("x", "unsafe", ["S 1"]), "invalid category code"),
        (_line("x", task="maybe"), "'task' must be 'prompt' or 'response'"),
        (_line("x", modality="audio"), "'modality' must be"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = _write(tmp_path / "bad.jsonl", [_line("ok"), line])
    with pytest.raises(DataError) as err:
        list(iter_records(f))
    assert str(err.value).startswith(f"{f}:2:")
    assert message in str(err.value)


def test_conversation_errors_name_file_and_line(tmp_path: Path) -> None:
    lines = [
        _line("ok"),
        json.dumps({"messages": [{"role": "user", "content": "q"}], "label": "safe", "task": "response"}),
        json.dumps(
            {
                "messages": [{"role": "user", "content": [{"type": "image", "path": "missing.png"}]}],
                "label": "safe",
            }
        ),
        json.dumps({"messages": [{"role": "system", "content": "x"}], "label": "safe"}),
    ]
    items = list(iter_records(_write(tmp_path / "c.jsonl", lines)))
    for item, expect in zip(
        items[1:], ["task is 'response'", "bad conversation", "bad conversation"], strict=True
    ):
        with pytest.raises(DataError, match=expect) as err:
            item.conversation()
        assert str(err.value).startswith(f"{tmp_path / 'c.jsonl'}:{item.line}:")


def test_image_paths_are_relative_to_the_file_and_modality_is_checked(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    msg = [
        {"role": "user", "content": [{"type": "image", "path": "img/a.png"}, {"type": "text", "text": "?"}]}
    ]
    f = _write(
        tmp_path / "m.jsonl",
        [
            json.dumps({"messages": msg, "label": "safe", "modality": "text"}),
            json.dumps({"messages": msg, "label": "safe", "modality": "image+text"}),
        ],
    )
    wrong, right = list(iter_records(f))
    with pytest.raises(DataError, match="modality is 'text'"):
        wrong.conversation()
    assert right.conversation().has_image


def test_split_filter_unknown_codes_and_limit(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "s.jsonl",
        [
            _line("a", split="train"),
            _line("b", split="test"),
            _line("c"),
            _line("d", "unsafe", ["S99"], split="test"),
        ],
    )
    test = list(iter_records(f, split="test"))
    assert [i.id for i in test] == ["s.jsonl:2", "s.jsonl:3", "s.jsonl:4"]
    assert test[-1].codes == ("S99",)  # unknown to the policy: kept, reported later
    assert scan([f], split="test").count == 3
    assert scan([f], split=None, limit=2).count == 2


def test_full_schema_lines_are_checked_by_the_shared_schema(tmp_path: Path) -> None:
    full = {
        "id": "x",
        "source": "src",
        "license": "MIT",
        "split": "test",
        "task": "prompt",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "label": "unsafe",
        "codes": ["S2", "S77"],
        "modality": "text",
        "trainable": False,
        "meta": {},
    }
    ok = list(iter_records(_write(tmp_path / "ok.jsonl", [json.dumps(full)])))
    assert ok[0].codes == ("S2", "S77") and ok[0].source == "src"
    bad = dict(full, license="")
    with pytest.raises(DataError, match="'license' must be a non-empty string") as err:
        list(iter_records(_write(tmp_path / "bad.jsonl", [json.dumps(full), json.dumps(bad)])))
    assert str(err.value).startswith(f"{tmp_path / 'bad.jsonl'}:2:")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        list(iter_records(tmp_path / "nope.jsonl"))
