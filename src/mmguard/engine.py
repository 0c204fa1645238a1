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

import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .prompt import RenderedPrompt
from .tokenizer import EOT_ID, IMAGE_ID, encode_prompt, encode_text

__all__ = [
    "EncodedItem",
    "Engine",
    "EngineError",
    "ScoredItem",
    "load_engine",
    "make_image_processor",
]

log = logging.getLogger(__name__)

# transformers imports torchao (our optional quantization extra) whenever it is installed; on a machine
# without its CUDA kernels torchao and torch's pytree then log warnings on every model load. Quiet them
# unless the application configured those loggers itself.
for _noisy in ("torchao", "torch.utils._pytree"):
    if logging.getLogger(_noisy).level == logging.NOTSET:
        logging.getLogger(_noisy).setLevel(logging.ERROR)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class EngineError(RuntimeError):
    pass


def _image_processor_class() -> Any:
    # transformers >= 5 splits the processor into a torchvision and a PIL backend; torchvision is optional
    try:
        import torchvision  # noqa: F401
        from transformers import MllamaImageProcessor

        return MllamaImageProcessor
    except Exception:
        try:
            from transformers import MllamaImageProcessorPil

            return MllamaImageProcessorPil
        except ImportError:
            from transformers import MllamaImageProcessor

            return MllamaImageProcessor


def make_image_processor(tile_size: int = 560, max_image_tiles: int = 4) -> Any:
    """transformers' Mllama image processor with the Llama 3.2 Vision settings and the given tile size."""
    cls = _image_processor_class()
    return cls(
        do_convert_rgb=True,
        do_normalize=True,
        do_pad=True,
        do_rescale=True,
        do_resize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        max_image_tiles=max_image_tiles,
        resample=2,
        rescale_factor=1 / 255,
        size={"height": tile_size, "width": tile_size},
    )


def _load_image_processor(source: str | Path, tile_size: int) -> Any:
    cls = _image_processor_class()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proc = cls.from_pretrained(source)
    except Exception as err:  # a checkpoint without preprocessor_config.json
        log.info("no image processor config in %s (%s); using Llama 3.2 Vision defaults", source, err)
        return make_image_processor(tile_size)
    size = getattr(proc, "size", None)
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    if height is not None and height != tile_size:
        raise EngineError(f"image processor tile size {height} differs from the vision model's image_size {tile_size}")
    if getattr(proc, "max_image_tiles", 4) > 4:
        proc.max_image_tiles = 4
    return proc


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise EngineError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available")
    return device


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


@dataclass
class _CodeGrammar:
    """Token paths of the policy's codes: the first code after ``unsafe\\n``, later ones after a comma."""

    codes: tuple[str, ...]
    first: dict[str, tuple[int, ...]]
    later: dict[str, tuple[int, ...]]

    @property
    def shared_first_prefix(self) -> tuple[int, ...]:
        """Tokens every first code starts with, short of the token that tells codes apart."""
        paths = list(self.first.values())
        limit = min(len(p) for p in paths) - 1  # always leave one token to choose
        prefix: list[int] = []
        for j in range(limit):
            tok = paths[0][j]
            if any(p[j] != tok for p in paths):
                break
            prefix.append(tok)
        return tuple(prefix)


class Engine:
    """Runs an ``MllamaForConditionalGeneration`` as a guard."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, *, device: str, dtype: torch.dtype,
                 source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.dtype = dtype
        self.source = source
        cfg = model.config
        self.image_token_id = int(getattr(cfg, "image_token_index", IMAGE_ID))
        tok_image = tokenizer.convert_tokens_to_ids("<|image|>")
        if tok_image != self.image_token_id:
            raise EngineError(
                f"tokenizer maps <|image|> to {tok_image} but the model expects {self.image_token_id}"
            )
        self.pad_id = int(cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 128004)
        self.tile_size = int(cfg.vision_config.image_size)
        self._grammar_cache: dict[tuple[str, ...], _CodeGrammar] = {}
        self.is_random_weights = False
        self._decision_ids: dict[str, list[int]] = {}
        self.safe_id = self._single_token("safe")
        self.unsafe_id = self._single_token("unsafe")
        self.newline_id = self._single_token("\n")

    def _single_token(self, text: str) -> int:
        ids = encode_text(self.tokenizer, text)
        if len(ids) != 1:
            raise EngineError(f"tokenizer encodes {text!r} as {len(ids)} tokens; a Llama 3 tokenizer is required")
        return ids[0]

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, prompt: RenderedPrompt, image: Image.Image | None) -> EncodedItem:
        ids = encode_prompt(self.tokenizer, prompt)
        ids += self.decision_prefix_ids(prompt.decision_prefix)
        if (image is not None) != prompt.has_image:
            raise EngineError("prompt and image disagree on whether an image is present")
        return EncodedItem(ids, image, prompt)

    def decision_prefix_ids(self, prefix: str) -> list[int]:
        if prefix not in self._decision_ids:
            self._decision_ids[prefix] = encode_text(self.tokenizer, prefix)
        return list(self._decision_ids[prefix])

    def grammar(self, codes: Sequence[str]) -> _CodeGrammar:
        key = tuple(codes)
        if key not in self._grammar_cache:
            first = {c: tuple(encode_text(self.tokenizer, c)) for c in codes}
            later = {c: tuple(encode_text(self.tokenizer, "," + c)) for c in codes}
            self._grammar_cache[key] = _CodeGrammar(key, first, later)
        return self._grammar_cache[key]

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
        """Indices of the sub-batches to run: image and text-only apart, each sorted by :meth:`batch_order`."""
        groups: list[list[int]] = []
        for want_image in (True, False):
            idx = [i for i, it in enumerate(items) if (it.image is not None) == want_image]
            idx.sort(key=lambda i: self.batch_order(items[i]))
            groups.extend(idx[s:s + batch_size] for s in range(0, len(idx), batch_size))
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
        """Continue rows whose cache ends at the decision position: write ``unsafe\\n`` then codes."""
        grammar = self.grammar(codes)
        n = state["attention_mask"].shape[0]
        state = dict(state)
        states = [_DecodeState(grammar) for _ in range(n)]
        max_steps = max_steps or (sum(len(p) for p in grammar.later.values()) + 4)
        cat_logp: list[dict[str, float]] = [dict() for _ in range(n)]
        forced_logp = [0.0] * n  # log-prob of the shared first-code prefix (e.g. "S")
        # "unsafe\n" and the token prefix every first code shares ("S" for S1..S13) are forced: feed them in
        # one step and read the shared prefix's probabilities from the same call
        shared = grammar.shared_first_prefix
        forced = torch.tensor([[self.unsafe_id, self.newline_id, *shared]] * n, dtype=torch.long)
        out = self._step(cache, forced, state, keep=len(shared) + 1)
        if shared:
            lp_shared = torch.log_softmax(out.logits[:, :-1, :].float(), dim=-1).cpu()
            for i, st in enumerate(states):
                forced_logp[i] = float(sum(lp_shared[i, j, tok] for j, tok in enumerate(shared)))
                for tok in shared:
                    st.push(tok)
        for _step in range(max_steps):
            logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
            next_tokens: list[int] = []
            for i, st in enumerate(states):
                if st.done:
                    next_tokens.append(EOT_ID)
                    continue
                allowed = st.allowed()
                if st.in_first_code and not cat_logp[i]:
                    branch = st.first_code_branch(allowed)
                    if branch is not None:  # the position that tells the codes apart
                        for code, tok in branch.items():
                            cat_logp[i][code] = forced_logp[i] + float(logp[i, tok])
                    elif len(allowed) == 1:
                        forced_logp[i] += float(logp[i, next(iter(allowed))])
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


def _cache_of(out: Any) -> Any:
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


class _DecodeState:
    """Per-row state of the code grammar: ``CODE ("," CODE)* <|eot_id|>``, each code at most once."""

    def __init__(self, grammar: _CodeGrammar) -> None:
        self.g = grammar
        self.codes: list[str] = []
        self.partial: list[int] = []
        self.tokens: list[int] = []
        self.done = False

    @property
    def in_first_code(self) -> bool:
        return not self.codes

    def _paths(self) -> dict[str, tuple[int, ...]]:
        table = self.g.first if not self.codes else self.g.later
        return {c: p for c, p in table.items() if c not in self.codes}

    def allowed(self) -> set[int]:
        k = len(self.partial)
        allowed = {p[k] for p in self._paths().values() if len(p) > k and list(p[:k]) == self.partial}
        if self.codes and not self.partial:
            allowed.add(EOT_ID)
        return allowed

    def first_code_branch(self, allowed: set[int]) -> dict[str, int] | None:
        """If the next token distinguishes codes, map each code to its token here."""
        if len(allowed) < 2 and len(self.g.codes) > 1:
            return None
        k = len(self.partial)
        return {c: p[k] for c, p in self._paths().items() if len(p) > k and list(p[:k]) == self.partial}

    def push(self, tok: int) -> None:
        self.tokens.append(tok)
        if tok == EOT_ID and not self.partial:
            self.done = True
            return
        self.partial.append(tok)
        paths = self._paths()
        complete = [c for c, p in paths.items() if list(p) == self.partial]
        k = len(self.partial)
        longer = [c for c, p in paths.items() if len(p) > k and list(p[:k]) == self.partial]
        if complete and not longer:
            self.codes.append(complete[0])
            self.partial = []
            if not self._paths():
                self.done = True
                self.tokens.append(EOT_ID)


def load_engine(source: str | Path, *, device: str | None = "auto", dtype: str | torch.dtype | None = "auto",
                local_files_only: bool | None = None) -> Engine:
    """Load an Mllama guard checkpoint (a local directory or a Hugging Face id) with its tokenizer and
    image processor. A checkpoint that ships its own tokenizer uses it; otherwise the Llama 3.2 Vision
    tokenizer built from ``llama-models`` is used."""
    from transformers import AutoConfig, AutoTokenizer, MllamaForConditionalGeneration

    from .tiny import TINY_MARKER
    from .tokenizer import load_default_tokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    src = str(source)
    is_dir = Path(src).is_dir()
    if not is_dir and (src.startswith((".", "/", "~")) or (os.sep in src and not src.count("/") == 1)):
        raise EngineError(f"model directory not found: {src}")
    kwargs: dict[str, Any] = {}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except Exception as err:
        raise EngineError(f"cannot load a model config from {src!r}: {err}") from None
    if getattr(config, "model_type", None) != "mllama":
        raise EngineError(f"{src} is a {getattr(config, 'model_type', '?')!r} model; mmguard needs an Mllama model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MllamaForConditionalGeneration.from_pretrained(src, dtype=torch_dtype, **kwargs)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorator confuses mypy about .to
    model.eval()
    tokenizer: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except Exception:
        log.info("no tokenizer in %s; using the Llama 3.2 Vision tokenizer from llama-models", src)
        tokenizer = load_default_tokenizer()
    processor = _load_image_processor(src, int(config.vision_config.image_size))
    engine = Engine(model, tokenizer, processor, device=device, dtype=torch_dtype, source=src)
    engine.is_random_weights = is_dir and (Path(src) / f"{TINY_MARKER}.json").exists()
    return engine
