"""OCR engines for tests (mmguard.ocr.OcrEngine doubles): what they read is known, so which checks run and
how their probabilities combine can be asserted exactly."""

from __future__ import annotations

import threading
from typing import Any

from PIL import Image


class FixedOcr:
    """Reads a fixed text; counts its calls. ``identity``: what a lasting store of reads is keyed by."""

    def __init__(self, text: str, identity: str | None = None) -> None:
        self.text = text
        self.calls = 0
        if identity is not None:
            self.identity = identity

    def read(self, image: Image.Image) -> str:
        self.calls += 1
        return self.text


class FailingOcr:
    def read(self, image: Image.Image) -> str:
        raise RuntimeError("onnx session broke")


class StuckOcr:
    """Blocks until released (a hung OCR call)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def read(self, image: Image.Image) -> str:
        self.release.wait(30)
        return "too late"


def count_scored(monkeypatch: Any, guard: Any) -> list[int]:
    """Spy on ``guard.engine.score``: the returned list gets each call's number of items (the checks in a batch)."""
    sizes: list[int] = []
    real_score = guard.engine.score

    def counting_score(items: Any, **kw: Any) -> Any:
        sizes.append(len(items))
        return real_score(items, **kw)

    monkeypatch.setattr(guard.engine, "score", counting_score)
    return sizes
