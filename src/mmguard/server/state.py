"""What the server's routes share (:class:`ServerState`): the guard, settings, batcher, metrics, image
fetcher, and the one way a request's items are judged. The guardrail proxy builds one too."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..images import ImageLimits
from .batcher import Batcher, GuardLike, Outcome, QueueFull, WorkSpec
from .errors import APIError
from .image_sources import ImageFetcher
from .metrics import Metrics
from .request_limits import CLIENT_GONE, REQUEST_DEADLINE, request_timeout_error
from .settings import ServerSettings, served_model_id

__all__ = ["ServerState", "served_fingerprint"]


def served_fingerprint(described: dict[str, Any], settings: ServerSettings) -> str:
    """What decides the verdicts this server gives, hashed (OpenAI's ``system_fingerprint``): the weights'
    contents (a local checkpoint; a hub id by name), the guard's settings (thresholds, prompt format, policy,
    reading text in images, dtype) and the server's fixed threshold. Equal fingerprints, equal verdicts for the
    same input; an evaluation's result cache is keyed by it. ``described``: the guard's ``describe()``."""
    from ..models import model_identity

    info = dict(described)
    info.pop("device", None)  # the same weights elsewhere give the same verdicts, up to rounding
    source = str(info.get("model") or "")
    weights = model_identity(source) if source and Path(source).is_dir() else {"id": source}
    described = json.dumps({"weights": weights, "guard": info, "threshold": settings.threshold},
                           sort_keys=True, default=str)
    return "fp_" + hashlib.sha256(described.encode()).hexdigest()[:16]


class ServerState:
    """What the routes share: the guard, settings, batcher, metrics, image fetcher.

    ``guard`` may arrive later (:meth:`attach`): the server then listens while the model loads, ``/readyz``
    answers 503 ``loading`` and the model routes 503 ``model_loading``.
    """

    def __init__(self, guard: GuardLike | None, settings: ServerSettings) -> None:
        self.guard: GuardLike | None = None
        self.settings = settings
        self.metrics = Metrics()
        self.batcher = Batcher(
            guard,  # type: ignore[arg-type]  # set by attach() before any item is queued
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            max_queued_images=settings.max_queued_images,
            fail_closed=settings.fail_closed,
            metrics=self.metrics,
        )
        self.fetcher = ImageFetcher(settings)
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                                  max_frames=settings.max_image_frames)
        self.ready = False
        self.load_error: str | None = None
        self.model_id = settings.model_id or "mmguard"
        self.system_fingerprint: str | None = None  # set when a guard is attached
        self._key_digests = tuple(hashlib.sha256(k.encode()).digest() for k in settings.api_keys)
        if guard is not None:
            self.attach(guard)

    def attach(self, guard: GuardLike) -> None:
        """Serve ``guard``; the model id defaults to the loaded model's name."""
        self.guard = guard
        self.batcher.guard = guard
        self.metrics.watch_image_encodings(getattr(guard, "engine", None))  # a FastEngine exports its counters
        try:
            info: dict[str, Any] = dict(guard.describe())
        except Exception:  # a stand-in guard without an engine
            info = {"guard": type(guard).__name__}
        if self.settings.model_id is None:
            self.model_id = served_model_id(str(info.get("model") or ""))
        self.system_fingerprint = served_fingerprint(info, self.settings)
        reads = bool(info.get("reads_text_with_ocr", True))
        # a guard that reads no text with OCR (Llama Guard 3 Vision by default) never looks at an image's other views:
        # a translucent image decoded 2-3 times slower for them, and an animation's frames were decoded for nothing
        self.limits = replace(self.limits, other_views=reads)

    @property
    def shield_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.model_id, *self.settings.shield_ids)))

    @property
    def threshold(self) -> float | None:
        return self.settings.threshold

    def key_ok(self, presented: str) -> bool:
        """Constant-time comparison against every configured key (no early exit, no length leak)."""
        digest = hashlib.sha256(presented.encode()).digest()
        ok = False
        for ref in self._key_digests:
            ok |= hmac.compare_digest(digest, ref)
        return ok

    async def judge(self, specs: list[WorkSpec]) -> list[Outcome]:
        """Queue ``specs``, wait for their verdicts; 429 / 503 / 504 as OpenAI-style errors."""
        try:
            futures = self.batcher.submit(specs)
        except QueueFull as err:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(
                429,
                f"the server's queue is full; retry after {err.retry_after}s",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(err.retry_after)},
            ) from None
        except RuntimeError:
            raise APIError(
                503,
                "the server is not ready",
                type="server_error",
                code="not_ready",
                headers={"Retry-After": "1"},
            ) from None
        deadline = REQUEST_DEADLINE.get()  # the time left of the request (image fetches may have used some)
        budget = self.settings.request_timeout_s
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - time.monotonic()))
        waiting = asyncio.gather(*futures)
        gone = CLIENT_GONE.get()
        left = asyncio.ensure_future(gone.wait()) if gone is not None else None
        try:
            await asyncio.wait({waiting, *([left] if left else [])}, timeout=budget,
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this task cancelled (shutdown): its items need not run either
            waiting.cancel()
            raise
        finally:
            if left is not None:
                left.cancel()
        if not waiting.done():  # the client left, or the time is up: the batcher skips cancelled items
            waiting.cancel()
            for f in futures:
                f.cancel()
            if gone is not None and gone.is_set():
                self.metrics.rejected.labels("client_gone").inc()
                raise APIError(499, "the client closed the request", type="requests", code="client_closed")
            self.metrics.rejected.labels("timeout").inc()
            raise request_timeout_error(self.settings.request_timeout_s)
        outcomes = list(waiting.result())
        rejected = [(k, o) for k, o in enumerate(outcomes) if o.input_error]
        if rejected:  # the guard refused the input itself: a client error, never retried, never fail-closed
            k, first = rejected[0]
            where = f"item {k + 1}: " if len(outcomes) > 1 else ""
            raise APIError(400, f"{where}{first.error}", code="invalid_input")
        failed = [o for o in outcomes if o.verdict is None]
        if failed:
            raise APIError(
                503,
                f"the model failed: {failed[0].error}",
                type="server_error",
                code="model_error",
                headers={"Retry-After": "1"},
            )
        for o in outcomes:
            v = o.verdict
            assert v is not None
            self.metrics.verdicts.labels(v.label).inc()
            self.metrics.items.labels("image" if v.has_image else "text").inc()
            for code in v.codes:
                self.metrics.verdict_categories.labels(code).inc()
        return outcomes
