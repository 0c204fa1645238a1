"""Judging one chunk: read its lines, build conversations (images resolved relative to the input file,
under the server's limits and allow-list), classify them in one call, and commit the part file."""

from __future__ import annotations

import asyncio
import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ..conversation import IMAGE_SOURCE_KEYS, Conversation, ConversationError, count_image_parts
from ..images import ImageError, ImageLimits, load_image
from ..jsonl import VERDICT_KEY, JsonlLine, dumps_row, loads_strict, parse_line
from ..policy import PolicyError
from ..server.errors import APIError
from ..server.image_sources import ImageFetcher, resolve_image
from ..server.settings import ServerSettings
from .plan import Chunk
from .storage import StorageError, iter_lines, join, open_storage, parent

__all__ = ["ChunkJudge", "ChunkResult"]



@dataclass
class ChunkResult:
    part: str
    rows: int = 0
    errors: int = 0
    unsafe: int = 0
    attempts: int = 0
    seconds: float = 0.0
    failure: str = ""  # non-empty: the chunk was not committed

    def stats(self) -> dict[str, int]:
        return {"rows": self.rows, "errors": self.errors, "unsafe": self.unsafe}


class ChunkJudge:
    """Holds one guard; ``run(input_uri, chunk, output)`` judges and commits one chunk."""

    def __init__(self, guard: Any, image_settings: ServerSettings, max_line_bytes: int) -> None:
        self.guard = guard
        self.settings = image_settings
        self.limits = ImageLimits(max_bytes=image_settings.max_image_bytes,
                                  max_pixels=image_settings.max_image_pixels)  # as the server's
        self.fetcher = ImageFetcher(image_settings)
        self.max_line_bytes = max_line_bytes

    # -- images --------------------------------------------------------------------------------------
    def _image_bytes(self, src: Any, where: str, base: str) -> bytes:
        """An image part's source -> encoded bytes: data URLs, base64 and allow-listed http(s) URLs by the
        server's own rules; anything else is a path relative to the input file's folder, never outside it."""
        if isinstance(src, str):
            text = src.strip()
            lowered = text[:8].lower()
            looks_like_path = (
                text and "://" not in text[:16] and not lowered.startswith("data:") and len(text) < 1024
                and "\n" not in text
            )
            if looks_like_path:
                rel = PurePosixPath(text.replace("\\", "/"))
                if rel.is_absolute() or ".." in rel.parts or (len(text) > 1 and text[1] == ":"):
                    raise ImageError(f"{where}: image path {text[:200]!r} must be relative to the input file's "
                                     "folder and stay inside it")
                storage, path = open_storage(join(base, posixpath.normpath(str(rel))))
                if storage.exists(path):
                    try:
                        return storage.read_bytes(path, self.limits.max_bytes)
                    except StorageError as err:
                        raise ImageError(f"{where}: {err}") from None
                    except OSError as err:
                        raise ImageError(f"{where}: cannot read image {text[:200]!r}: {err}") from None
                if len(text) < 64:  # too short for base64: a path not found, in the words of classify --jsonl
                    try:
                        load_image(text, self.limits, allow_paths=False)
                    except ImageError as err:
                        raise ImageError(f"{where}: {err}") from None
        try:
            return asyncio.run(resolve_image(src, where, self.limits, self.fetcher))
        except APIError as err:
            raise ImageError(f"{where}: {err.message}") from None

    def _with_image_bytes(self, messages: Any, base: str) -> Any:
        """A copy of well-formed messages whose image parts hold bytes; malformed ones are returned as they
        are, for Conversation.from_messages to name the problem."""
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            return messages
        images = count_image_parts(messages)
        if images > 1:  # refused before any is read: 400 references to one 15 MB file took 6.4 GB
            raise ConversationError(f"{images} images given; Llama Guard 3 Vision reads at most one image per "
                                    "conversation")
        out = []
        for i, msg in enumerate(messages):
            content = msg.get("content") if isinstance(msg, Mapping) else None
            if not isinstance(content, list):
                out.append(msg)
                continue
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind not in ("image", "image_url"):
                    parts.append(part)
                    continue
                if kind == "image_url":
                    ref = part.get("image_url")
                    src = ref.get("url") if isinstance(ref, Mapping) else ref
                else:
                    src = next((part[k] for k in IMAGE_SOURCE_KEYS if part.get(k) is not None), None)
                if src is None:  # from_messages names what is missing
                    parts.append(part)
                    continue
                parts.append({"type": "image", "image": self._image_bytes(src, f"message {i + 1} part {j + 1}", base)})
            out.append({**msg, "content": parts})
        return out

    def conversation(self, obj: Mapping[str, Any], base: str) -> Conversation:
        if "messages" not in obj:
            raise ConversationError("expected an object with a 'messages' list")
        messages = self._with_image_bytes(obj["messages"], base)
        return Conversation.from_messages(messages, limits=self.limits, allow_paths=False)

    # -- one chunk -----------------------------------------------------------------------------------
    def parse_line(self, raw: bytes | None, line: int, base: str) -> JsonlLine:
        """One line as classify --jsonl parses it, with images resolved by this job's rules."""
        obj: Any = None
        if raw is not None:
            try:
                obj = loads_strict(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                obj = None
        if not isinstance(obj, dict) or VERDICT_KEY in obj or "messages" not in obj:
            # the shared parser names what is wrong, in the words classify --jsonl uses
            return parse_line(raw, line, limits=self.limits, allow_paths=False, max_bytes=self.max_line_bytes)
        try:
            return JsonlLine(line, obj, conversation=self.conversation(obj, base))
        except (ConversationError, ImageError) as err:
            return JsonlLine(line, obj, error=str(err))

    def _parse(self, input_uri: str, chunk: Chunk) -> list[JsonlLine]:
        storage, path = open_storage(input_uri)
        base = parent(input_uri)
        entries: list[JsonlLine] = []
        with storage.read_range(path, chunk.start, chunk.end) as fh:
            for offset, (s, _e, raw) in enumerate(iter_lines(fh, self.max_line_bytes, start=chunk.start)):
                if s >= chunk.end or len(entries) == chunk.lines:
                    break
                if raw is not None and not raw.strip():
                    continue  # blank lines are skipped, and still counted in line numbers
                entries.append(self.parse_line(raw, chunk.first_line + offset, base))
        if len(entries) != chunk.lines:
            raise StorageError(f"{input_uri} changed since the job was planned: chunk {chunk.part} expected "
                               f"{chunk.lines} lines from byte {chunk.start}, found {len(entries)}")
        return entries

    def _classify(self, convs: list[Conversation]) -> list[Any]:
        """Verdicts in order; a conversation the guard refuses (ValueError) gets its message instead, found
        by judging that chunk one conversation at a time (as classify --jsonl does)."""
        if not convs:
            return []
        try:
            return list(self.guard.classify_batch(convs))
        except ValueError:
            pass
        out: list[Any] = []
        for conv in convs:
            try:
                out.append(self.guard.classify(conv))
            except ValueError as err:
                out.append(str(err) or type(err).__name__)
        return out

    def judge(self, input_uri: str, chunk: Chunk) -> tuple[bytes, ChunkResult]:
        entries = self._parse(input_uri, chunk)
        good = [x for x in entries if x.conversation is not None]
        for x, verdict in zip(good, self._classify([x.conversation for x in good]), strict=True):  # type: ignore[misc]
            if isinstance(verdict, str):
                x.error = verdict
            else:
                x.verdict = verdict
        result = ChunkResult(chunk.part, rows=len(entries))
        for x in entries:
            if x.error is not None:
                result.errors += 1
            else:
                result.unsafe += bool(x.verdict.is_unsafe)
        return ("".join(dumps_row(x.row()) + "\n" for x in entries)).encode(), result

    def run(self, input_uri: str, chunk: Chunk, output: str, retries: int = 2) -> ChunkResult:
        """Judge and commit one chunk, retrying failures (not input errors: those are rows) ``retries``
        times. A chunk that still fails is not committed: ``failure`` says why, ``--resume`` retries it."""
        start = time.perf_counter()
        last = ""
        for attempt in range(1, retries + 2):
            try:
                data, result = self.judge(input_uri, chunk)
                storage, path = open_storage(join(output, chunk.part))
                storage.write_atomic(path, data)
                result.attempts = attempt
                result.seconds = time.perf_counter() - start
                return result
            except (StorageError, PolicyError) as err:
                last = str(err)
                break  # retrying cannot help
            except Exception as err:  # a model or I/O failure: retry the whole chunk
                last = f"{type(err).__name__}: {err}"
        return ChunkResult(chunk.part, attempts=attempt, seconds=time.perf_counter() - start, failure=last)
