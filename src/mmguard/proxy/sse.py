"""Server-sent events as the upstream writes them and the proxy writes them back: events split at CRLF, CR or LF
only (as the standard and the openai client read them), bounded in size, their JSON read with a depth limit, and
the JSON the proxy writes itself escaped to ASCII."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DONE", "MAX_JSON_DEPTH", "SSEEvent", "SSEParser", "json_bytes", "loads_or_none", "sse"]

DONE = "[DONE]"


@dataclass
class SSEEvent:
    """One server-sent event: its raw bytes (forwarded unchanged) and its ``data`` payload."""

    raw: bytes
    data: str | None

    @property
    def is_done(self) -> bool:
        return self.data is not None and self.data.strip() == DONE

    def json(self) -> Any:
        if self.data is None:
            return None
        return loads_or_none(self.data)


MAX_JSON_DEPTH = 128  # far past any answer's nesting, far below what the proxy's own json.dumps can write back


def loads_or_none(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``text`` as JSON, or None where it is not JSON or nests deeper than ``max_depth``: the parser raises
    RecursionError (not a ValueError) past its limit, and JSON just under that limit parsed, then failed when the
    proxy wrote it back (a blocked answer, a report); either way an upstream's event must read as unreadable."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    opening = ("[", "{") if isinstance(text, str) else (b"[", b"{")
    if sum(text.count(o) for o in opening) > max_depth and _depth(data) > max_depth:  # type: ignore[arg-type]
        return None
    return data


def _depth(data: Any) -> int:
    """How deep containers nest in ``data`` (iterative: no recursion limit)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# the only line ends of server-sent events: CRLF, CR, LF (str.splitlines also splits at U+2028, NEL, \x1c...,
# which JSON may carry raw inside a string: splitting there cut such an event's text out of what was judged)
_LINE_END = re.compile(rb"\r\n|\r(?!\n)|\n")
_BOM = b"\xef\xbb\xbf"
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


class SSEParser:
    """Splits a byte stream into events (blank-line separated; lines end with LF, CRLF or CR, as the
    server-sent events standard and the openai client read them), bounded in size."""

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._scanned = 0  # the buffer before this holds no event end (searched once, not at every chunk)
        self._at_start = True  # no byte read yet past a possible byte order mark
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        if self._at_start:
            # the standard drops one UTF-8 BOM at the stream's start, and so do browsers and openai-node: left in,
            # the first event had no 'data:' line for the proxy, yet its text showed in those clients
            if len(self._buffer) < len(_BOM) and _BOM.startswith(self._buffer):
                return []
            self._buffer = self._buffer.removeprefix(_BOM)
            self._at_start = False
        events: list[SSEEvent] = []
        while True:
            cut = self._event_end()
            if cut is None:
                break
            raw, self._buffer, self._scanned = self._buffer[:cut], self._buffer[cut:], 0
            events.append(_event(raw))
        if len(self._buffer) > self.max_event_bytes:
            raise ValueError(f"upstream sent a server-sent event over {self.max_event_bytes} bytes")
        return events

    def _event_end(self) -> int | None:
        buf = self._buffer
        found = _BLANK_LINE.search(buf, max(0, self._scanned - 3))
        if found is None or (found.end() == len(buf) and buf.endswith(b"\r")):
            self._scanned = len(buf) if found is None else found.start()  # a CR at the end may begin a CRLF
            return None
        return found.end()

    def close(self) -> list[SSEEvent]:
        rest, self._buffer, self._scanned = self._buffer, b"", 0
        return [_event(rest)] if rest.strip() else []


def _event(raw: bytes) -> SSEEvent:
    data_lines = []
    for line in _LINE_END.split(raw):
        if line.startswith(b"data:"):
            data_lines.append(line[5:].removeprefix(b" ").decode("utf-8", errors="replace"))
    return SSEEvent(raw, "\n".join(data_lines) if data_lines else None)


def json_bytes(payload: Any) -> bytes:
    """JSON the proxy writes itself, escaped to ASCII: a lone surrogate the upstream sent as ``"\\ud800"`` stays
    as it was written (UTF-8 cannot hold it), and U+2028, NEL and the like never reach a client raw, where one
    that splits lines as str.splitlines does would cut an event in two."""
    return json.dumps(payload).encode()


def sse(payload: Any) -> bytes:
    return b"data: " + json_bytes(payload) + b"\n\n"
