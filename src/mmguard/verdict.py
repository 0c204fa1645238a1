"""Verdicts and the lenient parser of raw Llama Guard output."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .policy import DEFAULT_POLICY, Policy

__all__ = ["ParsedOutput", "Verdict", "ViolatedCategory", "parse_output"]


@dataclass(frozen=True)
class ViolatedCategory:
    code: str
    name: str


@dataclass(frozen=True)
class Verdict:
    """The guard's answer for one conversation.

    ``unsafe_probability`` is the model's full-vocabulary probability of the token ``unsafe`` at the
    decision position (after ``\\n\\n``); ``is_unsafe`` compares it with ``threshold``.
    ``category_probabilities[code]`` is the probability that the model's answer starts
    ``unsafe\\n<code>`` (the joint probability of ``unsafe`` and of that code listed first); it is only
    computed for unsafe verdicts (empty otherwise) and sums to at most ``unsafe_probability``.

    With ``read_text`` (OCR, see :mod:`mmguard.ocr`), an image's text is judged by a second, text-only
    check: ``read_text`` is what was read (None: not read; "": nothing found), ``check_probabilities``
    the unsafe probability of each check that ran (``model``: the conversation as given, ``ocr``: its
    transcription; empty when only the model's ran), ``unsafe_probability`` their maximum, and
    ``flagged_by`` the checks at or above the threshold (codes and category probabilities come from
    those). Without a second check, ``flagged_by`` is ``("model",)`` for an unsafe verdict.
    ``text_unread`` is true when OCR was on for the conversation's image and its text was not read (a
    timeout, an OCR failure, OCR not installed) or was read but could not be checked (the conversation with it
    is past the model's context): ``warnings`` says which; a model that cannot read (mmguard-mini
    v2) then judged the image blind, and ``mmguard serve --fail-closed`` blocks such a verdict.
    ``text_truncated`` is true when the image held more text than OCR's ``max_chars`` (6,000 by default):
    ``read_text`` is its first part, the only part judged; and when some of the image's other views were not
    read (:func:`mmguard.images.other_views`: frames past the limits, views past the OCR deadline).
    ``--fail-closed`` blocks such a safe verdict too.
    """

    is_unsafe: bool
    unsafe_probability: float
    threshold: float
    role: Literal["user", "agent"]
    violated: tuple[ViolatedCategory, ...] = ()
    category_probabilities: dict[str, float] = field(default_factory=dict)
    raw_text: str | None = None
    unknown_codes: tuple[str, ...] = ()
    has_image: bool = False
    latency_ms: float = 0.0
    warnings: tuple[str, ...] = ()
    read_text: str | None = None
    flagged_by: tuple[str, ...] = ()
    check_probabilities: dict[str, float] = field(default_factory=dict)
    text_unread: bool = False
    text_truncated: bool = False

    @property
    def label(self) -> Literal["safe", "unsafe"]:
        return "unsafe" if self.is_unsafe else "safe"

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(v.code for v in self.violated)

    @property
    def task(self) -> Literal["prompt", "response"]:
        return "prompt" if self.role == "user" else "response"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        d["codes"] = list(self.codes)
        d["task"] = self.task
        d["violated"] = [asdict(v) for v in self.violated]
        d["unknown_codes"] = list(self.unknown_codes)
        d["warnings"] = list(self.warnings)
        d["flagged_by"] = list(self.flagged_by)
        return d

    def __str__(self) -> str:
        if not self.is_unsafe:
            return f"safe (p_unsafe={self.unsafe_probability:.3f})"
        return f"unsafe {','.join(self.codes)} (p_unsafe={self.unsafe_probability:.3f})"


@dataclass(frozen=True)
class ParsedOutput:
    label: Literal["safe", "unsafe"] | None  # None when the text is neither
    codes: tuple[str, ...]  # codes of the policy, in the order written, deduplicated
    unknown_codes: tuple[str, ...]  # well-formed codes the policy does not have

    @property
    def is_unsafe(self) -> bool:
        return self.label == "unsafe"


_SPECIAL_RE = re.compile(r"<\|[a-z_0-9]+\|>")
_CODE_TOKEN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def parse_output(text: str, policy: Policy = DEFAULT_POLICY) -> ParsedOutput:
    """Turn any raw model text into a verdict.

    Accepts ``"\\n\\nunsafe\\nS1,S10<|eot_id|>"``, ``"safe"``, ``" Unsafe \\n S1, s2 "`` and the like:
    special tokens are dropped, case and spaces ignored, codes matched case-insensitively against the
    policy, unknown codes reported separately. Text that is neither safe nor unsafe gives ``label=None``.
    """
    cleaned = _SPECIAL_RE.sub("\n", text or "")
    lines = [ln.strip() for ln in cleaned.splitlines() if ln.strip()]
    if not lines:
        return ParsedOutput(None, (), ())
    first = lines[0].strip().rstrip(".:!")
    lowered = first.lower()
    if re.match(r"safe(?![a-z])", lowered):
        return ParsedOutput("safe", (), ())
    # "unsafe", "unsafe S1", "unsafe: S1" and even "unsafeS1" (codes glued to the label)
    m = re.match(r"unsafe(?=$|[^a-z]|[A-Za-z]{1,3}\d)", first, flags=re.IGNORECASE)
    if not m:
        return ParsedOutput(None, (), ())
    rest_of_line = first[m.end():]
    # codes may follow on the same line ("unsafe S1") or on the next lines
    code_text = " ".join([rest_of_line, *lines[1:]])
    by_lower = {c.lower(): c for c in policy.codes}
    codes: list[str] = []
    unknown: list[str] = []
    for tok in _CODE_TOKEN_RE.findall(code_text):
        code = by_lower.get(tok.lower())
        if code is not None:
            if code not in codes:
                codes.append(code)
        elif re.fullmatch(r"[A-Za-z]{1,3}\d{1,3}", tok) and tok not in unknown:
            unknown.append(tok)
    return ParsedOutput("unsafe", tuple(codes), tuple(unknown))
