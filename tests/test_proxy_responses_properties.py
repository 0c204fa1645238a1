"""The release logic with the Responses API's events (hypothesis): whatever the upstream streams (deltas that
split a word across events and parts, done events and final responses that say something else than their
deltas, reasoning, function-call arguments, non-JSON data, odd indices), no answer text reaches the client
that a passed check did not cover, nothing follows a block, and the stream always completes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from mmguard.proxy.release import StreamRelease
from mmguard.proxy.responses import ResponseEvents

from test_proxy_release_properties import BAD, run_release

words = st.sampled_from(["a", " b", "ok ", BAD, " BA", "D", "B", "AD", "\n", "é", "", "\u2028", "\x85"])
texts = st.lists(words, max_size=3).map("".join)
indices = st.one_of(st.integers(0, 2), st.sampled_from([None, "1", [0], True, -1]))


def part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def message(texts: list[str]) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": [part(t) for t in texts]}


def reasoning(text: str) -> dict[str, Any]:
    return {"type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


where = st.fixed_dictionaries({"output_index": indices, "content_index": indices})
said_events = st.one_of(
    st.builds(lambda w, d: {"type": "response.output_text.delta", **w, "delta": d}, where, words),
    st.builds(lambda w, t: {"type": "response.output_text.done", **w, "text": t}, where, texts),
    st.builds(lambda w, t: {"type": "response.content_part.done", **w, "part": part(t)}, where, texts),
    st.builds(lambda i, ts: {"type": "response.output_item.done", "output_index": i, "item": message(ts)},
              indices, st.lists(texts, max_size=2)),
    # announced with text in them: the SDK's stream helper adds it to its snapshot
    st.builds(lambda i, ts: {"type": "response.output_item.added", "output_index": i, "item": message(ts)},
              indices, st.lists(texts, max_size=2)),
    st.builds(lambda w, t: {"type": "response.content_part.added", **w, "part": part(t)}, where, texts),
    st.builds(lambda ts: {"type": "response.in_progress", "response": {"id": "r", "output": [message(ts)]}},
              st.lists(texts, max_size=2)),
)
thought_events = st.one_of(
    st.builds(lambda i, d: {"type": "response.reasoning_summary_text.delta", "output_index": i, "summary_index": 0,
                            "delta": d}, indices, words),
    st.builds(lambda i, t: {"type": "response.output_item.done", "output_index": i, "item": reasoning(t)},
              indices, texts),
)
other_events = st.one_of(
    st.just({"type": "response.output_item.added", "output_index": 0, "item": message([])}),
    st.builds(lambda d: {"type": "response.function_call_arguments.delta", "output_index": 1, "delta": d},
              st.sampled_from(["{", "\"x\": 1", "}"])),  # not judged, never holds BAD
    st.just({"type": "response.in_progress", "response": {"id": "r", "output": []}}),
)
terminal = st.builds(lambda kind, ts: {"type": kind, "response": {"id": "r", "output": [message(ts)]}},
                     st.sampled_from(["response.completed", "response.incomplete", "response.failed"]),
                     st.lists(texts, max_size=2))


def encode(payload: Any, sequence: int, ascii_only: bool, end: str) -> bytes:
    """An event as a server may write it: JSON escaped to ASCII or not, any of the three line ends."""
    if isinstance(payload, bytes):
        return payload
    data = json.dumps({"sequence_number": sequence, **payload}, ensure_ascii=ascii_only)
    return f"event: {payload['type']}{end}data: {data}{end}{end}".encode()


def said_and_thought(raw: list[bytes]) -> tuple[list[str], list[str]]:
    """What a client shows of the released events: the answer's texts and the reasoning's (each part apart). The
    answer's: its deltas joined in arrival order (a client printing each delta), each part's deltas joined (the
    SDK's snapshot of that part), each whole text an event carries, and the message items' texts joined with
    nothing between them (the SDK's ``output_text``), those of the events that announce or finish an item as
    they add up, and those of each response an event carries."""
    said, thought, deltas = [], [], ""
    thought_deltas: dict[str, str] = {}
    part_deltas: dict[str, str] = {}
    item_texts: dict[str, str] = {}
    for event in SSEDecoder().iter_bytes(iter([b"".join(raw)])):  # the openai client's reading, not the proxy's
        try:
            data = json.loads(event.data)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        kind = data.get("type")
        if kind == "response.output_text.delta":
            deltas += data["delta"]
            key = repr((data.get("output_index"), data.get("content_index")))
            part_deltas[key] = part_deltas.get(key, "") + data["delta"]
        elif kind == "response.reasoning_summary_text.delta":
            key = repr((data.get("output_index"), data.get("summary_index")))
            thought_deltas[key] = thought_deltas.get(key, "") + data["delta"]
        elif kind == "response.output_text.done":
            said.append(data["text"])
        elif kind in ("response.content_part.done", "response.content_part.added"):
            said.append(data["part"]["text"])
        one_item = kind in ("response.output_item.done", "response.output_item.added")
        items = [data["item"]] if one_item else data["response"]["output"] if "response" in data else []
        messages = []
        for item in items:
            if item["type"] == "message":
                messages.append("".join(p["text"] for p in item["content"]))
            elif item["type"] == "reasoning":
                thought += [p["text"] for p in item["summary"]]
        if one_item and messages:
            item_texts[repr(data.get("output_index"))] = messages[0]
            said.append("".join(item_texts.values()))
        elif messages:
            said.append("".join(messages))
    return [deltas, *part_deltas.values(), *said], [*thought_deltas.values(), *thought]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.data(), st.integers(1, 4), st.randoms(use_true_random=False))
def test_release_of_responses_events(judge_reasoning: bool, data: Any, check_every: int, rng: Any) -> None:
    # reasoning first, then the answer, as models send them (judged reasoning and answer are apart by a blank
    # line, so a word split across them is two words to the guard, and to the reader)
    thoughts = data.draw(st.lists(thought_events, max_size=3)) if judge_reasoning else []
    body = data.draw(st.lists(st.one_of(said_events, other_events, st.just(b"data: not json\n\n"),
                                        st.just(b": comment\n\n")), max_size=20))
    end = data.draw(st.lists(terminal, max_size=1))
    ascii_only, line_end = data.draw(st.booleans()), data.draw(st.sampled_from(["\n", "\r\n", "\r"]))
    stream = b"".join(encode(p, i, ascii_only, line_end) for i, p in enumerate([*thoughts, *body, *end]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    rel = StreamRelease(check_every=check_every, release="checked", count_tokens=len,
                        events=ResponseEvents(judge_reasoning))
    sent, _ = run_release(rel, pieces, rng)
    said, thought = said_and_thought(sent)
    assert not any(BAD in text for text in said), said
    if judge_reasoning:
        assert not any(BAD in text for text in thought), thought
    if rel.all_blocked:  # the block's response.incomplete ends the stream
        last = json.loads(list(SSEDecoder().iter_bytes(iter(sent)))[-1].data)
        assert last["type"] == "response.incomplete"
        assert last["response"]["incomplete_details"] == {"reason": "content_filter"}
