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
``max_held_bytes`` (bytes and a per-event overhead: :func:`held_cost`), :attr:`StreamRelease.reading_paused`
tells the proxy to stop reading the upstream (TCP backpressure does the rest) and every choice with unchecked
text gets a check at once, so an upstream that streams faster than the guard judges costs bounded memory,
never the whole flood.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .answers import RunningTexts, choice_index, delta_fields, readable_content, readable_refusal, verdict_extension
from .settings import Release
from .sse import SSEEvent, sse

__all__ = ["HELD_EVENT_OVERHEAD", "MAX_HELD_BYTES", "ChatChunks", "DueCheck", "EventFormat", "StreamRelease",
           "due_check", "held_cost", "max_ahead_chars", "readable_choices"]

MAX_HELD_BYTES = 16 * 1024 * 1024  # held events (what they cost in memory) past which reading pauses
# what a held event costs beyond its bytes (the event, its decoded data, the hold record): counted, since 8.4
# million held "\n\n" events of 2 bytes each took 2.5 GB under a bound that counted only their bytes
HELD_EVENT_OVERHEAD = 512


def held_cost(event: SSEEvent) -> int:
    return len(event.raw) + (len(event.data) if event.data else 0) + HELD_EVENT_OVERHEAD


def max_ahead_chars(check_every: int) -> int:
    """Unchecked answer text (characters) a choice may run ahead of its last passed check before reading
    pauses: 16 KiB, or 8 characters per token of ``check_every`` when that is more (tokens average ~4)."""
    return max(16_384, 8 * check_every)


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
        readings = []
        error = chunk.get("error")
        if error is not None:  # the SDK raises it as an APIError, whose message an app may well show
            message = error.get("message") if isinstance(error, dict) else error
            if not isinstance(message, (str, type(None))):
                return None
            readings.append((0, self._texts.setdefault(0, RunningTexts()).add("error", message or ""), False))
        choices = chunk.get("choices")
        if choices is None:
            return readings
        if not readable_choices(choices):
            return None  # a JS client reads choices[0] of {"0": ...} too: what the proxy cannot read, it drops
        for ch in choices:
            idx = choice_index(ch.get("index", 0))
            if self.n == 1:
                idx = 0  # one choice asked for: a client shows choices[0] of every chunk, whatever its index says
            elif idx < 0 or (self.n is not None and idx >= self.n):
                return None  # a choice nobody asked for: clients differ in where they show it (choices[-1]...)
            if isinstance(ch.get("delta"), dict) and not (readable_content(ch["delta"].get("content"))
                                                          and readable_refusal(ch["delta"])):
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
                 judge_reasoning: bool = False, events: EventFormat | None = None,
                 on_hold: Callable[[float], None] | None = None) -> None:
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
        self.on_hold = on_hold  # told, per released text event, how long it was held back
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
        self._held_bytes += held_cost(event)

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
            if head.needs and self.on_hold is not None:
                self.on_hold(time.perf_counter() - head.arrived)
        return out

    def _pop_held(self) -> None:
        self._held_bytes -= held_cost(self._held.popleft().event)

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


