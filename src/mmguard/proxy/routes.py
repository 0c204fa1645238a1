"""The OpenAI APIs the proxy carries through its rails, each described once: where the judged conversation
is in a request, where the judged text is in an answer, how a blocked answer reads, how its stream reads.

* :data:`CHAT` -- ``POST /v1/chat/completions`` (``messages``; ``choices``, each judged on its own);
* :data:`RESPONSES` -- ``POST /v1/responses`` (``input``; one answer: :mod:`mmguard.proxy.responses`).

A prompt the input rail blocks is refused the same way on both (:func:`content_filter_error`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..server.errors import APIError, error_body
from ..verdict import Verdict
from .answers import (
    REASONING_KEYS,
    choice_index,
    readable_content,
    readable_refusal,
    reasoning_text,
    said_text,
    verdict_extension,
)
from .judged import unjudgeable_images
from .release import ChatChunks, EventFormat
from .responses import (
    ResponseEvents,
    blocked_response,
    input_messages,
    previous_response_id,
    response_answer,
    score_response_stream,
    stores_answer,
    unjudgeable_answer,
)
from .scored import score_stream

__all__ = ["CHAT", "RESPONSES", "Answer", "Route", "UnreadableAnswer", "content_filter_error"]

Answer = tuple[int, str, dict[str, Any]]  # (index the client knows it by, judged text, the object a block edits)


@dataclass(frozen=True)
class Route:
    path: str  # under the upstream's /v1, and the proxy's
    param: str  # the request field the input rail judges (named in its errors and blocks)
    messages: Callable[[dict[str, Any]], Any]  # that field as chat messages
    answers: Callable[[dict[str, Any], bool], list[Answer]]  # a plain answer's judged texts (judge_reasoning)
    block: Callable[[dict[str, Any], Verdict], None]  # blocks one answer (the Answer's object) in place
    events: Callable[[dict[str, Any], bool], EventFormat]  # how its stream reads (the request, judge_reasoning)
    score_stream: Callable[..., AsyncIterator[bytes]]  # score mode's stream (:func:`.scored.score_stream`'s call)
    continues: Callable[[dict[str, Any]], str | None]  # the earlier answer whose turns the request omits
    stores: Callable[[dict[str, Any]], bool]  # a later request may continue this one's answer
    unjudgeable: Callable[[dict[str, Any]], APIError | None]  # why its answer cannot pass the output rail


class UnreadableAnswer(ValueError):
    """A plain answer in a shape the proxy cannot read all of: some client may still show what it says, so it
    is refused (502), never passed on unjudged."""


def _chat_answers(data: dict[str, Any], judge_reasoning: bool) -> list[Answer]:
    """Each choice's judged text: what its message says, after its reasoning when that is judged too."""
    choices = data.get("choices")
    if choices is None:
        return []
    if not isinstance(choices, list) or not all(
            isinstance(ch, dict) and isinstance(ch.get("message"), (dict, type(None))) and ch.get("text") is None
            for ch in choices):
        raise UnreadableAnswer("its 'choices' are not a list of objects with a 'message' object")
    if not all(readable_content(ch["message"].get("content")) for ch in choices if ch.get("message") is not None):
        raise UnreadableAnswer("a message's 'content' is neither a string nor a list of text parts")
    if not all(readable_refusal(ch["message"]) for ch in choices):
        raise UnreadableAnswer("a message's 'refusal' is not a string")
    found: list[Answer] = []
    for position, ch in enumerate(choices):
        if ch.get("message") is None:
            continue
        content = said_text(ch["message"], "\n")
        thought = reasoning_text(ch["message"]) if judge_reasoning else ""
        text = f"{thought}\n\n{content}" if thought and content else thought or content
        if text.strip():
            found.append((choice_index(ch.get("index", position)), text, ch))
    return found


def _block_choice(choice: dict[str, Any], verdict: Verdict) -> None:
    """A blocked choice as Azure OpenAI's filter ends one: no content (nor reasoning, nor audio, nor a refusal,
    nor citations, nor the log probabilities, whose tokens spell the answer)."""
    choice["message"]["content"] = None
    for key in (*REASONING_KEYS, "audio", "refusal"):
        if choice["message"].get(key) is not None:
            choice["message"][key] = None
    if choice["message"].get("annotations"):  # citations of the text that is gone
        choice["message"]["annotations"] = []
    if choice.get("logprobs") is not None:
        choice["logprobs"] = None
    choice["finish_reason"] = "content_filter"
    choice["mmguard"] = verdict_extension("output", verdict)


def _responses_answers(data: dict[str, Any], judge_reasoning: bool) -> list[Answer]:
    output = data.get("output")
    if output is not None and not (isinstance(output, list) and all(isinstance(item, dict) for item in output)):
        raise UnreadableAnswer("its 'output' is not a list of objects")
    text = response_answer(data, judge_reasoning)
    shown = data.get("output_text")  # the SDK's convenience; a server that sends it is read as a client reads it
    if isinstance(shown, str) and shown.strip() and shown not in text:
        text = f"{text}\n\n{shown}" if text else shown
    return [(0, text, data)] if text.strip() else []


def _block_response(data: dict[str, Any], verdict: Verdict) -> None:
    blocked = blocked_response(data, verdict)
    data.clear()
    data.update(blocked)


def _chat_events(body: dict[str, Any], judge_reasoning: bool) -> EventFormat:
    n = body.get("n")
    return ChatChunks(judge_reasoning, choices=n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1)


def _responses_events(body: dict[str, Any], judge_reasoning: bool) -> EventFormat:
    return ResponseEvents(judge_reasoning)


def _chat_messages(body: Mapping[str, Any]) -> Any:
    return body.get("messages")


def _never(body: dict[str, Any]) -> Any:
    return None  # a chat request carries its whole history


def _chat_unjudgeable(body: dict[str, Any]) -> APIError | None:
    """Image answers (``modalities`` holding ``image``, as OpenRouter and Gemini's compatible API take it)
    cannot pass the output rail; audio answers can, by their transcript."""
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "image" in modalities:
        return unjudgeable_images("modalities")
    return None


CHAT = Route("/chat/completions", "messages", _chat_messages, _chat_answers, _block_choice, _chat_events,
             score_stream, continues=_never, stores=lambda body: False, unjudgeable=_chat_unjudgeable)
RESPONSES = Route("/responses", "input", input_messages, _responses_answers, _block_response, _responses_events,
                  score_response_stream, continues=previous_response_id, stores=stores_answer,
                  unjudgeable=unjudgeable_answer)


def content_filter_error(verdict: Verdict, active_codes: tuple[str, ...], param: str = "messages") -> dict[str, Any]:
    """Azure OpenAI's 400 ``content_filter`` error body, with mmguard's verdict in ``error.mmguard``."""
    probs = verdict.category_probabilities
    body = error_body(
        f"The prompt was filtered by mmguard's input rail: {verdict}. Please modify your prompt and retry.",
        param=param, code="content_filter")
    body["error"]["status"] = 400
    body["error"]["innererror"] = {
        "code": "ResponsibleAIPolicyViolation",
        "content_filter_result": {c: {"filtered": c in verdict.codes, "probability": float(probs.get(c, 0.0))}
                                  for c in active_codes},
    }
    body["error"]["mmguard"] = verdict_extension("input", verdict)
    return body
