"""Labeled evaluation data: a streaming, tolerant reader of the mmguard JSONL schema.

One JSON object per line::

    {"id": "x-1", "source": "vlguard", "license": "...", "split": "test", "task": "prompt",
     "messages": [...chat form...], "label": "unsafe", "codes": ["S1"], "modality": "image+text",
     "trainable": true, "meta": {}}

Only ``messages`` and ``label`` are required; ``id`` defaults to ``FILE:LINE``, ``source`` to the
file's stem, ``task`` and ``modality`` are derived from the conversation (and checked against it when
given). Image paths in ``messages`` are relative to the JSONL file's folder.

Every problem raises :class:`DataError` naming the file and the line. Label codes that the policy does
not know are kept (and reported by the evaluation), never dropped.

Items are read one at a time: :func:`iter_records` parses lines without touching images (cheap, used to
validate and count), and :meth:`LabeledItem.conversation` builds the :class:`Conversation` (loading
the image) only when the item is evaluated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from ..conversation import IMAGE_SOURCE_KEYS, Conversation, ConversationError
from ..data.schema import FIELDS as _SCHEMA_FIELDS  # full-schema lines are validated by it
from ..data.schema import DataError as _SchemaDataError
from ..data.schema import Example as _Example
from ..images import ImageError
from ..jsonl import MAX_LINE_BYTES, loads_strict
from ..policy import DEFAULT_POLICY

__all__ = ["DataError", "LabeledItem", "iter_records", "scan"]

Task = Literal["prompt", "response"]
Modality = Literal["text", "image+text"]
_PLACEHOLDER = Image.new("RGB", (1, 1))  # stands in for an item's image when only its shape is checked
_LABELS = {"safe": "safe", "unsafe": "unsafe"}
_MODALITIES = {"text": "text", "image+text": "image+text", "text+image": "image+text", "image": "image+text"}
_CODE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")


class DataError(_SchemaDataError):
    """Bad evaluation data; the message starts with ``FILE:LINE:``."""


@dataclass(frozen=True)
class LabeledItem:
    """One labeled conversation (without its image loaded)."""

    id: str
    source: str
    label: Literal["safe", "unsafe"]
    codes: tuple[str, ...]
    messages: Sequence[Any]
    file: Path
    line: int
    split: str | None = None
    declared_task: Task | None = None
    declared_modality: Modality | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def y(self) -> int:
        return 1 if self.label == "unsafe" else 0

    @property
    def task_hint(self) -> Task:
        """The task without loading the image: the last message's role decides."""
        if self.declared_task is not None:
            return self.declared_task
        role = str(self.messages[-1].get("role", "user")).lower() if self.messages else "user"
        return "prompt" if role in ("user", "human") else "response"

    def conversation(self) -> Conversation:
        """Build (and validate) the conversation; loads the image."""
        try:
            conv = Conversation.from_messages(list(self.messages), base_dir=self.file.parent)
        except (ConversationError, ImageError) as err:
            raise DataError(f"{self.where}: bad conversation: {err}") from None
        return self._as_declared(conv)

    def check_shape(self) -> None:
        """What :meth:`conversation` checks but the images themselves (roles, turns, texts, the declared task and
        modality), cheaply: :func:`scan` runs it on every line, so a bad item stops a run before any model time,
        not deep into it."""
        def placeholder(part: Any) -> Any:  # an image part that names its image (one that does not is refused)
            keys = (*IMAGE_SOURCE_KEYS, "image_url")
            named = isinstance(part, Mapping) and any(part.get(k) is not None for k in keys)
            if named and part.get("type") in ("image", "image_url"):
                return {"type": "image", "image": _PLACEHOLDER}
            return part

        messages = [{**m, "content": [placeholder(p) for p in m["content"]]}
                    if isinstance(m, Mapping) and isinstance(m.get("content"), list) else m for m in self.messages]
        try:
            self._as_declared(Conversation.from_messages(messages))
        except (ConversationError, ImageError) as err:
            raise DataError(f"{self.where}: bad conversation: {err}") from None

    def _as_declared(self, conv: Conversation) -> Conversation:
        if self.declared_task is not None and conv.task != self.declared_task:
            raise DataError(
                f"{self.where}: task is {self.declared_task!r} but the conversation ends with a "
                f"{'user' if conv.task == 'prompt' else 'agent'} turn ({conv.task} classification)"
            )
        modality: Modality = "image+text" if conv.has_image else "text"
        if self.declared_modality is not None and modality != self.declared_modality:
            raise DataError(
                f"{self.where}: modality is {self.declared_modality!r} but the conversation "
                f"{'has' if conv.has_image else 'has no'} image"
            )
        return conv


def _parse(obj: Any, file: Path, line: int) -> LabeledItem:
    where = f"{file}:{line}"
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    messages = obj.get("messages")
    if messages is None and isinstance(obj.get("conversation"), Mapping):
        messages = obj["conversation"].get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    if not all(isinstance(m, Mapping) for m in messages):
        raise DataError(f"{where}: every entry of 'messages' must be an object with 'role' and 'content'")
    raw_label = obj.get("label")
    if isinstance(raw_label, bool):
        raw_label = "unsafe" if raw_label else "safe"
    label = _LABELS.get(str(raw_label).strip().lower()) if raw_label is not None else None
    if label is None:
        raise DataError(f"{where}: 'label' must be 'safe' or 'unsafe', got {raw_label!r}")
    raw_codes = obj.get("codes", [])
    if raw_codes is None:
        raw_codes = []
    if isinstance(raw_codes, str):
        raw_codes = [c for c in re.split(r"[,\s]+", raw_codes) if c]
    if not isinstance(raw_codes, list):
        raise DataError(f"{where}: 'codes' must be a list of category codes such as [\"S1\"]")
    codes: list[str] = []
    for c in raw_codes:
        if not isinstance(c, str) or not _CODE_RE.match(c.strip()):
            raise DataError(f"{where}: invalid category code {c!r} in 'codes'")
        code = c.strip()
        code = code.upper() if re.fullmatch(r"[sS]\d+", code) else code
        if code not in codes:
            codes.append(code)
    if label == "safe" and codes:
        raise DataError(f"{where}: label is 'safe' but codes {codes} are given")
    task = obj.get("task")
    if task is not None and task not in ("prompt", "response"):
        raise DataError(f"{where}: 'task' must be 'prompt' or 'response', got {task!r}")
    modality = obj.get("modality")
    if modality is not None:
        if str(modality) not in _MODALITIES:
            raise DataError(f"{where}: 'modality' must be 'text' or 'image+text', got {modality!r}")
        modality = _MODALITIES[str(modality)]
    if all(k in obj for k in _SCHEMA_FIELDS):
        # a full mmguard.data.schema line: its own checks apply (licence, split, roles, modality ...);
        # codes outside the policy are kept here and reported by the evaluation instead of rejected
        known = [c for c in DEFAULT_POLICY.codes if c in codes]
        try:
            _Example.from_json({**obj, "codes": known})
        except (_SchemaDataError, TypeError) as err:
            raise DataError(f"{where}: {err}") from None
    split = obj.get("split")
    item_id = obj.get("id")
    source = obj.get("source")
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    return LabeledItem(
        id=str(item_id) if item_id not in (None, "") else f"{file.name}:{line}",
        source=str(source) if source not in (None, "") else file.stem,
        label=label,  # type: ignore[arg-type]
        codes=tuple(codes),
        messages=messages,
        file=file,
        line=line,
        split=str(split) if split is not None else None,
        declared_task=task,
        declared_modality=modality,  # type: ignore[arg-type]
        meta=meta,
    )


def iter_records(path: str | Path, *, split: str | None = None) -> Iterator[LabeledItem]:
    """Stream the labeled items of one JSONL file (items without a ``split`` pass any split filter)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: data file not found")
    try:
        handle = file.open("r", encoding="utf-8")
    except OSError as err:
        raise DataError(f"{file}: cannot open: {err}") from None
    with handle:
        lineno = 0
        while True:
            try:
                text = handle.readline(MAX_LINE_BYTES + 1)  # characters here: a bound all the same
            except UnicodeDecodeError as err:
                raise DataError(f"{file}:{lineno + 1}: not UTF-8 text: {err}") from None
            if not text:
                break
            lineno += 1
            if len(text) > MAX_LINE_BYTES:
                raise DataError(f"{file}:{lineno}: line longer than {MAX_LINE_BYTES} characters")
            if not text.strip():
                continue
            try:
                obj = loads_strict(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            except ValueError as err:  # NaN, 1e999, an integer past 4,300 digits, nesting past the parser
                raise DataError(f"{file}:{lineno}: {err}") from None
            item = _parse(obj, file, lineno)
            if split is not None and item.split is not None and item.split != split:
                continue
            yield item


@dataclass
class Scan:
    """What a validation pass over the data found."""

    count: int = 0
    by_file: dict[str, int] = field(default_factory=dict)


def scan(paths: Sequence[str | Path], *, split: str | None = None, limit: int | None = None) -> Scan:
    """Validate every line (its conversation too, without loading images) and count the items a run will
    evaluate. An ``id`` given to two items is an error: they cannot be told apart in the predictions, and a file
    copied under another name, or items repeated in one, counted twice in every figure."""
    out = Scan()
    where_id: dict[str, str] = {}
    for p in paths:
        n = 0
        for item in iter_records(p, split=split):
            if limit is not None and out.count >= limit:
                break
            item.check_shape()
            if item.id != f"{item.file.name}:{item.line}":  # an id of its own (else named by its line)
                first = where_id.setdefault(item.id, f"{item.file}:{item.line}")
                if first != f"{item.file}:{item.line}":
                    raise DataError(f"{item.file}:{item.line}: id {item.id!r} is also the id of the item at {first}; "
                                    "each item needs its own (an item given twice counts twice in every figure)")
            n += 1
            out.count += 1
        out.by_file[str(p)] = n
    return out
