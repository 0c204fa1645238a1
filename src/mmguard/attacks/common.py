"""Shared pieces: the unsafe items to attack, neutral images, decision margins, deadlines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..conversation import Conversation, Turn

__all__ = ["AttackItem", "Deadline", "attack_loss", "decision_margin", "load_attack_items", "neutral_image",
           "with_image", "with_text"]


@dataclass
class AttackItem:
    """One unsafe conversation to attack. ``task`` is ``prompt`` or ``response`` (the judged role)."""

    id: str
    task: str
    conversation: Conversation
    image_source: str = "original"  # "original", "neutral" (a text item paired with a gray image) or "none"
    meta: dict[str, Any] = field(default_factory=dict)


def neutral_image(size: tuple[int, int] = (224, 224)) -> Image.Image:
    """A plain mid-gray RGB image: the 'dummy' image paired with text-only items for image attacks."""
    return Image.new("RGB", size, (128, 128, 128))


def with_image(conv: Conversation, image: Image.Image | None) -> Conversation:
    """The same conversation with its image replaced (on the first user turn), or removed (``None``)."""
    turns = list(conv.turns)
    idx = next((i for i, t in enumerate(turns) if t.image is not None), 0)
    turns = [Turn(t.role, t.texts, None) for t in turns]
    turns[idx] = Turn(turns[idx].role, turns[idx].texts, image)
    return Conversation(tuple(turns))


def with_text(conv: Conversation, turn_index: int, text: str) -> Conversation:
    """The same conversation with the text of one turn replaced."""
    turns = list(conv.turns)
    t = turns[turn_index]
    turns[turn_index] = Turn(t.role, (text,), t.image)
    return Conversation(tuple(turns))


def with_suffix(conv: Conversation, turn_index: int, suffix: str) -> Conversation:
    """The same conversation with ``suffix`` appended to the last text of one turn (stripped first). The turn's
    other texts stay apart: the template writes each under its own role label, and joining them into one text
    rewrote the item (``User: A\n\nUser: B`` became ``User: A\n\nB``), so an attack scored another conversation."""
    turns = list(conv.turns)
    t = turns[turn_index]
    texts = list(t.texts) or [""]
    texts[-1] = texts[-1].strip() + suffix
    turns[turn_index] = Turn(t.role, tuple(texts), t.image)
    return Conversation(tuple(turns))


def decision_margin(logits: torch.Tensor, safe_id: int, unsafe_id: int) -> torch.Tensor:
    """``logit(unsafe) - logit(safe)`` at the decision position; below 0 the verdict is ``safe`` at
    any threshold >= 0.5 (p_unsafe < p_safe implies p_unsafe < 0.5)."""
    logits = logits.float()
    return logits[..., unsafe_id] - logits[..., safe_id]


def attack_loss(logits: torch.Tensor, safe_id: int, unsafe_id: int,
                kind: str = "margin") -> torch.Tensor:
    """Per-row loss to minimise. ``margin``: ``logit(unsafe) - logit(safe)`` (the default; with a real
    guard p(unsafe) + p(safe) ~ 1, so this is the log-odds the threshold acts on). ``logprob``:
    ``log p(unsafe)`` over the full vocabulary, the quantity the threshold is applied to; useful for
    toy models that put mass outside the two verdict tokens and are run at a low threshold."""
    if kind == "margin":
        return decision_margin(logits, safe_id, unsafe_id)
    if kind == "logprob":
        return torch.log_softmax(logits.float(), dim=-1)[..., unsafe_id]
    raise ValueError(f"unknown loss {kind!r}; use 'margin' or 'logprob'")


class Deadline:
    """A wall-clock budget shared by all attacks of a run.

    ``None`` means no limit; zero or less means the budget is already spent (a phase that starts after
    the run's time is used up must skip its work, not run unbounded).
    """

    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.monotonic() + 60.0 * max(0.0, minutes)

    @property
    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def left_s(self) -> float:
        return float("inf") if self.end is None else max(0.0, self.end - time.monotonic())


def load_attack_items(
    data: str | Path,
    *,
    limit: int | None = None,
    split: str | None = "test",
    seed: int = 0,
    unloadable: list[tuple[str, str]] | None = None,
) -> list[AttackItem]:
    """Unsafe items of a JSONL file (the ``test`` split by default), ``limit`` per task (prompt/response).

    Items whose conversation cannot be loaded (e.g. a missing image) are skipped; ``unloadable``, when given,
    receives each one's (id, reason), for the report to say so. Image+text items come first within each task,
    then text-only items, each group in a seeded random order.
    """
    import random

    from ..data.schema import read_examples

    path = Path(data)
    if path.is_dir():
        path = path / f"{split or 'test'}.jsonl"
    rng = random.Random(seed)
    by_task: dict[str, list[tuple[int, Any]]] = {"prompt": [], "response": []}
    for ex in read_examples(path):
        if ex.label != "unsafe" or (split and ex.split != split) or ex.task not in by_task:
            continue
        by_task[ex.task].append((0 if ex.modality == "image+text" else 1, ex))
    items: list[AttackItem] = []
    for task, rows in by_task.items():
        rng.shuffle(rows)
        rows.sort(key=lambda r: r[0])
        taken = 0
        for _, ex in rows:
            if limit is not None and taken >= limit:
                break
            try:
                conv = ex.to_conversation(path.parent)
            except (ValueError, OSError) as err:  # an image, a text, a conversation rule
                if unloadable is not None:
                    unloadable.append((ex.id, str(err)[:200]))
                continue
            items.append(AttackItem(ex.id, task, conv, "original" if conv.has_image else "none",
                                    {"source": ex.source, "codes": list(ex.codes), "modality": ex.modality}))
            taken += 1
    return items
