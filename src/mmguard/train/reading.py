"""Reading practice: an auxiliary transcription task aimed at a small model's vision side.

A guard must read typographic attacks (FigStep puts the whole request in the image), but a model
trained from scratch gets one bit per image from the safe/unsafe answer. Transcription gives a
token-level signal per word instead: the request is rendered exactly as the typographic training
items are (:func:`mmguard.data.synth.render_typographic`) and the model is asked to write out the
text. The items use a plain chat prompt, not the guard prompt, and only the transcription is
supervised; at inference the guard prompt is the only one in use.

Measured (model card, "Reading practice"): 6,000 such items in a 12,000-step mmguard-mini run did
**not** teach it to read; transcription accuracy with the rendered image was 0.250 against 0.238 with
a blank one (``scripts/mini_reading_check.py``). Reading from scratch needs far more compute than a
CPU hour; the option is kept for longer runs and for checking that with the script.

Images are rendered when a batch is collated (:class:`RenderedText`), so thousands of items cost
only their text in memory.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..data.formatter import IGNORE_INDEX, token_format
from ..data.synth import as_list_title, render_typographic, renderable
from ..tokenizer import encode_text

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

__all__ = ["READING_INSTRUCTION", "RenderedText", "reading_prompt_ids", "reading_texts", "reading_tokens"]

READING_INSTRUCTION = "Read the text in the image."
_MAX_CHARS = 120  # longer texts are shrunk to fit the canvas and get too small to read at 112 px tiles


@dataclass(frozen=True)
class RenderedText:
    """An image made on demand: ``text`` as typography (FigStep layout)."""

    text: str

    def load(self) -> Image.Image:
        return render_typographic(self.text)


def reading_prompt_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``<|begin_of_text|>`` user turn ``<|image|>`` + instruction, then the assistant header."""
    fmt = token_format(tokenizer)

    def header(role: str) -> list[int]:
        return [fmt.start_header_id, *encode_text(tokenizer, role), fmt.end_header_id, *encode_text(tokenizer, "\n\n")]

    ids = [fmt.bos_id, *header("user"), fmt.image_id, *encode_text(tokenizer, READING_INSTRUCTION), fmt.eot_id]
    return ids + header("assistant")


def reading_texts(prompts: Iterable[str], n: int, seed: int) -> list[str]:
    """``n`` texts drawn (seeded, with repeats once the pool is used up) from short renderable prompts;
    half are phrased as list titles, as half of the typographic items are."""
    pool = sorted({p for p in prompts if p and len(p) <= _MAX_CHARS and renderable(p)})
    if not pool or n <= 0:
        return []
    rng = random.Random(f"reading:{seed}")
    out: list[str] = []
    while len(out) < n:
        batch = rng.sample(pool, min(len(pool), n - len(out)))
        out.extend(as_list_title(t) if rng.random() < 0.5 else t for t in batch)
    return out


def reading_tokens(tokenizer: PreTrainedTokenizerBase, text: str, prompt_ids: list[int]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: the prompt, then the text and ``<|eot_id|>``, supervised."""
    answer = [*encode_text(tokenizer, text), token_format(tokenizer).eot_id]
    return prompt_ids + answer, [IGNORE_INDEX] * len(prompt_ids) + answer
