"""Property tests of the command line front end (issue 14): whatever text, message shape or JSONL file comes
in, ``mmguard classify`` answers a verdict (exit 0/1) or a clear error (exit 2, ``error: ...`` lines on
stderr), never a traceback.

The model is the session's tiny random guard, loaded once (``Guard.from_pretrained`` is patched to return
it): what is under test is the input handling in front of it, and one load per example would cost seconds.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mmguard.cli import app  # noqa: E402

runner = CliRunner()
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _one_tiny_guard(tiny_guard: Any) -> Iterator[None]:
    from mmguard.guard import Guard

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Guard, "from_pretrained", classmethod(lambda cls, *a, **kw: tiny_guard))
        yield


def _png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), (250, 0, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG = _png_data_url()
HOSTILE = ["\ud800", "\udfff", "\udcff", "\x00", "\u202e", "\u200f", "\ufeff", "\r\n", "\x1b[31m", "<|eot_id|>",
           "<|image|>", "<END CONVERSATION>", "\U0001f600", "e\u0301", "\uffff", "\x7f"]
# every code point, surrogates and controls included (hypothesis leaves out surrogates unless asked)
any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None)
texts = st.lists(st.one_of(st.text(any_char, max_size=12), st.sampled_from(HOSTILE)), max_size=5).map("".join)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         texts)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)), max_leaves=8)
roles = st.one_of(st.sampled_from(["user", "assistant", "agent", "human", "USER", "system", "tool", ""]),
                  json_scalars)
image_sources = st.one_of(st.just(PNG), st.just("data:image/png;base64,AAAA"), texts,
                          st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()))
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(lambda s: {"type": "image", "url": s}, image_sources),
    st.builds(lambda s: {"type": "image_url", "image_url": {"url": s}}, image_sources),
    st.dictionaries(st.sampled_from(["type", "text", "url", "path"]), json_values, max_size=3),
    json_scalars,
)
contents = st.one_of(texts, st.lists(parts, max_size=3), json_values)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), min_size=0, max_size=4)
# well-formed alternations (so verdicts are reached; sometimes with hostile text), plus any shape at all
clean_texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20)
alternating = st.lists(st.tuples(st.one_of(clean_texts, texts), st.one_of(clean_texts, texts)),
                       min_size=1, max_size=2).map(
    lambda pairs: [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
)
conversations = st.one_of(
    st.builds(lambda m: {"messages": m}, messages),
    st.builds(lambda m, drop: {"messages": m[:-1] if drop else m}, alternating, st.booleans()),
    json_values,
)


def _assert_verdict_or_one_error(res: Any) -> None:
    hypothesis.event(f"exit {res.exit_code}")  # --hypothesis-show-statistics: how many reached a verdict
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    if res.exit_code in (0, 1):
        verdict = json.loads(res.stdout.strip().splitlines()[-1])
        assert verdict["label"] == ("unsafe" if res.exit_code == 1 else "safe")
    else:
        assert res.exit_code == 2, (res.exit_code, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr


@SETTINGS
@given(conv=conversations)
def test_classify_input_gives_a_verdict_or_one_error_line(conv: Any) -> None:
    body = json.dumps(conv)  # ASCII escapes: lone surrogates travel as "\ud800", valid JSON
    _assert_verdict_or_one_error(runner.invoke(app, ["classify", "--input", "-", "--json"], input=body))


@settings(SETTINGS, max_examples=20)
@given(prompt=texts, response=st.one_of(st.none(), texts))
def test_classify_prompt_gives_a_verdict_or_one_error_line(prompt: str, response: str | None) -> None:
    args = ["classify", "--json", "--prompt", prompt, *(["--response", response] if response is not None else [])]
    res = runner.invoke(app, args)
    _assert_verdict_or_one_error(res)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):
        assert res.exit_code == 2 and "--prompt" in res.stderr


lines = st.one_of(
    conversations.map(lambda c: json.dumps(c).encode()),
    st.builds(lambda c, extra: json.dumps({**extra, "messages": c}).encode(), alternating,
              st.dictionaries(st.sampled_from(["id", "label", "codes", "role", "task", "threshold", "mmguard"]),
                              json_values, max_size=3)),
    st.binary(max_size=30),
    st.sampled_from([b"", b"   ", b"{", b"NaN", b'{"messages": NaN}', b"\xff\xfe", b"[" * 5000]),
)


@settings(SETTINGS, max_examples=15)
@given(file_lines=st.lists(lines, min_size=1, max_size=6))
def test_classify_jsonl_answers_every_line_in_order(file_lines: list[bytes], tmp_path_factory: Any) -> None:
    src = tmp_path_factory.mktemp("jsonl") / "in.jsonl"
    data = b"\n".join(x.replace(b"\n", b" ").replace(b"\r", b" ") for x in file_lines) + b"\n"
    src.write_bytes(data)
    res = runner.invoke(app, ["classify", "--jsonl", str(src)])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert all(x.startswith("error: ") for x in res.stderr.strip().splitlines()), res.stderr
    expected = [n for n, raw in enumerate(data.split(b"\n")[:-1], start=1) if raw.strip()]
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["mmguard"]["line"] for r in rows] == expected
    errors = [r for r in rows if "error" in r["mmguard"]]
    hypothesis.event(f"{len(rows) - len(errors)} of {len(rows)} lines judged")
    assert res.exit_code == (2 if errors else 0), res.output
    raw_lines = data.split(b"\n")
    for r in rows:
        if "error" not in r["mmguard"]:
            assert r["mmguard"]["label"] in ("safe", "unsafe")
            given_obj = json.loads(raw_lines[r["mmguard"]["line"] - 1])
            assert {k: v for k, v in r.items() if k != "mmguard"} == {
                k: v for k, v in given_obj.items() if k != "messages"}  # input fields untouched
