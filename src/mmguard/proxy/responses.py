"""The Responses API (``POST /v1/responses``) through the rails: what they judge and how a block reads.

What is judged is the chat route's rule (:mod:`mmguard.proxy.judged`), read from the Responses shapes:

* **input**: ``input`` as a string (one user turn) or a list of items. Message items (any item with a
  ``role``, with or without ``"type": "message"``) keep their ``input_text`` / ``output_text`` text and
  their ``input_image`` (``image_url``: a data URL, or http(s) from allowlisted hosts). An image given only
  by ``file_id`` lives on the upstream and cannot be judged: refused, as files and audio are. Other items
  (function calls and their outputs, reasoning, item references) are dropped, as tool messages are; a
  function call's output that holds an image or a file is refused, since the guard would not see it. A stored
  prompt's ``variables`` (``prompt: {"id", "variables"}``) are judged as a user turn: the upstream fills them
  into the model's prompt. ``instructions`` is the system prompt: not judged. With ``previous_response_id`` the
  earlier turns live on the upstream: the rails judge the turns the request carries.
* **output**: the ``output_text`` of the answer's messages, joined as the SDK's ``output_text`` joins them,
  after the text of its reasoning items (a blank line between) when ``judge_reasoning`` is on; its ``refusal``
  parts and its citations' titles, URLs and file names (``annotations``), each a piece of its own. Function
  calls are not judged.
* **a blocked answer** keeps its other items and loses its messages and reasoning; it reads as OpenAI's own
  filter's does: ``status: "incomplete"``, ``incomplete_details: {"reason": "content_filter"}``, and the
  verdict in ``mmguard``. Streamed, the held events are dropped and a ``response.incomplete`` event says
  the same.
* **streams** (:class:`ResponseEvents`) are judged from the text deltas (``response.output_text.delta``;
  reasoning deltas with ``judge_reasoning``); an event that carries a whole text (``*.done``, a part or an
  item added or done, a response announced or final) is held like a delta, and a whole text the deltas did
  not say is judged too. The
  terminal event (``response.completed``, ``.incomplete``, ``.failed``) waits for the final check.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx

from ..server.errors import APIError
from ..verdict import Verdict
from .answers import RunningTexts, annotation_text, verdict_extension
from .judged import JudgedPrompt, refuse_unjudged_media, unjudgeable_images
from .scored import CheckAnswer, judge_output, score_report
from .sse import SSEEvent, SSEParser, json_bytes, read_decoded

__all__ = ["ResponseEvents", "blocked_response", "input_messages", "previous_response_id", "response_answer",
           "score_response_stream", "stores_answer", "unjudgeable_answer"]

TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})  # read as the chat route's text parts
# text events: their part's tag (said: the answer; summary, thought: reasoning) and the field with the text
_DELTAS = {"response.output_text.delta": "said", "response.audio.transcript.delta": "transcript",
           "response.refusal.delta": "refusal",
           "response.reasoning_summary_text.delta": "summary", "response.reasoning_text.delta": "thought"}
_DONE = {"response.output_text.done": ("said", "text"), "response.audio.transcript.done": ("transcript", "transcript"),
         "response.refusal.done": ("refusal", "refusal"),
         "response.reasoning_summary_text.done": ("summary", "text"),
         "response.reasoning_text.done": ("thought", "text"),
         "response.content_part.done": ("said", "part"),  # or "thought": the part's type says
         "response.reasoning_summary_part.done": ("summary", "part"),
         # parts and items announced with text already in them: the SDK's stream helper adds it to its snapshot
         "response.content_part.added": ("said", "part"), "response.reasoning_summary_part.added": ("summary", "part")}
_PART_TAGS = {"output_text": "said", "reasoning_text": "thought", "summary_text": "summary", "refusal": "refusal"}
_ANSWER_TAGS = ("said", "transcript", "refusal", "cited")  # judged always; the others (reasoning) with judge_reasoning
_WHOLE_OUTPUT = object()  # ResponseEvents._items: the items are a whole response's output, not one item of it


# -- the request -------------------------------------------------------------------------------------------
def _message_part(part: Any, where: str) -> Any:
    """A Responses content part as the chat route's part (which the server's input rules then check)."""
    if not isinstance(part, Mapping):
        return part  # refused by the shared rules, naming where
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        return {"type": "text", "text": part.get("text")}
    if kind == "input_image":
        if part.get("image_url") is not None:
            return {"type": "image_url", "image_url": {"url": part.get("image_url")}}
        raise APIError.bad_request(
            f"{where}: an input_image given only by file_id cannot be judged (the file lives on the upstream); "
            "send it as image_url (a data URL)", param=f"{where}.file_id")
    if kind == "refusal":
        return part  # an earlier answer's refusal: not judged
    raise APIError.bad_request(f"{where}: unsupported content type {kind!r} (the guard reads input_text and "
                               "input_image)", param=f"{where}.type")


def _tool_output(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A dropped item (a function call's output, reasoning, a reference) as a ``tool`` message the rails skip; an
    output that holds an image or a file is refused: the guard would never see it, the upstream would."""
    refuse_unjudged_media(item.get("output"), f"{where}.output", "a tool's output")
    return {"role": "tool", "content": ""}


def _prompt_variables(body: Mapping[str, Any]) -> list[Any]:
    """A stored prompt's ``variables`` (``prompt: {"id", "variables"}``) as one user message: the upstream fills
    them into the prompt the model reads, so they are judged with the input."""
    prompt = body.get("prompt")
    variables = prompt.get("variables") if isinstance(prompt, Mapping) else None
    if not isinstance(variables, Mapping) or not variables:
        return []
    parts = [value if isinstance(value, str) else _message_part(value, f"prompt.variables.{str(name)[:40]}")
             for name, value in variables.items()]
    return [{"role": "user", "content": parts}]


def input_messages(body: Mapping[str, Any]) -> list[Any]:
    """A Responses request's ``input`` as chat messages, index for index (dropped items become ``tool``
    messages, which the rails skip, so that errors name the request's own indices), then a stored prompt's
    variables as a user message."""
    given = body.get("input")
    variables = _prompt_variables(body)
    if isinstance(given, str):
        return [{"role": "user", "content": given}, *variables]
    if given is None and isinstance(body.get("prompt"), Mapping):  # a stored prompt with no input of its own
        return [{"role": "tool", "content": ""}, *variables]
    if not isinstance(given, list) or not given:
        raise APIError.bad_request("'input' must be a string or a non-empty list of input items", param="input")
    messages: list[Any] = []
    for i, item in enumerate(given):
        # anything with a role is read as a message, whatever its type says: a lenient upstream may take it for
        # one, so it must not pass unjudged
        if not (isinstance(item, Mapping) and "role" in item):
            messages.append(item if not isinstance(item, Mapping) else _tool_output(item, f"input[{i}]"))
            continue
        content = item.get("content")
        if isinstance(content, list):
            content = [_message_part(p, f"input[{i}].content[{j}]") for j, p in enumerate(content)]
        messages.append({"role": item.get("role"), "content": content})
    return [*messages, *variables]


def unjudgeable_answer(body: Mapping[str, Any]) -> APIError | None:
    """Why the answer to ``body`` cannot pass the output rail, if it cannot: a background response is fetched
    later, with ``GET /v1/responses/{id}``, which the proxy does not forward; an image the ``image_generation``
    tool draws cannot be judged (the guard reads images in user turns only)."""
    if body.get("background") is True:
        return APIError.bad_request("background responses cannot pass the output rail (their answer is fetched "
                                    "later with GET /v1/responses/{id}, which the proxy does not forward); send "
                                    "the request without background", param="background")
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(tool, Mapping) and tool.get("type") == "image_generation":
            return unjudgeable_images(f"tools[{i}]")
    return None


def previous_response_id(body: Mapping[str, Any]) -> str | None:
    """The answer a request continues, when the upstream keeps it (``store`` is not false)."""
    previous = body.get("previous_response_id")
    return previous if isinstance(previous, str) and previous else None


def stores_answer(body: Mapping[str, Any]) -> bool:
    """The upstream keeps this request's answer for a later ``previous_response_id`` (OpenAI's default)."""
    return body.get("store") is not False


# -- a plain answer ----------------------------------------------------------------------------------------
def _separator(previous: str | None, tag: str) -> str:
    """Between two judged parts: nothing within the answer (the SDK's ``output_text`` joins its parts so), a
    blank line around reasoning (as the chat route joins reasoning and answer)."""
    return "" if previous == tag == "said" else "\n\n"


def _part_texts(part: Any) -> list[tuple[str, str]]:
    """The judged texts of one content part, as (tag, text): an answer's text (``said``) and its citations
    (``cited``: :func:`~.answers.annotation_text`), a refusal (``refusal``), reasoning (``thought``,
    ``summary``)."""
    if not isinstance(part, Mapping):
        return []
    tag = _PART_TAGS.get(str(part.get("type")), "said")
    text = part.get("refusal" if tag == "refusal" else "text")
    found = [(tag, text)] if isinstance(text, str) else []
    cited = annotation_text(part.get("annotations"))
    return found + ([("cited", cited)] if cited else [])


def _item_texts(item: Any, judge_reasoning: bool) -> list[tuple[str, int, str]]:
    """The judged parts of one output item, as (tag, part index, text): a message's parts (``said``, with
    ``cited`` and ``refusal``: :func:`_part_texts`); a reasoning item's summary (``summary``) and content
    (``thought``), when judged."""
    if not isinstance(item, Mapping):
        return []
    if item.get("type") == "message":
        sources = [("said", "content")]
    elif item.get("type") == "reasoning" and judge_reasoning:
        sources = [("summary", "summary"), ("thought", "content")]
    else:
        return []
    found = []
    for tag, key in sources:
        parts = item.get(key)
        for j, part in enumerate(parts if isinstance(parts, list) else []):
            for part_tag, text in _part_texts(part):
                found.append((part_tag if tag == "said" else tag, j, text))
    return found


def response_answer(response: Any, judge_reasoning: bool) -> str:
    """A plain answer's judged text: every judged part of its ``output``, in order."""
    output = response.get("output") if isinstance(response, Mapping) else None
    text, previous = "", None
    for item in output if isinstance(output, list) else []:
        for tag, _, part in _item_texts(item, judge_reasoning):
            if part:
                text += (_separator(previous, tag) if text else "") + part
                previous = tag
    return text


def blocked_response(response: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    """``response`` as OpenAI's filter ends one: incomplete for ``content_filter``, without messages or
    reasoning (other items, such as function calls, stay), and the verdict in ``mmguard``."""
    output = response.get("output")
    judged_types = ("message", "reasoning")
    kept = [item for item in output if not (isinstance(item, Mapping) and item.get("type") in judged_types)] \
        if isinstance(output, list) else []
    blocked = {k: v for k, v in response.items() if k != "output_text"}  # the SDK's convenience, if a server sent it
    blocked.update(status="incomplete", incomplete_details={"reason": "content_filter"}, output=kept,
                   mmguard=verdict_extension("output", verdict))
    if blocked.get("error") is not None:  # a failed answer's message is judged with it, and goes with it
        blocked["error"] = None
    return blocked


# -- a stream ----------------------------------------------------------------------------------------------
def _position(value: Any) -> Any:
    """An event's output, content or summary index as part of a key: as sent where it is an int or a string,
    else its repr (a float NaN, never equal to itself, would make every delta a part of its own)."""
    return value if isinstance(value, (int, str)) or value is None else repr(value)[:64]


def _event_bytes(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + json_bytes(payload) + b"\n\n"


class ResponseEvents:
    """The Responses API's streamed events (one answer: choice 0) for :class:`~.release.StreamRelease`."""

    ends_with_done = False  # a Responses stream ends with its terminal event, not '[DONE]'

    def __init__(self, judge_reasoning: bool = False) -> None:
        self.judge_reasoning = judge_reasoning
        self.response: dict[str, Any] = {}  # the response object as first announced (for synthesized events)
        self.sequence = -1  # the largest sequence_number seen
        self._said_parts: dict[tuple[Any, Any], str] = {}  # the answer's parts as the SDK's snapshot shows them
        self._said_part: tuple[Any, Any] | None = None  # the answer part that spoke last
        self._said_items: dict[str, str] = {}  # each message item's whole text, by output index
        # all judged text; its fields are keyed (tag, output index, part index), the answer's deltas ("said",)
        self._texts = RunningTexts()

    @property
    def text(self) -> str:
        return self._texts.text

    @property
    def answer_id(self) -> Any:
        return self.response.get("id")

    def _add(self, key: tuple[Any, ...], text: str) -> str:
        """Text a delta says; returns what it adds to the judged text. The answer's deltas are one text (the
        SDK's ``output_text`` joins its parts), each reasoning part one of its own; a text that something
        else interrupted is judged again whole from its start, so that it stays in one piece, as shown."""
        last = self._texts.last
        return self._texts.add(key, text, _separator(last[0] if last else None, key[0]))

    def _whole(self, text: Any) -> str:
        """A whole text (a ``.done`` event's, an item's): judged as a piece of its own unless the judged text
        already holds it in one piece (it does when the upstream's deltas said it); a delta after such a
        piece judges its text again whole."""
        if not isinstance(text, str) or text in self._texts.text:
            return ""
        return self._texts.add_piece(text)

    def _said(self, part: tuple[Any, Any], delta: str) -> str:
        """An answer delta: the answer's deltas in arrival order are one text (what a client that prints each
        delta shows); where deltas of parts interleave, the part is judged whole too (what the SDK's snapshot
        of that part shows), then the arrival order again from its start."""
        added = ""
        if self._said_part not in (None, part) and self._said_parts.get(part):
            added = self._whole(self._said_parts[part] + delta)
        added += self._add(("said",), delta)
        self._said_parts[part] = self._said_parts.get(part, "") + delta
        self._said_part = part
        return added

    def _items(self, items: Any, output_index: Any = _WHOLE_OUTPUT) -> str:
        """Whole output items (an item added or done, a response announced or final): the messages' text as the
        SDK's ``output_text`` shows it (every message item's parts joined, with nothing between items), each
        reasoning part on its own. ``output_index``: one item of the answer, whose other items came before."""
        added, said = "", []
        for item in items if isinstance(items, list) else []:
            texts = _item_texts(item, self.judge_reasoning)
            if any(tag == "said" for tag, _, _ in texts):
                said.append("".join(t for tag, _, t in texts if tag == "said"))
            for _, _, text in (t for t in texts if t[0] != "said"):
                added += self._whole(text)
        if output_index is not _WHOLE_OUTPUT and said:
            self._said_items[repr(output_index)[:64]] = said[0]  # 1 and True apart: clients differ on them
            said = list(self._said_items.values())
        return added + self._whole("".join(said))

    def read(self, event: SSEEvent) -> list[tuple[int, str, bool]] | None:
        data = event.json()
        if not isinstance(data, dict):
            return None
        kind = data.get("type")
        if isinstance(data.get("sequence_number"), int):
            self.sequence = max(self.sequence, data["sequence_number"])
        if isinstance(data.get("response"), dict) and not self.response:
            self.response = data["response"]
        tag = _DELTAS.get(kind) if isinstance(kind, str) else None
        if tag is not None and (tag in _ANSWER_TAGS or self.judge_reasoning):
            delta = data.get("delta")
            if delta is None:
                return [(0, "", False)]
            if not isinstance(delta, str):
                return None  # a client hands it on as it came: what the proxy cannot read is not passed on
            part_index = data.get("summary_index", data.get("content_index"))
            part = (_position(data.get("output_index")), _position(part_index))
            return [(0, self._said(part, delta) if tag == "said" else self._add((tag, *part), delta), False)]
        tag, field = _DONE.get(kind, (None, "")) if isinstance(kind, str) else (None, "")
        text = data.get(field)
        if field == "part":  # a whole part, judged by its type
            texts = _part_texts(text)
            if texts and (texts[0][0] in _ANSWER_TAGS or self.judge_reasoning):
                return [(0, "".join(self._whole(t) for _, t in texts), False)]
            return [(0, "", False)]
        if tag is not None and (tag in _ANSWER_TAGS or self.judge_reasoning):
            return [(0, self._whole(text), False)]
        if kind == "response.output_text.annotation.added":
            return [(0, self._whole(annotation_text([data.get("annotation")])), False)]
        if kind in ("response.output_item.added", "response.output_item.done"):
            return [(0, self._items([data.get("item")], data.get("output_index")), False)]
        response = data.get("response")
        if kind in TERMINAL:
            if not isinstance(response, Mapping):
                return [(0, "", True)]
            error = response.get("error")  # a failed response's message: the SDK raises it, an app may show it
            failed = self._whole(error.get("message")) if isinstance(error, Mapping) else ""
            return [(0, failed + self._items(response.get("output")), True)]
        if kind == "error":
            return [(0, self._whole(data.get("message")), False)]
        if isinstance(response, Mapping):  # created, in_progress, queued: an announced response may hold text
            return [(0, self._items(response.get("output")), False)]
        # no answer text (function call arguments, ...): still the answer's, so once it is blocked nothing of it
        # (nor an event after the block) reaches the client
        return [(0, "", False)]

    def _next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence

    def closing_event(self, index: int, verdict: Any) -> bytes:
        base = self.response or {"id": "resp_mmguard", "object": "response", "created_at": int(time.time()),
                                 "model": "", "output": []}
        return _event_bytes("response.incomplete", {
            "type": "response.incomplete", "sequence_number": self._next_sequence(),
            "response": blocked_response({**base, "output": []}, verdict)})

    def without_blocked(self, event: SSEEvent, blocked: set[int]) -> bytes | None:
        return None  # one answer: once it is blocked, nothing more of it is sent

    def error_event(self, body: dict[str, Any]) -> bytes:
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        return _event_bytes("error", {"type": "error", "code": error.get("code"), "message": error.get("message"),
                                      "param": error.get("param"), "sequence_number": self._next_sequence()})


async def score_response_stream(resp: httpx.Response, judged: JudgedPrompt, input_verdict: Verdict | None,
                                input_error: str, check: CheckAnswer, log: dict[str, Any], *, output_rail: bool,
                                judge_reasoning: bool,
                                remember: Callable[[Any, str], None] | None = None) -> AsyncIterator[bytes]:
    """Score mode: the upstream's events as they come, except the terminal one, which waits for the verdict
    and carries the report in ``response.mmguard``; a stream that ends without one gets an ``mmguard.report``
    event."""
    parser = SSEParser()
    events = ResponseEvents(judge_reasoning)
    terminal: SSEEvent | None = None
    failure = ""
    try:
        async for chunk in read_decoded(resp):
            for event in parser.feed(chunk):
                if any(ends for *_, ends in events.read(event) or []) and terminal is None:
                    terminal = event  # sent with the report
                else:
                    yield event.raw
        for event in parser.close():
            yield event.raw
    except (httpx.HTTPError, ValueError) as err:
        failure = f"the upstream's stream failed: {type(err).__name__}"
    finally:
        await resp.aclose()
    if remember is not None:
        remember(events.answer_id, events.text)
    outputs = [await judge_output(check, judged, 0, events.text)] if output_rail and events.text.strip() else []
    if failure:
        outputs.append({"rail": "output", "error": failure})
    report = score_report(input_verdict, input_error, outputs, log)
    payload = terminal.json() if terminal is not None else None
    if isinstance(payload, dict) and isinstance(payload.get("response"), dict):
        payload["response"]["mmguard"] = report
        yield _event_bytes(str(payload.get("type")), payload)
    else:
        yield _event_bytes("mmguard.report", {"type": "mmguard.report", "sequence_number": events.sequence + 1,
                                              "mmguard": report})

