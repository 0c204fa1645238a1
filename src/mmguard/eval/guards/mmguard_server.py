"""A running ``mmguard serve`` as an evaluated guard."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ...conversation import Conversation
from ...policy import DEFAULT_POLICY, Policy
from .base import Prediction, ProgressFn, RemoteError, policy_key
from .http import RetryingHttp, conversation_to_messages, probability

__all__ = ["MmguardServerGuard"]


class MmguardServerGuard:
    """A running ``mmguard serve``: ``POST /v1/guard/classify`` per item."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        threshold: float | None = None,
        policy: Policy = DEFAULT_POLICY,
        **http: Any,
    ) -> None:
        self.http = RetryingHttp(url, **http)
        self.threshold = threshold
        self.policy = policy
        self.name = name or f"mmguard-server@{self.http.base_url.split('://', 1)[-1]}"
        self._asked = False
        self._fingerprint: str | None = None

    @property
    def system_fingerprint(self) -> str | None:
        """What the server says decides its verdicts (its weights and settings, hashed: ``GET /v1/models``),
        asked once; None for a server that does not say (an older mmguard) or cannot be reached."""
        if not self._asked:
            self._asked = True
            try:
                data = self.http.get("/v1/models")
            except RemoteError:
                data = None
            entries = data.get("data") if isinstance(data, Mapping) else None
            first = entries[0] if isinstance(entries, list) and entries and isinstance(entries[0], Mapping) else {}
            said = first.get("system_fingerprint")
            self._fingerprint = said if isinstance(said, str) and said else None
            if self._fingerprint is None:  # never reuse results of a server that cannot say which model it runs
                self._unverified = uuid.uuid4().hex[:12]
        return self._fingerprint

    @property
    def cache_id(self) -> str:
        thr = "server" if self.threshold is None else self.threshold  # None: the server's own thresholds
        # the URL alone said nothing of the model behind it: a server restarted with other weights on the same
        # port answered from the cache with the first model's results
        model = self.system_fingerprint or f"unverified-{self._unverified}"
        return f"mmguard-server:{self.http.base_url}:{model}:thr={thr}:policy={policy_key(self.policy)}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "mmguard-server",
            "url": self.http.base_url,
            "threshold": self.threshold,
            "probability": "model",
            "system_fingerprint": self.system_fingerprint,
        }

    def _one(self, conv: Conversation) -> Prediction:
        body: dict[str, Any] = {"messages": conversation_to_messages(conv)}
        if self.threshold is not None:  # else the server decides at its own (its model's) thresholds
            body["threshold"] = self.threshold
        if self.policy.excluded:
            body["exclude"] = sorted(self.policy.excluded)
        data = self.http.post("/v1/guard/classify", body)
        # the server answers {"verdict": {...Verdict.to_dict()...}, "fail_closed": ...}; a flat verdict is
        # accepted too
        verdict = data.get("verdict", data) if isinstance(data, Mapping) else None
        if not isinstance(verdict, Mapping) or verdict.get("label") not in ("safe", "unsafe"):
            raise RemoteError(f"unexpected answer from mmguard server: {str(data)[:200]}")
        if isinstance(data, Mapping) and data.get("fail_closed"):
            raise RemoteError("mmguard server failed closed (its verdict is not a model judgment)")
        expected = self.system_fingerprint
        if expected is not None and isinstance(data, Mapping) and data.get("system_fingerprint") != expected:
            raise RemoteError(f"the server's model or settings changed during the evaluation (system_fingerprint "
                              f"{data.get('system_fingerprint')!r}, was {expected!r}): its results would mix two "
                              "models")
        codes = [str(c) for c in verdict.get("codes") or []]
        known = set(self.policy.codes)
        cat_probs = verdict.get("category_probabilities") or {}
        return Prediction(
            label=str(verdict["label"]),
            unsafe_probability=probability(verdict.get("unsafe_probability"), "unsafe_probability"),
            codes=[c for c in codes if c in known],
            category_probabilities={str(k): probability(v, f"probability of {k}") for k, v in cat_probs.items()},
            unknown_codes=[c for c in codes if c not in known]
            + [str(c) for c in verdict.get("unknown_codes") or []],
            probability_kind="model",
        )

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        return self.http.map(self._one, conversations, progress)
