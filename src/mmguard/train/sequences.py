"""From labeled JSONL to training sequences: each example formatted with the paper's augmentations,
tokenized with labels on the answer only, cut to length, its image held compactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig

__all__ = ["PackedImage", "SequenceItem", "load_training_items", "reading_items", "transcript_example"]


@dataclass
class SequenceItem:
    """One training sequence: token ids, labels (-100 off the answer) and its image, if any."""

    input_ids: list[int]
    labels: list[int]
    image: Any  # PackedImage / reading.RenderedText (decoded or rendered at collation), a PIL image, or None


class PackedImage:
    """A training image held as PNG bytes (lossless) and decoded at collation: tens of thousands of
    decoded 760 px images would hold gigabytes."""

    __slots__ = ("data",)

    def __init__(self, image: Any) -> None:
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        self.data = buf.getvalue()

    def load(self) -> Any:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.data)) as im:
            return im.convert("RGB")


def _truncate(
    ids: list[int], labels: list[int], max_len: int, image_id: int
) -> tuple[list[int], list[int]] | None:
    """Cut the middle of the prompt so the sequence fits ``max_len``; the answer is always kept."""
    if len(ids) <= max_len:
        return ids, labels
    answer_start = next(i for i, lab in enumerate(labels) if lab != -100)
    tail_prompt = min(64, answer_start)
    head = max_len - (len(ids) - answer_start) - tail_prompt
    if head < 32:
        return None
    new_ids = ids[:head] + ids[answer_start - tail_prompt:]
    new_labels = labels[:head] + labels[answer_start - tail_prompt:]
    if (image_id in ids) != (image_id in new_ids):
        return None
    return new_ids, new_labels


def load_training_items(paths: list[str], tokenizer: Any, cfg: TrainConfig, split: str = "train",
                        limit: int | None = None) -> tuple[list[SequenceItem], dict[str, int]]:
    from ..data.formatter import AugmentationConfig, Formatter, token_format, tokenize
    from ..data.schema import DataError, read_numbered_examples

    a = cfg.augment if split == "train" else 0.0
    formatter = Formatter(config=AugmentationConfig(a, a, a), seed=cfg.seed)
    items: list[SequenceItem] = []
    stats = {"examples": 0, "skipped_untrainable": 0, "truncated": 0, "dropped_long": 0}
    reading_pool: list[str] = []  # texts for --reading: every trainable text prompt of the split
    for path in paths:
        base = Path(path).parent
        numbered = [(n, ex) for n, ex in read_numbered_examples(path) if ex.split == split]
        line_of = {id(ex): n for n, ex in numbered}
        examples = [ex for _, ex in numbered]
        if split == "train" and cfg.reading:
            reading_pool += [ex.prompt_text for ex in examples
                             if ex.trainable and ex.task == "prompt" and ex.modality == "text"]  # fmt: skip
        balanced = _balanced_sources(examples)
        for ex in examples:
            if not ex.trainable:
                stats["skipped_untrainable"] += 1
                continue
            if limit is not None and stats["examples"] >= limit:
                break
            stats["examples"] += 1
            repeated = ex.label == "unsafe" or ex.source in balanced
            repeat = cfg.unsafe_repeat if (split == "train" and repeated) else 1
            # formatting is seeded per example, so one call serves every repeat and the image is held once
            try:
                forms = formatter.format(ex, base)
                if cfg.transcripts and split == "train" and ex.meta.get("kind") == "typographic":
                    forms += formatter.format(transcript_example(ex), base)
            except (ValueError, TypeError, KeyError) as err:  # an image, a text, a conversation rule, meta fields
                raise DataError(f"{path}:{line_of[id(ex)]}: {err}") from None
            # one PNG per decoded image, shared by the example's repeats and augmentations (keyed while the
            # example's images are alive, so an id is never reused)
            packed: dict[int, PackedImage] = {}
            for t in forms * repeat:
                tok = tokenize(tokenizer, t)
                assert cfg.max_seq_len is not None
                cut = _truncate(tok.input_ids, tok.labels, cfg.max_seq_len, token_format(tokenizer).image_id)
                if cut is None:
                    stats["dropped_long"] += 1
                    continue
                if len(cut[0]) < len(tok.input_ids):
                    stats["truncated"] += 1
                image = tok.image
                if image is not None:
                    if id(image) not in packed:
                        packed[id(image)] = PackedImage(image)
                    image = packed[id(image)]
                items.append(SequenceItem(cut[0], cut[1], image))
    if split == "train" and cfg.reading:
        reading = reading_items(reading_pool, tokenizer, cfg.reading, cfg.seed)
        stats["reading"] = len(reading)
        items += reading
    stats["items"] = len(items)
    return items, stats


def transcript_example(ex: Any) -> Any:
    """A typographic example in the form of the guard's OCR check (:func:`mmguard.ocr.with_transcription`):
    text only, with what OCR reads from the rendered image (the request, then the empty items)."""
    from ..data.schema import Example
    from ..data.synth import typographic_text
    from ..ocr import TRANSCRIPTION_PREFIX, normalise_text

    if not isinstance(ex.meta.get("rendered_text"), str):
        raise ValueError("a typographic item needs meta.rendered_text (the text drawn) for --transcripts")
    read = normalise_text(typographic_text(ex.meta["rendered_text"]) + " 1. 2. 3.")
    messages = []
    for msg in ex.messages:
        content = msg["content"]
        if isinstance(content, list) and any(p.get("type") != "text" for p in content):
            content = [p for p in content if p.get("type") == "text"]
            content.append({"type": "text", "text": TRANSCRIPTION_PREFIX + read})
        messages.append({**msg, "content": content})
    return Example(id=ex.id + ":transcript", source=ex.source, license=ex.license, split=ex.split, task=ex.task,
                   messages=messages, label=ex.label, codes=list(ex.codes), modality="text",
                   trainable=ex.trainable, meta={**ex.meta, "kind": "typographic_transcript"})


def reading_items(prompts: list[str], tokenizer: Any, n: int, seed: int) -> list[SequenceItem]:
    """``n`` transcription items (see :mod:`mmguard.train.reading`) drawn from ``prompts``, harmful and
    benign alike; their images are rendered at collation."""
    from .reading import RenderedText, reading_prompt_ids, reading_texts, reading_tokens

    prompt_ids = reading_prompt_ids(tokenizer)
    items = []
    for text in reading_texts(prompts, n, seed):
        ids, labels = reading_tokens(tokenizer, text, prompt_ids)
        items.append(SequenceItem(ids, labels, RenderedText(text)))
    return items


def _balanced_sources(examples: list[Any], min_unsafe_share: float = 0.4) -> set[str]:
    """Sources whose trainable items are at least ``min_unsafe_share`` unsafe and include safe ones.

    ``--unsafe-repeat`` makes up for the many all-safe sources; inside a source that already holds both
    labels in similar numbers (the typographic items are 1:1 by construction) it repeats the safe items
    too. Otherwise repetition would turn the form of such items (typography, a fixed instruction) into a
    label signal: mini v4 learned "typography means unsafe" that way.
    """
    counts: dict[str, list[int]] = {}
    for ex in examples:
        if ex.trainable:
            c = counts.setdefault(ex.source, [0, 0])
            c[ex.label == "unsafe"] += 1
    return {src for src, (safe, unsafe) in counts.items() if safe and unsafe / (safe + unsafe) >= min_unsafe_share}
