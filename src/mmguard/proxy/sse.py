"""Server-sent events as the upstream writes them and the proxy writes them back: events split at CRLF, CR or LF
only (as the standard and the openai client read them), bounded in size, their JSON read with a depth limit, and
the JSON the proxy writes itself escaped to ASCII."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "DECODED_PIECE",
    "DONE",
    "MAX_JSON_DEPTH",
    "READABLE_ENCODINGS",
    "SSEEvent",
    "SSEParser",
    "UpstreamEncodingError",
    "json_bytes",
    "loads_or_none",
    "read_decoded",
    "sse",
]

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
        # one pass over the buffer, cut once at the end: slicing the rest off at every event took time events x
        # buffer (a 1 MiB read of ':\n\n' events 5.2 s, the event loop stalled for every client)
        buf, start, events = self._buffer, 0, []
        pos = max(0, self._scanned - 3)  # a CRLF pair may straddle the previous read's end
        while True:
            found = _BLANK_LINE.search(buf, pos)
            if found is None or (found.end() == len(buf) and buf.endswith(b"\r")):
                break
            events.append(_event(buf[start:found.end()]))
            start = pos = found.end()
        self._buffer = buf[start:]
        # the rest holds no event end before this (a CR at the very end may begin a CRLF)
        self._scanned = len(self._buffer) if found is None else found.start() - start
        if len(self._buffer) > self.max_event_bytes:
            raise ValueError(f"upstream sent a server-sent event over {self.max_event_bytes} bytes")
        return events

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


# -- the upstream's bytes ----------------------------------------------------------------------------------
DECODED_PIECE = 64 * 1024  # a compressed answer is inflated this much at a time
READABLE_ENCODINGS = ("", "identity", "gzip", "x-gzip", "deflate")  # content-encodings read_decoded reads


class UpstreamEncodingError(ValueError):
    """An answer in a content-encoding the proxy does not inflate (stacked, or other than gzip and deflate)."""


async def read_decoded(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream's body as it was meant, in pieces of at most :data:`DECODED_PIECE` bytes once inflated.

    The proxy asks for ``identity``; an upstream that compresses anyway (gzip or deflate, one layer) is inflated
    a piece at a time, so every bound downstream (64 MiB for a plain answer, 4 MiB an event) holds before memory
    grows: httpx inflates a whole read at once and stacks decoders, and 5 KB sent as ``gzip, gzip`` took 5.9 GB.
    Other encodings raise :class:`UpstreamEncodingError` before a byte is read."""
    encoding = resp.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        async for raw in resp.aiter_raw():
            yield raw
        return
    if encoding not in READABLE_ENCODINGS:
        raise UpstreamEncodingError(f"content-encoding {encoding[:40]!r} (only one layer of gzip or deflate is read)")
    inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or zlib header, found from the first bytes
    async for raw in resp.aiter_raw():
        pending = raw
        while True:
            try:
                piece = inflate.decompress(pending, DECODED_PIECE)
            except zlib.error as err:
                raise UpstreamEncodingError(f"a {encoding} body that does not inflate ({err})") from None
            pending = inflate.unconsumed_tail
            if piece:
                yield piece
            if not pending and len(piece) < DECODED_PIECE:
                break
