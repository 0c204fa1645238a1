"""Any OpenAI-compatible ``POST /v1/moderations`` endpoint as an evaluated guard.

OpenAI moderation categories → MLCommons S-codes (approximate; OpenAI's taxonomy is not MLCommons'):

====================================  =================================================
OpenAI category                       S-codes
====================================  =================================================
harassment                            S10 Hate (closest: demeaning people)
harassment/threatening                S2 Non-Violent Crimes (threats, intimidation), S1
hate                                  S10 Hate
hate/threatening                      S10 Hate, S1 Violent Crimes
illicit                               S2 Non-Violent Crimes
illicit/violent                       S1 Violent Crimes, S9 Indiscriminate Weapons
self-harm, self-harm/intent,          S11 Suicide & Self-Harm
self-harm/instructions
sexual                                S12 Sexual Content
sexual/minors                         S4 Child Sexual Exploitation
violence, violence/graphic            S1 Violent Crimes
====================================  =================================================

Categories not in this table are reported as unknown codes ``openai:<name>``, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...conversation import Conversation
from ...policy import DEFAULT_POLICY, Policy
from .base import Prediction, ProgressFn, RemoteError
from .http import RetryingHttp, image_data_url, probability

__all__ = ["OPENAI_TO_CODES", "OpenAIModerationGuard", "judged_content", "map_openai_categories"]

OPENAI_TO_CODES: dict[str, tuple[str, ...]] = {
    "harassment": ("S10",),
    "harassment/threatening": ("S2", "S1"),
    "hate": ("S10",),
    "hate/threatening": ("S10", "S1"),
    "illicit": ("S2",),
    "illicit/violent": ("S1", "S9"),
    "self-harm": ("S11",),
    "self-harm/intent": ("S11",),
    "self-harm/instructions": ("S11",),
    "sexual": ("S12",),
    "sexual/minors": ("S4",),
    "violence": ("S1",),
    "violence/graphic": ("S1",),
}


def judged_content(conv: Conversation) -> list[dict[str, Any]]:
    """What a moderation endpoint sees: the judged (last) turn's text, plus its image if it holds one."""
    last = conv.turns[-1]
    parts: list[dict[str, Any]] = [{"type": "text", "text": "\n\n".join(last.texts)}] if last.texts else []
    if last.image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_data_url(conv)}})
    return parts


def _openai_key(cat: Any) -> str:
    """``self_harm_intent`` (the Python SDK's attribute spelling) → ``self-harm/intent``."""
    key = str(cat)
    if key in OPENAI_TO_CODES:
        return key
    key = key.replace("self_harm", "self-harm").replace("_", "/")
    return key


def map_openai_categories(
    flags: Mapping[str, Any], policy: Policy = DEFAULT_POLICY
) -> tuple[list[str], list[str]]:
    """Flagged OpenAI categories → (policy codes in policy order, unknown ``openai:<name>`` codes)."""
    codes: set[str] = set()
    unknown: list[str] = []
    for cat, on in flags.items():
        if not on:
            continue
        mapped = OPENAI_TO_CODES.get(_openai_key(cat))
        if mapped is None:
            if str(cat) in policy.codes:  # an endpoint that already speaks S-codes (mmguard's own)
                codes.add(str(cat))
            else:
                unknown.append(f"openai:{str(cat)[:100]}")  # a name is a word: a 10 MB one is not kept whole
        else:
            codes.update(mapped)
    return [c for c in policy.codes if c in codes], unknown


class OpenAIModerationGuard:
    """Any OpenAI-compatible ``POST /v1/moderations`` endpoint.

    The unsafe score is the largest category score (``probability_kind="score"``); the label is the
    endpoint's ``flagged``. Only the judged last turn is sent (moderation endpoints see content, not a
    conversation); for response classification the user's image is therefore not sent.
    """

    def __init__(
        self,
        url: str,
        model: str = "omni-moderation-latest",
        *,
        name: str | None = None,
        policy: Policy = DEFAULT_POLICY,
        **http: Any,
    ) -> None:
        self.http = RetryingHttp(url, **http)
        self.model = model
        self.policy = policy
        self.name = name or f"moderation:{model}"

    @property
    def cache_id(self) -> str:
        return f"openai-moderation:{self.http.base_url}#{self.model}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "openai-moderation",
            "url": self.http.base_url,
            "model": self.model,
            "probability": "score",
            "mapping": {k: list(v) for k, v in OPENAI_TO_CODES.items()},
        }

    def _one(self, conv: Conversation) -> Prediction:
        parts = judged_content(conv)
        payload: Any = (
            parts if any(p["type"] != "text" for p in parts) else (parts[0]["text"] if parts else "")
        )
        data = self.http.post("/v1/moderations", {"model": self.model, "input": payload})
        results = data.get("results") if isinstance(data, Mapping) else None
        if not isinstance(results, list) or not results or not isinstance(results[0], Mapping):
            raise RemoteError(f"unexpected moderation answer: {str(data)[:200]}")
        res = results[0]
        flags = res.get("categories") or {}
        scores = res.get("category_scores") or {}
        if not isinstance(flags, Mapping) or not isinstance(scores, Mapping):
            raise RemoteError("moderation answer lacks 'categories' / 'category_scores' objects")
        codes, unknown = map_openai_categories(flags, self.policy)
        cat_probs: dict[str, float] = {}
        for cat, score in scores.items():
            mapped = OPENAI_TO_CODES.get(
                _openai_key(cat), (str(cat),) if str(cat) in self.policy.codes else ()
            )
            for code in mapped:
                cat_probs[code] = max(cat_probs.get(code, 0.0), probability(score, f"score of {cat}"))
        top = max((probability(v, f"score of {k}") for k, v in scores.items()), default=0.0)
        flagged = bool(res.get("flagged", bool(codes or unknown)))
        return Prediction(
            label="unsafe" if flagged else "safe",
            unsafe_probability=top,
            codes=codes if flagged else [],
            category_probabilities=cat_probs,
            unknown_codes=unknown,
            probability_kind="score",
        )

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        return self.http.map(self._one, conversations, progress)
