"""Per-item results in OpenAI's moderation shape, with S-code keys or OpenAI category names.

Score semantics (see docs/server.md):

* ``category_scores[code]`` is the model's probability that its answer starts ``unsafe\\n<code>``:
  the joint probability of ``unsafe`` and of that code written first. The scores of a result sum to at
  most the unsafe probability. With ``category_scores="unsafe"`` they are computed for unsafe verdicts
  only and reported as 0.0 for safe ones (whose true value is below the unsafe probability, hence
  below the threshold).
* ``categories[code]`` is true when the verdict is unsafe and the model wrote that code.
* With OpenAI names, a category's score is the sum of the scores of the codes mapped onto it (the
  events are disjoint, so the sum is still a probability), and it is true when any mapped code was
  written. OpenAI categories without a Llama Guard counterpart are always false, 0.0, with ``[]``
  as applied input types. ``flagged`` is always the guard's own verdict, even when the written codes
  (S5, S6, S7, S8, S13) have no OpenAI counterpart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..verdict import Verdict

__all__ = ["OPENAI_CATEGORIES", "OPENAI_MAP", "moderation_result"]

OPENAI_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

# OpenAI category -> Llama Guard 3 codes whose presence makes it true.
OPENAI_MAP: dict[str, tuple[str, ...]] = {
    "harassment": (),
    "harassment/threatening": (),
    "hate": ("S10",),
    "hate/threatening": (),
    "illicit": ("S2",),
    "illicit/violent": ("S1", "S9"),
    "self-harm": ("S11",),
    "self-harm/intent": ("S11",),
    "self-harm/instructions": ("S11",),
    "sexual": ("S3", "S12"),
    "sexual/minors": ("S4",),
    "violence": ("S1",),
    "violence/graphic": (),
}


def _input_types(has_text: bool, has_image: bool) -> list[str]:
    return (["text"] if has_text else []) + (["image"] if has_image else [])


def moderation_result(
    verdict: Verdict,
    active_codes: Sequence[str],
    *,
    names: str,
    has_text: bool,
    fail_closed: bool = False,
) -> dict[str, Any]:
    """One entry of ``results`` (keys: flagged, categories, category_scores, category_applied_input_types)."""
    applied = _input_types(has_text, verdict.has_image)
    written = set(verdict.codes) if verdict.is_unsafe else set()
    probs = verdict.category_probabilities
    if names == "openai":
        categories: dict[str, bool] = {}
        scores: dict[str, float] = {}
        types: dict[str, list[str]] = {}
        for name in OPENAI_CATEGORIES:
            codes = [c for c in OPENAI_MAP[name] if c in active_codes]
            categories[name] = fail_closed if codes else False
            categories[name] = categories[name] or any(c in written for c in codes)
            scores[name] = (
                1.0 if (fail_closed and codes) else min(1.0, sum(float(probs.get(c, 0.0)) for c in codes))
            )
            types[name] = list(applied) if codes else []
    else:
        categories = {c: fail_closed or c in written for c in active_codes}
        scores = {c: 1.0 if fail_closed else float(probs.get(c, 0.0)) for c in active_codes}
        types = {c: list(applied) for c in active_codes}
    return {
        "flagged": bool(verdict.is_unsafe),
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": types,
    }


def merge_verdict_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the results of one text judged with several images: any flag wins, scores take the maximum."""
    first = results[0]
    merged: dict[str, Any] = {
        "flagged": any(r["flagged"] for r in results),
        "categories": {k: any(r["categories"][k] for r in results) for k in first["categories"]},
        "category_scores": {
            k: max(r["category_scores"][k] for r in results) for k in first["category_scores"]
        },
        "category_applied_input_types": first["category_applied_input_types"],
    }
    return merged
