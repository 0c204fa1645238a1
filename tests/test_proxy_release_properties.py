"""The proxy's release logic under any upstream stream (hypothesis): with ``checked`` release, no text reaches
the client that a passed check did not hold in one piece (each field as a client accumulates it: the content,
the audio transcript), whatever the events (several choices, text in parts, non-JSON
data, comments, finish reasons, early ends) and whichever checks block; and the stream always completes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from mmguard.proxy.answers import choice_index, delta_fields
from mmguard.proxy.release import StreamRelease
from mmguard.proxy.sse import SSEParser
from mmguard.verdict import Verdict

BAD = "BAD"
UNSAFE = Verdict(is_unsafe=True, unsafe_probability=0.9, threshold=0.5, role="agent", violated=(),
                 category_probabilities={}, has_image=False)
# U+2028, NEL and \x1c end lines for str.splitlines, not for server-sent events: JSON may carry them raw
words = st.sampled_from(["a", " b", "ok ", BAD, " BA", "D", "\n", "é", "", "\u2028", "\x85", "\x1c"])
contents = st.one_of(words, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}), max_size=2))
indices = st.one_of(st.integers(0, 2), st.sampled_from(["1", 1.0, None, "x", True]))  # clients coerce "1", 1.0
choice_events = st.fixed_dictionaries(
    {"index": indices, "delta": st.fixed_dictionaries({}, optional={
        "content": contents, "audio": st.fixed_dictionaries({"transcript": words})}),
     "finish_reason": st.one_of(st.none(), st.just("stop"))})
line_ends = st.sampled_from(["\n", "\r\n", "\r"])  # each is a line end in server-sent events


def sse_bytes(payload: Any, ascii_only: bool, end: str) -> bytes:
    """An event as a server may write it: JSON escaped to ASCII or not, any of the three line ends."""
    return f"data: {json.dumps(payload, ensure_ascii=ascii_only)}{end}{end}".encode()


raw_events = st.one_of(
    st.builds(lambda chs, ascii_only, end: sse_bytes({"id": "x", "choices": chs}, ascii_only, end),
              st.lists(st.one_of(choice_events, st.just("not a choice")), min_size=1, max_size=2), st.booleans(),
              line_ends),
    st.just(b"data: not json\n\n"),
    st.just(b": a comment\n\n"),
    st.just(b"data: {\"usage\": {}}\n\n"),
)


def released_text(raw: list[bytes]) -> dict[tuple[int, str], str]:
    """What the openai client reads from the released bytes (its own SSE decoder, not the proxy's), by choice and
    by the field it accumulates apart: the content, the audio transcript."""
    out: dict[tuple[int, str], str] = {}
    for event in SSEDecoder().iter_bytes(iter([b"".join(raw)])):
        try:
            chunk = json.loads(event.data)
        except ValueError:
            continue
        for ch in chunk.get("choices", []) if isinstance(chunk, dict) else []:
            if isinstance(ch, dict):  # as a client reads it
                index = choice_index(ch.get("index", 0))
                for field, text in delta_fields(ch["delta"], judge_reasoning=False):
                    out[index, field] = out.get((index, field), "") + text
    return out


def covered_prefix(text: str, checked: str) -> int:
    """The length of the longest start of ``text`` that ``checked`` holds in one piece."""
    low, high = 0, len(text)
    while low < high:  # a start that is held has every shorter start held too
        mid = (low + high + 1) // 2
        low, high = (mid, high) if text[:mid] in checked else (low, mid - 1)
    return low


def run_release(rel: StreamRelease, pieces: list[bytes], rng: Any, end: bytes = b"") -> tuple[list[bytes],
                                                                                         dict[int, str]]:
    """Feeds ``pieces`` (then ``end``) of an upstream stream to ``rel`` as the proxy does, with checks that
    finish late and in any order (a check blocks when its text holds BAD), until the stream completes.
    Returns the released bytes and, per choice, the longest text a check passed."""
    passed: dict[int, str] = {}
    sent: list[bytes] = []
    pending: list[Any] = []

    def settle(all_of_them: bool) -> None:
        pending.extend(rel.due_checks())
        while pending and (all_of_them or rng.random() < 0.5):
            due = pending.pop(rng.randrange(len(pending)))
            if BAD in due.text:
                rel.blocked(due, UNSAFE)
            else:
                rel.passed(due)
                passed[due.choice] = max(passed.get(due.choice, ""), due.text, key=len)
        sent.extend(rel.releasable())

    parser = SSEParser()
    for piece in [*pieces, end]:
        for event in parser.feed(piece):
            rel.feed(event)
        settle(all_of_them=False)
    for event in parser.close():
        rel.feed(event)
    rel.finish()
    for _ in range(100):
        settle(all_of_them=True)
        if rel.complete or rel.all_blocked:
            break
    assert rel.complete or rel.all_blocked, (rel.choices, list(rel._held), pending)
    return sent, passed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(raw_events, max_size=25), st.integers(1, 4), st.booleans(), st.randoms(use_true_random=False),
       st.sampled_from(["checked", "eager"]))
def test_release_sends_only_text_that_passed_a_check(events: list[bytes], check_every: int, done: bool, rng: Any,
                                                     mode: Any) -> None:
    """``checked``: every character sent was covered by a passed check; ``eager``: at most one window
    (``check_every`` tokens; a token is a character here) past the last passed check."""
    rel = StreamRelease(check_every=check_every, release=mode, count_tokens=len)
    sent, passed = run_release(rel, events, rng, b"data: [DONE]\n\n" if done else b"")
    for (index, field), text in released_text(sent).items():  # (a synthesized content_filter chunk has no text)
        checked = passed.get(index, "")
        if mode == "checked":
            # a passed check held it in one piece, or it is blank (a whitespace-only answer has nothing to judge)
            assert text in checked or not text.strip(), (index, field, text, passed)
            assert BAD not in text
        else:
            assert text in rel.choices[index].text, (index, field, text)
            unchecked = len(text) - covered_prefix(text, checked)
            assert unchecked <= check_every or not text.strip(), (index, field, text, passed)
