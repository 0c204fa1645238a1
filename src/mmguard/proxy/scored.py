"""Score mode (``mmguard proxy --mode score``): judge both rails and report, never block.

A shadow deployment: the guard sees live traffic and its verdicts are measured (the ``mmguard_proxy_flags``
metric, the access log, and the answers' ``mmguard`` field) before it is trusted to block, as OpenAI's
``moderation`` option does with ``mode: "score"``. The upstream's answer reaches the client unchanged, and
streamed text is not held back. What is added:

* a plain answer gets a top-level ``mmguard`` field;
* a stream gets one more chunk before ``data: [DONE]``: ``{"object": "chat.completion.chunk", "choices": [],
  "mmguard": {...}}`` (a chunk without choices, as a usage chunk is).

In both: ``{"mode": "score", "input": VERDICT | null, "output": [VERDICT + "index", ...]}``, each VERDICT the
block mode's ``mmguard`` object. A check that could not run (a request the guard cannot read, such as two
images; a guard that is overloaded; an answer over the limits) is ``{"rail": ..., "error": "..."}`` there,
never a failed or changed request: the upstream gets what it would get without the proxy. A streamed answer
is judged once, whole, when it ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from ..conversation import MAX_TEXT_CHARS
from ..server.errors import APIError
from ..verdict import Verdict
from .answers import choice_index, delta_text, verdict_extension
from .judged import JudgedPrompt
from .sse import SSEParser, json_bytes, loads_or_none, read_decoded, sse

__all__ = ["CheckAnswer", "judge_output", "score_plain", "score_report", "score_stream"]

CheckAnswer = Callable[[JudgedPrompt, str], Awaitable[Verdict]]  # ProxyState.check_answer
MAX_CHOICES = 128  # OpenAI's largest n: a stream with more choice indices is not an answer to judge whole


async def judge_output(check: CheckAnswer, judged: JudgedPrompt, index: int, text: str) -> dict[str, Any]:
    try:
        verdict = await check(judged, text)
    except APIError as err:  # reported, never a failed request
        return {"rail": "output", "index": index, "error": f"the output check failed: {err.message}"}
    return {**verdict_extension("output", verdict), "index": index}


def score_report(input_verdict: Verdict | None, input_error: str, outputs: list[dict[str, Any]],
            log: dict[str, Any]) -> dict[str, Any]:
    """The ``mmguard`` report; ``log`` (the request's access-log entry) gets what an operator counts from a
    shadow deployment: which rails flagged, with which codes, and how many checks could not run."""
    judged_input = verdict_extension("input", input_verdict) if input_verdict else None
    if input_error:
        judged_input = {"rail": "input", "error": f"the input check failed: {input_error}"}
    entries = [e for e in (judged_input, *outputs) if e]
    flagged = [e for e in entries if e.get("flagged")]
    log["mode"] = "score"
    if flagged:
        log.update(rail=",".join(sorted({e["rail"] for e in flagged})), flagged=len(flagged),
                   codes=sorted({c for e in flagged for c in e["codes"]}))
    if failed := sum("error" in e for e in entries):
        log["checks_failed"] = failed
    return {"mode": "score", "input": judged_input, "output": outputs}


async def score_plain(raw: bytes, judged: JudgedPrompt, input_verdict: Verdict | None, input_error: str,
                      check: CheckAnswer, log: dict[str, Any], *,
                      output_rail: bool, answers: Callable[[dict[str, Any]], list[tuple[int, str]]]) -> bytes:
    """The plain answer with its ``mmguard`` report; ``answers`` gives its judged texts by choice index. An
    answer that is not a JSON object is returned as it is (there is nothing to report on, and score mode
    never fails a request)."""
    data = loads_or_none(raw)
    if not isinstance(data, dict):
        return raw
    outputs: list[dict[str, Any]] = []
    try:
        judged_texts = answers(data) if output_rail else []
    except ValueError as err:  # an answer the proxy cannot read all of: reported, passed on as it came
        judged_texts = []
        outputs.append({"rail": "output", "error": f"the upstream's answer cannot be checked: {err}"})
    for index, text in judged_texts[:MAX_CHOICES]:
        outputs.append(await judge_output(check, judged, index, text))
    if len(judged_texts) > MAX_CHOICES:
        outputs.append({"rail": "output", "error": f"{len(judged_texts) - MAX_CHOICES} choices past the first "
                                                   f"{MAX_CHOICES} not judged"})
    data["mmguard"] = score_report(input_verdict, input_error, outputs, log)
    return json_bytes(data)


async def score_stream(resp: httpx.Response, judged: JudgedPrompt, input_verdict: Verdict | None, input_error: str,
                       check: CheckAnswer, log: dict[str, Any], *, output_rail: bool,
                       judge_reasoning: bool, remember: Any = None) -> AsyncIterator[bytes]:
    """The upstream's events as they come (not held back), then the report chunk, then ``[DONE]``.
    (``remember`` is the Responses route's: a chat request carries its own history.)"""
    parser = SSEParser()
    texts: dict[int, str] = {}
    meta: dict[str, Any] = {}
    saw_done = False
    failure = ""
    dropped: set[int] = set()
    after_reasoning: dict[int, bool] = {}  # choices whose judged text last grew by reasoning
    try:
        async for chunk in read_decoded(resp):
            for event in parser.feed(chunk):
                if event.is_done:
                    saw_done = True  # sent after the report
                    continue
                yield event.raw
                body = event.json()
                if not isinstance(body, dict):
                    continue
                for key in ("id", "created", "model"):
                    if meta.get(key) is None:
                        meta[key] = body.get(key)
                choices = body.get("choices")
                for ch in choices if output_rail and isinstance(choices, list) else []:
                    if not isinstance(ch, dict):
                        continue
                    index = choice_index(ch.get("index", 0))
                    if index not in texts and len(texts) >= MAX_CHOICES:
                        if len(dropped) < MAX_CHOICES:  # more choices than any client asks for: reported, not judged
                            dropped.add(index)
                        continue
                    # joined as block mode joins them, so a shadow measures the text blocking would judge
                    added, after_reasoning[index] = delta_text(ch.get("delta"), judge_reasoning,
                                                               after_reasoning.get(index, False))
                    if len(texts.get(index, "")) <= MAX_TEXT_CHARS:  # past it the check reports the limit
                        texts[index] = texts.get(index, "") + added
        for event in parser.close():
            if not event.is_done:
                yield event.raw
    except (httpx.HTTPError, ValueError) as err:  # the report says the stream broke, and what it judged
        failure = f"the upstream's stream failed: {type(err).__name__}"
    finally:
        await resp.aclose()
    outputs = [await judge_output(check, judged, index, text) for index, text in sorted(texts.items()) if text.strip()]
    if dropped:
        many = f"{len(dropped)}" if len(dropped) < MAX_CHOICES else f"{MAX_CHOICES} or more"
        outputs.append({"rail": "output", "error": f"{many} choices past the first {MAX_CHOICES} not judged"})
    if failure:
        outputs.append({"rail": "output", "error": failure})
    yield sse({"id": meta.get("id") or "chatcmpl-mmguard", "object": "chat.completion.chunk",
               "created": meta.get("created") or int(time.time()), "model": meta.get("model") or "",
               "choices": [], "mmguard": score_report(input_verdict, input_error, outputs, log)})
    if saw_done or failure:
        yield b"data: [DONE]\n\n"
