"""Model loading, batching and one-pass scoring for Mllama guards.

The verdict comes from ONE forward pass per conversation: the prompt plus the ``\\n\\n`` the model
always writes first, read at the last position (full-vocabulary softmax, probability of ``unsafe``).
Only conversations judged unsafe run a short constrained decode that writes category codes, and
only codes of the active policy can be written. Per-category probabilities are read at the category
position of that decode.

Batches are left-padded with explicit attention masks, position ids and cross-attention masks.
Image and text-only conversations are run as separate sub-batches: Mllama skips its cross-attention
layers when a batch has no image, and a text-only row inside an image batch would instead attend to
padding vision states, giving a different (wrong) answer.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .conversation import ConversationError
from .model_format import CodeTrie, FormatError, TokenFormat
from .prompt import RenderedPrompt
from .tokenizer import encode_prompt

__all__ = [
    "EncodedItem",
    "Engine",
    "EngineError",
    "PromptTooLongError",
    "ScoredItem",
    "compile_layers",
]

log = logging.getLogger(__name__)

# transformers imports torchao (our optional quantization extra) whenever it is installed; on a machine
# without its CUDA kernels torchao and torch's pytree then log warnings on every model load. Quiet them
# unless the application configured those loggers itself.
for _noisy in ("torchao", "torch.utils._pytree"):
    if logging.getLogger(_noisy).level == logging.NOTSET:
        logging.getLogger(_noisy).setLevel(logging.ERROR)

class EngineError(RuntimeError):
    pass


class PromptTooLongError(ConversationError):
    """The conversation, in the prompt template, is longer than the model's context: an input error (the
    message names the limit), not a model failure."""


# positions kept free after the prompt, for the category codes generated after "unsafe" (13 codes of up to 3
# tokens, with separators, fit)
CODE_GENERATION_ROOM = 64


@dataclass
class EncodedItem:
    """One conversation ready for the model: token ids up to the decision position, and its image."""

    input_ids: list[int]
    image: Image.Image | None
    prompt: RenderedPrompt


@dataclass
class ScoredItem:
    unsafe_probability: float
    safe_probability: float
    codes: tuple[str, ...] = ()
    category_probabilities: dict[str, float] = field(default_factory=dict)
    raw_text: str | None = None


class Engine:
    """Runs an ``MllamaForConditionalGeneration`` as a guard."""

    # padded tokens per model batch (rows x longest row): 16 rows of 1,024 tokens, or fewer longer ones
    max_batch_tokens: int = 16384

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, *, device: str, dtype: torch.dtype,
                 source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.dtype = dtype
        self.source = source
        cfg = model.config
        pad = cfg.text_config.pad_token_id
        try:
            self.format = TokenFormat(tokenizer, pad_id=int(pad) if pad is not None else None)
        except FormatError as err:
            raise EngineError(str(err)) from None
        self.image_token_id = int(getattr(cfg, "image_token_index", self.format.image_id))
        if self.format.image_id != self.image_token_id:
            raise EngineError(
                f"tokenizer maps <|image|> to {self.format.image_id} but the model expects {self.image_token_id}"
            )
        self.pad_id = self.format.pad_id
        self.tile_size = int(cfg.vision_config.image_size)
        self.is_random_weights = False
        self.model_info: dict[str, Any] = {}  # the checkpoint's mmguard.json (see load_engine)
        # P(unsafe) and P(safe) are read at the decision position, where the two answer words differ
        self.safe_id = self.format.safe_decision_id
        self.unsafe_id = self.format.unsafe_decision_id
        self.eot_id = self.format.eot_id
        # the longest prompt the model was built for: past it, positions are untrained (an answer would mean
        # nothing) and time grows faster than the length (mmguard-mini v2 on 2 cores: 7k tokens 28 s, 14k 74 s)
        context = getattr(cfg.text_config, "max_position_embeddings", None)
        self.max_prompt_tokens: int | None = int(context) - CODE_GENERATION_ROOM if context else None
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise EngineError(f"the model's context ({context} positions) is too short for a guard prompt")

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, prompt: RenderedPrompt, image: Image.Image | None) -> EncodedItem:
        ids = encode_prompt(self.tokenizer, prompt)
        ids += self.decision_prefix_ids(prompt.decision_prefix)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(
                f"the conversation takes {len(ids)} tokens in the prompt template, over this model's limit of "
                f"{self.max_prompt_tokens} ({self.max_prompt_tokens + CODE_GENERATION_ROOM} positions, less "
                f"{CODE_GENERATION_ROOM} for category codes): shorten it, or judge it in parts")
        if (image is not None) != prompt.has_image:
            raise EngineError("prompt and image disagree on whether an image is present")
        return EncodedItem(ids, image, prompt)

    def decision_prefix_ids(self, prefix: str) -> list[int]:
        return list(self.format.decision_prefix_ids(prefix))

    def grammar(self, codes: Sequence[str]) -> CodeTrie:
        try:
            return self.format.trie(codes)
        except FormatError as err:
            raise EngineError(str(err)) from None

    # -- batching ----------------------------------------------------------------------------------
    def _image_inputs(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.image_processor(images=[[im] for im in images], return_tensors="pt")
        return {
            "pixel_values": out["pixel_values"].to(self.device, self.dtype),
            "aspect_ratio_ids": out["aspect_ratio_ids"].to(self.device),
            "aspect_ratio_mask": out["aspect_ratio_mask"].to(self.device),
            "num_tiles": out["num_tiles"],
        }

    def cross_attention_mask(self, ids: torch.Tensor, num_tiles: list[list[int]],
                             max_tiles: int | None = None) -> torch.Tensor:
        """The dense cross-attention mask for left-padded ``ids`` holding one ``<|image|>`` per row, over
        ``max_tiles`` tiles per image (default: the image processor's maximum)."""
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        sparse = [get_cross_attention_token_mask(row.tolist(), self.image_token_id) for row in ids.cpu()]
        if any(len(s) != 1 for s in sparse):
            raise EngineError("internal: each image prompt must hold exactly one <|image|> token")
        dense = convert_sparse_cross_attention_mask_to_dense(
            sparse, num_tiles=num_tiles, max_num_tiles=max_tiles or self.image_processor.max_image_tiles,
            length=ids.shape[1],
        )
        return torch.as_tensor(dense)

    def collate(self, items: Sequence[EncodedItem], extra: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """Left-pad a batch (all with images or all without) into model inputs."""
        seqs = [list(it.input_ids) + (list(extra[i]) if extra else []) for i, it in enumerate(items)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        with_image = [it.image is not None for it in items]
        if any(with_image):
            if not all(with_image):
                raise EngineError("internal: image and text-only items must be batched separately")
            vis = self._image_inputs([it.image for it in items])  # type: ignore[misc]
            batch["cross_attention_mask"] = self.cross_attention_mask(ids, vis.pop("num_tiles"))
            batch.update(vis)
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    # -- scoring -----------------------------------------------------------------------------------
    def score(
        self,
        items: Sequence[EncodedItem],
        *,
        threshold: float,
        codes: Sequence[str],
        batch_size: int = 8,
        decode_codes: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> list[ScoredItem]:
        """Score items: one forward pass each for the verdict; unsafe ones continue from that pass's
        KV cache with a constrained decode of the category codes."""
        results: list[ScoredItem | None] = [None] * len(items)
        for group in self.batch_groups(items, batch_size):
            batch = self.collate([items[i] for i in group])
            with torch.inference_mode():
                out, last_logits = self.decision_pass(batch, use_cache=decode_codes)
            broken = int((~torch.isfinite(last_logits).all(dim=-1)).sum())
            if broken:  # NaN >= threshold is False: a broken model would pass everything as safe
                raise EngineError(f"the model produced non-finite scores (NaN or infinity) for {broken} of "
                                  f"{len(group)} conversation(s): its weights are broken or overflow in "
                                  f"{str(self.dtype).replace('torch.', '')}")
            lp = torch.log_softmax(last_logits.float(), dim=-1).cpu()
            unsafe_rows: list[int] = []
            for row, idx in enumerate(group):
                p_unsafe = float(lp[row, self.unsafe_id].exp())
                p_safe = float(lp[row, self.safe_id].exp())
                results[idx] = ScoredItem(p_unsafe, p_safe)
                if p_unsafe >= threshold:
                    unsafe_rows.append(row)
            if decode_codes and unsafe_rows:
                cache = _cache_of(out)
                if len(unsafe_rows) < len(group):
                    cache.batch_select_indices(torch.tensor(unsafe_rows, device=self.device))
                sub: dict[str, torch.Tensor] = {
                    k: batch[k][unsafe_rows] for k in ("attention_mask", "position_ids", "cross_attention_mask")
                    if k in batch}
                decoded = self._decode_from_cache(cache, sub, codes)
                for r, (found, cat_probs, raw) in zip(unsafe_rows, decoded, strict=True):
                    res = results[group[r]]
                    assert res is not None
                    res.codes = found
                    res.category_probabilities = {c: p * res.unsafe_probability for c, p in cat_probs.items()}
                    res.raw_text = raw
            del out
            if progress is not None:
                progress(len(group))
        return [r for r in results if r is not None]

    def batch_groups(self, items: Sequence[EncodedItem], batch_size: int) -> list[list[int]]:
        """Indices of the sub-batches to run: image and text-only apart, each sorted by :meth:`batch_order`,
        at most ``batch_size`` rows and :attr:`max_batch_tokens` padded tokens each (one long prompt no
        longer pads 15 short ones to its length: compute and memory grow with rows x longest row)."""
        groups: list[list[int]] = []
        for want_image in (True, False):
            idx = [i for i, it in enumerate(items) if (it.image is not None) == want_image]
            idx.sort(key=lambda i: self.batch_order(items[i]))
            group: list[int] = []
            longest = 0
            for i in idx:
                n = len(items[i].input_ids)
                if group and (len(group) >= batch_size or (len(group) + 1) * max(longest, n) > self.max_batch_tokens):
                    groups.append(group)
                    group, longest = [], 0
                group.append(i)
                longest = max(longest, n)
            if group:
                groups.append(group)
        return groups

    def batch_order(self, item: EncodedItem) -> Any:
        """Sort key of batching: by length, so that padding stays small."""
        return len(item.input_ids)

    def decision_pass(self, batch: dict[str, Any], *, use_cache: bool) -> tuple[Any, torch.Tensor]:
        """The one forward pass of a collated batch: the model output (its cache continues the decode)
        and the logits at each row's decision position (rows x vocabulary)."""
        out = self.model(**batch, use_cache=use_cache, logits_to_keep=1)
        return out, out.logits[:, -1, :]

    @torch.inference_mode()
    def decode_codes(
        self, items: Sequence[EncodedItem], codes: Sequence[str], max_steps: int | None = None
    ) -> list[tuple[tuple[str, ...], dict[str, float], str]]:
        """Greedy decode after ``unsafe\\n``, constrained to ``codes``, with the per-code probabilities
        (given ``unsafe``) read where the first code is written. Items of one call may mix image and text."""
        with_image = [i for i, it in enumerate(items) if it.image is not None]
        if 0 < len(with_image) < len(items):  # decode image and text-only rows apart (see module doc)
            text_only = [i for i in range(len(items)) if items[i].image is None]
            merged: dict[int, tuple[tuple[str, ...], dict[str, float], str]] = {}
            for idx in (with_image, text_only):
                for i, res in zip(idx, self.decode_codes([items[i] for i in idx], codes, max_steps), strict=True):
                    merged[i] = res
            return [merged[i] for i in range(len(items))]
        batch = self.collate(items)
        out, _ = self.decision_pass(batch, use_cache=True)
        sub: dict[str, torch.Tensor] = {
            k: batch[k] for k in ("attention_mask", "position_ids", "cross_attention_mask") if k in batch}
        return self._decode_from_cache(_cache_of(out), sub, codes, max_steps)

    def _step(self, cache: Any, tokens: torch.Tensor, state: dict[str, torch.Tensor], keep: int = 1) -> Any:
        """Feed ``tokens`` (rows x k) after the cached sequence, extending masks and positions; logits for
        the last ``keep`` positions."""
        k = tokens.shape[1]
        attn = state["attention_mask"]
        state["attention_mask"] = torch.cat([attn, torch.ones_like(attn[:, :1]).expand(-1, k)], dim=1)
        last = state["position_ids"][:, -1:]
        pos = last + torch.arange(1, k + 1, device=last.device)[None, :]
        state["position_ids"] = pos
        kwargs: dict[str, Any] = {"input_ids": tokens.to(self.device), "attention_mask": state["attention_mask"],
                                  "position_ids": pos, "use_cache": True, "logits_to_keep": keep, "cache": cache}
        cross = state.get("cross_attention_mask")
        if cross is not None:
            new_rows = cross[:, -1:].expand(-1, k, -1, -1)
            state["cross_attention_mask"] = torch.cat([cross, new_rows], dim=1)
            kwargs["cross_attention_mask"] = new_rows.contiguous()
        return self.model(**kwargs)

    @torch.inference_mode()
    def _decode_from_cache(
        self, cache: Any, state: dict[str, torch.Tensor], codes: Sequence[str], max_steps: int | None = None
    ) -> list[tuple[tuple[str, ...], dict[str, float], str]]:
        """Continue rows whose cache ends at the decision position: write ``unsafe\\n`` then codes.

        ``category_probabilities[code]`` is P(the first code is ``code`` | ``unsafe\\n``): the product of
        the code's token probabilities after the forced prefix and, for a code that others extend (``S1``
        under SmolLM2's ``S``,``1``,``0``), the probability of ending it there (end of turn or a comma),
        read from a copy of the cache one step into the trie. Llama 3 needs no such step."""
        trie = self.grammar(codes)
        n = state["attention_mask"].shape[0]
        state = dict(state)
        states = [_DecodeState(trie, self.eot_id) for _ in range(n)]
        max_steps = max_steps or (sum(len(p) for p in trie.later.values()) + 4)
        # the rest of "unsafe" after the decision token, "\n" and the token prefix every first code shares
        # ("S") are forced: feed them in one step and read the shared prefix's probabilities from it
        shared = trie.shared_first_prefix
        forced_ids = [*self.format.unsafe_ids[self.format.decision_index:], *self.format.newline_ids]
        forced = torch.tensor([[*forced_ids, *shared]] * n, dtype=torch.long)
        out = self._step(cache, forced, state, keep=len(shared) + 1)
        lp_branch = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
        forced_logp = [0.0] * n  # log-prob of the shared first-code prefix (e.g. "S")
        if shared:
            lp_shared = torch.log_softmax(out.logits[:, :-1, :].float(), dim=-1).cpu()
            for i, st in enumerate(states):
                forced_logp[i] = float(sum(lp_shared[i, j, tok] for j, tok in enumerate(shared)))
                for tok in shared:
                    st.push(tok)
        inner = self._inner_node_logp(_cache_of(out), state, trie) if trie.inner_first_paths else {}
        cat_logp = [_first_code_logp(trie, lp_branch[i], {p: v[i] for p, v in inner.items()}, self.eot_id,
                                     forced_logp[i]) for i in range(n)]
        for _step in range(max_steps):
            logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
            next_tokens: list[int] = []
            for i, st in enumerate(states):
                if st.done:
                    next_tokens.append(self.eot_id)
                    continue
                allowed = st.allowed()
                tok = max(allowed, key=lambda t: float(logp[i, t]))
                st.push(tok)
                next_tokens.append(tok)
            if all(st.done for st in states):
                break
            out = self._step(_cache_of(out), torch.tensor(next_tokens, dtype=torch.long)[:, None], state)
        results = []
        for i, st in enumerate(states):
            probs = {c: math.exp(v) for c, v in cat_logp[i].items()}
            text = "unsafe\n" + self.tokenizer.decode(st.tokens, skip_special_tokens=False)
            results.append((tuple(st.codes), probs, text))
        return results

    def _inner_node_logp(self, cache: Any, state: dict[str, torch.Tensor],
                         trie: CodeTrie) -> dict[tuple[int, ...], torch.Tensor]:
        """Next-token log-probabilities (rows x vocabulary) at each inner trie node, from a copy of the
        cache at the branch position (the main decode continues from the original)."""
        nodes = {p[:k] for p in trie.inner_first_paths for k in range(1, len(p) + 1)}
        maximal = [p for p in nodes if not any(len(o) > len(p) and o[:len(p)] == p for o in nodes)]
        n = state["attention_mask"].shape[0]
        found: dict[tuple[int, ...], torch.Tensor] = {}
        for path in sorted(maximal):
            branch_state = {k: v.clone() for k, v in state.items()}
            out = self._step(copy.deepcopy(cache), torch.tensor([list(path)] * n, dtype=torch.long), branch_state,
                             keep=len(path))
            lp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
            for k in range(1, len(path) + 1):
                found[path[:k]] = lp[:, k - 1, :]
        return found


def _first_code_logp(trie: CodeTrie, lp_branch: torch.Tensor, inner: dict[tuple[int, ...], torch.Tensor],
                     eot_id: int, forced_logp: float) -> dict[str, float]:
    """log P(first code = c | forced prefix) for each code of the trie (see ``_decode_from_cache``)."""
    k = len(trie.shared_first_prefix)
    tails = {c: p[k:] for c, p in trie.first.items()}
    result: dict[str, float] = {}
    for code, tail in tails.items():
        logp = forced_logp + float(lp_branch[tail[0]])
        for j in range(1, len(tail)):
            logp += float(inner[tail[:j]][tail[j]])
        if tail in inner:  # a complete code that others extend: it must end here
            ends = {eot_id} | {p[0] for c, p in trie.later.items() if c != code}
            logp += float(torch.logsumexp(inner[tail][sorted(ends)], dim=0))
        result[code] = logp
    return result


def _cache_of(out: Any) -> Any:
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


class _DecodeState:
    """Per-row state of the code grammar ``CODE ("," CODE)* <end of turn>``, each code at most once,
    walked through the token trie: a complete code that longer codes extend (``S1`` of ``S10``) may end
    (end of turn or the next code's comma) or continue."""

    def __init__(self, trie: CodeTrie, eot_id: int) -> None:
        self.g = trie
        self.eot_id = eot_id
        self.codes: list[str] = []
        self.partial: list[int] = []
        self.tokens: list[int] = []
        self.done = False

    def _paths(self) -> dict[str, tuple[int, ...]]:
        table = self.g.first if not self.codes else self.g.later
        return {c: p for c, p in table.items() if c not in self.codes}

    def _complete(self) -> str | None:
        return next((c for c, p in self._paths().items() if list(p) == self.partial), None)

    def _ends(self, completed: str) -> set[int]:
        """Tokens that may follow a complete code: end of turn or the first token of a later code."""
        return {self.eot_id} | {p[0] for c, p in self.g.later.items() if c not in self.codes and c != completed}

    def allowed(self) -> set[int]:
        k = len(self.partial)
        allowed = {p[k] for p in self._paths().values() if len(p) > k and list(p[:k]) == self.partial}
        if self.codes and not self.partial:
            allowed.add(self.eot_id)
        done_here = self._complete() if self.partial else None
        if done_here is not None:
            allowed |= self._ends(done_here)
        return allowed

    def _commit(self, code: str) -> None:
        self.codes.append(code)
        self.partial = []

    def push(self, tok: int) -> None:
        self.tokens.append(tok)
        done_here = self._complete() if self.partial else None
        if done_here is not None:
            k = len(self.partial)
            extends = any(len(p) > k and list(p[:k]) == self.partial and p[k] == tok for p in self._paths().values())
            if not extends:  # the code ended here; ``tok`` starts what follows it
                self._commit(done_here)
        if tok == self.eot_id and not self.partial:
            self.done = True
            return
        self.partial.append(tok)
        paths = self._paths()
        k = len(self.partial)
        complete = self._complete()
        longer = [c for c, p in paths.items() if len(p) > k and list(p[:k]) == self.partial]
        if complete is not None and not longer:
            self._commit(complete)
            if not self._paths():
                self.done = True
                self.tokens.append(self.eot_id)


def compile_layers(model: Any) -> int:
    """Compile every transformer layer of an Mllama guard in place (``torch.compile``, dynamic shapes);
    returns how many. The layers keep their parameter names, so checkpoints and adapters save as before.

    Layers, not the whole model: each layer's graph fuses its norms, rotary, attention and LoRA arithmetic
    (1.5-1.7x a training step on 2 CPU cores, ``bench/train_compile.py``) while the model's Python around them
    (masks, caches, the loss) stays eager. A layer that reads a KV cache compiles once per layer index (the
    cache lookup is a constant of each layer), hence the recompile limits raised with the layer count. The first
    steps of a training run pay the compilation: 6-8 minutes on 2 cores, even with torch's on-disk cache warm
    (each new batch shape compiles; model card), so a stage of under ~100 steps gains nothing."""
    import torch._dynamo

    try:  # inductor turns the graphs into C++: fail here, clearly, not inside the first step
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(4))
    except Exception as err:
        raise EngineError(f"torch.compile does not work here (it needs a C++ compiler such as g++): {err}") from None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stacks = [base.model.language_model.layers]
    vision = base.model.vision_model
    stacks += [vision.transformer.layers, vision.global_transformer.layers]
    layers = [layer for stack in stacks for layer in stack]
    # per layer: the pass that fills a fresh cache, the pass that extends it, and spare (past the limit dynamo
    # silently runs the remaining layers eager: a 200-step run at 8x its layer count got no speed-up at all)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(layers) + 8)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 16 * len(layers))
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
