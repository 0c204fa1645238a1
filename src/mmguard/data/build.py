"""The ``mmguard data build`` pipeline: convert, de-duplicate, cap, add images, split, write.

Output folder layout::

    out/train.jsonl  out/validation.jsonl  out/test.jsonl   (schema: mmguard.data.schema)
    out/images/<hash>.png                                   (every image, referenced as images/<hash>.png)
    out/images/<hash>.png                                   (every image, as images/<hash>.png)

Everything is deterministic for a given ``seed`` and input folder: items are de-duplicated by id
(first occurrence wins), capped per source by a seeded hash of the id (not by file order), the
synthesized items use one ``random.Random(seed)``, and files are written sorted by id.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from .schema import SPLITS, DataError, Example, write_examples
from .sources import CONVERTERS, SKIMAGE_PHOTOS, convert_all
from .synth import (
    harmful_request_with_image,
    photo_questions,
    response_with_image,
    save_png,
    typographic_prompts,
)
from .synth_responses import templated_responses

__all__ = ["BuildConfig", "BuildResult", "build", "cap_per_source", "count_rows", "dedupe"]


@dataclass
class BuildConfig:
    datasets: Path
    out: Path
    seed: int = 0
    max_per_source: int | None = None
    exclude_noncommercial: bool = False
    exclude_model_outputs: bool = False
    sources: list[str] | None = None
    typographic: int = 400
    photo_questions: int = 200
    request_with_image: int = 300
    response_with_image: int = 300
    templated_responses: int = 0


@dataclass
class BuildResult:
    counts: dict[str, int]
    rows: list[dict[str, Any]]
    duplicates: dict[str, int] = field(default_factory=dict)
    excluded_from_train: dict[str, int] = field(default_factory=dict)

    def to_json(self, config: BuildConfig) -> dict[str, Any]:
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
        return {"config": cfg, "counts": self.counts, "duplicates": self.duplicates,
                "excluded_from_train": self.excluded_from_train, "rows": self.rows}  # fmt: skip


def dedupe(examples: Iterable[Example]) -> tuple[list[Example], Counter[str]]:
    """Keep the first item of each id (ids hash normalised content); count the dropped per source."""
    seen: set[str] = set()
    kept: list[Example] = []
    dropped: Counter[str] = Counter()
    for ex in examples:
        if ex.id in seen:
            dropped[ex.source] += 1
            continue
        seen.add(ex.id)
        kept.append(ex)
    return kept, dropped


def cap_per_source(examples: Iterable[Example], cap: int | None, seed: int) -> list[Example]:
    """At most ``cap`` items per source, the ones with the smallest sha256(seed, id): a seeded sample
    that does not depend on file order. Test-only sources are capped too (they are evaluation sets)."""
    items = list(examples)
    if cap is None:
        return items
    by_source: dict[str, list[Example]] = {}
    for ex in items:
        by_source.setdefault(ex.source, []).append(ex)
    out: list[Example] = []
    for group in by_source.values():
        group.sort(key=lambda e: hashlib.sha256(f"{seed}:{e.id}".encode()).digest())
        out.extend(group[:cap])
    return out


def _materialise(ex: Example, images_dir: Path) -> Example:
    """Copy absolute-path source images into ``images_dir`` as PNG and point the item at them."""
    changed = False
    messages = json.loads(json.dumps(ex.messages))
    for msg in messages:
        for part in msg["content"]:
            path = part.get("path") if part.get("type") == "image" else None
            if path is None or not Path(path).is_absolute():
                continue
            src = Path(path)
            if not src.is_file():
                raise DataError(f"{ex.id}: image {src} not found")
            with Image.open(src) as im:
                part["path"] = save_png(im.convert("RGB"), images_dir, f"source-v1\x00{ex.source}\x00{src.name}")
            changed = True
    return replace(ex, messages=messages) if changed else ex


def count_rows(examples: Iterable[Example]) -> list[dict[str, Any]]:
    """Counts per (source, split, task, label, modality), sorted."""
    c = Counter((e.source, e.split, e.task, e.label, e.modality) for e in examples)
    return [
        {"source": s, "split": sp, "task": t, "label": lb, "modality": m, "count": n}
        for (s, sp, t, lb, m), n in sorted(c.items())
    ]


def build(config: BuildConfig, progress: Callable[[str, int], None] | None = None) -> BuildResult:
    """Run the pipeline; ``progress(step_name, items_so_far)`` is called after each step."""
    tick = progress or (lambda _name, _n: None)
    out = Path(config.out)
    images_dir = out / "images"
    names = config.sources if config.sources is not None else [n for n in CONVERTERS if (config.datasets / n).is_dir()]
    if not names:
        raise DataError(f"no dataset folders found in {config.datasets}")
    converted: list[Example] = []
    for name in names:
        converted.extend(convert_all(config.datasets, [name]))
        tick(f"converted {name}", len(converted))
    items, dropped = dedupe(converted)
    items = cap_per_source(items, config.max_per_source, config.seed)
    items = [_materialise(e, images_dir) for e in items]
    tick("copied source images", len(items))

    rng = random.Random(config.seed)
    photo_dir = config.datasets / "skimage_benign_photos"
    photos = [photo_dir / p for p in SKIMAGE_PHOTOS if (photo_dir / p).is_file()]
    text_pool = [e for e in items if e.modality == "text"]
    synth = typographic_prompts(text_pool, images_dir, n=config.typographic, rng=rng)
    tick("typographic images", len(items) + len(synth))
    skimage_items = [e for e in items if e.source == "skimage_benign_photos"]
    synth += photo_questions(skimage_items, text_pool, photos, images_dir, n=config.photo_questions, rng=rng)
    synth += harmful_request_with_image(text_pool, photos, images_dir, n=config.request_with_image, rng=rng)
    synth += response_with_image(text_pool, photos, images_dir, n=config.response_with_image, rng=rng)
    synth += templated_responses(text_pool, n=config.templated_responses, rng=rng)  # last: keeps earlier draws
    synth, dropped_synth = dedupe(synth)
    dropped.update(dropped_synth)
    items += synth
    tick("image-paired items", len(items))

    excluded: Counter[str] = Counter()
    kept: list[Example] = []
    for e in items:
        drop = e.split == "train" and (
            (config.exclude_noncommercial and not e.trainable)
            or (config.exclude_model_outputs and "model_outputs" in e.meta)
        )
        if drop:
            excluded[e.source] += 1
        else:
            kept.append(e)
    kept.sort(key=lambda e: e.id)
    counts = {}
    for split in SPLITS:
        counts[split] = write_examples(out / f"{split}.jsonl", (e for e in kept if e.split == split))
    tick("written", len(kept))
    result = BuildResult(counts, count_rows(kept), dict(sorted(dropped.items())), dict(sorted(excluded.items())))
    (out / "stats.json").write_text(json.dumps(result.to_json(config), indent=2) + "\n", encoding="utf-8")
    return result
