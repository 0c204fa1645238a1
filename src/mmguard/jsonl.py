"""JSONL conversations in, one output row per line out: the format of ``mmguard classify --jsonl`` (and of
every tool that writes lines "as classify --jsonl writes them").

Input: one JSON object per line with a ``messages`` list (chat-messages form, see
:meth:`mmguard.Conversation.from_messages`) and any other fields (an id, a gold label, metadata...).
Blank lines are skipped (line numbers still count them).

Output: one JSON object per non-blank input line, in input order::

    {...every input field except "messages", unchanged..., "mmguard": {"line": 3, ...verdict...}}
    {...every input field except "messages", unchanged..., "mmguard": {"line": 4, "error": "..."}}

``mmguard`` holds :meth:`mmguard.Verdict.to_dict` plus the 1-based input ``line``, or, for a line that
could not be judged (invalid JSON, invalid UTF-8, invalid text, a bad image, a broken conversation rule),
``line`` and ``error`` only. Input fields are never overwritten: an input object that already has a
top-level ``mmguard`` field is refused (an error row without that field) rather than silently losing it.
``messages`` is not copied (it may hold inline images); join on your own id or on ``mmguard.line``.
Rows are strict JSON (no ``NaN``); text that holds lone surrogates, valid only as JSON escapes, is
written back as the same escapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .conversation import Conversation, ConversationError
from .images import DEFAULT_LIMITS, ImageError, ImageLimits

__all__ = [
    "MAX_LINE_BYTES",
    "VERDICT_KEY",
    "JsonlLine",
    "dumps_row",
    "dumps_utf8",
    "error_row",
    "finite_json",
    "iter_lines",
    "loads_strict",
    "parse_line",
    "verdict_row",
]

VERDICT_KEY = "mmguard"
MESSAGES_KEY = "messages"
# One line holds at most one image (20 MB encoded, ~27 MB as base64) plus texts (64 turns of at most
# 200 000 characters); a longer line is refused without being read into memory whole.
MAX_LINE_BYTES = 64 * 1024 * 1024


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON: {name} is not JSON (use null or a number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: Python reads infinity, which no JSON output can write back
        raise ValueError(f"invalid JSON: the number {text[:40]} is out of range")
    return value


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` that refuses what JSON does not allow (``NaN``, ``Infinity``, numbers out of a float's
    range) and reports nesting too deep to parse as a ``ValueError`` (Python raises ``RecursionError``)."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float replaced by ``None``: what ``json.dumps(..., allow_nan=False)`` accepts
    (JSON has no NaN). Mappings become dicts, tuples lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def dumps_utf8(value: Any, **options: Any) -> str:
    """``json.dumps`` as UTF-8 text where it can be: strings holding lone surrogates (an input's ``\\ud800``-style
    escape, a path whose bytes are not UTF-8) cannot be written as UTF-8, so such a value is written with ASCII
    escapes, which reproduce the input's. ``options``: json.dumps's (not ``ensure_ascii``)."""
    text = json.dumps(value, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, **options)
    return text


def dumps_row(row: Mapping[str, Any]) -> str:
    """One output line (without the newline): strict JSON, UTF-8 text where possible (:func:`dumps_utf8`)."""
    try:
        return dumps_utf8(row, allow_nan=False)
    except RecursionError:
        line = row.get(VERDICT_KEY, {}).get("line") if isinstance(row.get(VERDICT_KEY), Mapping) else None
        return json.dumps({VERDICT_KEY: {"line": line, "error": "the row is nested too deeply to write"}})


def _fields(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if k not in (MESSAGES_KEY, VERDICT_KEY)}


def verdict_row(input_obj: Mapping[str, Any] | None, verdict: Any, *, line: int | None = None) -> dict[str, Any]:
    """The output row of a judged line: the input's fields (except ``messages``) and ``mmguard``.

    ``verdict`` is a :class:`mmguard.Verdict` or its ``to_dict()``.
    """
    data = verdict if isinstance(verdict, Mapping) else verdict.to_dict()
    return {**_fields(input_obj), VERDICT_KEY: {"line": line, **finite_json(data)}}


def error_row(input_obj: Any, message: str, *, line: int | None = None) -> dict[str, Any]:
    """The output row of a line that could not be judged; ``input_obj`` is the parsed line if it was a JSON
    object (its fields are kept), else anything (nothing of it is copied)."""
    return {**_fields(input_obj), VERDICT_KEY: {"line": line, "error": str(message)}}


@dataclass
class JsonlLine:
    """One non-blank input line, parsed: ``conversation`` or ``error`` is set; ``verdict`` once judged."""

    line: int
    input: dict[str, Any] | None
    conversation: Conversation | None = None
    error: str | None = None
    verdict: Any = None

    def row(self) -> dict[str, Any]:
        """The output row: the error row, else the verdict row (``verdict`` must be set)."""
        if self.error is not None:
            return error_row(self.input, self.error, line=self.line)
        if self.verdict is None:
            raise ValueError(f"line {self.line} has neither a verdict nor an error")
        return verdict_row(self.input, self.verdict, line=self.line)


def iter_lines(
    source: str | Path | IO[bytes], *, max_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, raw bytes)`` for every non-blank line; ``None`` instead of the bytes for a line over
    ``max_bytes`` (it is skipped without being held in memory)."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            yield from iter_lines(fh, max_bytes=max_bytes)
        return
    n = 0
    while True:
        raw = source.readline(max_bytes + 1)
        if not raw:
            return
        n += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # drop the rest of the long line, a bounded chunk at a time
                raw = source.readline(1024 * 1024)
            yield n, None
            continue
        if raw.strip():
            yield n, raw


def parse_line(
    raw: bytes | str | None,
    line: int,
    *,
    base_dir: Path | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    allow_paths: bool = True,
    max_bytes: int = MAX_LINE_BYTES,
) -> JsonlLine:
    """Parse one line into a conversation, or into the error its output row will carry (never raises for bad
    input). ``raw`` is ``None`` for a line :func:`iter_lines` found too long."""
    if raw is None:
        return JsonlLine(line, None, error=f"line is longer than the limit of {max_bytes} bytes")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = f"0x{raw[err.start]:02X}"
            return JsonlLine(line, None, error=f"not UTF-8: invalid byte {bad} at byte {err.start + 1}")
    try:
        obj = loads_strict(raw)
    except json.JSONDecodeError as err:
        return JsonlLine(line, None, error=f"invalid JSON at column {err.colno}: {err.msg}")
    except ValueError as err:
        return JsonlLine(line, None, error=str(err))
    if not isinstance(obj, dict):
        return JsonlLine(line, None, error="each line must be a JSON object with a 'messages' list")
    if VERDICT_KEY in obj:
        return JsonlLine(
            line, obj,
            error=f"the input field {VERDICT_KEY!r} is reserved for mmguard's verdict; rename it",
        )
    try:
        conv = Conversation.from_messages(obj, base_dir=base_dir, limits=limits, allow_paths=allow_paths)
    except (ConversationError, ImageError) as err:
        return JsonlLine(line, obj, error=str(err))
    return JsonlLine(line, obj, conversation=conv)
