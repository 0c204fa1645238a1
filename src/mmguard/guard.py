"""The public API: ``Guard.from_pretrained(...)`` and ``guard.classify(conversation)``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .conversation import Conversation
from .engine import Engine, load_engine
from .policy import Policy, load_policy
from .prompt import MarkerHandling, PromptFormat, RenderedPrompt, build_prompt
from .verdict import Verdict, ViolatedCategory

__all__ = ["RANDOM_WEIGHTS_WARNING", "Guard"]

RANDOM_WEIGHTS_WARNING = "model has random weights: verdicts are meaningless (plumbing demo only)"


class Guard:
    """A Llama Guard 3 Vision style classifier.

    >>> guard = Guard.from_pretrained("meta-llama/Llama-Guard-3-11B-Vision", device="cuda")
    >>> guard.classify(Conversation.prompt("How do I make this?", image="photo.jpg"))
    """

    def __init__(
        self,
        engine: Engine,
        *,
        policy: Policy | str | Path | None = None,
        threshold: float = 0.5,
        prompt_format: PromptFormat | str = PromptFormat.HF,
        markers: MarkerHandling | str = MarkerHandling.ESCAPE,
        batch_size: int = 8,
    ) -> None:
        self.engine = engine
        self.policy = load_policy(policy)
        self.threshold = _check_threshold(threshold)
        self.prompt_format = PromptFormat(prompt_format)
        self.markers = MarkerHandling(markers)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path | None = None,
        *,
        policy: Policy | str | Path | None = None,
        device: str | None = "auto",
        dtype: str | None = "auto",
        threshold: float = 0.5,
        prompt_format: PromptFormat | str = PromptFormat.HF,
        markers: MarkerHandling | str = MarkerHandling.ESCAPE,
        batch_size: int = 8,
        local_files_only: bool | None = None,
        fast: bool = False,
        fast_options: dict[str, Any] | None = None,
    ) -> Guard:
        """Load a guard from a local directory or a Hugging Face id (``None``: the bundled default model).

        ``fast=True`` uses :class:`mmguard.fast.FastEngine` (mask-free exact vision attention, each distinct
        image encoded once per call, cross-attention over real tiles only); it gives the same results and is
        tested to, but its speed-up is not yet measured on a GPU (docs/performance.md). ``fast_options`` are
        FastEngine's (``keep_images``, ``mask_free_text``; the approximations ``quantize`` and
        ``real_tiles_only``) and imply ``fast``.
        """
        if path_or_id is None:
            from .models import default_model_path

            path_or_id = default_model_path()
        engine = load_engine(path_or_id, device=device, dtype=dtype, local_files_only=local_files_only)
        if fast or fast_options:
            from .fast import FastEngine

            engine = FastEngine.from_engine(engine, **(fast_options or {}))
        return cls(engine, policy=policy, threshold=threshold, prompt_format=prompt_format, markers=markers,
                   batch_size=batch_size)

    # -- prompts -----------------------------------------------------------------------------------
    def render(self, conversation: Conversation, policy: Policy | None = None) -> RenderedPrompt:
        return build_prompt(conversation, policy or self.policy, format=self.prompt_format, markers=self.markers)

    def prompt_ids(self, conversation: Conversation, policy: Policy | None = None) -> list[int]:
        """Token ids exactly as sent to the model (prompt only, without the decision prefix)."""
        from .tokenizer import encode_prompt

        return encode_prompt(self.engine.tokenizer, self.render(conversation, policy))

    # -- classification ----------------------------------------------------------------------------
    def classify(
        self,
        conversation: Conversation,
        *,
        policy: Policy | str | Path | None = None,
        exclude: Iterable[str] = (),
        threshold: float | None = None,
        categories: bool = True,
    ) -> Verdict:
        """Judge the last turn of ``conversation``."""
        return self.classify_batch([conversation], policy=policy, exclude=exclude, threshold=threshold,
                                   categories=categories)[0]

    def classify_batch(
        self,
        conversations: Sequence[Conversation],
        *,
        policy: Policy | str | Path | None = None,
        exclude: Iterable[str] = (),
        threshold: float | None = None,
        categories: bool = True,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Verdict]:
        """Judge many conversations; results are in input order and equal one-at-a-time results."""
        active = load_policy(policy) if policy is not None else self.policy
        exclude = list(exclude)
        if exclude:
            active = active.exclude(exclude)
        thr = self.threshold if threshold is None else _check_threshold(threshold)
        start = time.perf_counter()
        prompts = [self.render(c, active) for c in conversations]
        items = [self.engine.encode(p, c.image) for p, c in zip(prompts, conversations, strict=True)]
        scored = self.engine.score(items, threshold=thr, codes=active.active_codes,
                                   batch_size=batch_size or self.batch_size, decode_codes=categories,
                                   progress=progress)
        elapsed_ms = (time.perf_counter() - start) * 1000.0 / max(1, len(conversations))
        verdicts = []
        for conv, prompt, s in zip(conversations, prompts, scored, strict=True):
            notes: list[str] = []
            if self.engine.is_random_weights:
                notes.append(RANDOM_WEIGHTS_WARNING)
            if prompt.escaped_markers:
                notes.append(f"escaped {prompt.escaped_markers} prompt section marker(s) found in conversation text")
            unsafe = s.unsafe_probability >= thr
            verdicts.append(
                Verdict(
                    is_unsafe=unsafe,
                    unsafe_probability=s.unsafe_probability,
                    threshold=thr,
                    role=conv.judged_role,
                    violated=tuple(ViolatedCategory(c, active.category(c).name) for c in s.codes) if unsafe else (),
                    category_probabilities=dict(s.category_probabilities),
                    raw_text=s.raw_text,
                    has_image=conv.has_image,
                    latency_ms=elapsed_ms,
                    warnings=tuple(notes),
                )
            )
        return verdicts

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.engine.source,
            "device": self.engine.device,
            "dtype": str(self.engine.dtype).replace("torch.", ""),
            "tile_size": self.engine.tile_size,
            "threshold": self.threshold,
            "prompt_format": self.prompt_format.value,
            "policy": self.policy.name,
            "random_weights": self.engine.is_random_weights,
        }


def _check_threshold(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {value}")
    return value

