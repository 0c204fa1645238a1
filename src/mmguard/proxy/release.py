"""Streamed answers: which upstream events may be sent to the client, and when a check is due.

Pure logic (no I/O), driven by the proxy: :meth:`StreamRelease.feed` takes each server-sent event of the
upstream's stream as it arrives; :meth:`due_checks` says which answer prefixes to judge;
:meth:`passed` / :meth:`blocked` record the verdicts; :meth:`releasable` hands out, in upstream order and
byte for byte, the events the client may see now.

Each choice of the answer (``n`` > 1 gives several) is judged on its own. An event that carries answer
text is held until a passed check covers all text up to it (``checked`` release); with ``eager`` release it
is sent at once unless it would run more than one window (``check_every`` tokens) ahead of the last passed
check, so up to one window of text may reach the client before a block. In both
modes an event that finishes a choice (``finish_reason``) waits for the final check of that choice's whole
answer, so a blocked answer never ends with ``stop``. A blocked choice's held events are dropped and it ends
with a synthesized chunk whose ``finish_reason`` is ``content_filter`` and whose ``mmguard`` field holds the
verdict.

Reading is bounded: once a choice's unchecked text passes ``max_ahead_chars`` or the held events pass
``max_held_bytes``, :attr:`StreamRelease.reading_paused` tells the proxy to stop reading the upstream (TCP
backpressure does the rest) and every choice with unchecked text gets a check at once, so an upstream that
streams faster than the guard judges costs bounded memory, never the whole flood.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .settings import Release

__all__ = [
    "MAX_HELD_BYTES",
    "ChatChunks",
    "EventFormat",
    "RunningTexts",
    "SSEEvent",
    "SSEParser",
    "StreamRelease",
    "answer_text",
    "choice_index",
    "delta_fields",
    "delta_text",
    "due_check",
    "json_bytes",
    "loads_or_none",
    "max_ahead_chars",
    "readable_choices",
    "readable_content",
    "reasoning_text",
    "said_text",
]

DONE = "[DONE]"
MAX_HELD_BYTES = 16 * 1024 * 1024  # held events (raw bytes) past which reading pauses


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


def said_text(message: Any, sep: str = "") -> str:
    """What an answer's ``message`` (or a stream's ``delta``) says to the user: its ``content`` (a string or
    parts) and the ``transcript`` of its ``audio`` (OpenAI's audio answers carry the words there, with
    ``content`` null; the audio itself cannot be judged, its transcript is)."""
    if not isinstance(message, dict):
        return ""
    audio = message.get("audio")
    spoken = audio.get("transcript") if isinstance(audio, dict) else None
    return sep.join(t for t in (answer_text(message.get("content"), sep), spoken) if isinstance(t, str) and t)


def reasoning_text(message: Any) -> str:
    """The reasoning text of an answer's ``message`` or a stream's ``delta`` (empty if none): every reasoning
    field's, a blank line between (a server may send two, and a client may show either)."""
    if not isinstance(message, dict):
        return ""
    texts = dict.fromkeys(t for k in REASONING_KEYS if (t := answer_text(message.get(k))))
    return "\n\n".join(texts)


def delta_fields(delta: Any, judge_reasoning: bool) -> list[tuple[str, str]]:
    """The texts one stream delta adds, by the field a client accumulates them in: each reasoning field (when
    judged), the content, the audio transcript."""
    if not isinstance(delta, dict):
        return []
    fields = [(k, answer_text(delta.get(k))) for k in REASONING_KEYS] if judge_reasoning else []
    audio = delta.get("audio")
    spoken = audio.get("transcript") if isinstance(audio, dict) else None
    fields += [("content", answer_text(delta.get("content"))),
               ("transcript", spoken if isinstance(spoken, str) else "")]
    return [(field, text) for field, text in fields if text]


class RunningTexts:
    """One answer's judged text, built from texts a client shows apart (a chat choice's content, transcript and
    reasoning; a Responses answer's parts). Text that continues the field that spoke last is appended; text of a
    field that something else interrupted is judged again from that field's start, so a word split around an
    interruption, which the client shows whole, is judged whole too."""

    def __init__(self) -> None:
        self.fields: dict[Any, str] = {}
        self.last: Any = None
        self.text = ""

    def add(self, field: Any, text: str, separator: str = "\n\n") -> str:
        """Appends ``text`` to ``field``; returns what it adds to the judged text (``separator`` before a field
        that did not speak last)."""
        if not text:
            return ""
        added = text
        if self.text and field != self.last:
            added = separator + self.fields.get(field, "") + text
        self.fields[field] = self.fields.get(field, "") + text
        self.last = field
        self.text += added
        return added


def delta_text(delta: Any, judge_reasoning: bool, after_reasoning: bool) -> tuple[str, bool]:
    """The judged text one stream delta adds to its choice, and whether that text now ends in reasoning: the
    reasoning (when judged), then what the delta says, after a blank line when reasoning came before it."""
    thought = reasoning_text(delta) if judge_reasoning else ""
    said = said_text(delta)
    after = after_reasoning or bool(thought)
    if said and after:
        return f"{thought}\n\n{said}", False
    return thought + said, after


def max_ahead_chars(check_every: int) -> int:
    """Unchecked answer text (characters) a choice may run ahead of its last passed check before reading
    pauses: 16 KiB, or 8 characters per token of ``check_every`` when that is more (tokens average ~4)."""
    return max(16_384, 8 * check_every)


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


class EventFormat(Protocol):
    """How one API's streamed events carry answer text: what :class:`StreamRelease` reads from them, and the
    events it writes itself (a blocked choice's end, an error). Chat completions (:class:`ChatChunks`) is the
    default; the Responses API's is :class:`mmguard.proxy.responses.ResponseEvents`."""

    ends_with_done: bool  # the stream ends with 'data: [DONE]'

    @property
    def answer_id(self) -> Any:
        """The upstream's id of the answer being streamed (None before it was seen)."""

    def read(self, event: SSEEvent) -> list[tuple[int, str, bool]] | None:
        """Per choice the event speaks of: (choice index, judged text it adds, whether it ends that choice).
        ``[]``: it carries no answer text (sent at once); None: it cannot be read, so it is dropped (what it
        says cannot be judged)."""

    def closing_event(self, index: int, verdict: Any) -> bytes:
        """The event that ends a blocked choice, with the verdict."""

    def without_blocked(self, event: SSEEvent, blocked: set[int]) -> bytes | None:
        """``event`` without what it says for the ``blocked`` choices; None: drop it."""

    def error_event(self, body: dict[str, Any]) -> bytes:
        """An error the client's SDK reports (``body`` is an OpenAI error body)."""


class ChatChunks:
    """Chat completions' ``chat.completion.chunk`` events: ``choices[].delta`` text, ``finish_reason``."""

    ends_with_done = True

    def __init__(self, judge_reasoning: bool = False, choices: int | None = None) -> None:
        self.judge_reasoning = judge_reasoning
        self.n = choices  # the choices the request asked for (None: any index from 0 is read as its own)
        self.meta: dict[str, Any] = {}  # id, created, model of the upstream's chunks (for synthesized chunks)
        self._texts: dict[int, RunningTexts] = {}

    @property
    def answer_id(self) -> Any:
        return self.meta.get("id")

    def read(self, event: SSEEvent) -> list[tuple[int, str, bool]] | None:
        chunk = event.json()
        if not isinstance(chunk, dict):
            return None
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in self.meta:
                self.meta[key] = chunk[key]
        choices = chunk.get("choices")
        if choices is None:
            return []
        if not readable_choices(choices):
            return None  # a JS client reads choices[0] of {"0": ...} too: what the proxy cannot read, it drops
        readings = []
        for ch in choices:
            idx = choice_index(ch.get("index", 0))
            if self.n == 1:
                idx = 0  # one choice asked for: a client shows choices[0] of every chunk, whatever its index says
            elif idx < 0 or (self.n is not None and idx >= self.n):
                return None  # a choice nobody asked for: clients differ in where they show it (choices[-1]...)
            if isinstance(ch.get("delta"), dict) and not readable_content(ch["delta"].get("content")):
                return None
            texts = self._texts.setdefault(idx, RunningTexts())
            fields = delta_fields(ch.get("delta"), self.judge_reasoning)
            added = "".join(texts.add(field, text) for field, text in fields)
            readings.append((idx, added, ch.get("finish_reason") is not None))
        return readings

    def closing_event(self, index: int, verdict: Any) -> bytes:
        return sse({
            "id": self.meta.get("id", "chatcmpl-mmguard"),
            "object": "chat.completion.chunk",
            "created": self.meta.get("created", int(time.time())),
            "model": self.meta.get("model", ""),
            "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter",
                         "mmguard": verdict_extension("output", verdict)}],
        })

    def without_blocked(self, event: SSEEvent, blocked: set[int]) -> bytes | None:
        chunk = event.json()
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return None  # cannot be read: it may carry a blocked choice's text
        chunk["choices"] = [c for c in chunk["choices"] if isinstance(c, dict)
                            and choice_index(c.get("index", 0)) not in blocked]
        return sse(chunk)

    def error_event(self, body: dict[str, Any]) -> bytes:
        return sse(body)  # the openai client raises on a chunk with an 'error' field


# where a choice could carry text that a chat chunk's reader does not look for: legacy completions' text, a
# whole message
_UNREAD_CHOICE_KEYS = ("text", "message")


def readable_choices(choices: Any) -> bool:
    """``choices`` is what chat chunks hold: a list of objects, none with text where a delta's reader does not
    look (``text``, ``message``). Anything else is dropped: some client may show what the proxy did not judge."""
    return isinstance(choices, list) and all(
        isinstance(ch, dict) and all(ch.get(key) is None for key in _UNREAD_CHOICE_KEYS) for ch in choices)


@dataclass
class ChoiceState:
    """One choice of a streamed answer."""

    index: int
    text: str = ""
    checked_chars: int = 0  # text[:checked_chars] passed a check
    fresh_tokens: tuple[int, int, int] = (0, 0, 0)  # (checked_chars, len(text), tokens of the text between)
    final_passed: bool = False  # the whole, finished answer passed
    finished: bool = False  # finish_reason seen (or the stream ended)
    in_flight: bool = False
    blocked: Any = None  # the verdict that blocked it
    checks: int = 0


@dataclass
class _Held:
    event: SSEEvent
    needs: dict[int, tuple[int, bool]]  # choice -> (chars that must be checked, must the final check have passed)
    arrived: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class DueCheck:
    choice: int
    text: str
    final: bool


def due_check(state: ChoiceState, tokens_since_check: int, check_every: int) -> bool:
    """A window is full, or the answer is finished and its whole text has not passed yet."""
    if state.blocked is not None or state.in_flight:
        return False
    if state.finished:
        return not state.final_passed
    return tokens_since_check >= check_every


class StreamRelease:
    """The hold-back buffer of one streamed answer (see the module doc)."""

    def __init__(self, *, check_every: int, release: Release, count_tokens: Callable[[str], int],
                 max_ahead: int | None = None, max_held_bytes: int = MAX_HELD_BYTES,
                 judge_reasoning: bool = False, events: EventFormat | None = None) -> None:
        self.check_every = check_every
        self.events = events if events is not None else ChatChunks(judge_reasoning)
        self.max_ahead = max_ahead if max_ahead is not None else max_ahead_chars(check_every)
        self.max_held_bytes = max_held_bytes
        self._held_bytes = 0
        self.release = release
        self.count_tokens = count_tokens
        self.choices: dict[int, ChoiceState] = {}
        self._held: deque[_Held] = deque()
        self.upstream_done = False
        self.saw_done = False  # the upstream ended with 'data: [DONE]' (not every server sends it)
        self.unreadable = 0  # events with data that is not a JSON object: dropped
        self.hold_seconds: list[float] = []  # per released text event: time held back
        self._pending_blocks: list[ChoiceState] = []

    def choice(self, index: int) -> ChoiceState:
        if index not in self.choices:
            self.choices[index] = ChoiceState(index)
        return self.choices[index]

    # -- upstream side ---------------------------------------------------------------------------
    def feed(self, event: SSEEvent) -> None:
        if event.is_done and self.events.ends_with_done:
            self.saw_done = True
            self.finish()
            return
        readings = self.events.read(event)
        needs: dict[int, tuple[int, bool]] = {}
        if readings is None:
            if event.data is not None:  # data the proxy cannot read cannot be judged: never passed on
                self.unreadable += 1
                return
        else:
            for idx, added, finishes in readings:
                st = self.choice(idx)
                if added:
                    st.text += added
                    st.final_passed = False  # text after the choice's end (an odd upstream): judged again
                st.finished = st.finished or finishes
                needs[idx] = (len(st.text), finishes)
        self._held.append(_Held(event, needs))
        self._held_bytes += len(event.raw)

    def finish(self) -> None:
        """The upstream ended (``[DONE]`` or the connection closed): every choice is complete."""
        self.upstream_done = True
        for st in self.choices.values():
            st.finished = True

    # -- checks ----------------------------------------------------------------------------------
    def _fresh_tokens(self, st: ChoiceState) -> int:
        """Tokens of the text after the last passed check, counted once per state of the choice (the proxy asks
        after every event it takes, and again when it starts checks)."""
        key = (st.checked_chars, len(st.text))
        if st.fresh_tokens[:2] != key:
            st.fresh_tokens = (*key, self.count_tokens(st.text[st.checked_chars:]))
        return st.fresh_tokens[2]

    def _is_due(self, st: ChoiceState, paused: bool) -> bool:
        if st.blocked is not None or st.in_flight:
            return False
        fresh = len(st.text) > st.checked_chars
        tokens = self._fresh_tokens(st) if fresh and not st.finished else 0
        return due_check(st, tokens, self.check_every) or (fresh and paused)

    def due_checks(self) -> list[DueCheck]:
        due = []
        paused = self.reading_paused
        for st in self.choices.values():
            if st.blocked is not None or st.in_flight:
                continue
            if st.finished and not st.final_passed and not st.text.strip():
                st.final_passed, st.checked_chars = True, len(st.text)  # nothing to judge (e.g. tool calls)
                continue
            if st.finished and not st.final_passed and st.checked_chars == len(st.text) and st.checks:
                st.final_passed = True  # the last window check already covered the whole finished text
                continue
            if self._is_due(st, paused):
                st.in_flight = True
                due.append(DueCheck(st.index, st.text, st.finished))
        return due

    @property
    def wants_check(self) -> bool:
        """A choice could start a check now (a window is full, or its answer finished): the proxy stops taking
        queued events so that the check covers this window, not everything the upstream sent meanwhile."""
        paused = self.reading_paused
        return any(self._is_due(st, paused) for st in self.choices.values())

    @property
    def reading_paused(self) -> bool:
        """Read no more upstream events until checks catch up: a live choice runs ``max_ahead`` characters ahead
        of its last passed check, or the held events pass ``max_held_bytes``."""
        return self._held_bytes > self.max_held_bytes or any(
            st.blocked is None and len(st.text) - st.checked_chars > self.max_ahead for st in self.choices.values())

    def passed(self, check: DueCheck) -> None:
        st = self.choices[check.choice]
        st.in_flight = False
        st.checks += 1
        st.checked_chars = max(st.checked_chars, len(check.text))
        if check.final and len(check.text) == len(st.text):  # no text came after the choice's end meanwhile
            st.final_passed = True

    def blocked(self, check: DueCheck, verdict: Any) -> None:
        st = self.choices[check.choice]
        st.in_flight = False
        st.checks += 1
        st.blocked = verdict
        self._pending_blocks.append(st)

    # -- client side -----------------------------------------------------------------------------
    def _ready(self, held: _Held) -> bool:
        for idx, (chars, final) in held.needs.items():
            st = self.choices[idx]
            if st.blocked is not None:
                continue  # dropped below
            if final and not st.final_passed:
                return False
            if chars > st.checked_chars and (
                    self.release == "checked"
                    or self.count_tokens(st.text[st.checked_chars:chars]) > self.check_every):
                return False  # eager text runs at most one window ahead of the last passed check
        return True

    def releasable(self) -> list[bytes]:
        """Events the client may receive now, in upstream order; synthesized ``content_filter`` chunks for
        newly blocked choices come first (they end those choices)."""
        out: list[bytes] = []
        for st in self._pending_blocks:
            out.append(self.events.closing_event(st.index, st.blocked))
        self._pending_blocks.clear()
        while self._held:
            head = self._held[0]
            live = {i for i in head.needs if self.choices[i].blocked is None}
            if (head.needs and not live) or self.all_blocked:
                self._pop_held()  # belongs only to blocked choices, or comes after the answer's end: never sent
                continue
            if not self._ready(head):
                break
            self._pop_held()
            blocked = {i for i, st in self.choices.items() if st.blocked is not None}
            if blocked & set(head.needs):
                kept = self.events.without_blocked(head.event, blocked)
                if kept is not None:
                    out.append(kept)
            else:
                out.append(head.event.raw)
            if head.needs:
                self.hold_seconds.append(time.perf_counter() - head.arrived)
        return out

    def _pop_held(self) -> None:
        self._held_bytes -= len(self._held.popleft().event.raw)

    @property
    def all_blocked(self) -> bool:
        return bool(self.choices) and all(st.blocked is not None for st in self.choices.values())

    @property
    def complete(self) -> bool:
        """The upstream ended, every choice is judged or blocked, and nothing is held."""
        return self.upstream_done and not self._held and all(
            st.blocked is not None or st.final_passed for st in self.choices.values())

    @property
    def checks_in_flight(self) -> bool:
        return any(st.in_flight for st in self.choices.values())


def json_bytes(payload: Any) -> bytes:
    """JSON the proxy writes itself, escaped to ASCII: a lone surrogate the upstream sent as ``"\\ud800"`` stays
    as it was written (UTF-8 cannot hold it), and U+2028, NEL and the like never reach a client raw, where one
    that splits lines as str.splitlines does would cut an event in two."""
    return json.dumps(payload).encode()


def sse(payload: Any) -> bytes:
    return b"data: " + json_bytes(payload) + b"\n\n"


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
