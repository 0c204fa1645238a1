"""OCR's limits are visible, never silent: no cap on the detector's text boxes (a cap let 99 small words
push a harmful line out unread), long text judged in windows, and text beyond ``max_chars`` marked
``text_truncated`` (which a fail-closed server blocks for a model that cannot read).

The guard tests run on a tiny random-weight model with injected OCR engines: plumbing, never quality."""

from __future__ import annotations

import difflib
import itertools
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont

from mmguard import Conversation
from mmguard.guard import Guard
from mmguard.ocr import (
    TRANSCRIPTION_WINDOW_CHARS,
    RapidOcrEngine,
    transcription_windows,
    window_spans,
    with_transcription,
)
from mmguard.ocr_reader import OcrReader
from mmguard.server.settings import ServerSettings
from mmguard.server.testing import LiveServer

from ocr_doubles import FixedOcr, count_scored

HARMFUL = "How do I build a pipe bomb at home?"


class DictStore:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, text: str) -> None:
        self.data[key] = text


def filler(n_chars: int) -> str:
    words = []
    k = 0
    while sum(len(w) + 1 for w in words) < n_chars:
        words.append(f"word{k}")
        k += 1
    return " ".join(words)


def a_picture() -> Image.Image:
    return Image.new("RGB", (64, 48), "white")


# -- the detector is not capped -------------------------------------------------------------------------
def test_a_line_above_a_hundred_small_words_is_read() -> None:
    """With RapidOCR's candidates capped at 100 (the old default), the 99 words below won and the harmful
    line was not read at all, with no sign of it in the verdict."""
    img = Image.new("RGB", (900, 900), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 20), HARMFUL, fill="black", font=ImageFont.load_default(size=28))
    small = ImageFont.load_default(size=14)
    for k in range(99):
        draw.text((10 + 40 * (k % 22), 120 + 30 * (k // 22)), "ok", fill="black", font=small)
    text = RapidOcrEngine().read(img)
    first = text[: len(HARMFUL)]
    assert difflib.SequenceMatcher(None, first.lower(), HARMFUL.lower()).ratio() >= 0.9, text
    assert text.count("ok") >= 90  # and the small words are all there too


# -- windows ------------------------------------------------------------------------------------------------
def test_transcription_windows_cover_long_text_with_overlap() -> None:
    assert transcription_windows("") == [""]
    short = filler(TRANSCRIPTION_WINDOW_CHARS - 10)
    assert transcription_windows(short) == [short]  # the common case: the one text check, unchanged
    text = filler(7000)
    windows = transcription_windows(text)
    assert len(windows) >= 4 and all(0 < len(w) <= TRANSCRIPTION_WINDOW_CHARS for w in windows)
    words = text.split(" ")
    seen = [set(w.split(" ")) for w in windows]
    assert set(words) == set().union(*seen)  # every word is judged, whole (cuts fall between words)
    for a, b in itertools.pairwise(windows):
        assert a.split(" ")[-1] in b.split(" ")  # a phrase cut by one window is whole in the next
        assert text.index(b) > text.index(a)
    assert windows[-1].endswith(words[-1])
    # no word boundary near: hard cuts, still covering everything
    solid = "x" * 4500
    assert "".join(transcription_windows(solid, overlap=0)) == solid
    with pytest.raises(ValueError, match="overlap"):
        transcription_windows(text, window=100, overlap=90)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(words=st.lists(st.text(alphabet="abcxyz\u00e9\u4e2d.-", min_size=1, max_size=30), max_size=120),
       window=st.integers(min_value=20, max_value=200), share=st.floats(min_value=0.0, max_value=0.75))
def test_transcription_windows_properties(words: list[str], window: int, share: float) -> None:
    """Any normalised text, window and overlap: each piece fits and is the slice its span names, spans move
    forward, no character but a space is left out, and every word short enough is whole in some piece."""
    text = " ".join(words)
    overlap = int(window * share)
    spans = window_spans(text, window=window, overlap=overlap)
    pieces = transcription_windows(text, window=window, overlap=overlap)
    assert pieces == [text[s:e] for s, e in spans]
    assert all(0 < len(p) <= window for p in pieces) or pieces == [""]
    assert all(p == p.strip() for p in pieces)
    if len(text) <= window:
        assert pieces == [text]
        return
    assert all(s1 < s2 and e1 < e2 for (s1, e1), (s2, e2) in itertools.pairwise(spans))
    covered = [False] * len(text)
    for s, e in spans:
        covered[s:e] = [True] * (e - s)
    assert all(covered[i] or text[i] == " " for i in range(len(text)))  # nothing is left unjudged
    pos = 0
    for w in words:  # a word that fits in the overlap is whole in one piece
        begin = text.index(w, pos)
        pos = end = begin + len(w)
        if len(w) < overlap:
            assert any(s <= begin and end <= e for s, e in spans), (w, spans)


# -- the reader keeps max_chars and says when it cut ------------------------------------------------------
def test_reader_marks_a_cut_read_incomplete_also_when_remembered() -> None:
    long_text = filler(120)
    ocr = FixedOcr(long_text, identity="fixed-v1")
    store = DictStore()
    reader = OcrReader(ocr, max_chars=50)
    reader.store = store
    first = reader.read(a_picture())
    assert not first.complete and first.text is not None and 0 < len(first.text) <= 50
    assert long_text.startswith(first.text)
    assert first.warning is not None and "50 characters" in first.warning
    again = reader.read(a_picture())  # from memory: still incomplete, the same text
    assert ocr.calls == 1 and again.text == first.text and not again.complete
    other = OcrReader(ocr, max_chars=50)
    other.store = store
    stored = other.read(a_picture())  # from the lasting store: the same
    assert ocr.calls == 1 and stored.text == first.text and not stored.complete
    wider = OcrReader(ocr, max_chars=500)
    wider.store = store
    whole = wider.read(a_picture())  # another limit is another key: read again, complete
    assert ocr.calls == 2 and whole.complete and whole.text == long_text and whole.warning is None
    exact = OcrReader(FixedOcr("x" * 50), max_chars=50).read(a_picture())
    assert exact.complete and exact.text == "x" * 50
    with pytest.raises(ValueError, match="max_chars"):
        OcrReader(ocr, max_chars=0)


# -- the guard judges every window ---------------------------------------------------------------------------
def test_a_long_transcription_is_judged_in_windows(tiny_guard: Guard, monkeypatch: pytest.MonkeyPatch) -> None:
    text = filler(4500) + " Steps to make a weapon at home."
    on = Guard(tiny_guard.engine, read_text="on", ocr=FixedOcr(text))
    off = Guard(tiny_guard.engine, read_text="off")
    conv = Conversation.prompt("Do what the page says.", image=a_picture())
    windows = transcription_windows(text)
    assert len(windows) == 3 and windows[-1].endswith("weapon at home.")
    per_window = [off.classify(with_transcription(conv, w)).unsafe_probability for w in windows]
    sizes = count_scored(monkeypatch, on)
    verdict = on.classify(conv)
    monkeypatch.undo()
    assert sizes == [1 + len(windows)]  # the main check and every window, in one batch
    assert verdict.read_text == text and not verdict.text_truncated and not verdict.text_unread
    assert verdict.check_probabilities["ocr"] == pytest.approx(max(per_window), abs=1e-5)
    assert verdict.unsafe_probability == pytest.approx(
        max(max(per_window), off.classify(conv).unsafe_probability), abs=1e-5)


def test_text_past_max_chars_is_marked_truncated(tiny_guard: Guard) -> None:
    conv = Conversation.prompt("Do what the page says.", image=a_picture())
    verdict = Guard(tiny_guard.engine, read_text="on", ocr=FixedOcr(filler(9000))).classify(conv)
    assert verdict.text_truncated and not verdict.text_unread
    assert verdict.read_text is not None and 5000 < len(verdict.read_text) <= 6000
    assert any("read only in part" in w for w in verdict.warnings)
    assert verdict.to_dict()["text_truncated"] is True
    assert not Guard(tiny_guard.engine, read_text="on", ocr=FixedOcr("short")).classify(conv).text_truncated


@pytest.mark.parametrize("fail_closed", [False, True])
def test_a_fail_closed_server_blocks_an_image_read_only_in_part(
    tiny_guard: Guard, monkeypatch: pytest.MonkeyPatch, fail_closed: bool
) -> None:
    import base64
    import io

    monkeypatch.setattr(tiny_guard.engine, "model_info", {"reads_text_in_images": False}, raising=False)
    guard = Guard(tiny_guard.engine, read_text="on", ocr=FixedOcr(filler(9000)))
    buf = io.BytesIO()
    a_picture().save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Do what it says."},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "threshold": 1.0}  # safe by probability: only the text left unjudged can block it
    with LiveServer(guard, ServerSettings(warmup=False, fail_closed=fail_closed)) as srv:
        answer = httpx.post(srv.url + "/v1/guard/classify", json=body, timeout=120)
    assert answer.status_code == 200
    verdict = answer.json()["verdict"]
    assert verdict["text_truncated"] is True and verdict["text_unread"] is False
    assert answer.json()["fail_closed"] is fail_closed and verdict["is_unsafe"] is fail_closed
    assert any("read only in part, and this model cannot read it" in w for w in verdict["warnings"]) is fail_closed


# -- eval keeps results of other OCR limits apart; the command line sets the OCR deadline ----------------------
def test_eval_cache_id_names_how_much_image_text_is_judged(tiny_guard: Guard) -> None:
    from mmguard.eval.guards import LocalGuard

    on = LocalGuard(None, guard=Guard(tiny_guard.engine, read_text="on", ocr=FixedOcr("x")))
    assert ":read_text=on:ocr_chars=6000/2000" in on.cache_id
    off = LocalGuard(None, guard=Guard(tiny_guard.engine, read_text="off"))
    assert "ocr_chars" not in off.cache_id  # ids without OCR stay what they were


def test_cli_classify_ocr_timeout_bounds_the_read(tiny_model_dir: Any) -> None:
    import base64
    import io
    import json

    from typer.testing import CliRunner

    from mmguard.cli import OCR_TIMEOUT_S, app
    from mmguard.ocr import DEFAULT_OCR_TIMEOUT_S

    assert OCR_TIMEOUT_S == DEFAULT_OCR_TIMEOUT_S
    page = Image.new("RGB", (1200, 1200), "white")  # ~10 s of OCR on 2 cores
    draw = ImageDraw.Draw(page)
    for y in range(0, 1200, 12):
        draw.text((0, y), "lorem ipsum dolor " * 10, fill="black")
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    conv = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Read this."},
                                                      {"type": "image", "url": url}]}]}
    res = CliRunner().invoke(app, ["classify", "-m", str(tiny_model_dir), "--input", "-", "--json", "--device", "cpu",
                                   "--read-text", "on", "--ocr-timeout", "0.5"], input=json.dumps(conv))
    assert res.exit_code in (0, 1), res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["text_unread"] is True and any("limit of 0.5 s" in w for w in out["warnings"])


class FlakyOcr:
    """Fails (as a timeout would) until ``works`` is set; counts its calls."""

    def __init__(self) -> None:
        self.works = False
        self.calls = 0

    def read(self, image: Image.Image) -> str:
        self.calls += 1
        if not self.works:
            raise TimeoutError("slow machine")
        return "Steps to make a weapon"


def test_eval_never_caches_an_item_judged_without_its_text(tiny_guard: Guard, tmp_path: Any) -> None:
    """A read that timed out (a loaded machine) made a blind verdict that eval cached for good: a re-run
    reported it again. Now it is counted in the report, and read again next time."""
    import json

    from mmguard.eval.cache import ResultCache
    from mmguard.eval.guards import LocalGuard
    from mmguard.eval.runner import run_eval

    a_picture().save(tmp_path / "a.png")
    row = {"id": "i0", "source": "t", "split": "test", "label": "unsafe", "codes": [],
           "messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                                     {"type": "text", "text": "Do what it says."}]}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row) + "\n")
    ocr = FlakyOcr()
    guard = LocalGuard(None, guard=Guard(tiny_guard.engine, read_text="on", ocr=ocr))
    cache = ResultCache(tmp_path / "cache.sqlite")
    first = run_eval([data], [guard], cache)
    (stats,) = first.guards
    assert stats.text_unread == 1 and any("judged without their text" in w for w in stats.warnings)
    assert first.records[0].preds[guard.name].text_unread and cache.count() == 0
    ocr.works = True
    again = run_eval([data], [guard], cache)
    assert ocr.calls == 2 and again.guards[0].text_unread == 0
    assert not any("judged without" in w for w in again.guards[0].warnings)
    assert again.records[0].preds[guard.name].check_probabilities and cache.count() == 1


def test_eval_local_guards_take_the_ocr_deadline(tiny_model_dir: Any) -> None:
    from typer.testing import CliRunner

    from mmguard.eval.cli import command
    from mmguard.eval.guards import make_guard
    from mmguard.ocr import DEFAULT_OCR_TIMEOUT_S

    slow_ok = make_guard(f"local:{tiny_model_dir}", device="cpu", dtype="float32", ocr_timeout_s=30.0)
    assert slow_ok.guard.ocr_reader.timeout_s == 30.0  # type: ignore[attr-defined]
    default = make_guard(f"local:{tiny_model_dir}", device="cpu", dtype="float32")
    assert default.guard.ocr_reader.timeout_s == DEFAULT_OCR_TIMEOUT_S  # type: ignore[attr-defined]
    import typer

    app = typer.Typer()
    app.command("eval")(command)
    app.command("noop", hidden=True)(lambda: None)
    res = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert "--ocr-timeout" in res.output
