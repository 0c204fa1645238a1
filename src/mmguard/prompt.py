"""The Llama Guard 3 Vision prompt, byte for byte.

:func:`build_prompt` reproduces the official Hugging Face chat template of
``meta-llama/Llama-Guard-3-11B-Vision`` (README, "Prompt format"): one user turn that carries
the task, the category list, the conversation as ``User:``/``Agent:`` paragraphs and the
instructions, ending right after the assistant header. Two known variants are selectable:

* ``PromptFormat.HF`` (default): the current template (``<BEGIN UNSAFE CONTENT CATEGORIES>``).
* ``PromptFormat.HF_RELEASE``: the release-day rendering with the ``UNSAFECONTENT`` typo.
* ``PromptFormat.NATIVE``: Meta's llama-models reference layout (no space after ``<|image|>``, a
  newline before ``<|eot_id|>``, and ``\\n\\n`` already after the assistant header).

The prompt is returned as segments (template-owned special tokens vs text) so that tokenisation can
never turn user text into control tokens (see :mod:`mmguard.tokenizer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .conversation import Conversation
from .policy import DEFAULT_POLICY, Policy

__all__ = ["MarkerHandling", "PromptFormat", "RenderedPrompt", "Segment", "build_prompt"]


class PromptFormat(str, Enum):
    HF = "hf"
    HF_RELEASE = "hf-release"
    NATIVE = "native"


class MarkerHandling(str, Enum):
    """What to do when conversation text spells one of the prompt's section markers.

    ``ESCAPE`` (default) rewrites ``<END CONVERSATION>`` and the other section markers inside user or
    agent text to ``(END CONVERSATION)`` so that text cannot close the conversation block and forge
    instructions; the prompt is otherwise byte-identical. ``KEEP`` renders text verbatim, exactly as
    the official template would. ``REJECT`` raises :class:`PromptInjectionError`.
    """

    ESCAPE = "escape"
    KEEP = "keep"
    REJECT = "reject"


class PromptInjectionError(ValueError):
    pass


_MARKER_RE = re.compile(
    r"<(\s*(?:BEGIN|END)\s*(?:UNSAFE\s*CONTENT\s*CATEGORIES|CONVERSATION)\s*)>", re.IGNORECASE
)


@dataclass(frozen=True)
class Segment:
    text: str
    special: bool = False


@dataclass(frozen=True)
class RenderedPrompt:
    segments: tuple[Segment, ...]
    role: str  # "User" or "Agent"
    has_image: bool
    format: PromptFormat
    escaped_markers: int = 0

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def decision_prefix(self) -> str:
        """Text the model writes before ``safe``/``unsafe``: ``\\n\\n`` in the HF formats, nothing in NATIVE."""
        return "" if self.format is PromptFormat.NATIVE else "\n\n"


def _escape_markers(text: str, handling: MarkerHandling) -> tuple[str, int]:
    if handling is MarkerHandling.KEEP:
        return text, 0
    found = _MARKER_RE.findall(text)
    if not found:
        return text, 0
    if handling is MarkerHandling.REJECT:
        raise PromptInjectionError(
            f"conversation text contains the prompt section marker <{found[0]}>; "
            "use marker handling 'escape' or 'keep' to accept it"
        )
    return _MARKER_RE.sub(r"(\1)", text), len(found)


def build_prompt(
    conversation: Conversation,
    policy: Policy = DEFAULT_POLICY,
    *,
    format: PromptFormat = PromptFormat.HF,
    markers: MarkerHandling = MarkerHandling.ESCAPE,
) -> RenderedPrompt:
    """Render ``conversation`` under ``policy`` exactly as the official chat template does."""
    fmt = PromptFormat(format)
    markers = MarkerHandling(markers)
    role = "User" if len(conversation.turns) % 2 == 1 else "Agent"
    parts: list[Segment] = []
    pending: list[str] = []  # text since the last special token, joined once (appending to a string each time
    # took time quadratic in the number of texts: 400,000 empty parts took 16 s)

    def special(tok: str) -> None:
        if pending:
            parts.append(Segment("".join(pending)))
            pending.clear()
        parts.append(Segment(tok, special=True))

    def text(s: str) -> None:
        pending.append(s)

    special("<|begin_of_text|>")
    special("<|start_header_id|>")
    text("user")
    special("<|end_header_id|>")
    text("\n\n")
    if conversation.has_image:
        special("<|image|>")
        if fmt is not PromptFormat.NATIVE:
            text(" ")
    text(
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
        "policy with the below categories.\n\n"
    )
    # the release-day rendering lacked the space (reference 1.3)
    text("<BEGIN UNSAFECONTENT CATEGORIES>\n" if fmt is PromptFormat.HF_RELEASE
         else "<BEGIN UNSAFE CONTENT CATEGORIES>\n")
    for cat in policy.active:
        # a policy's text never opens or closes a section (a per-request policy is a client's text)
        value = _MARKER_RE.sub(r"(\1)", policy.prompt_value(cat))
        text(f"{cat.code}: {value}\n")
    text("<END UNSAFE CONTENT CATEGORIES>\n\n")
    text("<BEGIN CONVERSATION>\n\n")
    escaped = 0
    for turn in conversation.turns:
        speaker = "User" if turn.role == "user" else "Agent"
        for s in turn.texts:
            s, n = _escape_markers(s, markers)
            escaped += n
            # Jinja's |trim is Python's str.strip()
            text(f"{speaker}: {s.strip()}\n\n")
    text("<END CONVERSATION>\n\n")
    text(f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n")
    text(" - First line must read 'safe' or 'unsafe'.\n")
    text(" - If unsafe, a second line must include a comma-separated list of violated categories.")
    text("\n" if fmt is PromptFormat.NATIVE else " ")
    special("<|eot_id|>")
    special("<|start_header_id|>")
    text("assistant")
    special("<|end_header_id|>")
    if fmt is PromptFormat.NATIVE:
        text("\n\n")
    if pending:
        parts.append(Segment("".join(pending)))
    return RenderedPrompt(tuple(parts), role, conversation.has_image, fmt, escaped)
