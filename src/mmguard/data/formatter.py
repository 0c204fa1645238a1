"""Training examples: prompt + target under a derived policy, with Meta's fine-tuning augmentations.

Training must see exactly what inference sees, so prompts come from the inference builder,
:func:`mmguard.prompt.build_prompt`, under a :class:`~mmguard.policy.Policy` derived per example.
From one labeled :class:`~mmguard.data.schema.Example` the :class:`Formatter` emits (reference:
llama-cookbook ``finetuning_data_formatter.py``, described in the format reference, section 3.4):

* ``original``: the full base policy, the item's label and codes.
* ``drop_nonviolated`` (A): a random non-empty subset of the non-violated categories is excluded
  (``Policy.excluded``, so the remaining codes keep their numbers, exactly as inference-time
  exclusion renders them); label and codes unchanged. At least one category stays.
* ``drop_violated`` (B, unsafe items with known codes only): every violated category plus a random
  subset (possibly empty, never all) of the non-violated ones is excluded; relabeled ``safe``. This
  teaches that only listed categories count.
* ``shuffle_codes`` (C): the active categories are put in a random order and renamed ``S1..Sn`` in
  that order; the target codes are remapped to the new names.

Target text: ``safe``, or ``unsafe\\n`` + violated codes comma-joined without spaces. **Codes are
listed in the policy's order** (the order the categories appear in the prompt), so ``S2`` precedes
``S10`` and, after shuffling, the target is in ascending new-code order. Meta's formatter instead
sorts code strings (``S10`` before ``S2``); we use policy order because it is what our parser and
evaluation expect and it does not depend on how codes are spelled.

Items labeled unsafe without a usable category (``meta.codes_status``) get the target ``unsafe``
and ``supervise_codes=False``: the loss covers the decision only, never a made-up code line. A and
B would need to know which categories are violated, so they run only when it is known (A may use
``meta.candidate_codes``: candidates are never dropped).

Randomness: one ``random.Random`` per example, seeded with ``f"{seed}:{example.id}"``: reproducible
across runs and machines, and independent of the order in which examples are formatted.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..conversation import Conversation
from ..model_format import TokenFormat
from ..policy import DEFAULT_POLICY, Category, Policy
from ..prompt import PromptFormat, RenderedPrompt, build_prompt
from ..tokenizer import encode_prompt
from .schema import DataError, Example

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "AugmentationConfig",
    "Formatter",
    "TokenizedExample",
    "TrainingExample",
    "drop_nonviolated",
    "drop_violated",
    "original",
    "shuffle_codes",
    "target_text",
    "tokenize",
]

IGNORE_INDEX = -100
Augmentation = Literal["original", "drop_nonviolated", "drop_violated", "shuffle_codes"]


@dataclass(frozen=True)
class TrainingExample:
    """One supervised example: render with ``build_prompt(conversation, policy)``, answer ``target``.

    ``codes`` are the violated codes in this example's policy (after any renaming);
    ``supervise_codes`` is False when the target is a bare ``unsafe`` whose categories are unknown.
    """

    conversation: Conversation
    policy: Policy
    target: str
    label: Literal["safe", "unsafe"]
    codes: tuple[str, ...]
    augmentation: Augmentation
    supervise_codes: bool = True
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def render(self, format: PromptFormat = PromptFormat.HF) -> RenderedPrompt:
        return build_prompt(self.conversation, self.policy, format=format)


def target_text(label: str, codes: Sequence[str], policy: Policy) -> str:
    """``safe`` or ``unsafe\\nS1,S3`` with ``codes`` in ``policy`` order; every code must be active."""
    if label == "safe":
        if codes:
            raise DataError(f"a safe target cannot list codes {list(codes)}")
        return "safe"
    if label != "unsafe":
        raise DataError(f"label must be 'safe' or 'unsafe', got {label!r}")
    active = policy.active_codes
    missing = [c for c in codes if c not in active]
    if missing:
        raise DataError(f"violated code(s) {missing} are not active in the policy ({', '.join(active)})")
    if not codes:
        return "unsafe"
    return "unsafe\n" + ",".join(c for c in active if c in set(codes))


def _check_codes(codes: Iterable[str], policy: Policy) -> tuple[str, ...]:
    codes = tuple(codes)
    missing = [c for c in codes if c not in policy.active_codes]
    if missing:
        raise DataError(
            f"code(s) {missing} are not active in the base policy ({', '.join(policy.active_codes)})"
        )
    return tuple(c for c in policy.active_codes if c in codes)


def original(
    conversation: Conversation,
    label: Literal["safe", "unsafe"],
    codes: Sequence[str],
    policy: Policy = DEFAULT_POLICY,
    *,
    supervise_codes: bool = True,
) -> TrainingExample:
    """The un-augmented example under ``policy``."""
    codes_t = _check_codes(codes, policy)
    return TrainingExample(
        conversation, policy, target_text(label, codes_t, policy), label, codes_t, "original", supervise_codes
    )


def drop_nonviolated(
    conversation: Conversation,
    label: Literal["safe", "unsafe"],
    codes: Sequence[str],
    drop: Iterable[str],
    policy: Policy = DEFAULT_POLICY,
    *,
    supervise_codes: bool = True,
) -> TrainingExample:
    """Augmentation A with an explicit choice: exclude ``drop`` (none of them violated); label unchanged."""
    codes_t = _check_codes(codes, policy)
    drop_s = set(drop)
    if drop_s & set(codes_t):
        raise DataError(f"drop_nonviolated cannot drop violated code(s) {sorted(drop_s & set(codes_t))}")
    derived = policy.exclude(drop_s)
    return TrainingExample(
        conversation,
        derived,
        target_text(label, codes_t, derived),
        label,
        codes_t,
        "drop_nonviolated",
        supervise_codes,
    )


def drop_violated(
    conversation: Conversation,
    codes: Sequence[str],
    also_drop: Iterable[str] = (),
    policy: Policy = DEFAULT_POLICY,
) -> TrainingExample:
    """Augmentation B with an explicit choice: exclude every violated code and ``also_drop``; label safe."""
    codes_t = _check_codes(codes, policy)
    if not codes_t:
        raise DataError("drop_violated needs the violated codes")
    derived = policy.exclude(set(codes_t) | set(also_drop))
    return TrainingExample(conversation, derived, "safe", "safe", (), "drop_violated", True)


def shuffle_codes(
    conversation: Conversation,
    label: Literal["safe", "unsafe"],
    codes: Sequence[str],
    order: Sequence[str],
    policy: Policy = DEFAULT_POLICY,
    *,
    supervise_codes: bool = True,
) -> TrainingExample:
    """Augmentation C with an explicit order: ``order`` lists the active codes in their new order; the
    category at position k is renamed ``S{k+1}`` and the violated codes are remapped accordingly."""
    codes_t = _check_codes(codes, policy)
    if sorted(order) != sorted(policy.active_codes):
        raise DataError(f"order must be a permutation of the active codes {list(policy.active_codes)}")
    rename = {old: f"S{k + 1}" for k, old in enumerate(order)}
    cats = tuple(
        Category(
            rename[old],
            policy.category(old).label,
            policy.category(old).title,
            policy.category(old).description,
        )
        for old in order
    )
    derived = Policy(
        categories=cats, include_descriptions=policy.include_descriptions, name=f"{policy.name} (shuffled)"
    )
    new_codes = tuple(c for c in derived.codes if c in {rename[o] for o in codes_t})
    return TrainingExample(
        conversation,
        derived,
        target_text(label, new_codes, derived),
        label,
        new_codes,
        "shuffle_codes",
        supervise_codes,
        meta={"code_map": rename},
    )


@dataclass(frozen=True)
class AugmentationConfig:
    """Probability of emitting each augmentation per example (1.0 = always, as Meta does for A and B)."""

    drop_nonviolated: float = 1.0
    drop_violated: float = 1.0
    shuffle_codes: float = 1.0


class Formatter:
    """Turns labeled examples into training examples (original + augmentations), seeded per example."""

    def __init__(
        self,
        policy: Policy = DEFAULT_POLICY,
        config: AugmentationConfig = AugmentationConfig(),
        seed: int = 42,
    ) -> None:
        self.policy = policy
        self.config = config
        self.seed = seed

    def rng_for(self, example_id: str) -> random.Random:
        return random.Random(f"{self.seed}:{example_id}")

    def format(self, example: Example, base_dir: Path | str | None = None) -> list[TrainingExample]:
        """The original, then A, B and C as configured and applicable (see the module docstring)."""
        conv = example.to_conversation(base_dir)
        rng = self.rng_for(example.id)
        label = example.label
        codes = _check_codes(example.codes, self.policy)
        known = label == "safe" or bool(codes)
        candidates = example.meta.get("candidate_codes", [])
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise TypeError("meta.candidate_codes must be a list of category codes")  # "S1" read as 'S', '1'
        cands = tuple(c for c in candidates if c in self.policy.active_codes)
        base_meta = {"example_id": example.id, "source": example.source, "split": example.split}
        out = [original(conv, label, codes, self.policy, supervise_codes=known)]

        # A: drop some categories that are surely not violated
        protected = set(codes) | (set(cands) if label == "unsafe" else set())
        nonviolated = [c for c in self.policy.active_codes if c not in protected]
        if rng.random() < self.config.drop_nonviolated and nonviolated and (known or cands):
            n = rng.randint(1, len(nonviolated))
            if n == len(self.policy.active_codes):
                n -= 1
            if n:
                drop = rng.sample(nonviolated, n)
                out.append(drop_nonviolated(conv, label, codes, drop, self.policy, supervise_codes=known))

        # B: drop the violated categories (and some others): nothing listed is violated any more
        if rng.random() < self.config.drop_violated and label == "unsafe" and codes and not cands:
            others = [c for c in self.policy.active_codes if c not in codes]
            if others:
                k = rng.randint(0, len(others) - 1)
                out.append(drop_violated(conv, codes, rng.sample(others, k), self.policy))

        # C: shuffle and rename the codes
        if rng.random() < self.config.shuffle_codes:
            order = list(self.policy.active_codes)
            rng.shuffle(order)
            out.append(shuffle_codes(conv, label, codes, order, self.policy, supervise_codes=known))

        for t in out:
            t.meta.update(base_meta)
        return out

    def format_all(
        self, examples: Iterable[Example], base_dir: Path | str | None = None
    ) -> Iterator[TrainingExample]:
        for ex in examples:
            yield from self.format(ex, base_dir)


@dataclass(frozen=True)
class TokenizedExample:
    """``labels`` equals ``input_ids`` on the answer and :data:`IGNORE_INDEX` on the prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    image: Image.Image | None = None


def token_format(tokenizer: PreTrainedTokenizerBase) -> TokenFormat:
    """The tokenizer's :class:`TokenFormat`, made once per tokenizer object."""
    fmt = _FORMATS.get(tokenizer)
    if fmt is None:
        fmt = _FORMATS[tokenizer] = TokenFormat(tokenizer)
    return fmt


_FORMATS: weakref.WeakKeyDictionary[Any, TokenFormat] = weakref.WeakKeyDictionary()


def tokenize(
    tokenizer: PreTrainedTokenizerBase, example: TrainingExample, *, format: PromptFormat = PromptFormat.HF
) -> TokenizedExample:
    """Prompt ids via :func:`mmguard.tokenizer.encode_prompt`; answer ``\\n\\n`` + target + ``<|eot_id|>``.

    Only the answer is supervised. In the NATIVE format the prompt already ends with ``\\n\\n``, so the
    answer starts at the target. When ``supervise_codes`` is False the answer is the bare decision
    (``\\n\\nunsafe``) without ``<|eot_id|>``, so the model is never taught to stop without codes.
    """
    rendered = example.render(format)
    prompt_ids = encode_prompt(tokenizer, rendered)
    answer_ids = token_format(tokenizer).answer_ids(rendered.decision_prefix, example.target,
                                                    stop=example.supervise_codes)
    return TokenizedExample(
        input_ids=prompt_ids + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        prompt_length=len(prompt_ids),
        image=example.conversation.image,
    )
