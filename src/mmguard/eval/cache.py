"""Per-item results cached in SQLite, keyed by (guard identity, conversation content hash).

A rerun (or a run resumed after an interruption) reads finished items back instead of recomputing
them. Writes are committed per chunk, so at most one chunk of work is lost to a crash or Ctrl-C.
Item errors are never cached (they are retried on the next run).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .guards import Prediction

__all__ = ["ResultCache"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    guard TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (guard, content_hash)
);
CREATE TABLE IF NOT EXISTS ocr_reads (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL
);
"""


class ResultCache:
    def __init__(self, path: str | Path | None) -> None:
        """``None`` or ``":memory:"`` keeps the cache in memory (nothing survives the process)."""
        self.path = str(path) if path is not None else ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise OSError(f"{self.path}: cannot use as a result cache: {err}") from None
        self.hits = 0
        self.misses = 0

    def get_many(self, guard: str, hashes: Sequence[str]) -> dict[str, Prediction]:
        found: dict[str, Prediction] = {}
        unique = list(dict.fromkeys(hashes))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT content_hash, result FROM results WHERE guard = ? AND content_hash IN ({marks})",
                [guard, *chunk],
            ).fetchall()
            for h, text in rows:
                found[h] = Prediction.from_json(text)
        return found

    def put_many(self, guard: str, items: Iterable[tuple[str, Prediction]]) -> None:
        now = time.time()
        # a failed item, or one judged without its image's text (OCR timed out), is tried again next time
        rows = [(guard, h, p.to_json(), now) for h, p in items if p.error is None and not p.text_unread]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)", rows)

    def ocr_store(self) -> _OcrReads:
        """What OCR read from each image, kept here too: a guard evaluated later (another model, other
        settings) on the same images does not read them again (see :class:`mmguard.ocr_reader.OcrStore`)."""
        return _OcrReads(self.db)

    def count(self, guard: str | None = None) -> int:
        if guard is None:
            return int(self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        return int(self.db.execute("SELECT COUNT(*) FROM results WHERE guard = ?", (guard,)).fetchone()[0])

    def close(self) -> None:
        self.db.close()


class _OcrReads:
    """:class:`mmguard.ocr_reader.OcrStore` on the result cache's database (one row per engine identity and image)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT text FROM ocr_reads WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, text: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO ocr_reads VALUES (?, ?)", (key, text))
