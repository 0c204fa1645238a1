"""White-box L-infinity PGD on the image, pushing a guard's verdict from ``unsafe`` to ``safe``.

Attack space: the image *after* the processor's resize, as a float tensor in [0, 1] (3, H, W). The
processor's remaining steps are re-implemented in torch so gradients flow through exactly what the
model sees: zero-pad bottom/right to the tile canvas, rescale is implicit ([0, 1]), normalise with the
processor's mean/std, split into tiles row-major and place them in the ``(1, 1, max_tiles, 3, T, T)``
``pixel_values`` (unused tiles are zeros). :class:`ImagePipeline` is tested to reproduce the
processor's ``pixel_values`` on the unperturbed image.

Loss: the margin ``logit(unsafe) - logit(safe)`` at the decision position (or ``log p(unsafe)``,
see :func:`.common.attack_loss`), minimised with signed
gradient steps and projected onto the budget ball intersected with [0, 1]. Adversarial images are
quantised to 8 bits (the budget survives rounding because the resized image is itself 8-bit and the
budgets are whole multiples of 1/255), written as PNG at the resized size, read back from disk and
classified afresh; only that fresh verdict counts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..engine import Engine
from .common import attack_loss, with_image

__all__ = ["ImagePipeline", "PGDConfig", "PGDResult", "parse_budgets", "pgd_attack"]


def _canvas_functions() -> tuple[Any, Any]:
    try:
        from transformers.models.mllama.image_processing_pil_mllama import (
            get_image_size_fit_to_canvas,
            get_optimal_tiled_canvas,
        )
    except ImportError:  # older transformers: one module
        from transformers.models.mllama.image_processing_mllama import (  # type: ignore[no-redef]
            get_image_size_fit_to_canvas,
            get_optimal_tiled_canvas,
        )
    return get_optimal_tiled_canvas, get_image_size_fit_to_canvas


def _resized_layout(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int, int, int]:
    """(new_height, new_width, tiles_high, tiles_wide) exactly as the Mllama processor decides them."""
    canvas_fn, fit_fn = _canvas_functions()
    ch, cw = canvas_fn(image_height=height, image_width=width, max_image_tiles=max_tiles, tile_size=tile)
    nh, nw = fit_fn(image_height=height, image_width=width, canvas_height=ch, canvas_width=cw, tile_size=tile)
    return int(nh), int(nw), int(ch) // tile, int(cw) // tile


def _attr(proc: Any, name: str, default: Any) -> Any:
    value = getattr(proc, name, None)
    return default if value is None else value


class ImagePipeline:
    """The processor's view of one image, differentiable from the resized [0, 1] pixels onwards."""

    def __init__(self, engine: Any, image: Image.Image) -> None:
        proc = engine.image_processor
        self.tile = int(engine.tile_size)
        self.max_tiles = int(_attr(proc, "max_image_tiles", 4))
        image = image.convert("RGB")
        h, w, self.tiles_h, self.tiles_w = _resized_layout(image.height, image.width, self.tile,
                                                           self.max_tiles)
        resample = _attr(proc, "resample", Image.Resampling.BILINEAR)
        resized = image if image.size == (w, h) else image.resize((w, h), Image.Resampling(int(resample)))
        # the resized image must be a fixed point: re-processing it (after saving) must not resize again
        again = _resized_layout(h, w, self.tile, self.max_tiles)
        if again != (h, w, self.tiles_h, self.tiles_w):
            raise ValueError(f"resized size {(h, w)} is not stable under the processor's resize: {again}")
        self.resized = resized
        self.height, self.width = h, w
        arr = np.asarray(resized, dtype=np.float32) / 255.0
        self.x0 = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        self.mean = torch.tensor(_attr(proc, "image_mean", [0.5] * 3), dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(_attr(proc, "image_std", [0.5] * 3), dtype=torch.float32)[:, None, None]

    def pixel_values(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) in [0, 1] -> (1, 1, max_tiles, 3, T, T) normalised tiles, as the processor makes them."""
        t = self.tile
        canvas_h, canvas_w = self.tiles_h * t, self.tiles_w * t
        padded = torch.nn.functional.pad(x, (0, canvas_w - x.shape[2], 0, canvas_h - x.shape[1]), value=0.0)
        norm = (padded - self.mean.to(x)) / self.std.to(x)
        tiles = norm.reshape(3, self.tiles_h, t, self.tiles_w, t).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(self.tiles_h * self.tiles_w, 3, t, t)
        n = tiles.shape[0]
        if n < self.max_tiles:
            tiles = torch.cat([tiles, tiles.new_zeros(self.max_tiles - n, 3, t, t)], dim=0)
        return tiles[None, None]

    @staticmethod
    def quantise(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x.clamp(0, 1) * 255.0) / 255.0

    @staticmethod
    def to_pil(x: torch.Tensor) -> Image.Image:
        arr = torch.round(x.detach().clamp(0, 1) * 255.0).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr, "RGB")


def parse_budgets(text: str) -> list[float]:
    """``"1,2,4,inf"`` (in 1/255 units) -> ``[1/255, 2/255, 4/255, inf]``."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("inf", "unbounded", "none"):
            out.append(math.inf)
        else:
            value = float(part)
            if math.isnan(value) or value <= 0:
                raise ValueError(f"budget must be positive, got {part}")
            out.append(value / 255.0)
    if not out:
        raise ValueError("no budgets given")
    return sorted(out)


def budget_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{round(eps * 255):g}/255"


@dataclass
class PGDConfig:
    steps: int = 20
    step_size: float | None = None  # absolute, in [0, 1] units; default 2.5 * eps / steps (min 1/255)
    random_start: bool = True
    seed: int = 0
    early_stop: bool = True
    loss: str = "margin"  # or "logprob" (see common.attack_loss)


@dataclass
class PGDResult:
    item_id: str
    task: str
    budget: float
    clean_p_unsafe: float
    adv_p_unsafe: float
    clean_unsafe: bool
    success: bool  # the fresh verdict on the saved 8-bit PNG is safe
    linf: float  # measured on the saved 8-bit image, in [0, 1] units
    steps_run: int
    seconds: float
    image_path: str | None = None
    resized_size: tuple[int, int] = (0, 0)  # (width, height) of the attacked (resized) image
    reused: bool = False  # a smaller budget's image already flipped; reused at this larger budget
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["budget"] = budget_label(self.budget)
        return d


def _forward_logits(model: Any, batch: dict[str, Any], pixel_values: torch.Tensor) -> torch.Tensor:
    out = model(**batch, pixel_values=pixel_values, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :]


def pgd_attack(
    guard: Any,
    item: Any,
    budget: float,
    config: PGDConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    clean: tuple[float, bool] | None = None,
    start: torch.Tensor | None = None,
) -> tuple[PGDResult, torch.Tensor]:
    """Attack one unsafe item with an image at L-infinity ``budget`` (in [0, 1] units; ``inf`` =
    unbounded, i.e. only [0, 1]). Returns the result and the final 8-bit adversarial image tensor."""
    cfg = config or PGDConfig()
    engine = guard.engine
    model = engine.model
    t0 = time.perf_counter()
    conv = item.conversation
    if conv.image is None:
        raise ValueError(f"item {item.id} has no image; pair it with a neutral image first")
    pipe = ImagePipeline(engine, conv.image)
    conv0 = with_image(conv, pipe.resized)
    if clean is None:
        v = guard.classify(conv0, categories=False)
        clean = (v.unsafe_probability, v.is_unsafe)
    clean_p, clean_unsafe = clean
    eps = 1.0 if math.isinf(budget) else float(budget)
    result = PGDResult(item.id, item.task, budget, clean_p, clean_p, clean_unsafe, not clean_unsafe, 0.0, 0,
                       0.0, resized_size=(pipe.width, pipe.height))
    x0 = pipe.x0.to(engine.device)
    if not clean_unsafe:  # already missed: nothing to attack, the clean image is "adversarial"
        result.seconds = time.perf_counter() - t0
        return result, x0
    enc = engine.encode(guard.render(conv0), pipe.resized)
    batch = Engine.collate(engine, [enc])  # the reference batch (pixel values), also for a FastEngine
    batch.pop("pixel_values")
    dtype = engine.dtype
    alpha = cfg.step_size if cfg.step_size else max(2.5 * eps / max(1, cfg.steps), 1.0 / 255.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    if start is not None:
        x = start.to(engine.device).clone()
    elif cfg.random_start:
        radius = min(eps, 16.0 / 255.0)
        noise = (torch.rand(x0.shape, generator=gen) * 2 - 1) * radius
        x = (x0 + noise.to(engine.device)).clamp(0, 1)
    else:
        x = x0.clone()
    lo, hi = (x0 - eps).clamp(min=0.0), (x0 + eps).clamp(max=1.0)
    x = torch.max(torch.min(x, hi), lo)
    best_q, best_q_margin = ImagePipeline.quantise(x), math.inf
    steps_run = 0
    for _ in range(cfg.steps):
        steps_run += 1
        x_var = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = _forward_logits(model, batch, pipe.pixel_values(x_var).to(dtype))
            loss = attack_loss(logits, engine.safe_id, engine.unsafe_id, cfg.loss).sum()
            (grad,) = torch.autograd.grad(loss, x_var)
        p_float = float(torch.softmax(logits.detach()[0].float(), -1)[engine.unsafe_id])
        if p_float < guard.threshold_for(conv.task) or steps_run == cfg.steps:
            q = ImagePipeline.quantise(x)
            with torch.no_grad():
                ql = _forward_logits(model, batch, pipe.pixel_values(q).to(dtype))
            qm = float(attack_loss(ql, engine.safe_id, engine.unsafe_id, cfg.loss)[0])
            qp = float(torch.softmax(ql[0].float(), -1)[engine.unsafe_id])
            if qm < best_q_margin:
                best_q, best_q_margin = q, qm
            if cfg.early_stop and qp < guard.threshold_for(conv.task):
                break
        x = x.detach() - alpha * grad.sign()
        x = torch.max(torch.min(x, hi), lo)
    if best_q_margin == math.inf:
        best_q = ImagePipeline.quantise(x)
    adv = best_q
    # guard against any rounding drift: project the 8-bit image into the budget once more
    q_hi = torch.floor(hi * 255.0 + 1e-3) / 255.0
    q_lo = torch.ceil(lo * 255.0 - 1e-3) / 255.0
    adv = torch.max(torch.min(adv, q_hi), q_lo)
    pil = ImagePipeline.to_pil(adv)
    path = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / f"{_safe_name(item.id)}_eps{budget_label(budget).replace('/255', '')}.png"
        pil.save(path, format="PNG")
        with Image.open(path) as im:
            pil = im.convert("RGB")
    fresh = guard.classify(with_image(conv, pil), categories=False)
    back = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1).to(engine.device)
    result.adv_p_unsafe = fresh.unsafe_probability
    result.success = not fresh.is_unsafe
    result.linf = float((back - x0).abs().max())
    result.steps_run = steps_run
    result.image_path = str(path) if path else None
    result.seconds = time.perf_counter() - t0
    return result, back


def _safe_name(text: str) -> str:
    import hashlib

    short = "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]
    return f"{short}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"
