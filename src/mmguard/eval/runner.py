"""Run guards over labeled JSONL files, streaming, with a resumable SQLite result cache.

Items are read, turned into conversations (images loaded) and judged one chunk at a time; only a
small record per item (labels and each guard's answer) is kept, never the conversations or images.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..jsonl import dumps_row, finite_json
from ..policy import DEFAULT_POLICY, Policy
from .cache import ResultCache
from .data import LabeledItem, iter_records
from .guards import EvalGuard, Prediction, RemoteUnavailable

__all__ = ["EvalError", "GuardStats", "ItemRecord", "RunResult", "run_eval"]


class EvalError(RuntimeError):
    """The evaluation cannot go on; the message says why."""


@dataclass(slots=True)
class ItemRecord:
    id: str
    source: str
    where: str
    task: str
    modality: str
    y: int
    codes: tuple[str, ...]
    content_hash: str
    preds: dict[str, Prediction] = field(default_factory=dict)


@dataclass
class GuardStats:
    name: str
    cache_id: str
    description: dict[str, Any]
    computed: int = 0
    cached: int = 0
    errors: int = 0
    text_unread: int = 0  # image items judged without their text (OCR timed out or failed)
    probability_kinds: Counter[str] = field(default_factory=Counter)
    unknown_codes: Counter[str] = field(default_factory=Counter)
    error_examples: list[dict[str, str]] = field(default_factory=list)
    warnings: set[str] = field(default_factory=set)


@dataclass
class RunResult:
    records: list[ItemRecord]
    guards: list[GuardStats]
    data_files: list[str]
    split: str | None
    policy: Policy = DEFAULT_POLICY
    unknown_label_codes: Counter[str] = field(default_factory=Counter)

    @property
    def guard_names(self) -> list[str]:
        return [g.name for g in self.guards]


def _items(paths: Sequence[str | Path], split: str | None, limit: int | None) -> Iterator[LabeledItem]:
    n = 0
    for p in paths:
        for item in iter_records(p, split=split):
            if limit is not None and n >= limit:
                return
            n += 1
            yield item


def _chunks(it: Iterator[LabeledItem], size: int) -> Iterator[list[LabeledItem]]:
    chunk: list[LabeledItem] = []
    for x in it:
        chunk.append(x)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _unique_names(guards: Sequence[EvalGuard]) -> None:
    seen: Counter[str] = Counter()
    for g in guards:
        seen[g.name] += 1
        if seen[g.name] > 1:
            g.name = f"{g.name}#{seen[g.name]}"


def run_eval(
    data: Sequence[str | Path],
    guards: Sequence[EvalGuard],
    cache: ResultCache,
    *,
    split: str | None = "test",
    limit: int | None = None,
    chunk_size: int = 64,
    policy: Policy = DEFAULT_POLICY,
    progress: Callable[[int], None] | None = None,
    predictions: IO[str] | None = None,
) -> RunResult:
    """Judge every item with every guard (cached answers are reused) and collect per-item records.

    ``progress(n)`` is called as items finish (``n`` items × guards at a time); ``predictions``, when
    given, receives one JSON line per item as it completes.
    """
    if not guards:
        raise EvalError("no guard to evaluate")
    _unique_names(guards)
    for g in guards:  # local guards reading text in images keep what OCR read in the cache too
        keep_reads = getattr(g, "keep_ocr_reads", None)
        if keep_reads is not None:
            keep_reads(cache.ocr_store())
    stats = [GuardStats(g.name, g.cache_id, g.describe()) for g in guards]
    result = RunResult([], stats, [str(p) for p in data], split, policy)
    known = set(policy.codes)
    for chunk in _chunks(_items(data, split, limit), max(1, chunk_size)):
        convs = [item.conversation() for item in chunk]
        hashes = [c.content_hash() for c in convs]
        recs = [
            ItemRecord(
                item.id,
                item.source,
                item.where,
                conv.task,
                "image+text" if conv.has_image else "text",
                item.y,
                item.codes,
                h,
            )
            for item, conv, h in zip(chunk, convs, hashes, strict=True)
        ]
        for item in chunk:
            result.unknown_label_codes.update(c for c in item.codes if c not in known)
        for guard, st in zip(guards, stats, strict=True):
            found = cache.get_many(st.cache_id, hashes)
            todo = [i for i, h in enumerate(hashes) if h not in found]
            # the same content twice in one chunk is judged once
            todo_unique = list({hashes[i]: i for i in reversed(todo)}.values())[::-1]
            st.cached += len(hashes) - len(todo)
            cache.hits += len(hashes) - len(todo)
            if progress is not None and len(hashes) > len(todo):
                progress(len(hashes) - len(todo))
            if todo_unique:
                try:
                    preds = guard.predict([convs[i] for i in todo_unique], progress=progress)
                except RemoteUnavailable as err:
                    raise EvalError(f"guard {guard.name}: {err}") from None
                if len(preds) != len(todo_unique):
                    raise EvalError(
                        f"guard {guard.name} returned {len(preds)} answers for {len(todo_unique)} items"
                    )
                fresh = {hashes[i]: p for i, p in zip(todo_unique, preds, strict=True)}
                cache.put_many(st.cache_id, fresh.items())
                cache.misses += len(todo_unique)
                found.update(fresh)
                if progress is not None and len(todo) > len(todo_unique):
                    progress(len(todo) - len(todo_unique))
                st.computed += len(todo)
            for i, rec in enumerate(recs):
                pred = found[hashes[i]]
                rec.preds[st.name] = pred
                if pred.error is not None:
                    st.errors += 1
                    if len(st.error_examples) < 20:
                        st.error_examples.append({"id": rec.id, "where": rec.where, "error": pred.error})
                    continue
                st.probability_kinds[pred.probability_kind] += 1
                st.unknown_codes.update(pred.unknown_codes)
                st.text_unread += pred.text_unread
        result.records.extend(recs)
        if predictions is not None:
            for rec in recs:
                predictions.write(dumps_row(_record_json(rec)) + "\n")  # (ASCII escapes where an id holds "\ud800")
            predictions.flush()
    for guard, st in zip(guards, stats, strict=True):
        engine = getattr(getattr(guard, "guard", None), "engine", None)
        if engine is not None and getattr(engine, "is_random_weights", False):
            st.warnings.add("random weights: verdicts are meaningless (plumbing demo only)")
        if st.probability_kinds.get("binary"):
            st.warnings.add(
                f"{st.probability_kinds['binary']} item(s) without log-probabilities: unsafe "
                "probability is 0/1 (AUPRC, ROC-AUC and calibration are coarse)"
            )
        if st.probability_kinds.get("score"):
            st.warnings.add("moderation scores are not calibrated probabilities")
        if st.text_unread:
            st.warnings.add(f"{st.text_unread} image item(s) judged without their text: OCR timed out or failed "
                            "(see the verdicts' warnings); not cached, so a re-run reads them again")
    return result


def _record_json(rec: ItemRecord) -> dict[str, Any]:
    """One ``predictions.jsonl`` line; a failed item has ``unsafe_probability: null`` and its ``error``."""
    return finite_json({
        "id": rec.id,
        "source": rec.source,
        "where": rec.where,
        "task": rec.task,
        "modality": rec.modality,
        "label": "unsafe" if rec.y else "safe",
        "codes": list(rec.codes),
        "content_hash": rec.content_hash,
        "predictions": {
            name: {
                "label": p.label,
                "unsafe_probability": p.unsafe_probability,
                "codes": p.codes,
                "unknown_codes": p.unknown_codes,
                **({"check_probabilities": p.check_probabilities} if p.check_probabilities else {}),
                **({"error": p.error} if p.error else {}),
                **({"text_unread": True} if p.text_unread else {}),
            }
            for name, p in rec.preds.items()
        },
    })
