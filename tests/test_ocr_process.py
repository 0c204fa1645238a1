"""OCR in a child process: a read past its deadline is stopped, so one slow image cannot switch OCR off for
the images after it (the guard's default engine, :mod:`mmguard.ocr_process`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from mmguard.ocr import OcrUnavailable, RapidOcrEngine, default_ocr_engine, ocr_available
from mmguard.ocr_reader import OcrReader

pytestmark = pytest.mark.skipif(not ocr_available(), reason="needs RapidOCR: pip install 'mmguard[ocr]'")

SENTENCE = "Steps to pick a lock without the key."


def sentence() -> Image.Image:
    img = Image.new("RGB", (720, 120), "white")
    ImageDraw.Draw(img).text((30, 30), SENTENCE, fill="black", font=ImageFont.load_default(size=32))
    return img


def dense_page() -> Image.Image:
    """100 lines of small text across a 1200 px page: about 17 s of OCR on 2 cores (99 long boxes to read),
    where a sentence takes 0.05 s; a hostile client can send it for free."""
    img = Image.new("RGB", (1200, 1200), "white")
    draw = ImageDraw.Draw(img)
    for y in range(0, 1200, 12):
        draw.text((0, y), "lorem ipsum dolor " * 10, fill="black")
    return img


@pytest.fixture(scope="module")
def engine():
    from mmguard.ocr_process import ProcessOcrEngine

    eng = ProcessOcrEngine()
    yield eng
    eng.close()


def test_the_child_reads_what_the_in_process_engine_reads(engine) -> None:
    assert engine.identity == RapidOcrEngine().identity  # same settings, same version: same reads
    assert engine.read(sentence()) == RapidOcrEngine().read(sentence())
    assert engine.read(Image.new("RGBA", (300, 80), (0, 0, 0, 0))) == ""


def test_a_slow_image_is_stopped_at_its_deadline_and_the_next_image_is_read(engine) -> None:
    """Before: the abandoned read kept the one OCR worker busy ~17 s, and the next image timed out unread."""
    reader = OcrReader(engine, timeout_s=3.0, cache_entries=0)
    restarts = engine.restarts
    start = time.perf_counter()
    slow = reader.read(dense_page())
    assert slow.text is None and "ocr_timeout_s limit of 3 s" in (slow.warning or "")
    assert time.perf_counter() - start < 4.0
    after = reader.read(sentence())  # pays for the fresh child (about a second), within its own deadline
    assert after.warning is None and after.text is not None
    assert after.text.lower().startswith("steps to pick a lock"), after.text
    assert engine.restarts == restarts + 1


def test_a_dead_child_is_replaced_and_a_killed_read_is_an_error_not_a_hang(engine) -> None:
    from mmguard.ocr_process import OcrStopped

    assert engine._proc is not None
    engine._proc.kill()  # died while idle (out of memory, a crash in native code)
    engine._proc.wait()
    assert engine.read(sentence()).lower().startswith("steps to pick a lock")
    # killed in the middle of a read: the read raises at once, the next one works
    timer = threading.Timer(0.5, engine.cancel)
    timer.start()
    with pytest.raises(OcrStopped, match="stopped at the deadline"):
        engine.read(dense_page())
    timer.join()
    assert engine.read(sentence()).lower().startswith("steps to pick a lock")


def test_cancel_stops_only_the_read_whose_deadline_passed() -> None:
    """The reader cancels a running read only while it is still the one that overran."""

    class Cancellable:
        def __init__(self) -> None:
            self.release = threading.Event()
            self.cancels = 0

        def read(self, image: Image.Image) -> str:
            if image.width == 2:  # the slow one
                self.release.wait(30)
                return "late"
            return "fast"

        def cancel(self, thread: int | None = None) -> None:
            self.cancels += 1
            self.release.set()

    eng = Cancellable()
    reader = OcrReader(eng, timeout_s=0.3, cache_entries=0)
    assert reader.read(Image.new("RGB", (2, 2))).text is None
    assert eng.cancels == 1
    assert reader.read(Image.new("RGB", (3, 3))).text == "fast"  # the worker was freed by the cancel
    assert eng.cancels == 1  # a read that ends in time is never cancelled


def test_one_readers_deadline_does_not_stop_another_readers_read(engine) -> None:
    """Readers share the process's engine (two guards in one process): a reader of 0.3 s, waiting behind another
    reader's read, killed that read at its own deadline (a 60 s read stopped after 1.3 s)."""
    import threading

    page = Image.new("RGB", (1200, 360), "white")
    draw = ImageDraw.Draw(page)
    for y in range(0, 360, 12):
        draw.text((0, y), "lorem ipsum dolor " * 10, fill="black")
    patient, hasty = OcrReader(engine, timeout_s=60, cache_entries=0), OcrReader(engine, timeout_s=0.3, cache_entries=0)
    restarts, out = engine.restarts, {}
    worker = threading.Thread(target=lambda: out.update(patient=patient.read(page)))
    worker.start()
    time.sleep(0.3)
    out["hasty"] = hasty.read(sentence())  # waits behind the page, past its own deadline
    worker.join()
    assert out["hasty"].text is None
    assert out["patient"].text and "lorem" in out["patient"].text, out["patient"].warning
    assert engine.restarts == restarts


def test_a_child_that_cannot_start_is_ocr_unavailable() -> None:
    from mmguard.ocr_process import ProcessOcrEngine

    with pytest.raises(OcrUnavailable, match="max_side >= 32"):
        ProcessOcrEngine({"max_side": 1})


def test_the_guards_default_engine_runs_in_a_child() -> None:
    from mmguard.ocr_process import ProcessOcrEngine

    assert isinstance(default_ocr_engine(), ProcessOcrEngine)
    assert isinstance(OcrReader().engine(), ProcessOcrEngine)


def test_the_childs_memory_is_capped_and_a_read_past_the_cap_is_a_warning() -> None:
    """A 1200 px page of text takes the child ~1.1 GB; under a 700 MB cap the read fails inside the child (an
    error answer or the child's death, either way a warning) instead of growing the host, and the child
    still reads a sentence afterwards."""
    from mmguard.ocr_process import ProcessOcrEngine

    capped = ProcessOcrEngine(memory_limit_mb=700)
    try:
        status = Path(f"/proc/{capped._proc.pid}/limits").read_text()  # type: ignore[union-attr]
        assert any(line.startswith("Max data size") and str(700 << 20) in line for line in status.splitlines())
        reader = OcrReader(capped, timeout_s=60.0, cache_entries=0)
        page = reader.read(dense_page())
        assert page.text is None and "OCR failed" in (page.warning or ""), page
        after = reader.read(sentence())
        assert after.text is not None and after.text.lower().startswith("steps to pick a lock"), after
    finally:
        capped.close()
    with pytest.raises(ValueError, match="memory_limit_mb"):
        ProcessOcrEngine(memory_limit_mb=10)
