"""A checkpoint loaded in this process: the bundled default, Llama Guard 3 Vision, any local path or hub id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...conversation import Conversation
from ...models import model_identity
from ...policy import DEFAULT_POLICY, Policy
from .base import Prediction, ProgressFn, policy_key

__all__ = ["LLAMA_GUARD_3_VISION", "LocalGuard"]

LLAMA_GUARD_3_VISION = "meta-llama/Llama-Guard-3-11B-Vision"


class LocalGuard:
    """A checkpoint loaded in this process with :class:`mmguard.guard.Guard`."""

    def __init__(
        self,
        source: str | Path | None,
        *,
        name: str | None = None,
        threshold: float | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        policy: Policy = DEFAULT_POLICY,
        guard: Any = None,
        read_text: str = "auto",
        prefix_cache: bool = False,
        ocr_timeout_s: float | None = None,
    ) -> None:
        from ...guard import Guard
        from ...ocr import DEFAULT_OCR_TIMEOUT_S

        self.source = source
        self.threshold = threshold
        self.batch_size = batch_size
        self.policy = policy
        self.guard = (
            guard
            if guard is not None
            else Guard.from_pretrained(
                source, device=device, dtype=dtype, threshold=threshold, batch_size=batch_size, policy=policy,
                read_text=read_text, prefix_cache=prefix_cache,
                ocr_timeout_s=DEFAULT_OCR_TIMEOUT_S if ocr_timeout_s is None else ocr_timeout_s,
            )
        )
        model = str(self.guard.engine.source or source or "default")
        self.name = name or (Path(model).name if model else "local")
        local = Path(model)
        # the weights' contents (as a batch job's fingerprint): file sizes and mtimes matched a checkpoint copied
        # over another with cp -p, and the cache answered with the old model's results
        identity = json.dumps(model_identity(str(local)) if local.is_dir() else {"id": model}, sort_keys=True)
        self._fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]

    @property
    def cache_id(self) -> str:
        g = self.guard
        # only when OCR is in effect: cache ids of guards without it stay what they were
        info = self.describe()
        ocr = ":read_text=on" if info.get("reads_text_with_ocr") else ""
        if ocr:  # an image's text judged whole up to max_chars, in windows (before: cut at 2,000 characters)
            judged = info["ocr_text_judged"]
            ocr += f":ocr_chars={judged['max_chars']}/{judged['window_chars']}"
        if ocr and info["image_verdict"] != "max":  # the rule changes image verdicts; ids under "max" stay as they were
            ocr += f":image_verdict={info['image_verdict']}"
        # another dtype gives other probabilities (bf16 against fp32: a few 1e-3); float32's ids stay as they were
        precision = "" if info["dtype"] == "float32" else f":dtype={info['dtype']}"
        return (
            f"local:{self._fingerprint}:thr={self._threshold_key(info)}:fmt={g.prompt_format.value}:"
            f"policy={policy_key(self.policy)}{ocr}{precision}"
        )

    @staticmethod
    def _threshold_key(info: dict[str, Any]) -> str:
        """The thresholds the labels were decided at; one number as before, so older caches stay valid."""
        per_task = info["thresholds"]
        if len(set(per_task.values())) == 1:
            return str(next(iter(per_task.values())))
        return ",".join(f"{task}:{value:.6g}" for task, value in sorted(per_task.items()))

    def describe(self) -> dict[str, Any]:
        info = {"kind": "local", **self.guard.describe(), "probability": "model"}
        if self.threshold is not None:  # this evaluation's one threshold overrides the model's own
            info["thresholds"] = dict.fromkeys(info["thresholds"], self.threshold)
        return info

    def keep_ocr_reads(self, store: Any) -> None:
        """Keep what OCR reads in ``store`` and read it back from there (:class:`mmguard.ocr_reader.OcrStore`)."""
        self.guard.ocr_reader.store = store

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        verdicts = self.guard.classify_batch(
            list(conversations), threshold=self.threshold, batch_size=self.batch_size, progress=progress
        )
        return [
            Prediction(
                label=v.label,
                unsafe_probability=float(v.unsafe_probability),
                codes=list(v.codes),
                category_probabilities=dict(v.category_probabilities),
                unknown_codes=list(v.unknown_codes),
                probability_kind="model",
                raw=v.raw_text,
                check_probabilities=dict(v.check_probabilities),
                text_unread=bool(getattr(v, "text_unread", False)),
            )
            for v in verdicts
        ]
