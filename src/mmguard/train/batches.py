"""Sequences into batches: never images and text together, grouped by length, and (``share_prefix``) text
rows grouped by template so a batch computes the shared prompt prefix once; the collator that turns a batch
into model inputs."""

from __future__ import annotations

import random
from typing import Any

import torch

from .sequences import PackedImage, SequenceItem

__all__ = ["MIN_SHARED_PREFIX", "TEMPLATE_KEY_TOKENS", "BatchDataset", "Collator", "make_batches",
           "shared_prefix_len"]


def make_batches(items: list[SequenceItem], batch_size: int, seed: int,
                 share_prefix: bool = False) -> list[list[SequenceItem]]:
    """Shuffled batches, each all-image or all-text, grouped loosely by length to limit padding.

    ``share_prefix``: text items are first grouped by their template (the first :data:`TEMPLATE_KEY_TOKENS`
    token ids: same policy, same judged role), so most text batches share the template prefix that
    :func:`answer_logits` computes once; the groups' remainders make mixed batches as before."""
    rng = random.Random(seed)
    batches: list[list[SequenceItem]] = []

    def add(group: list[SequenceItem], whole_only: bool) -> list[SequenceItem]:
        rng.shuffle(group)
        # sort within windows of 32 batches: less padding, still random
        window = batch_size * 32
        for s in range(0, len(group), window):
            chunk = sorted(group[s:s + window], key=lambda it: len(it.input_ids))
            for i in range(0, len(chunk), batch_size):
                if whole_only and len(chunk) - i < batch_size:
                    return chunk[i:]  # the group's remainder
                batches.append(chunk[i:i + batch_size])
        return []

    for want_image in (True, False):
        group = [it for it in items if (it.image is not None) == want_image]
        if share_prefix and not want_image:
            templates: dict[tuple[int, ...], list[SequenceItem]] = {}
            for it in group:
                templates.setdefault(tuple(it.input_ids[:TEMPLATE_KEY_TOKENS]), []).append(it)
            group = [rest for members in templates.values() for rest in add(members, whole_only=True)]
        add(group, whole_only=False)
    rng.shuffle(batches)
    return batches


TEMPLATE_KEY_TOKENS = 96  # within the task line + 13 categories (~135 tokens with Llama 3's tokenizer)
MIN_SHARED_PREFIX = 32  # a shorter common prefix is not worth a second forward call


def shared_prefix_len(items: list[SequenceItem]) -> int:
    """How many leading tokens every row of a text batch shares, stopping before the position that predicts
    the first answer token (its hidden state must come from the rows' own forward). 0: none worth sharing."""
    if len(items) < 2 or any(it.image is not None for it in items):
        return 0
    first = items[0].input_ids
    limit = min(next(i for i, lab in enumerate(it.labels) if lab != -100) for it in items) - 1
    n = 0
    while n < limit and all(it.input_ids[n] == first[n] for it in items[1:]):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


class BatchDataset(torch.utils.data.Dataset):
    def __init__(self, batches: list[list[SequenceItem]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[SequenceItem]:
        return self.batches[i]


class Collator:
    """Turns one ready-made batch into model inputs with the engine's left-padding logic, plus labels.

    ``share_prefix``: a text batch whose rows share a prefix (:func:`shared_prefix_len`) becomes
    ``prefix_ids`` (1, P) plus the rows' remainders, right-padded (causal attention never looks right, so
    the padding needs no mask): :func:`answer_logits` runs the prefix once and every row from its KV."""

    def __init__(self, engine: Any, share_prefix: bool = False) -> None:
        self.engine = engine
        self.share_prefix = share_prefix

    def __call__(self, wrapped: list[list[SequenceItem]]) -> dict[str, Any]:
        from ..engine import EncodedItem
        from .reading import RenderedText

        items = [it for batch in wrapped for it in batch]
        shared = shared_prefix_len(items) if self.share_prefix else 0
        if shared:
            width = max(len(it.input_ids) for it in items) - shared
            ids = torch.full((len(items), width), self.engine.pad_id, dtype=torch.long)
            labels = torch.full((len(items), width), -100, dtype=torch.long)
            for i, it in enumerate(items):
                ids[i, :len(it.input_ids) - shared] = torch.tensor(it.input_ids[shared:], dtype=torch.long)
                labels[i, :len(it.labels) - shared] = torch.tensor(it.labels[shared:], dtype=torch.long)
            return {"prefix_ids": torch.tensor([items[0].input_ids[:shared]], dtype=torch.long),
                    "input_ids": ids, "labels": labels}
        images = [it.image.load() if isinstance(it.image, (RenderedText, PackedImage)) else it.image for it in items]
        enc = [EncodedItem(it.input_ids, im, None) for it, im in zip(items, images, strict=True)]  # type: ignore[arg-type]
        batch = self.engine.collate(enc)
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for i, it in enumerate(items):
            labels[i, width - len(it.labels):] = torch.tensor(it.labels, dtype=torch.long)
        batch["labels"] = labels
        return batch
