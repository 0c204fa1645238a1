"""``FastEngine``: the mmguard engine with mask-free exact vision attention and one encoding per image.

Within one ``score`` call every distinct image (by ``mmguard.images.image_digest``) is preprocessed and
run through the vision encoder and projector once; the language model gets its ``cross_attention_states``
(repeated per row) instead of pixel values. A prompt classification and a response classification of the
same image therefore cost one encoding. Images are encoded in batches of equal tile count so that each
batch runs the mask-free attention with no per-row grouping. Everything else (one forward pass at the
decision position, the cached constrained decode of category codes, image and text-only rows batched
apart, batches sorted by length) is the parent :class:`mmguard.engine.Engine`.

``real_tiles_only=True`` is an opt-in approximation (see :mod:`mmguard.fast.vision`): the encoder skips
padding tokens altogether. It is not the model's computation; measure its verdict agreement first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..engine import EncodedItem, Engine, EngineError, ScoredItem, load_engine
from ..images import image_digest
from .vision import fast_vision_forward, patch_vision_attention

__all__ = ["FastEngine", "enable_fast_path", "load_fast_engine"]


@dataclass
class _Encoded:
    num_tiles: int
    states: torch.Tensor  # (max_tiles, num_patches, hidden): cross_attention_states rows of one image


class FastEngine(Engine):
    """Drop-in :class:`Engine` with the fast paths; same probabilities as the plain engine (exact path)."""

    def __init__(self, *args: Any, real_tiles_only: bool = False, vision_batch_size: int = 8,
                 max_cached_images: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_tiles_only = real_tiles_only
        self.vision_batch_size = vision_batch_size
        self.max_cached_images = max_cached_images
        self._encoded: dict[str, _Encoded] = {}
        self.images_encoded = 0  # counter, for tests and benchmarks
        patch_vision_attention(self.model)

    @classmethod
    def from_engine(cls, engine: Engine, **options: Any) -> FastEngine:
        fast = cls(engine.model, engine.tokenizer, engine.image_processor, device=engine.device,
                   dtype=engine.dtype, source=engine.source, **options)
        fast.is_random_weights = engine.is_random_weights
        return fast

    # -- image encodings ---------------------------------------------------------------------------
    def encode_images(self, images: Sequence[Image.Image]) -> list[str]:
        """Encode the images not encoded yet; returns their digests (in order)."""
        digests = [image_digest(im) for im in images]
        todo: dict[str, Image.Image] = {}
        for d, im in zip(digests, images, strict=True):
            if d not in self._encoded and d not in todo:
                todo[d] = im
        if not todo:
            return digests
        prepared = []
        for d, im in todo.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self.image_processor(images=[[im]], return_tensors="pt")
            prepared.append((int(out["num_tiles"][0][0]), d, out))
        prepared.sort(key=lambda x: x[0])  # equal tile counts together: one attention layout per batch
        vm = self.model.model.vision_model
        projector = self.model.model.multi_modal_projector
        hidden = self.model.config.text_config.hidden_size
        for s in range(0, len(prepared), self.vision_batch_size):
            chunk = prepared[s:s + self.vision_batch_size]
            px = torch.cat([c[2]["pixel_values"] for c in chunk]).to(self.device, self.dtype)
            ar_ids = torch.cat([c[2]["aspect_ratio_ids"] for c in chunk]).to(self.device)
            ar_mask = torch.cat([c[2]["aspect_ratio_mask"] for c in chunk]).to(self.device)
            with torch.inference_mode():
                vis = fast_vision_forward(vm, px, ar_ids, ar_mask, real_only=self.real_tiles_only)
                states = projector(vis).reshape(-1, vis.shape[-2], hidden)  # as MllamaModel.forward
            per = states.shape[0] // len(chunk)
            for j, (tiles, d, _) in enumerate(chunk):
                self._encoded[d] = _Encoded(tiles, states[j * per:(j + 1) * per])
            self.images_encoded += len(chunk)
        return digests

    def clear_image_cache(self) -> None:
        self._encoded.clear()

    # -- batching ----------------------------------------------------------------------------------
    def collate(self, items: Sequence[EncodedItem], extra: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        if not any(it.image is not None for it in items):
            return super().collate(items, extra)
        if not all(it.image is not None for it in items):
            raise EngineError("internal: image and text-only items must be batched separately")
        digests = self.encode_images([it.image for it in items])  # type: ignore[misc]
        batch = super().collate([EncodedItem(it.input_ids, None, it.prompt) for it in items], extra)
        enc = [self._encoded[d] for d in digests]
        mask = self.cross_attention_mask(batch["input_ids"], [[e.num_tiles] for e in enc])
        batch["cross_attention_mask"] = mask.to(self.device)
        batch["cross_attention_states"] = torch.cat([e.states for e in enc], dim=0)
        return batch

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
        """As :meth:`Engine.score`; items sharing an image share one encoding. Items are processed in
        chunks of at most ``max_cached_images`` distinct images to bound the memory of cached encodings."""
        results: list[ScoredItem | None] = [None] * len(items)
        by_image: dict[str, list[int]] = {}
        text_only: list[int] = []
        for i, it in enumerate(items):
            if it.image is None:
                text_only.append(i)
            else:
                by_image.setdefault(image_digest(it.image), []).append(i)
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
                self.clear_image_cache()
            for i, r in zip(chunk, scored, strict=True):
                results[i] = r
        return [r for r in results if r is not None]

    def decode_codes(self, items: Sequence[EncodedItem], codes: Sequence[str],
                     max_steps: int | None = None) -> list[tuple[tuple[str, ...], dict[str, float], str]]:
        try:
            return super().decode_codes(items, codes, max_steps)
        finally:
            self.clear_image_cache()


def load_fast_engine(source: str | Path, *, device: str | None = "auto", dtype: str | torch.dtype | None = "auto",
                     local_files_only: bool | None = None, **options: Any) -> FastEngine:
    """``load_engine`` then the fast paths (``options``: real_tiles_only, vision_batch_size, max_cached_images)."""
    return FastEngine.from_engine(load_engine(source, device=device, dtype=dtype, local_files_only=local_files_only),
                                  **options)


def enable_fast_path(guard: Any, **options: Any) -> Any:
    """Switch a loaded :class:`mmguard.guard.Guard` to the :class:`FastEngine` (same model instance)."""
    if not isinstance(guard.engine, FastEngine):
        guard.engine = FastEngine.from_engine(guard.engine, **options)
    return guard
