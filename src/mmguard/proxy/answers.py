"""What an answer says, as clients show it: the text of its content (a string or parts), its audio transcript,
its reasoning fields; the texts a stream's delta adds, by field; the choice index a client files them under; and
the judged text built from several such fields (:class:`RunningTexts`). Also the ``mmguard`` field a block
carries."""

from __future__ import annotations

from typing import Any

from ..conversation import MAX_TEXT_CHARS

__all__ = ["REASONING_KEYS", "RunningTexts", "annotation_text", "answer_text", "choice_index", "delta_fields",
           "delta_text", "readable_content", "readable_refusal", "reasoning_text", "said_text", "verdict_extension"]


def answer_text(content: Any, sep: str = "", _depth: int = 0) -> str:
    """The judged text of an answer's (or a delta's) ``content``: a string, or the text of a list of parts
    (``{"type": "text", "text": ...}``, and text nested in parts such as Mistral's ``thinking``), joined by
    ``sep``. Text in parts is as visible to the user as a plain string, so it is never left unjudged."""
    if isinstance(content, str):
        return content
    if _depth > 8:
        return ""
    if isinstance(content, list):
        return sep.join(t for t in (answer_text(p, sep, _depth + 1) for p in content) if t)
    if isinstance(content, dict):
        if content.get("type") == "refusal":  # the model declining: nothing to judge, but for a text it shows
            return content["text"] if isinstance(content.get("text"), str) else ""
        texts = [answer_text(v, sep, _depth + 1) for k, v in content.items() if k != "type"
                 and (k == "text" or isinstance(v, (list, dict)))]
        return sep.join(t for t in texts if t)
    return ""


def readable_content(content: Any) -> bool:
    """``content`` is a shape whose text :func:`answer_text` reads as a client shows it: a string, nothing, or a
    list of strings and parts whose ``text`` is a string. Anything else (an object, a part whose text is an
    object) a client may still print, so it is never passed on unjudged."""
    if content is None or isinstance(content, str):
        return True
    if not isinstance(content, list):
        return False
    return all(isinstance(part, str) or (isinstance(part, dict) and isinstance(part.get("text", ""), str)
                                         and (part.get("type") != "text" or "text" in part))
               for part in content)


def choice_index(value: Any) -> int:
    """A chunk's choice index as a client reads it: clients coerce ``"1"`` or ``1.0`` to 1, so the proxy judges
    that text as choice 1 too; anything unreadable counts as choice 0, so no text escapes judging."""
    if isinstance(value, int):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if number.is_integer() and abs(number) < 2**31 else 0


REASONING_KEYS = ("reasoning_content", "reasoning")  # where vLLM / DeepSeek / OpenRouter put chain of thought


def annotation_text(annotations: Any) -> str:
    """What a client shows of an answer's citations (``annotations``: url and file citations, flat as the
    Responses API sends them or nested as chat's ``{"type": "url_citation", "url_citation": {...}}``): each
    title, URL and file name, a line each. A search-enabled model copies titles from the pages it read: text
    nobody vetted, shown to the user."""
    lines = []
    for note in annotations if isinstance(annotations, list) else []:
        if not isinstance(note, dict):
            continue
        kind = note.get("type")
        inner = note.get(kind) if isinstance(kind, str) and isinstance(note.get(kind), dict) else note
        for key in ("title", "url", "filename"):
            value = inner.get(key)
            if value is not None and value != "":
                lines.append(value if isinstance(value, str) else str(value))  # an object: as Python prints it
    return "\n".join(lines)


def readable_refusal(message: Any) -> bool:
    """A message's (or delta's) ``refusal`` is text or absent: an object a client prints is never passed on
    unjudged."""
    return not isinstance(message, dict) or isinstance(message.get("refusal"), (str, type(None)))


def said_text(message: Any, sep: str = "") -> str:
    """What an answer's ``message`` (or a stream's ``delta``) says to the user: its ``content`` (a string or
    parts), its ``refusal`` (apps show it: the model declining in its own words, which may say anything), the
    ``transcript`` of its ``audio`` (OpenAI's audio answers carry the words there, with ``content`` null; the
    audio itself cannot be judged, its transcript is), and its citations' titles (:func:`annotation_text`)."""
    if not isinstance(message, dict):
        return ""
    audio = message.get("audio")
    spoken = audio.get("transcript") if isinstance(audio, dict) else None
    texts = (answer_text(message.get("content"), sep), message.get("refusal"), spoken,
             annotation_text(message.get("annotations")))
    return sep.join(t for t in texts if isinstance(t, str) and t)


def reasoning_text(message: Any) -> str:
    """The reasoning text of an answer's ``message`` or a stream's ``delta`` (empty if none): every reasoning
    field's, a blank line between (a server may send two, and a client may show either)."""
    if not isinstance(message, dict):
        return ""
    texts = dict.fromkeys(t for k in REASONING_KEYS if (t := answer_text(message.get(k))))
    return "\n\n".join(texts)


def delta_fields(delta: Any, judge_reasoning: bool) -> list[tuple[str, str]]:
    """The texts one stream delta adds, by the field a client accumulates them in: each reasoning field (when
    judged), the content, the refusal, the audio transcript, the citations."""
    if not isinstance(delta, dict):
        return []
    fields = [(k, answer_text(delta.get(k))) for k in REASONING_KEYS] if judge_reasoning else []
    audio = delta.get("audio")
    spoken = audio.get("transcript") if isinstance(audio, dict) else None
    refusal = delta.get("refusal")
    cited = annotation_text(delta.get("annotations"))
    fields += [("content", answer_text(delta.get("content"))),
               ("refusal", refusal if isinstance(refusal, str) else ""),
               ("transcript", spoken if isinstance(spoken, str) else ""),
               ("annotations", cited + "\n" if cited else "")]  # one delta's citations end their line
    return [(field, text) for field, text in fields if text]


class RunningTexts:
    """One answer's judged text, built from texts a client shows apart (a chat choice's content, transcript and
    reasoning; a Responses answer's parts). Text that continues the field that spoke last is appended; text of a
    field that something else interrupted is judged again from that field's start, so a word split around an
    interruption, which the client shows whole, is judged whole too. Past ``MAX_TEXT_CHARS`` text is returned
    but no longer kept: the check of so long an answer reports the limit, and memory stays bounded."""

    def __init__(self) -> None:
        self.fields: dict[Any, str] = {}
        self.last: Any = None  # the field that spoke last (None: a piece, or nothing yet)
        self.text = ""

    def add(self, field: Any, text: str, separator: str = "\n\n") -> str:
        """Appends ``text`` to ``field``; returns what it adds to the judged text (``separator`` before a field
        that did not speak last)."""
        if not text:
            return ""
        if len(self.text) > MAX_TEXT_CHARS:
            return text
        added = text
        if self.text and field != self.last:
            added = separator + self.fields.get(field, "") + text
        self.fields[field] = self.fields.get(field, "") + text
        self.last = field
        self.text += added
        return added

    def add_piece(self, text: str) -> str:
        """A whole text judged as a piece of its own (after a blank line); the next text of any field is judged
        again from that field's start."""
        if not text:
            return ""
        if len(self.text) > MAX_TEXT_CHARS:
            return text
        piece = "\n\n" + text if self.text else text
        self.last = None
        self.text += piece
        return piece


def delta_text(delta: Any, judge_reasoning: bool, after_reasoning: bool) -> tuple[str, bool]:
    """The judged text one stream delta adds to its choice, and whether that text now ends in reasoning: the
    reasoning (when judged), then what the delta says, after a blank line when reasoning came before it."""
    thought = reasoning_text(delta) if judge_reasoning else ""
    said = said_text(delta)
    after = after_reasoning or bool(thought)
    if said and after:
        return f"{thought}\n\n{said}", False
    return thought + said, after


def verdict_extension(rail: str, verdict: Any) -> dict[str, Any]:
    """The documented ``mmguard`` field: which rail blocked and the guard's verdict."""
    return {
        "rail": rail,
        "flagged": bool(verdict.is_unsafe),
        "unsafe_probability": float(verdict.unsafe_probability),
        "threshold": float(verdict.threshold),
        "codes": list(verdict.codes),
        "categories": [{"code": v.code, "name": v.name} for v in verdict.violated],
        "category_probabilities": {k: float(p) for k, p in verdict.category_probabilities.items()},
        "warnings": list(verdict.warnings),
    }
