"""Reading text in images: an OCR stage for guards whose model cannot read.

A typographic attack (FigStep) writes the harmful request into the image and asks an innocent
question in text. A model that cannot read (mmguard-mini) cannot judge it; an OCR engine can. The
guard then runs a second, text-only check of the *transcription*, built by :func:`with_transcription`
(``read_text`` in :class:`mmguard.guard.Guard`):

* the main check sees the conversation unchanged (its prompt is byte-identical);
* the second check sees the same turns without the image, and in the turn that held the image one
  more text part, exactly ``"Text in the image: {text}"``; a text over 2,000 characters is checked in
  overlapping windows (:func:`transcription_windows`), the most unsafe one counting, up to the reader's
  ``max_chars`` (6,000; past it the verdict says ``text_truncated``).

The default engine is RapidOCR (Apache-2.0; PP-OCR ONNX models inside the ``rapidocr`` wheel, run by
onnxruntime: pip only, no network, no system package). It is loaded once per process, lazily, and
guarded by a lock. :class:`mmguard.ocr_reader.OcrReader` bounds the time: each image gets ``timeout_s`` in a
worker thread; a failure or a timeout becomes a warning, never an exception.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from .conversation import Conversation, Turn

__all__ = [
    "DEFAULT_OCR_CACHE_ENTRIES",
    "DEFAULT_OCR_MAX_CHARS",
    "DEFAULT_OCR_TIMEOUT_S",
    "TRANSCRIPTION_PREFIX",
    "TRANSCRIPTION_WINDOW_CHARS",
    "OcrEngine",
    "OcrUnavailable",
    "RapidOcrEngine",
    "default_ocr_engine",
    "merge_reads",
    "normalise_text",
    "ocr_available",
    "prepare_views",
    "reading_order",
    "transcription_windows",
    "window_spans",
    "with_transcription",
]

TRANSCRIPTION_PREFIX = "Text in the image: "
DEFAULT_OCR_TIMEOUT_S = 5.0
DEFAULT_OCR_MAX_CHARS = 6000  # of an image's text, judged (in windows); beyond it the verdict says text_truncated
DEFAULT_OCR_CACHE_ENTRIES = 256  # distinct images whose text is remembered (at most 1.5M characters)
# one text check judges at most this much of the transcription (about 500 tokens; mmguard-mini v2 was trained on
# transcriptions far shorter); longer text is judged in overlapping windows of this size
TRANSCRIPTION_WINDOW_CHARS = 2000
TRANSCRIPTION_WINDOW_OVERLAP = 200
_ENGINE_MAX_CHARS = 100_000  # what one read may return at all: a memory bound, not a judging bound
DETAIL_SIDE = 2240  # a large image's tiles are cut from it at this size at most (the image loader's own bound)
_NO_BOX_CAP = 1 << 30  # RapidOCR's Det.max_candidates when uncapped (its own default, 1000, is a cap too)
OCR_INSTALL_HINT = "pip install 'mmguard[ocr]'"
_WS_RE = re.compile(r"\s+")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class OcrUnavailable(RuntimeError):
    """The OCR package is not installed (the message names the pip command)."""


@runtime_checkable
class OcrEngine(Protocol):
    """Anything that turns an image into the text written on it ("" when there is none). An engine may also
    have ``cancel(thread)``, which stops the read in progress on that thread (called from another thread at the
    read's deadline; engines are shared by readers, so only the late read may be stopped)."""

    def read(self, image: Image.Image) -> str: ...


# -- the derived conversation ---------------------------------------------------------------------
def with_transcription(conversation: Conversation, text: str) -> Conversation:
    """The text-only conversation of the second check: same turns, the image removed, and in the turn
    that held it one more text part, exactly ``f"Text in the image: {text}"`` (none when ``text`` is
    empty: an image with no text leaves the conversation's own words to judge).

    Pure and stable: mmguard-mini v2 is trained on conversations made by this very function.
    A conversation without an image is returned unchanged.
    """
    turns: list[Turn] = []
    for turn in conversation.turns:
        if turn.image is None:
            turns.append(turn)
        else:
            read = (f"{TRANSCRIPTION_PREFIX}{text}",) if text else ()
            turns.append(Turn(turn.role, (*turn.texts, *read)))
    return Conversation(tuple(turns))


# -- text clean-up --------------------------------------------------------------------------------
def normalise_text(text: str, max_chars: int = 2000) -> str:
    """Whitespace runs become one space, ends stripped, at most ``max_chars`` characters (cut at a word
    boundary when one is near)."""
    return _cut(_WS_RE.sub(" ", text).strip(), max_chars)


def _cut(text: str, max_chars: int) -> str:
    """``text``'s first ``max_chars`` characters, cut at a space or newline when one is near the end."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return cut[:space] if space >= max_chars * 0.8 else cut


def transcription_windows(text: str, window: int = TRANSCRIPTION_WINDOW_CHARS,
                          overlap: int = TRANSCRIPTION_WINDOW_OVERLAP) -> list[str]:
    """``text`` (normalised) as the pieces the text checks judge: itself when at most ``window`` characters,
    else windows of at most ``window`` characters, cut at word boundaries when one is near, each starting
    about ``overlap`` characters before the previous one ended (a sentence cut by one window is whole in
    the next). Harmful text after a page of filler is judged, not cut off."""
    return [text[s:e] for s, e in window_spans(text, window, overlap)]


def window_spans(text: str, window: int = TRANSCRIPTION_WINDOW_CHARS,
                 overlap: int = TRANSCRIPTION_WINDOW_OVERLAP) -> list[tuple[int, int]]:
    """Where :func:`transcription_windows`' pieces lie in ``text``: ``(start, end)`` slices, in order."""
    if not 0 <= overlap < window * 0.8:
        raise ValueError(f"transcription_windows: need 0 <= overlap < 0.8 * window, got {overlap}, {window}")
    spans: list[tuple[int, int]] = []
    start = 0
    while len(text) - start > window:
        space = text.rfind(" ", start, start + window + 1)  # a cut at a space keeps the word after it whole
        end = space if space - start >= window * 0.8 else start + window
        spans.append((start, end))
        back = text.find(" ", end - overlap, end) if overlap else -1
        start = back + 1 if back != -1 else end  # progress: end - overlap > start, as overlap < 0.8 * window
        while start < len(text) and text[start] == " ":
            start += 1
    if start < len(text) or not spans:
        spans.append((start, len(text)))
    return spans


def reading_order(boxes: Sequence[Sequence[Sequence[float]]]) -> list[int]:
    """Indices of text boxes (each 4 corner points ``(x, y)``) in reading order: lines top to bottom,
    boxes within a line left to right. A box joins the current line when its vertical centre lies
    within the line's vertical extent."""
    spans = []
    for i, pts in enumerate(boxes):
        xs = [float(p[0]) for p in pts]
        ys = [float(p[1]) for p in pts]
        spans.append((i, min(xs), min(ys), max(ys)))
    spans.sort(key=lambda s: (s[2] + s[3]) / 2)
    lines: list[list[tuple[int, float, float, float]]] = []
    top = bottom = 0.0
    for s in spans:
        centre = (s[2] + s[3]) / 2
        if lines and top <= centre <= bottom:
            lines[-1].append(s)
            top, bottom = min(top, s[2]), max(bottom, s[3])
        else:
            lines.append([s])
            top, bottom = s[2], s[3]
    return [s[0] for line in lines for s in sorted(line, key=lambda s: s[1])]


# -- RapidOCR ---------------------------------------------------------------------------------------
def ocr_available() -> bool:
    """Whether the default OCR engine's packages are importable (without loading them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("rapidocr", "onnxruntime", "cv2"))


class RapidOcrEngine:
    """RapidOCR 3.x (PP-OCR det + cls + rec, ONNX, CPU), bounded in size.

    The image is composited on white (transparent text stays readable) and downscaled so that its longer
    side is at most ``max_side`` pixels (the detector runs at that size or less, never upscaled); lines with
    a recognition confidence below ``min_confidence`` are dropped; the rest are joined in
    :func:`reading_order`, whitespace normalised and cut to ``max_chars`` (a memory bound: what is judged is
    bounded by :class:`OcrReader`'s ``max_chars``). Calls are serialised by a lock (RapidOCR keeps per-call
    state), so one instance may be shared by threads.

    ``max_boxes`` (default: none) caps the detector's candidate regions, and a cap drops text *silently*:
    RapidOCR keeps the first N contours it finds, bottom of the image first, so 99 small words under a
    harmful line pushed the line out unread. Without a cap, time is what bounds a busy image: the reader's
    deadline stops the read, and the verdict says ``text_unread``.
    """

    def __init__(
        self,
        *,
        max_side: int = 1280,
        max_boxes: int | None = None,
        min_confidence: float = 0.5,
        max_chars: int = _ENGINE_MAX_CHARS,
        threads: int | None = None,
    ) -> None:
        try:
            from rapidocr import RapidOCR
        except ImportError as err:
            raise OcrUnavailable(f"reading text in images needs RapidOCR: {OCR_INSTALL_HINT} ({err})") from None
        if max_side < 32 or (max_boxes is not None and max_boxes < 1) or max_chars < 1 \
                or not 0.0 <= min_confidence <= 1.0:
            raise ValueError("RapidOcrEngine: max_side >= 32, max_boxes >= 1, max_chars >= 1, min_confidence in [0, 1]")
        self.max_side = max_side
        self.max_boxes = max_boxes
        self.min_confidence = min_confidence
        self.max_chars = max_chars
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.text_score": min_confidence,
            "Global.max_side_len": max_side,
            # RapidOCR's default ("min", 736) *upscales* until the shorter side is 736 px: a 1280x20 strip
            # would be run at 47104x736. "max" only ever shrinks, to the same bound as ours
            "Det.limit_type": "max",
            "Det.limit_side_len": max_side,
            "Det.max_candidates": max_boxes if max_boxes is not None else _NO_BOX_CAP,
        }
        if threads is not None:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
        self._ocr = RapidOCR(params=params)
        self._lock = threading.Lock()
        from importlib.metadata import version

        # what decides the text read from given pixels: a lasting store of reads is keyed by it
        self.identity = (f"rapidocr-{version('rapidocr')}:side={max_side}:boxes={max_boxes or 'all'}:"
                         f"conf={min_confidence}:chars={max_chars}:detail={DETAIL_SIDE}")
        # RapidOCR creates its three ONNX sessions at first use; do it now, so that the first guarded read
        # is not charged for loading
        self.read(_warmup_image())

    def read(self, image: Image.Image) -> str:
        return merge_reads([self.read_pixels(view) for view in prepare_views(image, self.max_side)])

    def read_pixels(self, bgr: Any) -> str:
        """Read an image already through :func:`prepare_pixels` (BGR, uint8, ``max_side`` at most)."""
        with self._lock:
            out = self._ocr(bgr)
        txts = getattr(out, "txts", None)
        boxes = getattr(out, "boxes", None)
        scores = getattr(out, "scores", None)
        if not txts or boxes is None or len(boxes) != len(txts):
            return ""
        keep = [i for i in reading_order(boxes)
                if scores is None or float(scores[i]) >= self.min_confidence]
        return normalise_text(" ".join(str(txts[i]) for i in keep), self.max_chars)


def prepare_views(image: Image.Image, max_side: int) -> list[Any]:
    """What OCR reads of one image: the whole of it at ``max_side`` (:func:`prepare_pixels`), and, when that
    shrinks it by more than a quarter, overlapping tiles of ``max_side`` pixels at up to :data:`DETAIL_SIDE` on
    its longer side. Text of 40 px on a 2,240 px canvas, shrunk to 1,280, was read as nothing, and the verdict
    said nothing was there; large text split by the tiles is whole in the first view. At most 5 reads."""
    import numpy as np

    image = _flatten_rgb(image)  # once for all views
    views = [prepare_pixels(image, max_side)]
    if max(image.size) <= max_side * 1.25:
        return views
    detail = np.asarray(prepare_pixels(image, DETAIL_SIDE))
    overlap = max_side // 4  # a line up to this tall, cut by one tile's edge, is whole in the next
    height, width = detail.shape[:2]
    for top in _tile_starts(height, max_side, overlap):
        for left in _tile_starts(width, max_side, overlap):
            views.append(np.ascontiguousarray(detail[top:top + max_side, left:left + max_side]))
    return views


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` pixels start to cover ``length``, each overlapping the next by at least
    ``overlap`` (spread evenly, the last one ending at the edge)."""
    if length <= tile:
        return [0]
    count = -(-(length - overlap) // (tile - overlap))  # ceil
    return [round(k * (length - tile) / (count - 1)) for k in range(count)]


def merge_reads(texts: Sequence[str]) -> str:
    """The texts of an image's views, in order, each once (the whole view and its tiles often read the same)."""
    seen: list[str] = []
    for text in texts:
        text = normalise_text(text, _ENGINE_MAX_CHARS)
        if text and text not in seen:
            seen.append(text)
    return normalise_text(" ".join(seen), _ENGINE_MAX_CHARS)


def prepare_pixels(image: Image.Image, max_side: int) -> Any:
    """The pixels the detector runs on: composited on white, downscaled to ``max_side`` (never upscaled), as
    a contiguous BGR uint8 array (OpenCV's order)."""
    import numpy as np

    rgb = _flatten_rgb(image)
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                         Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])


def _flatten_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _warmup_image() -> Image.Image:
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (160, 48), "white")
    ImageDraw.Draw(img).text((8, 8), "warm up", fill="black", font=ImageFont.load_default(size=24))
    return img


_default_engine: OcrEngine | None = None
_default_lock = threading.Lock()


def default_ocr_engine() -> OcrEngine:
    """The process-wide OCR engine: RapidOCR in a child process that a read past its deadline is killed in
    (:class:`mmguard.ocr_process.ProcessOcrEngine`), started at the first call (about a second); raises
    :class:`OcrUnavailable` when the package is missing."""
    global _default_engine
    if _default_engine is None:
        with _default_lock:
            if _default_engine is None:
                from .ocr_process import ProcessOcrEngine

                _default_engine = ProcessOcrEngine()
    return _default_engine


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
