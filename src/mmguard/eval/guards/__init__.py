"""Guards an evaluation can compare, behind one small interface.

Specs (``--guard``), optionally prefixed with a display name ``NAME=``:

* ``default`` / ``mmguard-mini``: the bundled default model (``Guard.from_pretrained(None)``).
* ``llama-guard-3-vision``: ``meta-llama/Llama-Guard-3-11B-Vision``.
* ``local:PATH_OR_HF_ID``: any local checkpoint or Hugging Face id.

Local guards take ``read_text`` (``--read-text``: off, auto, on; see :class:`mmguard.guard.Guard`); the
cache key says ``read_text=on`` when OCR is in effect, so results with and without it are kept apart.
``prefix_cache`` (``--prefix-cache``) reuses the template prefix's KV across items (exact within float
rounding, so it does not change the cache key).
* ``mmguard-server:URL``: a running ``mmguard serve`` (``POST URL/v1/guard/classify``).
* ``openai-moderation:URL[#MODEL]``: any OpenAI-compatible ``POST URL/v1/moderations`` endpoint
  (default model ``omni-moderation-latest``); categories mapped to S-codes by :data:`OPENAI_TO_CODES`.
* ``chat-judge:URL#MODEL``: an OpenAI-compatible chat model prompted with the exact Llama Guard 3
  Vision prompt (the paper's GPT-4o baseline), ``POST URL/v1/chat/completions``.

Each kind lives in a module of its own: :mod:`.local`, :mod:`.mmguard_server`, :mod:`.openai_moderation`,
:mod:`.chat_judge`; what they share in :mod:`.base` (the prediction, the interface) and :mod:`.http` (retries,
backoff, concurrency, the API key).
"""

from __future__ import annotations

import re
from typing import Any

from ...policy import DEFAULT_POLICY, Policy
from .base import EvalGuard, GuardSpecError, Prediction, RemoteError, RemoteUnavailable
from .chat_judge import ChatJudgeGuard, judge_prompt_text
from .http import conversation_to_messages
from .local import LLAMA_GUARD_3_VISION, LocalGuard
from .mmguard_server import MmguardServerGuard
from .openai_moderation import OPENAI_TO_CODES, OpenAIModerationGuard

__all__ = [
    "OPENAI_TO_CODES",
    "ChatJudgeGuard",
    "EvalGuard",
    "GuardSpecError",
    "LocalGuard",
    "MmguardServerGuard",
    "OpenAIModerationGuard",
    "Prediction",
    "RemoteError",
    "RemoteUnavailable",
    "conversation_to_messages",
    "judge_prompt_text",
    "make_guard",
]


def make_guard(
    spec: str,
    *,
    threshold: float | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    concurrency: int = 4,
    retries: int = 4,
    timeout: float = 60.0,
    policy: Policy = DEFAULT_POLICY,
    read_text: str = "auto",
    prefix_cache: bool = False,
    ocr_timeout_s: float | None = None,
) -> EvalGuard:
    """Build a guard from a ``--guard`` spec (see the module docstring)."""
    name: str | None = None
    m = re.match(r"^([A-Za-z0-9_.\-]+)=(.+)$", spec)
    if m and ":" not in m.group(1):
        name, spec = m.group(1), m.group(2)
    kind, _, rest = spec.partition(":")
    http = {"concurrency": concurrency, "retries": retries, "timeout": timeout}
    local: dict[str, Any] = {"threshold": threshold, "device": device, "dtype": dtype, "batch_size": batch_size,
                             "policy": policy, "read_text": read_text, "prefix_cache": prefix_cache,
                             "ocr_timeout_s": ocr_timeout_s}
    if spec in ("default", "mmguard-mini"):
        return LocalGuard(None, name=name or "mmguard-mini", **local)
    if spec in ("llama-guard-3-vision", LLAMA_GUARD_3_VISION):
        return LocalGuard(LLAMA_GUARD_3_VISION, name=name or "llama-guard-3-vision", **local)
    if kind == "local" and rest:
        return LocalGuard(rest, name=name, **local)
    if kind == "mmguard-server" and rest:
        return MmguardServerGuard(rest, name=name, threshold=threshold, policy=policy, **http)
    if kind == "openai-moderation" and rest:
        url, _, model = rest.partition("#")
        return OpenAIModerationGuard(url, model or "omni-moderation-latest", name=name, policy=policy, **http)
    if kind == "chat-judge" and rest:
        url, _, model = rest.partition("#")
        return ChatJudgeGuard(url, model, name=name, policy=policy, **http)
    if kind in ("http", "https"):
        raise GuardSpecError(f"guard spec {spec!r}: say which kind of endpoint, e.g. mmguard-server:{spec}")
    raise GuardSpecError(
        f"unknown guard spec {spec!r}; use default, mmguard-mini, llama-guard-3-vision, local:PATH, "
        "mmguard-server:URL, openai-moderation:URL[#MODEL] or chat-judge:URL#MODEL (optionally NAME=SPEC)"
    )
