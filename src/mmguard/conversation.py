"""Validated conversations: what a guard judges.

A conversation is a list of turns that alternate ``user`` / ``agent`` starting with the user, with
at most one image in the whole conversation (Llama Guard 3 Vision reads one). The role judged is
the last turn's: a conversation ending with a user turn is *prompt classification*, one ending with
an agent turn is *response classification*.

Each turn holds one or more text parts (the official template prints each text part as its own
``User: ...`` paragraph) and optionally the image.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from .images import DEFAULT_LIMITS, ImageError, ImageLimits, image_digest, load_image

__all__ = [
    "IMAGE_SOURCE_KEYS",
    "Conversation",
    "ConversationError",
    "InvalidTextError",
    "Role",
    "Turn",
    "check_text",
    "count_image_parts",
]

Role = Literal["user", "agent"]
_ROLE_ALIASES = {"user": "user", "human": "user", "agent": "agent", "assistant": "agent", "chatbot": "agent"}
MAX_TURNS = 64
MAX_TEXT_CHARS = 200_000
# a conversation in all: past these a model's context is long exhausted (Llama Guard 3 Vision reads 128k tokens,
# ~500,000 characters), while tokenizing it would still cost time and memory (25 MB of text: 61 s and 5.4 GB)
MAX_CONVERSATION_CHARS = 1_000_000
MAX_TEXT_PARTS = 1_024
IMAGE_SOURCE_KEYS = ("path", "url", "image", "base64", "data")  # where an "image" part names its image, in order


def count_image_parts(messages: Any) -> int:
    """The image parts (``image``, ``image_url``) of chat messages, counted before anything is read."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return 0
    return sum(isinstance(part, Mapping) and part.get("type") in ("image", "image_url")
               for msg in messages if isinstance(msg, Mapping) and isinstance(msg.get("content"), Sequence)
               and not isinstance(msg["content"], (str, bytes, bytearray))
               for part in msg["content"])


class ConversationError(ValueError):
    """A conversation breaks a rule; the message names the rule."""


class InvalidTextError(ConversationError):
    """A text field is not valid Unicode (it holds a lone surrogate); the message names field and position."""


# Python strings may hold surrogate code points that no UTF-8 text can: JSON's "\ud800" escape, or bytes
# that did not decode under surrogateescape (argv, filenames). Tokenizers and UTF-8 encoders fail on them.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_text(value: str, where: str, error: type[ValueError] = InvalidTextError) -> str:
    """The one input rule for text: it must be valid Unicode. Returns ``value`` or raises ``error``.

    A lone surrogate is rejected (never replaced): ``where`` and the 1-based character position are named,
    e.g. ``message 1 part 1: text holds a lone surrogate (U+D800) at character 5; text must be valid Unicode``.
    """
    if not isinstance(value, str):
        raise error(f"{where}: text must be a string, got {type(value).__name__}")
    m = _SURROGATE_RE.search(value)
    if m is None:
        return value
    point = ord(m.group())
    hint = ""
    if 0xDC80 <= point <= 0xDCFF:  # what surrogateescape makes of an undecodable byte
        hint = f" (the undecodable byte 0x{point - 0xDC00:02X}: the input is not UTF-8)"
    raise error(
        f"{where}: text holds a lone surrogate (U+{point:04X}) at character {m.start() + 1}{hint}; "
        "text must be valid Unicode"
    )


@dataclass(frozen=True)
class Turn:
    role: Role
    texts: tuple[str, ...]
    image: Image.Image | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        return "\n\n".join(self.texts)


@dataclass(frozen=True)
class Conversation:
    """An immutable, validated conversation. Build with :meth:`prompt`, :meth:`response`, :meth:`from_turns`
    or :meth:`from_messages`."""

    turns: tuple[Turn, ...]

    def __post_init__(self) -> None:
        if isinstance(self.turns, list):  # hashable and immutable, as the type says
            object.__setattr__(self, "turns", tuple(self.turns))
        _validate(self.turns)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def prompt(cls, text: str, image: Any = None, *, limits: ImageLimits = DEFAULT_LIMITS) -> Conversation:
        """One user turn: prompt classification."""
        check_text(text, "prompt")
        return cls((Turn("user", (text,), _load(image, limits, "user turn 1")),))

    @classmethod
    def response(
        cls, prompt: str, response: str, image: Any = None, *, limits: ImageLimits = DEFAULT_LIMITS
    ) -> Conversation:
        """A user turn and the agent's reply: response classification. The image belongs to the user turn."""
        check_text(prompt, "prompt")
        check_text(response, "response")
        return cls(
            (
                Turn("user", (prompt,), _load(image, limits, "user turn 1")),
                Turn("agent", (response,)),
            )
        )

    @classmethod
    def from_turns(
        cls, turns: Sequence[tuple[str, str] | Mapping[str, Any]], image: Any = None, *, image_turn: int = 0,
        limits: ImageLimits = DEFAULT_LIMITS,
    ) -> Conversation:
        """``[("user", "hi"), ("agent", "hello")]``; the optional image is attached to turn ``image_turn``."""
        built: list[Turn] = []
        for i, t in enumerate(turns):
            if isinstance(t, Mapping):
                role, text = t.get("role"), t.get("text", t.get("content"))
            else:
                role, text = t
            if not isinstance(text, str):
                raise ConversationError(f"turn {i + 1}: text must be a string")
            check_text(text, f"turn {i + 1}")
            img = _load(image, limits, f"turn {i + 1}") if (image is not None and i == image_turn) else None
            built.append(Turn(_role(role, i), (text,), img))
        if image is not None and not 0 <= image_turn < len(built):
            raise ConversationError(f"image_turn {image_turn} is outside the conversation's {len(built)} turns")
        return cls(tuple(built))

    @classmethod
    def from_messages(
        cls, messages: Sequence[Mapping[str, Any]] | Mapping[str, Any], *, base_dir: Path | None = None,
        limits: ImageLimits = DEFAULT_LIMITS, allow_paths: bool = True,
    ) -> Conversation:
        """The chat-messages form used by transformers and OpenAI.

        ``{"messages": [{"role": "user", "content": [{"type": "text", "text": "..."},
        {"type": "image", "path": "cat.png"}]}]}``. Image parts may be ``{"type": "image", "path"|"url"|
        "image"|"base64": ...}`` or OpenAI's ``{"type": "image_url", "image_url": {"url": "data:..."}}``.
        A plain string ``content`` is taken as one text part. ``allow_paths=False`` refuses image parts that
        name local files (use it for untrusted input, e.g. in a server).
        """
        if isinstance(messages, Mapping):
            if "messages" not in messages:
                raise ConversationError("expected an object with a 'messages' list")
            messages = messages["messages"]
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise ConversationError("'messages' must be a list of {role, content} objects")
        images = count_image_parts(messages)
        if images > 1:  # before any is decoded: one image a message in 64 turns decoded 64 images (about 1 GB)
            raise ConversationError(f"{images} images given; Llama Guard 3 Vision reads at most one image per "
                                    "conversation")
        turns: list[Turn] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise ConversationError(f"message {i + 1} must be an object with 'role' and 'content'")
            role = _role(msg.get("role"), i)
            content = msg.get("content")
            texts: list[str] = []
            image: Image.Image | None = None
            if isinstance(content, str):
                texts.append(check_text(content, f"message {i + 1}"))
            elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
                for j, part in enumerate(content):
                    where = f"message {i + 1} part {j + 1}"
                    if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                        raise ConversationError(f"{where}: each content part must be an object with a 'type'")
                    kind = part["type"]
                    if kind == "text":
                        if not isinstance(part.get("text"), str):
                            raise ConversationError(f"{where}: text part needs a string 'text'")
                        texts.append(check_text(part["text"], where))
                    elif kind in ("image", "image_url"):
                        if image is not None:
                            raise ConversationError(
                                f"{where}: more than one image; Llama Guard 3 Vision reads at most one image"
                            )
                        src = _image_source(part, where, base_dir if allow_paths else None)
                        image = _load(src, limits, where, allow_paths)
                    else:
                        raise ConversationError(f"{where}: unsupported content type {kind!r} (use 'text' or 'image')")
            else:
                raise ConversationError(f"message {i + 1}: 'content' must be a string or a list of parts")
            turns.append(Turn(role, tuple(texts), image))
        return cls(tuple(turns))

    # -- views ----------------------------------------------------------------------------------
    @property
    def judged_role(self) -> Role:
        """The role whose last message is classified."""
        return self.turns[-1].role

    @property
    def task(self) -> Literal["prompt", "response"]:
        return "prompt" if self.judged_role == "user" else "response"

    @property
    def image(self) -> Image.Image | None:
        for t in self.turns:
            if t.image is not None:
                return t.image
        return None

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def without_last_turn(self) -> Conversation:
        if len(self.turns) < 2:
            raise ConversationError("a one-turn conversation has no earlier turn to judge")
        return Conversation(self.turns[:-1])

    def content_hash(self) -> str:
        """Stable hash of texts, roles and image pixels (a cache key)."""
        h = hashlib.sha256()
        for t in self.turns:
            h.update(json.dumps([t.role, list(t.texts)], ensure_ascii=False).encode())
            if t.image is not None:
                h.update(image_digest(t.image).encode())
        return h.hexdigest()

    def to_messages(self) -> list[dict[str, Any]]:
        """Chat-messages form with ``{"type": "image"}`` placeholders (what the official template reads)."""
        out: list[dict[str, Any]] = []
        for t in self.turns:
            parts: list[dict[str, Any]] = [{"type": "text", "text": s} for s in t.texts]
            if t.image is not None:
                parts.insert(0, {"type": "image"})
            out.append({"role": "user" if t.role == "user" else "assistant", "content": parts})
        return out


def _role(value: Any, index: int) -> Role:
    if not isinstance(value, str) or value.lower() not in _ROLE_ALIASES:
        raise ConversationError(
            f"turn {index + 1}: role {value!r} is not supported; use 'user' or 'assistant'/'agent' "
            "(system and tool messages are not part of the Llama Guard format)"
        )
    return _ROLE_ALIASES[value.lower()]  # type: ignore[return-value]


def _image_source(part: Mapping[str, Any], where: str, base_dir: Path | None) -> Any:
    if part["type"] == "image_url":
        ref = part.get("image_url")
        src = ref.get("url") if isinstance(ref, Mapping) else ref
    else:
        src = next((part[k] for k in IMAGE_SOURCE_KEYS if part.get(k) is not None), None)
    if src is None:
        raise ConversationError(f"{where}: image part needs one of 'path', 'url', 'image' or 'base64'")
    if isinstance(src, str) and base_dir is not None and not src.startswith("data:") and len(src) < 4096:
        candidate = base_dir / src
        try:
            if candidate.exists():
                return candidate
        except (OSError, ValueError):  # a name the OS refuses (too long, NUL): not a file, so read as data
            pass
    return src


def _load(source: Any, limits: ImageLimits, where: str, allow_paths: bool = True) -> Image.Image | None:
    if source is None:
        return None
    try:
        return load_image(source, limits, allow_paths=allow_paths)
    except ImageError as err:
        raise ImageError(f"{where}: {err}") from None


def _validate(turns: Iterable[Turn]) -> None:
    turns = tuple(turns)
    if not turns:
        raise ConversationError("a conversation needs at least one turn")
    for i, t in enumerate(turns):  # the shapes first: a Turn built by hand is not checked by its constructor
        if not isinstance(t, Turn):
            raise ConversationError(f"turn {i + 1} must be a Turn, got {type(t).__name__}")
        if not isinstance(t.texts, tuple):  # a str would be judged one character a message
            raise ConversationError(f"turn {i + 1}: texts must be a tuple of strings, got {type(t.texts).__name__}")
        if t.image is not None:
            if not isinstance(t.image, Image.Image):
                raise ConversationError(f"turn {i + 1}: image must be a PIL image, got {type(t.image).__name__}")
            if min(t.image.size) <= 0:
                raise ConversationError(f"turn {i + 1}: image has zero size {t.image.size}")
    if len(turns) > MAX_TURNS:
        raise ConversationError(f"a conversation may have at most {MAX_TURNS} turns, got {len(turns)}")
    parts = sum(len(t.texts) for t in turns)
    if parts > MAX_TEXT_PARTS:
        raise ConversationError(f"a conversation may hold at most {MAX_TEXT_PARTS} texts, got {parts}")
    chars = sum(len(s) for t in turns for s in t.texts if isinstance(s, str))
    if chars > MAX_CONVERSATION_CHARS:
        raise ConversationError(
            f"a conversation may hold at most {MAX_CONVERSATION_CHARS} characters of text, got {chars}")
    images = 0
    for i, t in enumerate(turns):
        expected = "user" if i % 2 == 0 else "agent"
        if t.role != expected:
            raise ConversationError(
                f"turn {i + 1} is {t.role!r} but must be {expected!r}: turns alternate user/agent starting with user"
            )
        if not t.texts and (t.image is None or t.role != "user"):
            raise ConversationError(f"turn {i + 1} has no text (only a user turn may hold just an image)")
        for j, s in enumerate(t.texts):
            if not isinstance(s, str):
                raise ConversationError(f"turn {i + 1}: text must be a string, got {type(s).__name__}")
            check_text(s, f"turn {i + 1}" if len(t.texts) == 1 else f"turn {i + 1} part {j + 1}")
            if len(s) > MAX_TEXT_CHARS:
                raise ConversationError(
                    f"turn {i + 1}: text has {len(s)} characters, over the limit of {MAX_TEXT_CHARS}"
                )
        if t.image is not None:
            images += 1
            if t.role != "user":
                raise ConversationError(f"turn {i + 1}: only user turns may carry the image")
    if images > 1:
        raise ConversationError(f"{images} images given; Llama Guard 3 Vision reads at most one image per conversation")
