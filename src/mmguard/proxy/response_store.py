"""The conversations behind Responses API answers, so that a request that continues one is judged with it.

A Responses client sends only its new turn and ``previous_response_id``; the earlier turns live on the
upstream. Judged alone, a harmful request split over several turns passes each rail turn by turn, where a
chat request, which carries its history, is judged whole. :class:`ResponseStore` keeps, per answered
response id, the conversation the output rail judged (the prompt's turns and the answer), and
:func:`continued` puts it in front of the next request's turns.

Bounded and local: at most ``max_entries`` conversations and ``max_chars`` characters of text, each turn
counted ``TURN_COST`` more (least recently used first out); text only (an earlier image is kept as the text
``[image]``: Llama Guard reads one image, the request's own, and a decoded image would cost megabytes); in
this process only (behind a load balancer, replicas do not share it: an id it does not know is judged
without its earlier turns).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..conversation import MAX_TURNS, Conversation, Turn
from .judged import JudgedPrompt, recent_turns

__all__ = ["EARLIER_CHARS", "IMAGE_MARK", "TURN_COST", "ResponseStore", "continued"]

IMAGE_MARK = "[image]"  # what an earlier turn's image leaves in the stored text
# earlier text put before a request: ~2k tokens, so that with the policy block and the request it stays well
# within mmguard-mini's 8,128-token context (a chat request's own history counts whole, as the client sent it)
EARLIER_CHARS = 8_000
TURN_COST = 256  # what a kept turn costs beyond its text (Python objects), counted against max_chars


@dataclass(frozen=True)
class _Entry:
    turns: tuple[Turn, ...]
    chars: int


class ResponseStore:
    """Response id -> the judged conversation that produced it (text only), least recently used first out."""

    def __init__(self, max_entries: int = 10_000, max_chars: int = 32_000_000) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> tuple[Turn, ...] | None:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None:
                return None
            self._entries.move_to_end(response_id)
            return entry.turns

    def put(self, response_id: str, conversation: Conversation) -> None:
        turns = tuple(Turn(t.role, t.texts or (IMAGE_MARK,)) if t.image is not None or not t.texts
                      else Turn(t.role, t.texts) for t in conversation.turns)
        chars = sum(len(s) for t in turns for s in t.texts) + TURN_COST * len(turns)
        if chars > self.max_chars or self.max_entries < 1:
            return
        with self._lock:
            old = self._entries.pop(response_id, None)
            self._chars -= old.chars if old else 0
            self._entries[response_id] = _Entry(turns, chars)
            self._chars += chars
            while len(self._entries) > self.max_entries or self._chars > self.max_chars:
                _, evicted = self._entries.popitem(last=False)
                self._chars -= evicted.chars


def continued(earlier: tuple[Turn, ...], judged: JudgedPrompt, max_chars: int = EARLIER_CHARS) -> JudgedPrompt:
    """``judged`` after the ``earlier`` turns (their last ``max_chars`` characters, so that the whole stays
    within a small guard's context): consecutive turns of one role merged (a tool loop's request has no user
    turn, so its answer continues the earlier answer), the last ``MAX_TURNS - 1`` kept (room for the answer),
    starting with a user turn (an empty one when the kept turns start with the agent's)."""
    merged: list[Turn] = []
    for turn in (*recent_turns(earlier, max_chars), *(judged.conversation.turns if judged.conversation else ())):
        if merged and merged[-1].role == turn.role:
            last = merged[-1]
            merged[-1] = Turn(turn.role, last.texts + turn.texts, last.image or turn.image)
        else:
            merged.append(turn)
    merged = merged[-(MAX_TURNS - 2):]  # room for an empty first user turn and the answer
    if merged and merged[0].role != "user":
        merged.insert(0, Turn("user", ("",)))
    return JudgedPrompt(Conversation(tuple(merged))) if merged else judged
