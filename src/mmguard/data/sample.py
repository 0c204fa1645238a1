"""Seeded subsets of a build's train split by kind of item (``mmguard data sample``).

A training stage can weight kinds of items differently without a new build: keep every text prompt, half the
image prompts and a sixth of the replies, say. Each train example draws one number from ``random.Random(seed)``
in file order and is kept when it falls under its kind's share, so the same file, shares and seed always give the
same subset. Validation and test examples pass through untouched.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .schema import MODALITIES, TASKS, DataError, Example

KINDS = tuple(TASKS) + tuple(f"{task}/{modality}" for task in TASKS for modality in MODALITIES)


def parse_shares(specs: Iterable[str]) -> dict[str, float]:
    """``["response=0.15", "prompt/image+text=0.5"]`` -> ``{"response": 0.15, "prompt/image+text": 0.5}``."""
    shares: dict[str, float] = {}
    for spec in specs:
        kind, sep, value = spec.partition("=")
        if not sep or kind not in KINDS:
            raise DataError(f"--share {spec!r}: expected KIND=FRACTION with KIND one of {', '.join(KINDS)}")
        try:
            share = float(value)
        except ValueError:
            raise DataError(f"--share {spec!r}: {value!r} is not a number") from None
        if not 0.0 <= share <= 1.0:
            raise DataError(f"--share {spec!r}: the fraction must be within 0 and 1")
        if kind in shares:
            raise DataError(f"--share {kind}: given twice")
        shares[kind] = share
    return shares


def share_of(example: Example, shares: Mapping[str, float]) -> float:
    """The share that applies to ``example``: its task/modality's, else its task's, else 1 (keep)."""
    return shares.get(f"{example.task}/{example.modality}", shares.get(example.task, 1.0))


def sample_train(examples: Iterable[Example], shares: Mapping[str, float], seed: int) -> Iterator[Example]:
    """The train examples kept at their kind's share (one seeded draw each, in order), every other split whole."""
    rng = random.Random(seed)
    for ex in examples:
        if ex.split != "train" or rng.random() < share_of(ex, shares):
            yield ex


def relocate_images(example: Example, source_dir: Path, target_dir: Path) -> Example:
    """The example with its relative image paths rewritten from ``source_dir`` to ``target_dir``."""
    if not example.image_paths():
        return example

    def moved(part: dict[str, Any]) -> dict[str, Any]:
        path = part.get("path")
        if part.get("type") != "image" or path is None or os.path.isabs(str(path)):
            return part
        return {**part, "path": os.path.relpath(source_dir / str(path), target_dir)}

    messages = [{**m, "content": [moved(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
                for m in example.messages]  # fmt: skip
    return replace(example, messages=messages)  # validated again by __post_init__
