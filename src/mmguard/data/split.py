"""Deterministic train/validation/test assignment by content hash.

The split of an item is a pure function of its *normalised user text* (and, for image items whose
text is generic, of the image identity): sha256 → a bucket in [0, 10000) → split by ratio. It does
not depend on input order, the machine, the Python version or ``PYTHONHASHSEED`` (Python's
``hash()`` is salted per process and must never be used here). Keying on the user text keeps a
prompt and every response to it in the same split, so response-labeled sets (GPTFuzz: 77 responses
per question) cannot leak a question from train into test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .schema import DataError, Split, normalise_text

__all__ = ["SplitRatios", "assign_split", "content_id", "split_bucket"]

_BUCKETS = 10_000


@dataclass(frozen=True)
class SplitRatios:
    """Fractions of train and validation; the rest is test."""

    train: float = 0.8
    validation: float = 0.1

    def __post_init__(self) -> None:
        if not (0 <= self.train <= 1 and 0 <= self.validation <= 1 and self.train + self.validation <= 1):
            raise DataError(f"invalid split ratios train={self.train} validation={self.validation}")


def split_bucket(key: str, *, salt: str = "mmguard-split-v1") -> int:
    """The bucket (0..9999) of a split key, from sha256 of the normalised key."""
    digest = hashlib.sha256(f"{salt}\x00{normalise_text(key)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS


def assign_split(key: str, *, test_only: bool = False, ratios: SplitRatios = SplitRatios()) -> Split:
    """``test`` for test-only sources, otherwise by bucket: [0, train) → train, then validation, then test."""
    if test_only:
        return "test"
    b = split_bucket(key)
    if b < round(ratios.train * _BUCKETS):
        return "train"
    if b < round((ratios.train + ratios.validation) * _BUCKETS):
        return "validation"
    return "test"


def content_id(source: str, *parts: str) -> str:
    """A stable id ``source:<16 hex>`` from the normalised content parts."""
    h = hashlib.sha256()
    for p in parts:
        h.update(normalise_text(p).encode())
        h.update(b"\x1f")
    return f"{source}:{h.hexdigest()[:16]}"
