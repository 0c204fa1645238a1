"""Guards an evaluation can compare, behind one small interface.

Specs (``--guard``), optionally prefixed with a display name ``NAME=``:

* ``default`` / ``mmguard-mini``: the bundled default model (``Guard.from_pretrained(None)``).
* ``llama-guard-3-vision``: ``meta-llama/Llama-Guard-3-11B-Vision``.
* ``local:PATH_OR_HF_ID``: any local checkpoint or Hugging Face id.

Local guards take ``read_text`` (``--read-text``: off, auto, on; see :class:`mmguard.guard.Guard`); the
cache key says ``read_text=on`` when OCR is in effect, so results with and without it are kept apart.
``prefix_cache`` (``--prefix-cache``) reuses the template prefix's KV across items (exact within float
rounding, so it does not change the cache key).
* ``mmguard-server:URL``: a running ``mmguard serve`` (``POST URL/v1/guard/classify``).
* ``openai-moderation:URL[#MODEL]``: any OpenAI-compatible ``POST URL/v1/moderations`` endpoint
  (default model ``omni-moderation-latest``); categories mapped to S-codes by :data:`OPENAI_TO_CODES`.
* ``chat-judge:URL#MODEL``: an OpenAI-compatible chat model prompted with the exact Llama Guard 3
  Vision prompt (the paper's GPT-4o baseline), ``POST URL/v1/chat/completions``.

Remote guards send ``Authorization: Bearer $MMGUARD_EVAL_API_KEY`` (or ``$OPENAI_API_KEY``) when one of
those variables is set, retry 429/5xx/connection errors with exponential backoff (honouring
``Retry-After``), and run at most ``concurrency`` requests at once.

OpenAI moderation categories → MLCommons S-codes (approximate; OpenAI's taxonomy is not MLCommons'):

====================================  =================================================
OpenAI category                       S-codes
====================================  =================================================
harassment                            S10 Hate (closest: demeaning people)
harassment/threatening                S2 Non-Violent Crimes (threats, intimidation), S1
hate                                  S10 Hate
hate/threatening                      S10 Hate, S1 Violent Crimes
illicit                               S2 Non-Violent Crimes
illicit/violent                       S1 Violent Crimes, S9 Indiscriminate Weapons
self-harm, self-harm/intent,          S11 Suicide & Self-Harm
self-harm/instructions
sexual                                S12 Sexual Content
sexual/minors                         S4 Child Sexual Exploitation
violence, violence/graphic            S1 Violent Crimes
====================================  =================================================

Categories not in this table are reported as unknown codes ``openai:<name>``, never dropped.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..conversation import Conversation
from ..policy import DEFAULT_POLICY, Policy
from ..prompt import build_prompt
from ..verdict import parse_output

__all__ = [
    "OPENAI_TO_CODES",
    "ChatJudgeGuard",
    "EvalGuard",
    "GuardSpecError",
    "LocalGuard",
    "MmguardServerGuard",
    "OpenAIModerationGuard",
    "Prediction",
    "RemoteError",
    "RemoteUnavailable",
    "conversation_to_messages",
    "judge_prompt_text",
    "make_guard",
    "strict_json",
]

OPENAI_TO_CODES: dict[str, tuple[str, ...]] = {
    "harassment": ("S10",),
    "harassment/threatening": ("S2", "S1"),
    "hate": ("S10",),
    "hate/threatening": ("S10", "S1"),
    "illicit": ("S2",),
    "illicit/violent": ("S1", "S9"),
    "self-harm": ("S11",),
    "self-harm/intent": ("S11",),
    "self-harm/instructions": ("S11",),
    "sexual": ("S12",),
    "sexual/minors": ("S4",),
    "violence": ("S1",),
    "violence/graphic": ("S1",),
}

LLAMA_GUARD_3_VISION = "meta-llama/Llama-Guard-3-11B-Vision"
ProgressFn = Callable[[int], None]


class GuardSpecError(ValueError):
    """A ``--guard`` spec cannot be understood."""


class RemoteError(RuntimeError):
    """A remote guard refused one item (non-retryable HTTP error or unparseable answer)."""


class RemoteUnavailable(RuntimeError):
    """A remote guard could not be reached even after retries: the run stops (and can resume)."""


@dataclass
class Prediction:
    """One guard's answer for one item, as cached.

    ``probability_kind``: ``model`` (the guard's own unsafe probability), ``logprob`` (from a chat model's
    token log-probabilities), ``score`` (a moderation score, not a probability), ``binary`` (0/1 from the
    label only: ranking and calibration metrics are then coarse).
    """

    label: str
    unsafe_probability: float
    codes: list[str] = field(default_factory=list)
    category_probabilities: dict[str, float] = field(default_factory=dict)
    unknown_codes: list[str] = field(default_factory=list)
    probability_kind: str = "model"
    raw: str | None = None
    error: str | None = None
    check_probabilities: dict[str, float] = field(default_factory=dict)  # per check, with OCR (local guards)
    # OCR was on and the image's text was not read (a timeout on a loaded machine, a failure): judged blind, so
    # never cached (a re-run reads it again) and counted in the report
    text_unread: bool = False

    @property
    def is_unsafe(self) -> bool:
        return self.label == "unsafe"

    def to_json(self) -> str:
        """Strict JSON: a missing probability (a failed item's NaN) is ``null``."""
        return json.dumps(strict_json(asdict(self)), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Prediction:
        data = json.loads(text)
        if data.get("unsafe_probability") is None:
            data["unsafe_probability"] = math.nan
        return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})


def strict_json(x: Any) -> Any:
    """``x`` with every non-finite float replaced by ``None``: what ``json.dumps(..., allow_nan=False)``
    accepts (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


class EvalGuard(Protocol):
    name: str

    @property
    def cache_id(self) -> str:
        """Identity for the result cache: changes whenever answers could change."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        """One prediction per conversation, in order (an item error is a Prediction with ``error``)."""
        ...


# -- local checkpoints -----------------------------------------------------------------------------
def _checkpoint_fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


class LocalGuard:
    """A checkpoint loaded in this process with :class:`mmguard.guard.Guard`."""

    def __init__(
        self,
        source: str | Path | None,
        *,
        name: str | None = None,
        threshold: float | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        policy: Policy = DEFAULT_POLICY,
        guard: Any = None,
        read_text: str = "auto",
        prefix_cache: bool = False,
        ocr_timeout_s: float | None = None,
    ) -> None:
        from ..guard import Guard
        from ..ocr import DEFAULT_OCR_TIMEOUT_S

        self.source = source
        self.threshold = threshold
        self.batch_size = batch_size
        self.policy = policy
        self.guard = (
            guard
            if guard is not None
            else Guard.from_pretrained(
                source, device=device, dtype=dtype, threshold=threshold, batch_size=batch_size, policy=policy,
                read_text=read_text, prefix_cache=prefix_cache,
                ocr_timeout_s=DEFAULT_OCR_TIMEOUT_S if ocr_timeout_s is None else ocr_timeout_s,
            )
        )
        model = str(self.guard.engine.source or source or "default")
        self.name = name or (Path(model).name if model else "local")
        local = Path(model)
        self._fingerprint = _checkpoint_fingerprint(local) if local.exists() else model

    @property
    def cache_id(self) -> str:
        g = self.guard
        # only when OCR is in effect: cache ids of guards without it stay what they were
        info = self.describe()
        ocr = ":read_text=on" if info.get("reads_text_with_ocr") else ""
        if ocr:  # an image's text judged whole up to max_chars, in windows (before: cut at 2,000 characters)
            judged = info["ocr_text_judged"]
            ocr += f":ocr_chars={judged['max_chars']}/{judged['window_chars']}"
        if ocr and info["image_verdict"] != "max":  # the rule changes image verdicts; ids under "max" stay as they were
            ocr += f":image_verdict={info['image_verdict']}"
        # another dtype gives other probabilities (bf16 against fp32: a few 1e-3); float32's ids stay as they were
        precision = "" if info["dtype"] == "float32" else f":dtype={info['dtype']}"
        return (
            f"local:{self._fingerprint}:thr={self._threshold_key(info)}:fmt={g.prompt_format.value}:"
            f"policy={_policy_key(self.policy)}{ocr}{precision}"
        )

    @staticmethod
    def _threshold_key(info: dict[str, Any]) -> str:
        """The thresholds the labels were decided at; one number as before, so older caches stay valid."""
        per_task = info["thresholds"]
        if len(set(per_task.values())) == 1:
            return str(next(iter(per_task.values())))
        return ",".join(f"{task}:{value:.6g}" for task, value in sorted(per_task.items()))

    def describe(self) -> dict[str, Any]:
        info = {"kind": "local", **self.guard.describe(), "probability": "model"}
        if self.threshold is not None:  # this evaluation's one threshold overrides the model's own
            info["thresholds"] = dict.fromkeys(info["thresholds"], self.threshold)
        return info

    def keep_ocr_reads(self, store: Any) -> None:
        """Keep what OCR reads in ``store`` and read it back from there (:class:`mmguard.ocr.OcrStore`)."""
        self.guard.ocr_reader.store = store

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        verdicts = self.guard.classify_batch(
            list(conversations), threshold=self.threshold, batch_size=self.batch_size, progress=progress
        )
        return [
            Prediction(
                label=v.label,
                unsafe_probability=float(v.unsafe_probability),
                codes=list(v.codes),
                category_probabilities=dict(v.category_probabilities),
                unknown_codes=list(v.unknown_codes),
                probability_kind="model",
                raw=v.raw_text,
                check_probabilities=dict(v.check_probabilities),
                text_unread=bool(getattr(v, "text_unread", False)),
            )
            for v in verdicts
        ]


def _policy_key(policy: Policy) -> str:
    return hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# -- remote plumbing -------------------------------------------------------------------------------
def _image_data_url(conv: Conversation) -> str | None:
    img = conv.image
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def conversation_to_messages(conv: Conversation) -> list[dict[str, Any]]:
    """OpenAI chat form with the image inlined as a PNG data URL (what the remote guards receive)."""
    out: list[dict[str, Any]] = []
    for t in conv.turns:
        parts: list[dict[str, Any]] = [{"type": "text", "text": s} for s in t.texts]
        if t.image is not None:
            parts.insert(0, {"type": "image_url", "image_url": {"url": _image_data_url(conv)}})
        out.append({"role": "user" if t.role == "user" else "assistant", "content": parts})
    return out


def _api_key() -> str | None:
    return os.environ.get("MMGUARD_EVAL_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


class _Http:
    """POST JSON with retries, exponential backoff and a concurrency limit (a thread pool)."""

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(
        self,
        base_url: str,
        *,
        concurrency: int = 4,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 60.0,
        api_key: str | None = None,
    ) -> None:
        import httpx

        if not re.match(r"^https?://", base_url):
            raise GuardSpecError(f"remote guard URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.concurrency = max(1, int(concurrency))
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"Content-Type": "application/json"}
        key = api_key if api_key is not None else _api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(
            timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=self.concurrency)
        )
        self.attempts = 0  # total HTTP attempts (for reports and tests)
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        """``path`` under the base URL: the server root, the usual OpenAI base ``.../v1`` (not doubled) or
        the full endpoint URL are all accepted."""
        if self.base_url.endswith(path):
            return self.base_url
        if path.startswith("/v1/") and self.base_url.endswith("/v1"):
            return self.base_url + path[len("/v1"):]
        return self.base_url + path

    def _sleep_for(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + random.random() / 2)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        import httpx

        url = self.url(path)
        last = ""
        for attempt in range(self.retries + 1):
            with self._lock:
                self.attempts += 1
            retry_after = None
            try:
                resp = self.client.post(url, json=body)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError:
                        raise RemoteError(f"{url} answered non-JSON: {resp.text[:200]!r}") from None
                if resp.status_code not in self.RETRY_STATUS:
                    raise RemoteError(f"{url} answered HTTP {resp.status_code}: {resp.text[:300]}")
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                retry_after = resp.headers.get("retry-after")
            if attempt < self.retries:
                time.sleep(self._sleep_for(attempt, retry_after))
        raise RemoteUnavailable(f"{url} failed after {self.retries + 1} attempts ({last})")

    def map(
        self,
        fn: Callable[[Conversation], Prediction],
        conversations: Sequence[Conversation],
        progress: ProgressFn | None,
    ) -> list[Prediction]:
        def one(conv: Conversation) -> Prediction:
            try:
                pred = fn(conv)
            except RemoteError as err:
                pred = Prediction(label="error", unsafe_probability=math.nan, error=str(err))
            if progress is not None:
                progress(1)
            return pred

        if self.concurrency == 1 or len(conversations) <= 1:
            return [one(c) for c in conversations]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, conversations))


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise RemoteError(f"{what} is not a finite number: {value!r}")
    return float(value)


# -- remote mmguard server -------------------------------------------------------------------------
class MmguardServerGuard:
    """A running ``mmguard serve``: ``POST /v1/guard/classify`` per item."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        threshold: float | None = None,
        policy: Policy = DEFAULT_POLICY,
        **http: Any,
    ) -> None:
        self.http = _Http(url, **http)
        self.threshold = threshold
        self.policy = policy
        self.name = name or f"mmguard-server@{self.http.base_url.split('://', 1)[-1]}"

    @property
    def cache_id(self) -> str:
        thr = "server" if self.threshold is None else self.threshold  # None: the server's own thresholds
        return f"mmguard-server:{self.http.base_url}:thr={thr}:policy={_policy_key(self.policy)}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "mmguard-server",
            "url": self.http.base_url,
            "threshold": self.threshold,
            "probability": "model",
        }

    def _one(self, conv: Conversation) -> Prediction:
        body: dict[str, Any] = {"messages": conversation_to_messages(conv)}
        if self.threshold is not None:  # else the server decides at its own (its model's) thresholds
            body["threshold"] = self.threshold
        if self.policy.excluded:
            body["exclude"] = sorted(self.policy.excluded)
        data = self.http.post("/v1/guard/classify", body)
        # the server answers {"verdict": {...Verdict.to_dict()...}, "fail_closed": ...}; a flat verdict is
        # accepted too
        verdict = data.get("verdict", data) if isinstance(data, Mapping) else None
        if not isinstance(verdict, Mapping) or verdict.get("label") not in ("safe", "unsafe"):
            raise RemoteError(f"unexpected answer from mmguard server: {str(data)[:200]}")
        if isinstance(data, Mapping) and data.get("fail_closed"):
            raise RemoteError("mmguard server failed closed (its verdict is not a model judgment)")
        codes = [str(c) for c in verdict.get("codes") or []]
        known = set(self.policy.codes)
        cat_probs = verdict.get("category_probabilities") or {}
        return Prediction(
            label=str(verdict["label"]),
            unsafe_probability=_num(verdict.get("unsafe_probability"), "unsafe_probability"),
            codes=[c for c in codes if c in known],
            category_probabilities={str(k): _num(v, f"probability of {k}") for k, v in cat_probs.items()},
            unknown_codes=[c for c in codes if c not in known]
            + [str(c) for c in verdict.get("unknown_codes") or []],
            probability_kind="model",
        )

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        return self.http.map(self._one, conversations, progress)


# -- OpenAI-compatible moderation ------------------------------------------------------------------
def judged_content(conv: Conversation) -> list[dict[str, Any]]:
    """What a moderation endpoint sees: the judged (last) turn's text, plus its image if it holds one."""
    last = conv.turns[-1]
    parts: list[dict[str, Any]] = [{"type": "text", "text": "\n\n".join(last.texts)}] if last.texts else []
    if last.image is not None:
        parts.append({"type": "image_url", "image_url": {"url": _image_data_url(conv)}})
    return parts


def _openai_key(cat: Any) -> str:
    """``self_harm_intent`` (the Python SDK's attribute spelling) → ``self-harm/intent``."""
    key = str(cat)
    if key in OPENAI_TO_CODES:
        return key
    key = key.replace("self_harm", "self-harm").replace("_", "/")
    return key


def map_openai_categories(
    flags: Mapping[str, Any], policy: Policy = DEFAULT_POLICY
) -> tuple[list[str], list[str]]:
    """Flagged OpenAI categories → (policy codes in policy order, unknown ``openai:<name>`` codes)."""
    codes: set[str] = set()
    unknown: list[str] = []
    for cat, on in flags.items():
        if not on:
            continue
        mapped = OPENAI_TO_CODES.get(_openai_key(cat))
        if mapped is None:
            if str(cat) in policy.codes:  # an endpoint that already speaks S-codes (mmguard's own)
                codes.add(str(cat))
            else:
                unknown.append(f"openai:{cat}")
        else:
            codes.update(mapped)
    return [c for c in policy.codes if c in codes], unknown


class OpenAIModerationGuard:
    """Any OpenAI-compatible ``POST /v1/moderations`` endpoint.

    The unsafe score is the largest category score (``probability_kind="score"``); the label is the
    endpoint's ``flagged``. Only the judged last turn is sent (moderation endpoints see content, not a
    conversation); for response classification the user's image is therefore not sent.
    """

    def __init__(
        self,
        url: str,
        model: str = "omni-moderation-latest",
        *,
        name: str | None = None,
        policy: Policy = DEFAULT_POLICY,
        **http: Any,
    ) -> None:
        self.http = _Http(url, **http)
        self.model = model
        self.policy = policy
        self.name = name or f"moderation:{model}"

    @property
    def cache_id(self) -> str:
        return f"openai-moderation:{self.http.base_url}#{self.model}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "openai-moderation",
            "url": self.http.base_url,
            "model": self.model,
            "probability": "score",
            "mapping": {k: list(v) for k, v in OPENAI_TO_CODES.items()},
        }

    def _one(self, conv: Conversation) -> Prediction:
        parts = judged_content(conv)
        payload: Any = (
            parts if any(p["type"] != "text" for p in parts) else (parts[0]["text"] if parts else "")
        )
        data = self.http.post("/v1/moderations", {"model": self.model, "input": payload})
        results = data.get("results") if isinstance(data, Mapping) else None
        if not isinstance(results, list) or not results or not isinstance(results[0], Mapping):
            raise RemoteError(f"unexpected moderation answer: {str(data)[:200]}")
        res = results[0]
        flags = res.get("categories") or {}
        scores = res.get("category_scores") or {}
        if not isinstance(flags, Mapping) or not isinstance(scores, Mapping):
            raise RemoteError("moderation answer lacks 'categories' / 'category_scores' objects")
        codes, unknown = map_openai_categories(flags, self.policy)
        cat_probs: dict[str, float] = {}
        for cat, score in scores.items():
            mapped = OPENAI_TO_CODES.get(
                _openai_key(cat), (str(cat),) if str(cat) in self.policy.codes else ()
            )
            for code in mapped:
                cat_probs[code] = max(cat_probs.get(code, 0.0), _num(score, f"score of {cat}"))
        top = max((_num(v, f"score of {k}") for k, v in scores.items()), default=0.0)
        flagged = bool(res.get("flagged", bool(codes or unknown)))
        return Prediction(
            label="unsafe" if flagged else "safe",
            unsafe_probability=min(1.0, max(0.0, top)),
            codes=codes if flagged else [],
            category_probabilities=cat_probs,
            unknown_codes=unknown,
            probability_kind="score",
        )

    def predict(
        self, conversations: Sequence[Conversation], progress: ProgressFn | None = None
    ) -> list[Prediction]:
        return self.http.map(self._one, conversations, progress)


# -- OpenAI-compatible chat model as a judge -------------------------------------------------------
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
                p = math.exp(float(c.get("logprob")))
            except (TypeError, ValueError):
                continue
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
        self.http = _Http(url, **http)
        self.model = model
        self.policy = policy
        self.max_tokens = max_tokens
        self.logprobs = logprobs
        self.name = name or f"judge:{model}"

    @property
    def cache_id(self) -> str:
        return f"chat-judge:{self.http.base_url}#{self.model}:policy={_policy_key(self.policy)}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "chat-judge",
            "url": self.http.base_url,
            "model": self.model,
            "probability": "logprob when returned, else binary",
        }

    def request_body(self, conv: Conversation) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        url = _image_data_url(conv)
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


# -- specs -----------------------------------------------------------------------------------------
def make_guard(
    spec: str,
    *,
    threshold: float | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    concurrency: int = 4,
    retries: int = 4,
    timeout: float = 60.0,
    policy: Policy = DEFAULT_POLICY,
    read_text: str = "auto",
    prefix_cache: bool = False,
    ocr_timeout_s: float | None = None,
) -> EvalGuard:
    """Build a guard from a ``--guard`` spec (see the module docstring)."""
    name: str | None = None
    m = re.match(r"^([A-Za-z0-9_.\-]+)=(.+)$", spec)
    if m and ":" not in m.group(1):
        name, spec = m.group(1), m.group(2)
    kind, _, rest = spec.partition(":")
    http = {"concurrency": concurrency, "retries": retries, "timeout": timeout}
    local: dict[str, Any] = {"threshold": threshold, "device": device, "dtype": dtype, "batch_size": batch_size,
                             "policy": policy, "read_text": read_text, "prefix_cache": prefix_cache,
                             "ocr_timeout_s": ocr_timeout_s}
    if spec in ("default", "mmguard-mini"):
        return LocalGuard(None, name=name or "mmguard-mini", **local)
    if spec in ("llama-guard-3-vision", LLAMA_GUARD_3_VISION):
        return LocalGuard(LLAMA_GUARD_3_VISION, name=name or "llama-guard-3-vision", **local)
    if kind == "local" and rest:
        return LocalGuard(rest, name=name, **local)
    if kind == "mmguard-server" and rest:
        return MmguardServerGuard(rest, name=name, threshold=threshold, policy=policy, **http)
    if kind == "openai-moderation" and rest:
        url, _, model = rest.partition("#")
        return OpenAIModerationGuard(url, model or "omni-moderation-latest", name=name, policy=policy, **http)
    if kind == "chat-judge" and rest:
        url, _, model = rest.partition("#")
        return ChatJudgeGuard(url, model, name=name, policy=policy, **http)
    if kind in ("http", "https"):
        raise GuardSpecError(f"guard spec {spec!r}: say which kind of endpoint, e.g. mmguard-server:{spec}")
    raise GuardSpecError(
        f"unknown guard spec {spec!r}; use default, mmguard-mini, llama-guard-3-vision, local:PATH, "
        "mmguard-server:URL, openai-moderation:URL[#MODEL] or chat-judge:URL#MODEL (optionally NAME=SPEC)"
    )
