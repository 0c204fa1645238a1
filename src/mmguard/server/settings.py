"""Server settings (one frozen dataclass, filled by ``mmguard serve`` or by code that embeds the app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["CategoryNames", "MultiImage", "ServerSettings", "served_model_id"]

CategoryNames = Literal["codes", "openai"]
MultiImage = Literal["error", "each"]


@dataclass(frozen=True)
class ServerSettings:
    """Everything the moderation server can be told.

    model_id: the name reported in responses (``model``) and listed as the shield; None: the loaded
        model's (its directory name, or its Hugging Face id), see :func:`served_model_id`.
    shield_ids: extra shield identifiers accepted by ``/v1/safety/run-shield`` (the model id always is).
    threshold: server-wide decision threshold on the unsafe probability (None: the guard's own).
    category_names: keys of OpenAI ``categories``/``category_scores``: ``codes`` (S1..S13) or ``openai``.
    category_scores: ``unsafe`` computes per-category probabilities only for unsafe verdicts (others
        report 0.0); ``always`` computes them for every item (one short constrained decode each).
    multi_image: what a moderation item with more than one image gets: ``error`` (OpenAI's
        ``too_many_images``) or ``each`` (the text is judged once per image, the results merged).
    max_batch_size / max_wait_ms: dynamic batching: a batch is run when it is full or when the oldest
        waiting item has waited ``max_wait_ms``.
    max_queue: items (not requests) that may wait; beyond it requests get 429 with Retry-After.
    max_queued_images: items with an image that may wait (each holds its decoded image, about 31 MB at the
        largest canvas); beyond it a request with an image gets 429 with Retry-After (one alone always fits).
    request_timeout_s: time from admission to answer; beyond it 504.
    fail_closed: on a model error, answer "unsafe" (flagged) instead of 503.
    api_keys: accepted Bearer keys (empty: no authentication).
    max_body_bytes: request bodies above this get 413.
    max_inflight_bytes: request bodies the server holds at once, counted by their declared length (a body
        without one counts as ``max_body_bytes``) from before it is read until its answer is sent; a request
        that would pass it gets 429 ``server_busy`` at once, unread. A request costs several times its body
        while it waits and runs (a 25 MB image request peaked at 222 MB): this bounds the server's memory
        whatever the number of concurrent clients.
    body_timeout_s: the whole request body must arrive within this; beyond it 408 ``body_timeout``.
    max_inputs: maximum items in one moderation request.
    max_text_chars: characters of text one request may hold in all its items and messages (400
        ``text_too_long``): the guard tokenizes a request's text on the model's thread, so one huge request
        must not stall every other (each text alone is bounded by the conversation's own limit too).
    max_image_bytes / max_image_pixels: limits on each decoded image.
    max_image_frames: an animation's frames decoded for OCR's other views (the first one the model judges); with
        ``fail_closed`` and a model that cannot read, an animation with more frames is blocked (read in part).
    remote_images / remote_image_hosts / remote_image_timeout_s: fetching http(s) image URLs; off by
        default; when on, only hosts in the allowlist (exact names, or ``*.example.com``) are fetched,
        redirects are not followed, and the body is bounded by ``max_image_bytes``.
    torch_threads: if set, ``torch.set_num_threads`` at startup (process-wide). On a CPU host leave a
        core to the event loop: OpenMP threads spinning on every core starve it and slow batches ~10x.
    log_content: include conversation text in logs (off by default).
    metrics_public: serve ``/metrics`` without an API key.
    """

    model_id: str | None = None
    shield_ids: tuple[str, ...] = ("meta-llama/Llama-Guard-3-11B-Vision",)
    threshold: float | None = None
    category_names: CategoryNames = "codes"
    category_scores: Literal["unsafe", "always"] = "unsafe"
    multi_image: MultiImage = "error"
    max_images_per_item: int = 4
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 512
    max_queued_images: int = 64
    request_timeout_s: float = 30.0
    fail_closed: bool = False
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 32 * 1024 * 1024
    max_inflight_bytes: int = 256 * 1024 * 1024
    body_timeout_s: float = 30.0
    max_inputs: int = 256
    max_text_chars: int = 1_000_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_frames: int = 8
    remote_images: bool = False
    remote_image_hosts: tuple[str, ...] = ()
    remote_image_timeout_s: float = 5.0
    log_content: bool = False
    metrics_public: bool = True
    warmup: bool = True
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.category_names not in ("codes", "openai"):
            raise ValueError(f"category_names must be 'codes' or 'openai', got {self.category_names!r}")
        if self.category_scores not in ("unsafe", "always"):
            raise ValueError(f"category_scores must be 'unsafe' or 'always', got {self.category_scores!r}")
        if self.multi_image not in ("error", "each"):
            raise ValueError(f"multi_image must be 'error' or 'each', got {self.multi_image!r}")
        for name in (
            "max_batch_size",
            "max_queue",
            "max_queued_images",
            "max_body_bytes",
            "max_inflight_bytes",
            "max_inputs",
            "max_text_chars",
            "max_image_bytes",
            "max_image_pixels",
            "max_image_frames",
            "max_images_per_item",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if (
            self.max_wait_ms < 0
            or self.request_timeout_s <= 0
            or self.remote_image_timeout_s <= 0
            or self.body_timeout_s <= 0
        ):
            raise ValueError("max_wait_ms must be >= 0 and timeouts > 0")
        if self.remote_images and not self.remote_image_hosts:
            raise ValueError("remote_images needs at least one host in remote_image_hosts (the allowlist)")

    @property
    def all_shield_ids(self) -> tuple[str, ...]:
        """The shield ids when ``model_id`` is set (the app's state knows the loaded model's otherwise)."""
        return tuple(dict.fromkeys((*(() if self.model_id is None else (self.model_id,)), *self.shield_ids)))


def served_model_id(source: str | Path | None) -> str:
    """The name a server reports for a model loaded from ``source``: a directory's name, else the id as given."""
    text = str(source or "").strip()
    if not text:
        return "mmguard"
    path = Path(text).expanduser()
    try:
        if path.exists():
            return path.resolve().name or text
    except (OSError, ValueError):
        pass
    return text
