"""An OpenAI-compatible chat model prompted with the exact Llama Guard 3 Vision prompt (the paper's GPT-4o
baseline) as an evaluated guard."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...conversation import Conversation
from ...policy import DEFAULT_POLICY, Policy
from ...prompt import build_prompt
from ...verdict import parse_output
from .base import GuardSpecError, Prediction, ProgressFn, RemoteError, policy_key
from .http import RetryingHttp, image_data_url, probability

__all__ = ["ChatJudgeGuard", "judge_prompt_text"]


def judge_prompt_text(conv: Conversation, policy: Policy = DEFAULT_POLICY) -> str:
    """The Llama Guard 3 Vision prompt body (``Task: ...`` to ``...categories.``) without special tokens."""
    segs = build_prompt(conv, policy).segments
    start = next(i for i, s in enumerate(segs) if s.special and s.text == "<|end_header_id|>")
    end = next(i for i, s in enumerate(segs) if s.special and s.text == "<|eot_id|>")
    return "".join(s.text for s in segs[start + 1 : end] if not s.special).strip()


def _logprob_unsafe(choice: Mapping[str, Any]) -> float | None:
    """P(first answer token is 'unsafe') from a chat completion's logprobs, when present."""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, Mapping) else None
    if not isinstance(content, list):
        return None
    for tok in content:
        if not isinstance(tok, Mapping) or not str(tok.get("token", "")).strip():
            continue  # leading whitespace / newlines
        cands = tok.get("top_logprobs") or [{"token": tok.get("token"), "logprob": tok.get("logprob")}]
        p_unsafe = p_safe = 0.0
        for c in cands:
            t = str(c.get("token", "")).strip().lower()
            try:
                logprob = float(c.get("logprob"))
            except (TypeError, ValueError):
                continue
            p = probability(math.exp(logprob), f"the probability of {t[:20]!r}")  # a logprob over 0 is none
            if len(t) >= 2 and "unsafe".startswith(t):
                p_unsafe += p
            elif len(t) >= 2 and "safe".startswith(t):
                p_safe += p
        if p_unsafe == 0.0 and p_safe == 0.0:
            return None
        if not tok.get("top_logprobs"):  # only the chosen token's probability is known
            return p_unsafe if p_unsafe else 1.0 - p_safe
        return min(1.0, p_unsafe)
    return None


class ChatJudgeGuard:
    """An OpenAI-compatible chat model given the exact Llama Guard prompt (the paper's GPT-4o baseline).

    One user message: the image (PNG data URL) then the prompt text. The answer is parsed with
    :func:`mmguard.verdict.parse_output`. The unsafe probability comes from the answer's first-token
    log-probabilities when the endpoint returns them (``probability_kind="logprob"``), else it is 0/1
    (``"binary"``).
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        name: str | None = None,
        policy: Policy = DEFAULT_POLICY,
        max_tokens: int = 32,
        logprobs: bool = True,
        **http: Any,
    ) -> None:
        if not model:
            raise GuardSpecError("chat-judge needs a model: chat-judge:URL#MODEL")
        self.http = RetryingHttp(url, **http)
        self.model = model
        self.policy = policy
        self.max_tokens = max_tokens
        self.logprobs = logprobs
        self.name = name or f"judge:{model}"

    @property
    def cache_id(self) -> str:
        return f"chat-judge:{self.http.base_url}#{self.model}:policy={policy_key(self.policy)}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "chat-judge",
            "url": self.http.base_url,
            "model": self.model,
            "probability": "logprob when returned, else binary",
        }

    def request_body(self, conv: Conversation) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        url = image_data_url(conv)
        if url is not None:
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": judge_prompt_text(conv, self.policy)})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=10)
        return body

    def _one(self, conv: Conversation) -> Prediction:
        data = self.http.post("/v1/chat/completions", self.request_body(conv))
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RemoteError(f"unexpected chat completion: {str(data)[:200]}") from None
        parsed = parse_output(str(text), self.policy)
        if parsed.label is None:
            raise RemoteError(f"judge answer is neither safe nor unsafe: {str(text)[:120]!r}")
        p = _logprob_unsafe(choice)
        kind = "logprob"
        if p is None:
            p, kind = (1.0 if parsed.is_unsafe else 0.0), "binary"
        return Prediction(
            label=parsed.label,
            unsafe_probability=p,
            codes=list(parsed.codes),
            unknown_codes=list(parsed.unknown_codes),
            probability_kind=kind,
            raw=str(text),
        )

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        return self.http.map(self._one, conversations, progress)
