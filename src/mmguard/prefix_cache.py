"""An exact prefix cache for the guard: reuse the KV of prompt prefixes already computed.

Two kinds of reuse, both found the same way (the longest common token prefix with a kept entry):

* **The template prefix** (text-only): the prompt up to the conversation — the task line and the category
  block, ~250 tokens with the 13 MLCommons categories — is the same for every request with the same policy
  and judged role. Its KV is computed once ("anchor", pinned) and every text-only row starts from it.
* **The conversation so far**: each scored row's whole KV is kept (LRU, bounded in tokens). A later check of
  the same conversation with a longer answer (a streamed answer checked every N tokens) shares everything up
  to the last word of the previous answer, so only the new answer tokens plus the closing part of the
  template (``<END CONVERSATION>`` ... the assistant header and ``\\n\\n``, which follow the answer and so
  must be recomputed) run through the model.

Image rows: every token after ``<|image|>`` depends on the image through cross-attention, so an image row
reuses only entries of the same image (keyed by a hash of its decoded pixels; the entry also keeps the
cross-attention KV, so a hit skips the vision encoder too). There is no cross-image anchor.

Exactness: a reused KV is the KV of exactly the same tokens at the same positions (matched by token id, so
tokenisation changes at the answer's end are handled: the match stops where the ids differ), and the rows of
a batch are laid out ``[pad][reused prefix][pad][new tokens]`` with an attention mask and position ids that
give each row the same attention as its unpadded sequence. Results equal the plain engine's within float
rounding (tested to 1e-5 on tiny models). The plain engine's decision and category decode (``Engine.score``)
run unchanged on top: this class only replaces its ``collate`` / ``decision_pass`` hooks.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .engine import EncodedItem, Engine, ScoredItem, _cache_of
from .images import image_digest
from .prompt import RenderedPrompt, Segment
from .tokenizer import encode_prompt

__all__ = ["DEFAULT_PREFIX_CACHE_TOKENS", "PrefixCacheStats", "PrefixCachingEngine", "enable_prefix_cache"]

_CONVERSATION_START = "<BEGIN CONVERSATION>\n\n"
_CONVERSATION_END = "<END CONVERSATION>"
_SAME_CONVERSATION_SLACK = 16  # tokens: a re-check of one conversation matches its entry up to about its end
_MIN_REUSE = 8  # shorter matches are not worth the copying
# the budget of a guard loaded with prefix_cache=True: ~380 MB on mmguard-mini v2 (fp32), ~1.1 GB on the 11B (bf16)
DEFAULT_PREFIX_CACHE_TOKENS = 8192


@dataclass
class _Entry:
    """The KV of one token sequence (real tokens only, positions 0..len-1)."""

    ids: tuple[int, ...]
    image_key: str | None
    keys: list[torch.Tensor | None]  # per layer, (1, kv_heads, len, head_dim); cross layers: the image's KV
    values: list[torch.Tensor | None]
    cross_row: torch.Tensor | None  # (1, max_tiles) cross-attention mask of tokens after the image
    pinned: bool = False  # a template anchor
    body_end: int = 0  # where the template's closing part starts (the conversation ends)
    image_tokens: int = 0  # the image's cross-attention keys and values, in tokens of self-attention cache

    @property
    def tokens(self) -> int:
        """What the entry holds, in tokens of self-attention cache (``max_tokens`` counts these): an image entry's
        cross-attention keys and values weigh as much as thousands of tokens (about 210 MB for the 11B in bf16),
        and went uncounted (12 images under a 2,048-token bound held 26 MiB, 16,825 bytes a counted token)."""
        return len(self.ids) + self.image_tokens


@dataclass
class PrefixCacheStats:
    rows: int = 0  # rows scored
    hits: int = 0  # rows that reused a prefix
    reused_tokens: int = 0  # tokens not recomputed
    computed_tokens: int = 0  # tokens run through the model (anchors included)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


MAX_MEMO = 256  # template parts whose token ids are kept (per table)


def _memo(table: OrderedDict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``table[key]``, made on a miss; the table keeps the ``MAX_MEMO`` most recently used."""
    if key in table:
        table.move_to_end(key)
        return table[key]
    value = table[key] = make()
    while len(table) > MAX_MEMO:
        table.popitem(last=False)
    return value


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Plan:
    """How one row of a batch is computed: reuse ``reuse`` tokens of ``entry``, compute the rest."""

    entry: _Entry | None
    reuse: int
    image_key: str | None
    anchor: tuple[int, ...] | None
    body_end: int = 0

    def new_anchor(self, item: EncodedItem) -> bool:
        return self.anchor is not None and len(self.anchor) < len(item.input_ids)


class PrefixCachingEngine(Engine):
    """:class:`mmguard.engine.Engine` with the prefix cache (see the module doc). Build with :meth:`from_engine`."""

    max_tokens: int
    stats: PrefixCacheStats

    @classmethod
    def from_engine(cls, engine: Engine, *, max_tokens: int = 32768, max_anchors: int = 32) -> PrefixCachingEngine:
        """The same model, tokenizer and settings as ``engine`` (nothing is copied or loaded again)."""
        new = cls.__new__(cls)
        new.__dict__.update(engine.__dict__)
        new._setup_prefix_cache(max_tokens, max_anchors)
        return new

    def _setup_prefix_cache(self, max_tokens: int, max_anchors: int) -> None:
        if not (isinstance(max_tokens, int) and max_tokens >= 1):  # NaN or inf would bound nothing
            raise ValueError(f"max_tokens must be a whole number of tokens >= 1, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.max_anchors = max_anchors
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], _Entry] = OrderedDict()
        self._anchors: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        # token ids by template part, least recently used first: a policy is part of the key, and a server that takes
        # per-request policies sees any number of them (each kept its ~60 KB for ever before they were bounded)
        self._anchor_ids: OrderedDict[tuple[Segment, ...], tuple[int, ...]] = OrderedDict()
        self._closing: OrderedDict[tuple[Segment, ...], int] = OrderedDict()
        self._lock = threading.RLock()
        cross = set(getattr(self.model.config.text_config, "cross_attention_layers", []) or [])
        self._n_layers = int(self.model.config.text_config.num_hidden_layers)
        self._cross_layers = cross

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> int:
        return sum(e.tokens for e in self._entries.values()) + sum(e.tokens for e in self._anchors.values())

    def clear_prefix_cache(self) -> None:
        with self._lock:
            self._entries.clear()
            self._anchors.clear()

    def _evict(self) -> None:
        while self._entries and self.cached_tokens > self.max_tokens:
            self._entries.popitem(last=False)
        while len(self._anchors) > self.max_anchors or (self._anchors and self.cached_tokens > self.max_tokens):
            self._anchors.popitem(last=False)

    def anchor_ids(self, prompt: RenderedPrompt) -> tuple[int, ...] | None:
        """Token ids of the prompt up to the conversation (text-only prompts; None if there is no such point)."""
        if prompt.has_image:
            return None
        cut: list[Segment] = []
        for seg in prompt.segments:
            if not seg.special and _CONVERSATION_START in seg.text:
                end = seg.text.index(_CONVERSATION_START) + len(_CONVERSATION_START)
                cut.append(Segment(seg.text[:end]))
                break
            cut.append(seg)
        else:
            return None
        key = tuple(cut)
        return _memo(self._anchor_ids, key, lambda: tuple(encode_prompt(self.tokenizer, RenderedPrompt(
            key, prompt.role, prompt.has_image, prompt.format))))

    def closing_len(self, prompt: RenderedPrompt) -> int:
        """Tokens of the template's closing part (``<END CONVERSATION>`` to the end), 0 if there is none."""
        tail: list[Segment] = []
        for seg in reversed(prompt.segments):
            if not seg.special and _CONVERSATION_END in seg.text:
                tail.append(Segment(seg.text[seg.text.rindex(_CONVERSATION_END):]))
                break
            tail.append(seg)
        else:
            return 0
        key = (*reversed(tail), Segment(prompt.decision_prefix))
        return _memo(self._closing, key, lambda: len(encode_prompt(
            self.tokenizer, RenderedPrompt(key[:-1], prompt.role, prompt.has_image, prompt.format)))
            + len(self.decision_prefix_ids(prompt.decision_prefix)))

    def _plan(self, item: EncodedItem) -> _Plan:
        ids = item.input_ids
        limit = len(ids) - 1  # the decision position is always computed
        image_key = image_digest(item.image) if item.image is not None else None
        anchor = self.anchor_ids(item.prompt) if image_key is None else None
        if anchor is not None and tuple(ids[:len(anchor)]) != anchor:
            # the tokenizer merged across the boundary (SmolLM2 writes the "\n\n" before "User:" as two
            # tokens, alone as one): anchor on the tokens both share, whose KV does not depend on what follows
            shared = _common_prefix(anchor, ids)
            anchor = anchor[:shared] if shared >= _MIN_REUSE else None
        best: _Entry | None = None
        best_len = 0
        probe = len(anchor) if anchor is not None else 0
        for entry in self._entries.values():
            if entry.image_key != image_key:
                continue
            if probe and (len(entry.ids) <= probe or probe >= len(ids) or entry.ids[probe] != ids[probe]):
                continue  # another conversation under the same template: the anchor does as well
            n = min(_common_prefix(entry.ids, ids), limit)
            if n > best_len:
                best, best_len = entry, n
        if anchor is not None and len(anchor) >= best_len and len(anchor) <= limit:
            pinned = self._anchors.get(anchor)
            if pinned is not None:
                self._anchors.move_to_end(anchor)
                best, best_len = pinned, len(anchor)
            else:
                best, best_len = None, 0  # the anchor is computed first (see collate)
        if best is not None and best_len < _MIN_REUSE:
            best, best_len = None, 0
        return _Plan(best, best_len, image_key, anchor, len(ids) - self.closing_len(item.prompt))

    # -- the hooks -------------------------------------------------------------------------------
    def score(self, items: Sequence[EncodedItem], **kwargs: Any) -> list[ScoredItem]:
        with self._lock:  # one model thread in the server; the lock keeps other callers consistent too
            return super().score(items, **kwargs)

    def decode_codes(self, items: Sequence[EncodedItem], codes: Sequence[str],
                     max_steps: int | None = None) -> list[tuple[tuple[str, ...], dict[str, float], str]]:
        with self._lock:
            return super().decode_codes(items, codes, max_steps)

    def collate(self, items: Sequence[EncodedItem], extra: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        if extra:  # not a scoring batch: the plain layout
            return super().collate(items, extra)
        plans = [self._plan(it) for it in items]
        for it, plan in zip(items, plans, strict=True):
            if plan.entry is None and plan.anchor is not None and len(plan.anchor) < len(it.input_ids):
                plan.entry, plan.reuse = self._compute_anchor(plan.anchor), len(plan.anchor)
        with_image = items[0].image is not None
        if all(p.entry is None for p in plans) or (with_image and any(p.entry is None for p in plans)):
            batch = super().collate(items)  # nothing to reuse, or an image row must run the vision encoder
            batch["_prefix_rows"] = (list(items), [_Plan(None, 0, p.image_key, p.anchor, p.body_end) for p in plans])
            return batch
        return self._collate_reusing(items, plans)

    def decision_pass(self, batch: dict[str, Any], *, use_cache: bool) -> tuple[Any, torch.Tensor]:
        rows = batch.pop("_prefix_rows", None)
        past = batch.pop("_prefix_past", None)
        if rows is None:  # a batch this class did not collate
            return super().decision_pass(batch, use_cache=use_cache)
        kwargs = dict(batch)
        if past is not None:
            kwargs["cache"] = past
        out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        self._store(rows, batch, _cache_of(out), counted=past is not None)
        return out, out.logits[:, -1, :]

    # -- building batches ------------------------------------------------------------------------
    @torch.inference_mode()
    def _compute_anchor(self, ids: tuple[int, ...]) -> _Entry:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                         position_ids=torch.arange(len(ids), device=self.device)[None], use_cache=True,
                         logits_to_keep=1)
        cache = _cache_of(out)
        keys, values = self._layer_tensors(cache, 0, torch.arange(len(ids), device=self.device), with_cross=False)
        entry = _Entry(ids, None, keys, values, None, pinned=True)
        self._anchors[ids] = entry
        self.stats.computed_tokens += len(ids)
        self._evict()
        return entry

    def _layer_tensors(self, cache: Any, row: int, real: torch.Tensor,
                       with_cross: bool) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        keys: list[torch.Tensor | None] = []
        values: list[torch.Tensor | None] = []
        # a one-row batch with no padding (a streamed re-check): keep the cache's own tensors, no copy (the
        # cache is dropped after the call and DynamicCache extends by concatenation, never in place)
        self_keys = cache.layers[next(i for i in range(self._n_layers) if i not in self._cross_layers)].keys
        whole = self_keys.shape[0] == 1 and real.numel() == self_keys.shape[2]
        for idx in range(self._n_layers):
            layer = cache.layers[idx]
            if whole and idx not in self._cross_layers:
                keys.append(layer.keys)
                values.append(layer.values)
                continue
            if idx in self._cross_layers:
                if with_cross:
                    keys.append(layer.keys[row:row + 1].clone())
                    values.append(layer.values[row:row + 1].clone())
                else:
                    keys.append(None)
                    values.append(None)
                continue
            keys.append(layer.keys[row:row + 1, :, real].clone())
            values.append(layer.values[row:row + 1, :, real].clone())
        return keys, values

    def _collate_reusing(self, items: Sequence[EncodedItem], plans: list[_Plan]) -> dict[str, Any]:
        from transformers import DynamicCache

        n = len(items)
        reuse = [p.reuse if p.entry is not None else 0 for p in plans]
        fresh = [list(it.input_ids[r:]) for it, r in zip(items, reuse, strict=True)]
        width_past, width_new = max(reuse), max(len(f) for f in fresh)
        ids = torch.full((n, width_new), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width_past + width_new), dtype=torch.long)
        pos = torch.zeros((n, width_new), dtype=torch.long)
        for i, (r, f) in enumerate(zip(reuse, fresh, strict=True)):
            ids[i, width_new - len(f):] = torch.tensor(f, dtype=torch.long)
            mask[i, width_past - r:width_past] = 1
            mask[i, width_past + width_new - len(f):] = 1
            pos[i, width_new - len(f):] = torch.arange(r, r + len(f))
        with_image = items[0].image is not None
        data: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        ref = next(p.entry for p in plans if p.entry is not None)
        assert ref is not None
        for idx in range(self._n_layers):
            if idx in self._cross_layers:
                if with_image:  # every row has an entry of its own image (collate checked)
                    data.append((torch.cat([p.entry.keys[idx] for p in plans], 0),  # type: ignore[union-attr, misc]
                                 torch.cat([p.entry.values[idx] for p in plans], 0)))  # type: ignore[union-attr, misc]
                else:
                    data.append((None, None))
                continue
            k_ref = ref.keys[idx]
            assert k_ref is not None
            if n == 1:  # one row: its entry's tensors as they are (a view; the forward concatenates)
                data.append((k_ref[:, :, :reuse[0]], ref.values[idx][:, :, :reuse[0]]))  # type: ignore[index]
                continue
            shape = (n, k_ref.shape[1], width_past, k_ref.shape[3])
            k = torch.zeros(shape, dtype=k_ref.dtype, device=k_ref.device)
            v = torch.zeros(shape, dtype=k_ref.dtype, device=k_ref.device)
            for i, (p, r) in enumerate(zip(plans, reuse, strict=True)):
                if p.entry is None or r == 0:
                    continue
                k[i, :, width_past - r:] = p.entry.keys[idx][0, :, :r]  # type: ignore[index]
                v[i, :, width_past - r:] = p.entry.values[idx][0, :, :r]  # type: ignore[index]
            data.append((k, v))
        past = DynamicCache(ddp_cache_data=data, config=self.model.config)
        batch: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                                 "position_ids": pos.to(self.device)}
        if with_image:
            rows = [p.entry.cross_row for p in plans]  # type: ignore[union-attr]
            cross = torch.zeros((n, width_new, 1, rows[0].shape[-1]), dtype=rows[0].dtype)  # type: ignore[union-attr]
            for i, (f, row) in enumerate(zip(fresh, rows, strict=True)):
                cross[i, width_new - len(f):, 0] = row.cpu()  # type: ignore[union-attr]
            batch["cross_attention_mask"] = cross.to(self.device)
        for r, f in zip(reuse, fresh, strict=True):
            self.stats.rows += 1
            self.stats.hits += int(r > 0)
            self.stats.reused_tokens += r
            self.stats.computed_tokens += len(f)
        batch["_prefix_rows"] = (list(items), plans)
        batch["_prefix_past"] = past
        return batch

    # -- keeping what was computed ---------------------------------------------------------------
    def _image_tokens(self, keys: list[torch.Tensor | None], values: list[torch.Tensor | None], length: int) -> int:
        """The cross-attention layers' tensors of an entry, in tokens of its self-attention layers' size."""
        def size(cross_layers: bool) -> int:
            return sum(t.numel() * t.element_size() for i in range(self._n_layers) for t in (keys[i], values[i])
                       if t is not None and (i in self._cross_layers) == cross_layers)

        cross = size(True)
        per_token = size(False) / max(1, length)
        return math.ceil(cross / per_token) if cross and per_token else 0

    def _store(self, rows: tuple[list[EncodedItem], list[_Plan]], batch: dict[str, Any], cache: Any,
               counted: bool) -> None:
        items, plans = rows
        mask = batch["attention_mask"]
        cross = batch.get("cross_attention_mask")
        if not counted:  # a plain batch
            for it in items:
                self.stats.rows += 1
                self.stats.computed_tokens += len(it.input_ids)
        for i, (it, plan) in enumerate(zip(items, plans, strict=True)):
            real = torch.nonzero(mask[i], as_tuple=True)[0]
            if real.numel() != len(it.input_ids):  # cannot happen; never keep a misaligned entry
                continue
            keys, values = self._layer_tensors(cache, i, real, with_cross=it.image is not None)
            cross_row = cross[i, -1, 0].clone()[None] if cross is not None else None
            entry = _Entry(tuple(it.input_ids), plan.image_key, keys, values, cross_row, body_end=plan.body_end,
                           image_tokens=self._image_tokens(keys, values, len(it.input_ids)))
            source = plan.entry
            if source is not None and not source.pinned and plan.reuse >= source.body_end - _SAME_CONVERSATION_SLACK:
                # the same conversation checked again (e.g. a longer streamed answer): the new entry supersedes it
                self._entries.pop((source.image_key, source.ids), None)
            self._entries[(entry.image_key, entry.ids)] = entry
            self._entries.move_to_end((entry.image_key, entry.ids))
            if plan.anchor is not None and plan.anchor not in self._anchors and plan.new_anchor(it):
                self._anchors[plan.anchor] = _Entry(plan.anchor, None, [k[:, :, :len(plan.anchor)] if k is not None
                                                                        else None for k in keys],
                                                    [v[:, :, :len(plan.anchor)] if v is not None else None
                                                     for v in values], None, pinned=True)
        self._evict()


def enable_prefix_cache(guard: Any, *, max_tokens: int = 32768) -> Any:
    """Give ``guard`` (a :class:`mmguard.guard.Guard` on the plain engine) the prefix cache; returns the guard."""
    engine = guard.engine
    if isinstance(engine, PrefixCachingEngine):
        return guard
    if type(engine) is not Engine:
        raise TypeError(f"the prefix cache works on the plain Engine, not {type(engine).__name__}")
    guard.engine = PrefixCachingEngine.from_engine(engine, max_tokens=max_tokens)
    return guard

