"""The one JSONL schema for labeled conversations, and its streaming reader/writer.

Every converter, the multimodal generator, the training formatter and the evaluation harness speak
this schema, so that a labeled item means the same thing everywhere. One line is one item::

    {"id": "xstest:3f2a...", "source": "xstest", "license": "CC-BY-4.0", "split": "test",
     "task": "prompt", "messages": [{"role": "user", "content": [{"type": "text", "text": "..."}]}],
     "label": "safe", "codes": [], "modality": "text", "trainable": false, "meta": {...}}

* ``messages`` is the chat-messages form accepted by
  :meth:`mmguard.conversation.Conversation.from_messages`; image parts are
  ``{"type": "image", "path": "images/<name>.png"}`` with the path relative to the JSONL file's
  folder (converters may hold absolute paths until the build copies the image next to the output).
* ``codes`` are MLCommons codes of :data:`mmguard.policy.DEFAULT_POLICY` (``S1``..``S13``) in policy
  order. An ``unsafe`` item may have empty ``codes`` when the source gives no usable category; then
  ``meta["codes_status"]`` says why (``"unlabeled"`` or ``"ambiguous"``, with the candidate codes in
  ``meta["candidate_codes"]``).
* ``trainable`` is the licence decision: False for non-commercial and test-only material.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..conversation import Conversation
from ..files import atomic_output
from ..jsonl import MAX_LINE_BYTES, dumps_utf8, loads_strict
from ..policy import DEFAULT_POLICY

__all__ = [
    "LABELS",
    "MODALITIES",
    "SPLITS",
    "TASKS",
    "DataError",
    "Example",
    "Label",
    "Modality",
    "Split",
    "Task",
    "conversation_text",
    "normalise_text",
    "read_examples",
    "read_numbered_examples",
    "sort_codes",
    "write_examples",
]

Split = Literal["train", "validation", "test"]
Task = Literal["prompt", "response"]
Label = Literal["safe", "unsafe"]
Modality = Literal["text", "image+text"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
TASKS: tuple[Task, ...] = ("prompt", "response")
LABELS: tuple[Label, ...] = ("safe", "unsafe")
MODALITIES: tuple[Modality, ...] = ("text", "image+text")
FIELDS = (
    "id",
    "source",
    "license",
    "split",
    "task",
    "messages",
    "label",
    "codes",
    "modality",
    "trainable",
    "meta",
)
_ORDER = {code: i for i, code in enumerate(DEFAULT_POLICY.codes)}


class DataError(ValueError):
    """A labeled item or a dataset file is invalid; the message names the file, line and field."""


def sort_codes(codes: Iterable[str]) -> list[str]:
    """Deduplicate MLCommons codes and put them in policy order (S2 before S10), the order targets use."""
    unique = set(codes)
    unknown = sorted(unique - set(_ORDER))
    if unknown:
        raise DataError(
            f"unknown category code(s) {', '.join(unknown)}; expected {', '.join(DEFAULT_POLICY.codes)}"
        )
    return sorted(unique, key=_ORDER.__getitem__)


_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)
_APOSTROPHES = re.compile(r"['’‘`´]")


def normalise_text(text: str) -> str:
    """Text reduced to what identifies content: NFKC, case-folded, apostrophes
    dropped, other punctuation and spacing collapsed.

    Used for split hashing and de-duplication, so that the same request with different case,
    apostrophes or spacing (ToxiGen ships such near copies) lands in the same split and id.
    """
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(_NON_WORD.sub(" ", text).split())


def conversation_text(messages: list[dict[str, Any]], roles: tuple[str, ...] = ("user", "assistant")) -> str:
    """All text parts of the given roles, joined; the image parts are ignored."""
    out: list[str] = []
    for msg in messages:
        if msg.get("role") not in roles:
            continue
        content = msg.get("content")
        if isinstance(content, str):
            out.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                out.append(part.get("text", ""))
    return "\n".join(out)


@dataclass
class Example:
    """One labeled conversation (see the module docstring for the meaning of each field)."""

    id: str
    source: str
    license: str
    split: Split
    task: Task
    messages: list[dict[str, Any]]
    label: Label
    codes: list[str] = field(default_factory=list)
    modality: Modality = "text"
    trainable: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the field values and their consistency (not the images: see :meth:`to_conversation`)."""
        where = f"example {self.id!r}"
        for name in ("id", "source", "license"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise DataError(f"{where}: '{name}' must be a non-empty string")
        if self.split not in SPLITS:
            raise DataError(f"{where}: split must be one of {SPLITS}, got {self.split!r}")
        if self.task not in TASKS:
            raise DataError(f"{where}: task must be one of {TASKS}, got {self.task!r}")
        if self.label not in LABELS:
            raise DataError(f"{where}: label must be one of {LABELS}, got {self.label!r}")
        if self.modality not in MODALITIES:
            raise DataError(f"{where}: modality must be one of {MODALITIES}, got {self.modality!r}")
        if not isinstance(self.trainable, bool):
            raise DataError(f"{where}: trainable must be true or false")
        if not isinstance(self.meta, dict):
            raise DataError(f"{where}: meta must be an object")
        if not isinstance(self.codes, list) or not all(isinstance(c, str) for c in self.codes):
            raise DataError(f"{where}: codes must be a list of strings")
        try:
            ordered = sort_codes(self.codes)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        if ordered != self.codes:
            raise DataError(f"{where}: codes must be unique and in policy order, expected {ordered}")
        if self.label == "safe" and self.codes:
            raise DataError(f"{where}: a safe example cannot list violated codes {self.codes}")
        if not isinstance(self.messages, list) or not self.messages:
            raise DataError(f"{where}: messages must be a non-empty list")
        roles = [m.get("role") if isinstance(m, Mapping) else None for m in self.messages]
        expected_last = "user" if self.task == "prompt" else "assistant"
        if roles[-1] != expected_last:
            raise DataError(
                f"{where}: task {self.task!r} needs the last message from {expected_last!r},"
                f" got {roles[-1]!r}"
            )
        has_image = any(
            isinstance(p, Mapping) and p.get("type") in ("image", "image_url")
            for m in self.messages
            if isinstance(m, Mapping) and isinstance(m.get("content"), list)
            for p in m["content"]
        )
        if has_image != (self.modality == "image+text"):
            raise DataError(
                f"{where}: modality {self.modality!r} does not match the messages"
                f" (image present: {has_image})"
            )

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The JSON object of one JSONL line, keys in schema order."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_line(self) -> str:
        """One JSON line, UTF-8 text where it can be (a lone surrogate, read from a ``\\ud800`` escape, is
        written with ASCII escapes, as it was read: :func:`mmguard.jsonl.dumps_utf8`)."""
        return dumps_utf8(self.to_json())

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Example:
        """Build and validate from a parsed JSONL object; unknown or missing keys are errors."""
        if not isinstance(obj, Mapping):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in FIELDS if k not in obj]
        if missing:
            raise DataError(f"missing field(s) {', '.join(missing)}")
        extra = sorted(set(obj) - set(FIELDS))
        if extra:
            raise DataError(f"unknown field(s) {', '.join(extra)} (put extra information in 'meta')")
        return cls(**{k: obj[k] for k in FIELDS})

    # -- views -------------------------------------------------------------------------------------
    def to_conversation(self, base_dir: Path | str | None = None) -> Conversation:
        """The validated :class:`Conversation`; images resolve against ``base_dir`` (JSONL folder)."""
        return Conversation.from_messages(
            self.messages, base_dir=Path(base_dir) if base_dir is not None else None
        )

    @property
    def text(self) -> str:
        """All conversation text (both roles), for search and hashing."""
        return conversation_text(self.messages)

    @property
    def prompt_text(self) -> str:
        """The user turns' text only: the split key, so a prompt and its responses share a split."""
        return conversation_text(self.messages, roles=("user",))

    def image_paths(self) -> list[str]:
        return [
            str(p["path"])
            for m in self.messages
            if isinstance(m, Mapping) and isinstance(m.get("content"), list)
            for p in m["content"]
            if isinstance(p, Mapping) and p.get("type") == "image" and p.get("path") is not None
        ]


def read_examples(path: Path | str) -> Iterator[Example]:
    """Stream the examples of a JSONL file; a bad line raises :class:`DataError` naming file and line.

    Blank lines are skipped. Image paths stay as written (relative to ``path``'s folder); pass
    ``Path(path).parent`` to :meth:`Example.to_conversation`.
    """
    for _, example in read_numbered_examples(path):
        yield example


def read_numbered_examples(path: Path | str) -> Iterator[tuple[int, Example]]:
    """:func:`read_examples` with each example's line number (1-based), for errors found later that name it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:  # read no further: one line may not hold the whole file's memory
                raise DataError(f"{path}:{lineno}: line over {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = loads_strict(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            except ValueError as err:  # NaN, 1e999, an integer past 4,300 digits, nesting past the parser
                raise DataError(f"{path}:{lineno}: {err}") from None
            try:
                yield lineno, Example.from_json(obj)
            except (DataError, TypeError) as err:
                raise DataError(f"{path}:{lineno}: {err}") from None


def write_examples(path: Path | str, examples: Iterable[Example]) -> int:
    """Write examples as JSONL (UTF-8, one object a line); returns the number written. The file appears whole
    or not at all (written beside it, then renamed): a failure never leaves a short file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_output(path, text=True) as fh:
        for ex in examples:
            fh.write(ex.to_line() + "\n")
            n += 1
    return n
