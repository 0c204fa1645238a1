"""``FastEngine``: the mmguard engine with exact fast paths, and opt-in approximations.

Exact (same probabilities as :class:`mmguard.engine.Engine`, tested on CPU):

* **One encoding per image.** Every distinct image (by ``mmguard.images.image_digest``) is preprocessed and
  run through the vision encoder and projector once; the language model gets its ``cross_attention_states``
  instead of pixel values. A prompt classification and a response classification of the same image cost one
  encoding, in one call and, with ``keep_images=N``, across calls too (an LRU of the N most recently used
  encodings: a server's prompt check and later response check of one image).
* **Mask-free vision attention** (:mod:`mmguard.fast.vision`), images encoded in batches of equal tile count.
* Image rows are batched by tile count, so that the opt-in approximations below, which cut the padded tiles,
  find batches that share one. (The exact path keeps every tile: the tokens before ``<|image|>`` have a fully
  masked cross-attention row, which Mllama resets to attend evenly to all tiles, padded ones included; cutting
  them changed the logit of 1-3 tile images by up to 7e-4.)
* ``mask_free_text=True``: right padding instead of left padding. Under a causal mask a real token never
  sees the padding that follows it, so the prefill runs with no attention mask at all (PyTorch's
  ``is_causal`` kernels) and the decision is read at each row's last real position. The code decode that
  follows continues from the same cache with an explicit mask. Opt-in until a GPU measures it faster.

Opt-in approximations (not the model's computation; measure their verdict agreement first, e.g. with
``bench/approx_agreement.py``):

* ``real_tiles_only=True``: an image's padded tiles are not encoded (its real tiles are, whole), and a batch
  whose images have at most ``t`` tiles gets cross-attention states over ``t`` tiles. Real tokens attend to the
  padded tiles' tokens in the model, so this changes the result for images of 1-3 tiles.
* ``real_tokens_only=True``: no padding token is encoded at all (also not the pad patches that round each
  real tile up to a multiple of 8 tokens), so it changes 4-tile images too (:mod:`mmguard.fast.vision`).
* ``quantize="int8"`` (torchao dynamic int8 activations and weights) or ``"fp8"`` (torchao dynamic float8,
  CUDA compute capability >= 8.9: H100/H200): every linear layer except ``lm_head`` (the verdict's own
  projection stays in the model's dtype). This changes the model instance in place.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..checkpoints import load_engine
from ..engine import EncodedItem, Engine, EngineError, ScoredItem
from ..images import image_digest
from .vision import fast_vision_forward, patch_vision_attention

__all__ = ["QUANTIZATIONS", "FastEngine", "enable_fast_path", "load_fast_engine", "quantize_model"]

QUANTIZATIONS = ("int8", "fp8")


@dataclass
class _Encoded:
    num_tiles: int
    states: torch.Tensor  # (max_tiles, num_patches, hidden): cross_attention_states rows of one image


class FastEngine(Engine):
    """Drop-in :class:`Engine` with the fast paths; same probabilities as the plain engine unless an
    approximation (``real_tiles_only``, ``real_tokens_only``, ``quantize``) is asked for."""

    def __init__(self, *args: Any, real_tiles_only: bool = False, real_tokens_only: bool = False,
                 vision_batch_size: int = 8,
                 max_cached_images: int = 64, keep_images: int = 0, mask_free_text: bool = False,
                 quantize: str | None = None, preprocess_workers: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if keep_images < 0 or max_cached_images < 1 or vision_batch_size < 1:
            raise EngineError("keep_images must be >= 0, max_cached_images and vision_batch_size >= 1")
        if real_tiles_only and real_tokens_only:
            raise EngineError("real_tiles_only and real_tokens_only are alternatives; choose one")
        self.real_tiles_only = real_tiles_only
        self.real_tokens_only = real_tokens_only
        self.vision_skip = "padding" if real_tokens_only else "padded_tiles" if real_tiles_only else None
        self.vision_batch_size = vision_batch_size
        self.max_cached_images = max_cached_images
        self.keep_images = keep_images
        self.mask_free_text = mask_free_text
        self.quantize = quantize
        # image preprocessing threads; on a CPU the model itself wants the cores, so one (inline) by default
        if preprocess_workers is None:
            preprocess_workers = 1 if str(self.device).startswith("cpu") else min(8, os.cpu_count() or 1)
        self.preprocess_workers = preprocess_workers
        self._pool: ThreadPoolExecutor | None = None
        self._encoded: OrderedDict[str, _Encoded] = OrderedDict()  # least recently used first
        self._digests: dict[int, str] = {}  # id(image) -> digest, for the duration of one call
        self._lock = threading.RLock()  # score and decode_codes, one call at a time (see score)
        self.images_encoded = 0  # counters, for tests, benchmarks and the server's metrics
        self.image_cache_hits = 0
        if quantize is not None:
            quantize_model(self.model, quantize)
        patch_vision_attention(self.model)

    @classmethod
    def from_engine(cls, engine: Engine, **options: Any) -> FastEngine:
        """A fast engine on ``engine``'s model, shared, not copied: its vision attention is patched in place, so
        ``engine``'s own probabilities then move within float rounding (~1e-6 relative; ``quantize`` changes the
        weights themselves)."""
        fast = cls(engine.model, engine.tokenizer, engine.image_processor, device=engine.device,
                   dtype=engine.dtype, source=engine.source, **options)
        fast.is_random_weights = engine.is_random_weights
        return fast

    # -- image encodings ---------------------------------------------------------------------------
    def _digest(self, image: Image.Image) -> str:
        # hashing a 4-tile image's pixels takes milliseconds: once per image object and call
        key = id(image)
        if key not in self._digests:
            self._digests[key] = image_digest(image)
        return self._digests[key]

    def encode_images(self, images: Sequence[Image.Image]) -> list[str]:
        """Encode the images not encoded yet; returns their digests (in order)."""
        digests = [self._digest(im) for im in images]
        todo: dict[str, Image.Image] = {}
        for d, im in zip(digests, images, strict=True):
            if d in self._encoded:
                if d not in todo:
                    self._encoded.move_to_end(d)
            elif d not in todo:
                todo[d] = im
        if not todo:
            return digests
        # sorted by expected tile count (equal counts batch together), preprocessed by a thread pool in that
        # order while earlier batches are encoded: the PIL processor takes ~20 ms for a 4-tile image on one
        # core (bench/preprocess_throughput.py), half of what a classification may take at 25/s
        order = sorted(todo.items(), key=lambda kv: self.expected_tiles(kv[1]))
        prepared = self._preprocessed([im for _, im in order])
        vm = self.model.model.vision_model
        projector = self.model.model.multi_modal_projector
        hidden = self.model.config.text_config.hidden_size
        for s in range(0, len(order), self.vision_batch_size):
            chunk = [(d, prepared[s + j]()) for j, (d, _) in enumerate(order[s:s + self.vision_batch_size])]
            px = torch.cat([out["pixel_values"] for _, out in chunk]).to(self.device, self.dtype)
            ar_ids = torch.cat([out["aspect_ratio_ids"] for _, out in chunk]).to(self.device)
            ar_mask = torch.cat([out["aspect_ratio_mask"] for _, out in chunk]).to(self.device)
            with torch.inference_mode():
                vis = fast_vision_forward(vm, px, ar_ids, ar_mask, skip=self.vision_skip)
                states = projector(vis).reshape(-1, vis.shape[-2], hidden)  # as MllamaModel.forward
            per = states.shape[0] // len(chunk)
            for j, (d, out) in enumerate(chunk):
                self._encoded[d] = _Encoded(int(out["num_tiles"][0][0]), states[j * per:(j + 1) * per])
            self.images_encoded += len(chunk)
        return digests

    def expected_tiles(self, image: Image.Image) -> int:
        """The tile count the image processor will choose (transformers' own canvas rule), from the size."""
        try:
            from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas
        except ImportError:  # the sort order is only an optimisation
            return 0
        height, width = get_optimal_tiled_canvas(image.height, image.width, self.image_processor.max_image_tiles,
                                                 self.tile_size)
        return (height // self.tile_size) * (width // self.tile_size)

    def _preprocess(self, image: Image.Image) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.image_processor(images=[[image]], return_tensors="pt")

    def _preprocessed(self, images: list[Image.Image]) -> list[Callable[[], Any]]:
        """One getter per image: inline when ``preprocess_workers`` is 1, else futures of a thread pool."""
        if self.preprocess_workers <= 1 or len(images) <= 1:
            return [functools.partial(self._preprocess, im) for im in images]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.preprocess_workers, thread_name_prefix="mmguard-preprocess")
        futures = [self._pool.submit(self._preprocess, im) for im in images]
        return [f.result for f in futures]

    def clear_image_cache(self) -> None:
        """Drop every cached encoding (also those kept across calls)."""
        with self._lock:
            self._encoded.clear()
            self._digests.clear()

    def _release(self) -> None:
        """Between chunks and at the end of a call: keep only the ``keep_images`` most recently used."""
        while len(self._encoded) > self.keep_images:
            self._encoded.popitem(last=False)

    @property
    def cached_images(self) -> int:
        return len(self._encoded)

    # -- batching ----------------------------------------------------------------------------------
    def batch_order(self, item: EncodedItem) -> Any:
        """Image rows by (tile count, length): batches of one tile count let the cross-attention skip padded
        tiles. The tile count is known once the image is encoded (``score`` encodes before batching)."""
        if item.image is None:
            return super().batch_order(item)
        enc = self._encoded.get(self._digest(item.image))
        return (enc.num_tiles if enc is not None else 0, len(item.input_ids))

    def collate(self, items: Sequence[EncodedItem], extra: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        if not any(it.image is not None for it in items):
            batch = super().collate(items, extra)
        else:
            if not all(it.image is not None for it in items):
                raise EngineError("internal: image and text-only items must be batched separately")
            digests = self.encode_images([it.image for it in items])  # type: ignore[misc]
            batch = super().collate([EncodedItem(it.input_ids, None, it.prompt) for it in items], extra)
            enc = [self._encoded[d] for d in digests]
            # every tile, padded ones too: the tokens before <|image|> have a fully masked cross-attention row,
            # which Mllama resets to attend evenly to all tiles, so cutting the padded ones changed 1-3 tile images
            # (a logit by up to 7e-4). Only the approximations, which change those images anyway, cut them.
            approximate = self.real_tiles_only or self.real_tokens_only
            tiles = max(e.num_tiles for e in enc) if approximate else enc[0].states.shape[0]
            mask = self.cross_attention_mask(batch["input_ids"], [[e.num_tiles] for e in enc], max_tiles=tiles)
            batch["cross_attention_mask"] = mask.to(self.device)
            batch["cross_attention_states"] = torch.cat([e.states[:tiles] for e in enc], dim=0)
        return _to_right_padding(batch) if self.mask_free_text else batch

    def decision_pass(self, batch: dict[str, Any], *, use_cache: bool) -> tuple[Any, torch.Tensor]:
        if "last_index" not in batch:
            return super().decision_pass(batch, use_cache=use_cache)
        # right-padded: no attention mask (causal only); hidden states read at each row's last real token
        inputs = {k: v for k, v in batch.items() if k not in ("attention_mask", "last_index")}
        out = self.model.model(**inputs, use_cache=use_cache)
        rows = torch.arange(out.last_hidden_state.shape[0], device=out.last_hidden_state.device)
        last_hidden = out.last_hidden_state[rows, batch["last_index"].to(rows.device)]
        return out, self.model.lm_head(last_hidden)

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
        """As :meth:`Engine.score`; items sharing an image share one encoding (also with an earlier call's
        items when ``keep_images`` > 0). Items are processed in chunks of at most ``max_cached_images``
        distinct images to bound the memory of cached encodings."""
        # the cached encodings, the call's digests and the patched vision state are shared: one call at a time
        # (a second thread's release evicted encodings the first was about to read: KeyErrors, wrong probabilities)
        with self._lock:
            try:
                results: list[ScoredItem | None] = [None] * len(items)
                by_image: dict[str, list[int]] = {}
                text_only: list[int] = []
                for i, it in enumerate(items):
                    if it.image is None:
                        text_only.append(i)
                    else:
                        by_image.setdefault(self._digest(it.image), []).append(i)
                self.image_cache_hits += sum(d in self._encoded for d in by_image)
                chunks = [text_only] if text_only else []
                groups = list(by_image.values())
                for s in range(0, len(groups), self.max_cached_images):
                    chunks.append([i for g in groups[s:s + self.max_cached_images] for i in g])
                for chunk in chunks:
                    try:
                        imgs = [items[i].image for i in chunk if items[i].image is not None]
                        if imgs:
                            self.encode_images(imgs)  # type: ignore[arg-type]
                        scored = super().score([items[i] for i in chunk], threshold=threshold, codes=codes,
                                               batch_size=batch_size, decode_codes=decode_codes, progress=progress)
                    finally:
                        self._release()
                    for i, r in zip(chunk, scored, strict=True):
                        results[i] = r
                return [r for r in results if r is not None]
            finally:
                self._digests.clear()

    def decode_codes(self, items: Sequence[EncodedItem], codes: Sequence[str],
                     max_steps: int | None = None) -> list[tuple[tuple[str, ...], dict[str, float], str]]:
        with self._lock:
            try:
                return super().decode_codes(items, codes, max_steps)
            finally:
                self._release()
                self._digests.clear()


def load_fast_engine(source: str | Path, *, device: str | None = "auto", dtype: str | torch.dtype | None = "auto",
                     local_files_only: bool | None = None, **options: Any) -> FastEngine:
    """``load_engine`` then the fast paths (``options``: see :class:`FastEngine`: keep_images, mask_free_text,
    real_tiles_only, real_tokens_only, quantize, vision_batch_size, max_cached_images, preprocess_workers)."""
    return FastEngine.from_engine(load_engine(source, device=device, dtype=dtype, local_files_only=local_files_only),
                                  **options)


def enable_fast_path(guard: Any, **options: Any) -> Any:
    """Switch a loaded :class:`mmguard.guard.Guard` to the :class:`FastEngine` (same model instance, which
    ``quantize`` changes in place)."""
    if not isinstance(guard.engine, FastEngine):
        guard.engine = FastEngine.from_engine(guard.engine, **options)
    return guard


def quantize_model(model: Any, kind: str) -> Any:
    """Quantize every linear layer of ``model`` except ``lm_head`` in place with torchao (an approximation:
    measure its verdict agreement before use). ``kind``: ``"int8"`` (dynamic int8 activations and weights)
    or ``"fp8"`` (dynamic float8, needs CUDA compute capability >= 8.9)."""
    if kind not in QUANTIZATIONS:
        raise EngineError(f"unknown quantization {kind!r}; use one of {', '.join(QUANTIZATIONS)}")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if kind == "fp8" and not (on_cuda and torch.cuda.get_device_capability() >= (8, 9)):
        raise EngineError("quantize='fp8' needs a CUDA GPU of compute capability >= 8.9 (H100, H200, L40S, ...)")
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            quantize_,
        )
    except ImportError:
        raise EngineError("quantization needs torchao: pip install 'mmguard[quant]'") from None
    config = Int8DynamicActivationInt8WeightConfig() if kind == "int8" else Float8DynamicActivationFloat8WeightConfig()
    lm_head = model.lm_head

    def keep(module: torch.nn.Module, _fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module is not lm_head

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=keep)
    return model


def _to_right_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """Move a left-padded batch's padding to the right (``mask_free_text``). Real tokens keep their positions
    0..n-1; padding takes the last real position and the last real row of the cross-attention mask, so the
    code decode that continues after it (``Engine._step`` extends from the last column and row) is unchanged.
    ``attention_mask`` stays for that decode; ``last_index`` says where each row's decision is read."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    lengths = mask.sum(-1)
    out = dict(batch)
    out["input_ids"] = batch["input_ids"].clone()
    out["attention_mask"] = torch.zeros_like(mask)
    cross = batch.get("cross_attention_mask")
    if cross is not None:
        out["cross_attention_mask"] = cross.clone()
    for row, n in enumerate(lengths.tolist()):
        pad = width - n
        if pad == 0:
            out["attention_mask"][row] = 1
            continue
        out["input_ids"][row, :n] = batch["input_ids"][row, pad:]
        out["input_ids"][row, n:] = batch["input_ids"][row, 0]  # the pad id
        out["attention_mask"][row, :n] = 1
        if cross is not None:
            out["cross_attention_mask"][row, :n] = cross[row, pad:]
            out["cross_attention_mask"][row, n:] = cross[row, -1]
    positions = torch.arange(width, device=mask.device)[None, :]
    out["position_ids"] = torch.minimum(positions, (lengths - 1)[:, None])
    out["last_index"] = lengths - 1
    return out
