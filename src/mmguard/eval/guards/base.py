"""What every evaluated guard shares: the prediction it returns, the interface, the errors."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ...conversation import Conversation
from ...jsonl import finite_json
from ...policy import Policy

__all__ = ["EvalGuard", "GuardSpecError", "Prediction", "ProgressFn", "RemoteError", "RemoteUnavailable",
           "policy_key"]

ProgressFn = Callable[[int], None]


class GuardSpecError(ValueError):
    """A ``--guard`` spec cannot be understood."""


class RemoteError(RuntimeError):
    """A remote guard refused one item (non-retryable HTTP error or unparseable answer)."""


class RemoteUnavailable(RuntimeError):
    """A remote guard could not be reached even after retries: the run stops (and can resume)."""


@dataclass
class Prediction:
    """One guard's answer for one item, as cached.

    ``probability_kind``: ``model`` (the guard's own unsafe probability), ``logprob`` (from a chat model's
    token log-probabilities), ``score`` (a moderation score, not a probability), ``binary`` (0/1 from the
    label only: ranking and calibration metrics are then coarse).
    """

    label: str
    unsafe_probability: float
    codes: list[str] = field(default_factory=list)
    category_probabilities: dict[str, float] = field(default_factory=dict)
    unknown_codes: list[str] = field(default_factory=list)
    probability_kind: str = "model"
    raw: str | None = None
    error: str | None = None
    check_probabilities: dict[str, float] = field(default_factory=dict)  # per check, with OCR (local guards)
    # OCR was on and the image's text was not read (a timeout on a loaded machine, a failure): judged blind, so
    # never cached (a re-run reads it again) and counted in the report
    text_unread: bool = False

    @property
    def is_unsafe(self) -> bool:
        return self.label == "unsafe"

    def to_json(self) -> str:
        """Strict JSON: a missing probability (a failed item's NaN) is ``null``."""
        return json.dumps(finite_json(asdict(self)), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Prediction:
        data = json.loads(text)
        if data.get("unsafe_probability") is None:
            data["unsafe_probability"] = math.nan
        return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})


class EvalGuard(Protocol):
    name: str

    @property
    def cache_id(self) -> str:
        """Identity for the result cache: changes whenever answers could change."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        """One prediction per conversation, in order (an item error is a Prediction with ``error``)."""
        ...


def policy_key(policy: Policy) -> str:
    """A short hash of the policy: part of cache ids, so results under other policies are kept apart."""
    return hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
