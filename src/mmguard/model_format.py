"""A guard model family's token facts, read from its tokenizer: the one place they live.

Every Llama Guard style model answers in the same words (``safe``, or ``unsafe`` then a line of codes)
inside the same template, but each tokenizer spells them with its own ids: Llama 3 writes ``unsafe`` as
one token (39257) and ``S10`` as ``S`` + ``10``; SmolLM2 (mmguard-mini v2) writes ``unsafe`` as ``uns`` +
``afe`` and ``S10`` as ``S`` + ``1`` + ``0``. :class:`TokenFormat` derives everything the engine and the
trainer need from the checkpoint's tokenizer:

* the template's special tokens (:data:`SPECIAL_TOKENS`), looked up by name;
* the answer token paths, segmented the way the engine continues them (decision prefix, answer word,
  newline, first code, ``,`` + each later code, end of turn), so training targets and scoring agree;
* the *decision position*: the first token where ``safe`` and ``unsafe`` differ. P(unsafe) is the
  probability of ``unsafe``'s token there; tokens the two words share are part of the decision prefix;
* the category-code trie, in which a code may be a prefix of another (``S1`` / ``S10``).

A tokenizer that cannot tell the answers apart (one word a prefix of the other) is refused at load with
a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = [
    "ANSWER_SAFE",
    "ANSWER_UNSAFE",
    "SPECIAL_TOKENS",
    "CodeTrie",
    "FormatError",
    "TokenFormat",
]

ANSWER_SAFE = "safe"
ANSWER_UNSAFE = "unsafe"
CODE_SEPARATOR = ","


@dataclass(frozen=True)
class SpecialTokens:
    """Names of the template's control tokens (Llama 3's; other families add them under these names)."""

    begin: str = "<|begin_of_text|>"
    start_header: str = "<|start_header_id|>"
    end_header: str = "<|end_header_id|>"
    end_of_turn: str = "<|eot_id|>"
    image: str = "<|image|>"
    pad: str = "<|finetune_right_pad_id|>"

    def names(self) -> tuple[str, ...]:
        return (self.begin, self.start_header, self.end_header, self.end_of_turn, self.image, self.pad)


SPECIAL_TOKENS = SpecialTokens()


class FormatError(ValueError):
    """The tokenizer cannot express the guard's answer format."""


def _encode(tokenizer: Any, text: str) -> list[int]:
    from .tokenizer import encode_text

    return encode_text(tokenizer, text)


def _special(tokenizer: Any, name: str) -> int:
    from .tokenizer import special_id

    try:
        i = special_id(tokenizer, name)
    except ValueError:
        raise FormatError(f"the tokenizer has no special token {name}; a guard tokenizer needs "
                          f"{', '.join(SPECIAL_TOKENS.names()[:5])} as special tokens") from None
    if i in _encode(tokenizer, name):  # an added token not marked special matches in any text
        raise FormatError(f"the tokenizer's {name} (id {i}) is not marked special, so user text spelling it would "
                          "become that control token; mark it \"special\": true in tokenizer.json's added_tokens")
    return i


@dataclass(frozen=True)
class CodeTrie:
    """Token paths of a policy's codes: ``first`` right after ``unsafe\\n``, ``later`` after a comma
    (``,S3`` is tokenized as one piece, as the model writes it)."""

    codes: tuple[str, ...]
    first: dict[str, tuple[int, ...]]
    later: dict[str, tuple[int, ...]]

    @cached_property
    def shared_first_prefix(self) -> tuple[int, ...]:
        """Tokens every first code starts with, short of the token that tells codes apart (``S``)."""
        paths = list(self.first.values())
        limit = min(len(p) for p in paths) - 1  # always leave one token to choose
        prefix: list[int] = []
        for j in range(limit):
            tok = paths[0][j]
            if any(p[j] != tok for p in paths):
                break
            prefix.append(tok)
        return tuple(prefix)

    @cached_property
    def inner_first_paths(self) -> tuple[tuple[int, ...], ...]:
        """Paths (after the shared prefix) that end inside the first-code trie at a complete code that
        other codes extend (Llama 3: none; SmolLM2: ``1``, since ``S1`` is a prefix of ``S10``..``S13``).
        A category's probability there needs the probability of ending the code, read one step further."""
        k = len(self.shared_first_prefix)
        tails = {c: p[k:] for c, p in self.first.items()}
        inner = [t for t in tails.values() if any(len(o) > len(t) and o[:len(t)] == t for o in tails.values())]
        return tuple(sorted(set(inner)))


class TokenFormat:
    """Token ids and answer paths of one tokenizer (see the module doc)."""

    def __init__(self, tokenizer: Any, *, pad_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.bos_id = _special(tokenizer, SPECIAL_TOKENS.begin)
        self.start_header_id = _special(tokenizer, SPECIAL_TOKENS.start_header)
        self.end_header_id = _special(tokenizer, SPECIAL_TOKENS.end_header)
        self.eot_id = _special(tokenizer, SPECIAL_TOKENS.end_of_turn)
        self.image_id = _special(tokenizer, SPECIAL_TOKENS.image)
        self.pad_id = pad_id if pad_id is not None else _special(tokenizer, SPECIAL_TOKENS.pad)
        self.safe_ids = tuple(_encode(tokenizer, ANSWER_SAFE))
        self.unsafe_ids = tuple(_encode(tokenizer, ANSWER_UNSAFE))
        self.newline_ids = tuple(_encode(tokenizer, "\n"))
        d = 0
        while d < min(len(self.safe_ids), len(self.unsafe_ids)) and self.safe_ids[d] == self.unsafe_ids[d]:
            d += 1
        if d == len(self.safe_ids) or d == len(self.unsafe_ids):
            raise FormatError(f"the tokenizer writes {ANSWER_SAFE!r} as {list(self.safe_ids)} and {ANSWER_UNSAFE!r} "
                              f"as {list(self.unsafe_ids)}: no token tells them apart")
        self.decision_index = d
        self.safe_decision_id = self.safe_ids[d]
        self.unsafe_decision_id = self.unsafe_ids[d]
        self._prefix_cache: dict[str, tuple[int, ...]] = {}
        self._trie_cache: dict[tuple[str, ...], CodeTrie] = {}

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Every control token of the tokenizer (never to be produced from user text or by attacks)."""
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        ids.update(int(i) for i, tok in added.items() if getattr(tok, "special", True))
        ids.update({self.bos_id, self.start_header_id, self.end_header_id, self.eot_id, self.image_id, self.pad_id})
        return frozenset(ids)

    def decision_prefix_ids(self, prefix: str) -> tuple[int, ...]:
        """Ids fed before the decision position: the template's decision prefix (``\\n\\n``) and the
        tokens ``safe`` and ``unsafe`` share (none for Llama 3 and SmolLM2)."""
        if prefix not in self._prefix_cache:
            self._prefix_cache[prefix] = (*_encode(self.tokenizer, prefix), *self.safe_ids[:self.decision_index])
        return self._prefix_cache[prefix]

    def trie(self, codes: Sequence[str]) -> CodeTrie:
        key = tuple(codes)
        if key not in self._trie_cache:
            first = {c: tuple(_encode(self.tokenizer, c)) for c in key}
            later = {c: tuple(_encode(self.tokenizer, CODE_SEPARATOR + c)) for c in key}
            if len(set(first.values())) < len(key):
                raise FormatError(f"two of the codes {list(key)} have the same tokens")
            self._trie_cache[key] = CodeTrie(key, first, later)
        return self._trie_cache[key]

    def answer_ids(self, prefix: str, target: str, *, stop: bool = True) -> list[int]:
        """Ids of an answer as the engine reads and continues it, segment by segment: ``prefix`` (the
        decision prefix), the answer word, then for ``unsafe\\nS1,S3`` the newline, the first code and
        ``,`` + each later code; end of turn when ``stop``. ``target`` is ``safe``, ``unsafe`` (the bare
        decision) or ``unsafe\\n`` + comma-separated codes. The training target of the data formatter."""
        word, _, codes_line = target.partition("\n")
        if word not in (ANSWER_SAFE, ANSWER_UNSAFE) or (word == ANSWER_SAFE and codes_line):
            raise FormatError(f"not a guard answer: {target!r}")
        ids = list(self.decision_prefix_ids(prefix))
        ids += (self.safe_ids if word == ANSWER_SAFE else self.unsafe_ids)[self.decision_index:]
        if codes_line:
            codes = codes_line.split(CODE_SEPARATOR)
            ids += self.newline_ids
            ids += _encode(self.tokenizer, codes[0])
            for c in codes[1:]:
                ids += _encode(self.tokenizer, CODE_SEPARATOR + c)
        if stop:
            ids.append(self.eot_id)
        return ids
