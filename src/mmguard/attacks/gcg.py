"""GCG (the nanoGCG algorithm) adversarial suffixes against a guard, target verdict ``safe``.

Each step: gradients of the decision margin ``logit(unsafe) - logit(safe)`` with respect to one-hot
suffix tokens (through ``model.get_input_embeddings()``), the top-k most promising tokens per
position, a batch of random single-token swaps, a retokenisation filter (the candidate text must
decode and re-encode to the same ids, alone and in its place in the prompt), exact evaluation of the
batch in one forward pass, keep the best. Candidates never include the tokenizer's special tokens
(which covers ``<|image|>``) or the embedding rows past the vocabulary and, by default, only printable ASCII
tokens (as nanoGCG's ``allow_non_ascii=False``).

The suffix is appended to the last text of one turn (its other texts kept apart): the user prompt
(``location="user"``: prompt classification, or response classification where the attacker controls only
the prompt) or the agent response (``location="agent"``). Its token span is found by rendering the conversation with a
sentinel in its place. The final adversarial conversation is rendered and encoded afresh (checked to
give the same ids) and classified with ``guard.classify``; only that verdict counts.

Image conversations: the vision encoder runs once; its cross-attention states are reused for every
candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import Engine
from ..tokenizer import encode_text, special_id
from .common import Deadline, attack_loss, with_suffix

__all__ = ["GCGConfig", "GCGResult", "allowed_token_mask", "gcg_attack"]

SENTINEL = "QQMMGUARDSUFFIXQQ"
_MASK_CACHE: dict[tuple[int, bool], torch.Tensor] = {}


@dataclass
class GCGConfig:
    steps: int = 20
    suffix_len: int = 12
    init: str | None = None  # default: " x" repeated suffix_len times (nanoGCG's "x x x ...")
    topk: int = 64
    search_width: int = 32
    eval_batch: int = 32
    seed: int = 0
    early_stop: bool = True
    loss: str = "margin"  # or "logprob" (see common.attack_loss)
    allow_non_ascii: bool = False


@dataclass
class GCGResult:
    item_id: str
    task: str
    location: str  # "user" or "agent": which turn carries the suffix
    clean_p_unsafe: float
    clean_unsafe: bool
    adv_p_unsafe: float
    success: bool  # the fresh verdict on the adversarial conversation is safe
    suffix: str = ""
    suffix_ids: list[int] = field(default_factory=list)
    retokenizes: bool = True  # the adversarial text re-encodes to exactly the optimised ids
    steps_run: int = 0
    seconds: float = 0.0
    margins: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def allowed_token_mask(tokenizer: Any, vocab_rows: int, special_ids: frozenset[int],
                       allow_non_ascii: bool = False) -> torch.Tensor:
    """Boolean mask over embedding rows: True for tokens GCG may use (never a special token)."""
    key = (id(tokenizer), allow_non_ascii)
    if key not in _MASK_CACHE:
        texts = tokenizer.batch_decode([[i] for i in range(min(vocab_rows, len(tokenizer)))])
        ok = torch.zeros(vocab_rows, dtype=torch.bool)
        for i, t in enumerate(texts):
            if not t or "\ufffd" in t:
                continue
            if not allow_non_ascii and not (t.isascii() and t.isprintable()):
                continue
            ok[i] = i not in special_ids
        _MASK_CACHE[key] = ok
    mask = _MASK_CACHE[key]
    if mask.numel() != vocab_rows:
        pad = torch.zeros(max(0, vocab_rows - mask.numel()), dtype=torch.bool)
        mask = torch.cat([mask, pad])[:vocab_rows]
    return mask


def _segment_ids(tokenizer: Any, segments: Any) -> list[int]:
    ids: list[int] = []
    for seg in segments:
        ids.extend([special_id(tokenizer, seg.text)] if seg.special else encode_text(tokenizer, seg.text))
    return ids


class _Layout:
    """Token ids around the suffix: ``before + suffix + after`` (``after`` ends with the decision prefix)."""

    def __init__(self, guard: Any, conv: Any, turn_index: int) -> None:
        tok = guard.engine.tokenizer
        prompt = guard.render(with_suffix(conv, turn_index, SENTINEL))
        hits = [i for i, s in enumerate(prompt.segments) if not s.special and SENTINEL in s.text]
        if len(hits) != 1 or prompt.text.count(SENTINEL) != 1:
            raise ValueError("could not locate the suffix position in the rendered prompt")
        k = hits[0]
        seg = prompt.segments[k].text
        pos = seg.index(SENTINEL)
        self.seg_before, self.seg_after = seg[:pos], seg[pos + len(SENTINEL):]
        self.head = _segment_ids(tok, prompt.segments[:k])
        self.seg_before_ids = encode_text(tok, self.seg_before)
        self.seg_after_ids = encode_text(tok, self.seg_after)
        self.tail = _segment_ids(tok, prompt.segments[k + 1:]) + guard.engine.decision_prefix_ids(
            prompt.decision_prefix)
        self.before = self.head + self.seg_before_ids
        self.after = self.seg_after_ids + self.tail

    def full(self, suffix: list[int]) -> list[int]:
        return self.before + list(suffix) + self.after

    def stable(self, tokenizer: Any, cands: list[list[int]], texts: list[str], at_end: bool) -> list[bool]:
        """Which candidates decode/re-encode to the same ids, alone and inside their text segment."""
        alone = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ctx = tokenizer([self.seg_before + t + self.seg_after for t in texts], add_special_tokens=False,
                        split_special_tokens=True)["input_ids"]
        out = []
        for ids, a, c, t in zip(cands, alone, ctx, texts, strict=True):
            ok = list(a) == list(ids) and list(c) == self.seg_before_ids + list(ids) + self.seg_after_ids
            if at_end and t != t.rstrip():  # the template strips turn text
                ok = False
            if SENTINEL in t or ("<" in t and ">" in t and ("CONVERSATION" in t or "CATEGORIES" in t)):
                ok = False
            out.append(ok)
        return out


def _vision_inputs(guard: Any, enc: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Cross-attention states (computed once) and the dense cross-attention mask of one image item."""
    if enc.image is None:
        return None, None
    engine = guard.engine
    batch = Engine.collate(engine, [enc])  # the reference batch (pixel values), also for a FastEngine
    inner = engine.model.model
    with torch.no_grad():
        vis = inner.vision_model(pixel_values=batch["pixel_values"],
                                 aspect_ratio_ids=batch["aspect_ratio_ids"],
                                 aspect_ratio_mask=batch["aspect_ratio_mask"]).last_hidden_state
        states = inner.multi_modal_projector(vis).reshape(-1, vis.shape[-2], inner.hidden_size)
    return states, batch["cross_attention_mask"]


def _run(model: Any, n: int, length: int, device: str, *, input_ids: torch.Tensor | None = None,
         inputs_embeds: torch.Tensor | None = None, states: torch.Tensor | None = None,
         cross_mask: torch.Tensor | None = None) -> torch.Tensor:
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones((n, length), dtype=torch.long, device=device),
        "position_ids": torch.arange(length, device=device)[None].expand(n, -1),
        "use_cache": False,
        "logits_to_keep": 1,
    }
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    if states is not None:
        kwargs["cross_attention_states"] = states.repeat(n, 1, 1)
        kwargs["cross_attention_mask"] = cross_mask.expand(n, *cross_mask.shape[1:])
    return model(**kwargs).logits[:, -1, :].float()


def gcg_attack(
    guard: Any,
    item: Any,
    location: str = "user",
    config: GCGConfig | None = None,
    *,
    clean: tuple[float, bool] | None = None,
    deadline: Deadline | None = None,
) -> GCGResult:
    """Optimise a suffix on the last ``location`` turn ("user" or "agent") of an unsafe item."""
    cfg = config or GCGConfig()
    engine, model, tok = guard.engine, guard.engine.model, guard.engine.tokenizer
    device = engine.device
    t0 = time.perf_counter()
    conv = item.conversation
    role = "user" if location == "user" else "agent"
    idx = [i for i, t in enumerate(conv.turns) if t.role == role]
    if not idx:
        raise ValueError(f"item {item.id} has no {role} turn")
    ti = idx[-1]
    at_end = True
    if clean is None:
        v = guard.classify(conv, categories=False)
        clean = (v.unsafe_probability, v.is_unsafe)
    res = GCGResult(item.id, item.task, location, clean[0], clean[1], clean[0], not clean[1])
    if not clean[1]:
        res.seconds = time.perf_counter() - t0
        return res
    layout = _Layout(guard, conv, ti)
    init = cfg.init if cfg.init is not None else " x" * cfg.suffix_len
    if init and not init[0].isspace():
        init = " " + init  # a suffix glued to the last word would re-tokenize that word
    suffix = encode_text(tok, init)
    if not suffix:
        raise ValueError("the initial suffix is empty")
    specials = engine.format.special_ids
    if any(i in specials for i in suffix):
        raise ValueError("the initial suffix encodes to a special token")
    emb = model.get_input_embeddings()
    W = emb.weight
    allowed = allowed_token_mask(tok, W.shape[0], specials, cfg.allow_non_ascii).to(device)
    enc0 = engine.encode(guard.render(with_suffix(conv, ti, init)), conv.image)
    states, cross_mask = _vision_inputs(guard, enc0)
    before = torch.tensor(layout.before, device=device)
    after = torch.tensor(layout.after, device=device)
    length = len(layout.before) + len(suffix) + len(layout.after)
    if len(enc0.input_ids) != length:
        raise ValueError(f"the initial suffix {init!r} does not keep its tokens inside the prompt; choose another")
    gen = torch.Generator().manual_seed(cfg.seed)

    def evaluate(cands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        margins, probs = [], []
        for s in range(0, cands.shape[0], cfg.eval_batch):
            chunk = cands[s:s + cfg.eval_batch]
            n = chunk.shape[0]
            ids = torch.cat([before.expand(n, -1), chunk, after.expand(n, -1)], dim=1)
            with torch.no_grad():
                logits = _run(model, n, length, device, input_ids=ids, states=states, cross_mask=cross_mask)
            margins.append(attack_loss(logits, engine.safe_id, engine.unsafe_id, cfg.loss))
            probs.append(torch.softmax(logits, -1)[:, engine.unsafe_id])
        return torch.cat(margins), torch.cat(probs)

    cur = torch.tensor(suffix, device=device)
    cur_margin, cur_p = (float(v[0]) for v in evaluate(cur[None]))
    best, best_margin = cur.clone(), cur_margin
    res.margins.append(cur_margin)
    steps = 0
    for _ in range(cfg.steps):
        if cfg.early_stop and cur_p < guard.threshold_for(conv.task):
            break
        if deadline is not None and deadline.passed:
            break
        steps += 1
        # 1. token gradients through one-hot suffix embeddings
        one_hot = torch.nn.functional.one_hot(cur, W.shape[0]).to(W.dtype).requires_grad_(True)
        with torch.enable_grad():
            embeds = torch.cat([emb(before), one_hot @ W, emb(after)], dim=0)[None]
            logits = _run(model, 1, length, device, inputs_embeds=embeds, states=states,
                          cross_mask=cross_mask)
            margin = attack_loss(logits, engine.safe_id, engine.unsafe_id, cfg.loss).sum()
            (grad,) = torch.autograd.grad(margin, one_hot)
        grad = grad.float()
        grad[:, ~allowed] = float("inf")
        top = (-grad).topk(cfg.topk, dim=1).indices  # (n, k)
        # 2. a batch of single-token swaps
        n = cur.shape[0]
        pos = torch.randint(0, n, (cfg.search_width,), generator=gen).to(device)
        pick = torch.randint(0, cfg.topk, (cfg.search_width,), generator=gen).to(device)
        cands = cur[None].repeat(cfg.search_width, 1)
        cands[torch.arange(cfg.search_width, device=device), pos] = top[pos, pick]
        # 3. retokenisation filter
        lists = cands.tolist()
        texts = tok.batch_decode(lists)
        keep = layout.stable(tok, lists, texts, at_end)
        if not any(keep):
            continue
        cands = cands[torch.tensor(keep, device=device)]
        # 4. exact evaluation, keep the best
        margins, probs = evaluate(cands)
        j = int(margins.argmin())
        if float(margins[j]) < cur_margin:
            cur, cur_margin, cur_p = cands[j].clone(), float(margins[j]), float(probs[j])
        if cur_margin < best_margin:
            best, best_margin = cur.clone(), cur_margin
        res.margins.append(cur_margin)
    ids = [int(i) for i in best.tolist()]
    assert not any(i in specials for i in ids), "GCG produced a special token"
    text = tok.decode(ids)
    adv = with_suffix(conv, ti, text)
    full = engine.encode(guard.render(adv), conv.image).input_ids
    res.retokenizes = list(full) == layout.full(ids)
    fresh = guard.classify(adv, categories=False)
    res.suffix, res.suffix_ids = text, ids
    res.adv_p_unsafe, res.success = fresh.unsafe_probability, not fresh.is_unsafe
    res.steps_run, res.seconds = steps, time.perf_counter() - t0
    return res
