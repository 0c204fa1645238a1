"""Reading an image's text within a deadline: :class:`OcrReader` runs an :class:`mmguard.ocr.OcrEngine` on the
image and its other views (:func:`mmguard.images.other_views`) in a worker thread, bounded in time, remembering what
it read; a failure or a timeout is a warning on the :class:`OcrResult`, never an exception."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from . import ocr
from .images import image_digest, other_views
from .ocr import (
    _SURROGATE_RE,
    _WS_RE,
    DEFAULT_OCR_CACHE_ENTRIES,
    DEFAULT_OCR_MAX_CHARS,
    DEFAULT_OCR_TIMEOUT_S,
    OcrEngine,
    _cut,
    _describe,
)

__all__ = ["OcrReader", "OcrResult", "OcrStore"]


class OcrStore(Protocol):
    """Somewhere to keep what was read across processes (e.g. :meth:`mmguard.eval.ResultCache.ocr_store`),
    keyed by the OCR engine's ``identity`` and the image's pixel hash."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, text: str) -> None: ...


@dataclass(frozen=True)
class OcrResult:
    """What was read from one image: ``text`` is None when the reading failed or timed out (``warning``
    says which); "" when it ran and found no text. ``complete`` is False when the image held more text than
    the reader's ``max_chars`` (``text`` is its first part), or when some of its other views (later frames, other
    renderings) were not read; ``warning`` says which.

    ``parts``: the distinct texts of the image and of its other views, in order (``text`` is them joined by
    spaces). Each is judged on its own: a harmful frame after an innocent one was judged safe when read as one
    text with it."""

    text: str | None
    warning: str | None = None
    elapsed_ms: float = 0.0
    complete: bool = True
    parts: tuple[str, ...] = ()


class OcrReader:
    """Runs an :class:`OcrEngine` with a time budget per image, remembering what it read.

    Of each image's text, the first ``max_chars`` characters (whitespace normalised) are kept; a read with
    more is marked incomplete (:attr:`OcrResult.complete`), so that the verdict can say so instead of
    passing text cut off after a page of filler for the whole.

    What was read is kept for the last ``cache_entries`` distinct images (keyed by a hash of the decoded
    pixels; successful reads only, at most ``max_chars`` + 1 characters each): a conversation checked again
    with the same image (a streamed answer checked every N tokens, a client retrying) is not read again. 0
    keeps none.

    Each read runs in one long-lived daemon worker thread; the caller waits at most ``timeout_s`` for the
    worker to take the image (behind the restart of a stopped read) and ``timeout_s`` more for the image and all
    its other views, then moves on with a warning. At the deadline a read still running
    is stopped when the engine has a ``cancel()`` (the default engine, RapidOCR in a child process, kills
    the child: :mod:`mmguard.ocr_process`), so a slow image costs its own deadline, not the next images'.
    An engine without ``cancel()`` keeps the worker busy until its read ends, delaying (never unbounding)
    the next read; nothing else piles up, because reads are submitted one at a time.
    """

    def __init__(self, engine: OcrEngine | Callable[[], OcrEngine] | None = None,
                 *, timeout_s: float = DEFAULT_OCR_TIMEOUT_S,
                 cache_entries: int = DEFAULT_OCR_CACHE_ENTRIES,
                 max_chars: int = DEFAULT_OCR_MAX_CHARS) -> None:
        if not timeout_s > 0:
            raise ValueError(f"ocr_timeout_s must be > 0, got {timeout_s}")
        if cache_entries < 0:
            raise ValueError(f"cache_entries must be >= 0, got {cache_entries}")
        if max_chars < 1:
            raise ValueError(f"ocr max_chars must be >= 1, got {max_chars}")
        self.timeout_s = float(timeout_s)
        self.max_chars = max_chars
        self.cache_entries = cache_entries
        self.cache_hits = 0
        # image digest -> the texts read (see _kept: the distinct texts of its views, whitespace normalised, joined by
        # a newline, the first max_chars + 1 characters of that; a newline is the one space a normalised text lacks)
        self._read_cache: OrderedDict[str, str] = OrderedDict()
        self._cache_lock = threading.Lock()
        # a lasting store, used only with an engine that states its identity (its settings and version)
        self.store: OcrStore | None = None
        self._engine: OcrEngine | None = engine if isinstance(engine, OcrEngine) else None
        self._factory: Callable[[], OcrEngine] = (
            engine if callable(engine) and not isinstance(engine, OcrEngine) else ocr.default_ocr_engine)
        self._jobs: queue.SimpleQueue[tuple[Image.Image, Future[str], threading.Event]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running: Future[str] | None = None  # the read the worker is in; stopped only at its own deadline
        self._running_lock = threading.Lock()

    def engine(self) -> OcrEngine:
        """The engine, loaded on first use (may raise :class:`OcrUnavailable`)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = self._factory()
        return self._engine

    def read(self, image: Image.Image) -> OcrResult:
        """What ``image`` holds in writing: the image itself, then its :func:`mmguard.images.other_views` (a
        transparent image on black and with its alpha dropped, an animation's later frames), all within one
        ``timeout_s`` that counts from the start of the first read. When the image itself is read but not all
        its other views, the verdict has what was read and says the rest was not (``complete`` False)."""
        start = time.perf_counter()
        key = image_digest(image) if self.cache_entries else None  # covers the other views too
        if key is not None:
            with self._cache_lock:
                known = self._read_cache.get(key)
                if known is not None:
                    self._read_cache.move_to_end(key)
                    self.cache_hits += 1
                    return self._result(known, (time.perf_counter() - start) * 1000.0, image)
        try:
            engine = self.engine()  # loaded here, not in the worker: a one-time load is not charged to the deadline
        except Exception as err:
            return OcrResult(None, f"text in the image was not read: {_describe(err)}")
        identity = getattr(engine, "identity", None)
        stored = (f"{identity}:kept={self.max_chars}:{key}"
                  if key is not None and self.store is not None and identity else None)
        if stored is not None:
            known = self.store.get(stored)  # type: ignore[union-attr]
            if known is not None:
                self._remember(key, known)  # type: ignore[arg-type]
                self.cache_hits += 1
                return self._result(known, (time.perf_counter() - start) * 1000.0, image)
        views = [image, *other_views(image).renderings]
        texts: list[str] = []
        deadline: float | None = None  # the first read's start + timeout_s: every view is read by then
        for done, view in enumerate(views):
            text, failure, started_at = self._read_view(view, deadline)
            deadline = started_at + self.timeout_s if deadline is None else deadline
            if failure is None:
                texts.append(text)  # type: ignore[arg-type]
                continue
            elapsed = (time.perf_counter() - start) * 1000.0
            if not done:
                return OcrResult(None, f"text in the image was not read: {failure}", elapsed)
            # the image itself was read: judge that, say what was not (and keep it out of the caches: the next
            # try may read it all)
            kept = self._kept(texts)
            partial = (f"text in the image was read only in part: {len(views) - done} of its other view(s) "
                       f"(on black, alpha dropped, later frames) not read: {failure}")
            result = self._result(kept, elapsed, image)
            return OcrResult(result.text, "; ".join(w for w in (partial, result.warning) if w), elapsed,
                             complete=False, parts=result.parts)
        kept = self._kept(texts)
        if key is not None:
            self._remember(key, kept)
        if stored is not None:
            self.store.put(stored, kept)  # type: ignore[union-attr]
        return self._result(kept, (time.perf_counter() - start) * 1000.0, image)

    def _read_view(self, view: Image.Image, deadline: float | None) -> tuple[str | None, str | None, float]:
        """One engine read in the worker, done by ``deadline`` (None: ``timeout_s`` from its start, after a wait of
        at most as long for the worker): ``(text, None, started)`` or ``(None, why it failed, started)``."""
        future: Future[str] = Future()
        started = threading.Event()
        self._ensure_worker()
        self._jobs.put((view, future, started))
        # the engine runs outside this thread, so that a slow read can be abandoned at the deadline. The image's
        # deadline counts from its first read's start: the wait for the worker (the restart of a stopped read, a
        # second or two) is bounded apart, and was charged to the next image, which then went unread
        wait = self.timeout_s if deadline is None else deadline - time.perf_counter()
        if not started.wait(max(wait, 0.0)) and future.cancel():
            return None, f"OCR was busy for the ocr_timeout_s limit of {self.timeout_s:g} s", time.perf_counter()
        started_at = time.perf_counter()
        # a later view, behind other readers' reads, has what is left of the image's deadline, not a deadline anew
        end = started_at + self.timeout_s if deadline is None else deadline
        try:
            text = future.result(timeout=max(end - time.perf_counter(), 0.0))
        except FutureTimeout:
            if not future.cancel():  # cancel() works only before the start (it then never starts)
                self._stop(future)
            return None, f"OCR took longer than the ocr_timeout_s limit of {self.timeout_s:g} s", started_at
        except Exception as err:
            return None, f"OCR failed ({_describe(err)})", started_at
        if not isinstance(text, str):
            return None, f"OCR returned {type(text).__name__}, not text", started_at
        return text, None, started_at

    def _kept(self, texts: Sequence[str]) -> str:
        """What is remembered of the texts of an image's views: those not within an earlier one, whitespace
        normalised, joined by newlines, one character past ``max_chars`` (how a remembered read knows it was cut). A
        lone surrogate (an engine of the user's) becomes U+FFFD, as the verdict's JSON cannot hold it."""
        parts: list[str] = []
        for text in texts:
            text = _SURROGATE_RE.sub("\ufffd", _WS_RE.sub(" ", text).strip())
            if text and not any(text in part for part in parts):  # a view that reads what another did adds nothing
                parts.append(text)
        return "\n".join(parts)[: self.max_chars + 1]

    def _result(self, kept: str, elapsed_ms: float, image: Image.Image) -> OcrResult:
        warnings = []
        views = other_views(image)
        if views.frames_unread:
            warnings.append(f"text in the image was read only in part: the animation's frames after the first "
                            f"{views.frames_decoded} were not decoded (image limits max_frames, max_frame_pixels)")
        if len(kept) > self.max_chars:
            warnings.append(f"text in the image was read only in part: it holds more than the {self.max_chars} "
                            "characters judged (ocr max_chars)")
            kept = _cut(kept, self.max_chars)
        parts = tuple(part for part in kept.split("\n") if part)
        return OcrResult(" ".join(parts), "; ".join(warnings) or None, elapsed_ms, complete=not warnings,
                         parts=parts)

    def _stop(self, future: Future[str]) -> None:
        """Stop a read past its deadline if the engine can (``cancel(thread)``), and only if it is still that read:
        the read on this reader's worker thread, not another reader's on the same engine."""
        cancel = getattr(self._engine, "cancel", None)
        worker = self._worker
        if not callable(cancel) or worker is None:
            return
        with self._running_lock:
            if self._running is future:
                with contextlib.suppress(Exception):
                    cancel(worker.ident)

    def _remember(self, key: str, text: str) -> None:
        with self._cache_lock:
            self._read_cache[key] = text
            while len(self._read_cache) > self.cache_entries:
                self._read_cache.popitem(last=False)

    def read_many(self, images: Sequence[Image.Image]) -> list[OcrResult]:
        """One result per image, in order; an image object given twice is read once."""
        seen: dict[int, OcrResult] = {}
        out = []
        for img in images:
            key = id(img)
            if key not in seen:
                seen[key] = self.read(img)
            out.append(seen[key])
        return out

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="mmguard-ocr", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        while True:
            image, future, started = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            started.set()
            with self._running_lock:
                self._running = future
            try:
                engine = self.engine()
                result = engine.read(image)
            except BaseException as err:
                with contextlib.suppress(Exception):
                    future.set_exception(err)
            else:
                with contextlib.suppress(Exception):
                    future.set_result(result)
            finally:
                with self._running_lock:
                    self._running = None
