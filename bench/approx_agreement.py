"""Verdict agreement of FastEngine's opt-in approximations with its exact path, on a trained model and
labeled data: the measurement issue 7 asks for before an approximation is used.

For every approximation (``real-tiles-only``: an image's padded tiles are not encoded; ``real-tokens-only``:
no padding token is; ``int8`` / ``fp8``: torchao quantization of every linear layer but lm_head) the same
conversations are classified by the exact FastEngine and by the approximation. Printed and written as
JSON: verdict agreement, flips in each direction, max / mean / p99 |dp(unsafe)|, and F1 / FPR of both
against the labels, overall and for the image+text items alone. Quantization loads its own copy of the
model (it changes the model in place); the vision approximations share the exact engine's.

    python bench/approx_agreement.py --model default --data TEST.jsonl --limit 600
    python bench/approx_agreement.py --model default --data TEST.jsonl --limit 0 --images-only --resize-to-tiles 1
    python bench/approx_agreement.py --model /models/Llama-Guard-3-11B-Vision --data TEST.jsonl \\
        --approx real-tiles-only fp8 --device cuda

Random weights make these numbers meaningless: use a trained model (the bundled mmguard-mini or yours).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmguard.eval.data import DataError, iter_records
from mmguard.eval.metrics import binary_metrics
from mmguard.fast import FastEngine, load_fast_engine
from mmguard.guard import Guard

APPROXIMATIONS = {"real-tiles-only": {"real_tiles_only": True}, "real-tokens-only": {"real_tokens_only": True},
                  "int8": {"quantize": "int8"}, "fp8": {"quantize": "fp8"}}


def load_items(path: Path, limit: int, split: str | None) -> tuple[list[Any], list[Any], int]:
    """``limit`` records spread evenly over the file (sources are often contiguous), images loaded."""
    records = list(iter_records(path, split=split))
    if limit and len(records) > limit:
        records = [records[int(i)] for i in np.linspace(0, len(records) - 1, limit)]
    kept, conversations, bad = [], [], 0
    for rec in records:
        try:
            conversations.append(rec.conversation())
            kept.append(rec)
        except DataError:
            bad += 1
    return kept, conversations, bad


def resized_to_tiles(conversations: list[Any], tiles: int, tile_size: int) -> list[Any]:
    """The same conversations with each image resized to a canvas of ``tiles`` tiles (1: 1x1, 2: 2x1, 3: 3x1,
    4: 2x2), so that approximations that act on padded tiles are exercised; the labels still hold."""
    from PIL import Image

    from mmguard.attacks.common import with_image

    cols, rows = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2)}[tiles]
    size = (cols * tile_size, rows * tile_size)
    return [with_image(c, c.image.resize(size, Image.Resampling.BICUBIC)) if c.image is not None else c
            for c in conversations]


def compare(exact: list[Any], approx: list[Any], labels: list[int], threshold: float,
            tiles: list[int]) -> dict[str, Any]:
    """``tiles``: each item's image tile count (0: no image)."""
    pe = np.array([v.unsafe_probability for v in exact])
    pa = np.array([v.unsafe_probability for v in approx])
    ve, va = pe >= threshold, pa >= threshold
    dp = np.abs(pe - pa)
    out: dict[str, Any] = {
        "n": len(pe), "verdict_agreement": float((ve == va).mean()),
        "flips_safe_to_unsafe": int((~ve & va).sum()), "flips_unsafe_to_safe": int((ve & ~va).sum()),
        "max_abs_dp_unsafe": float(dp.max()), "mean_abs_dp_unsafe": float(dp.mean()),
        "p99_abs_dp_unsafe": float(np.percentile(dp, 99)),
    }
    t = np.array(tiles)
    for key, sel in [("image_items", t > 0)] + [(f"{k}-tile images", t == k) for k in sorted(set(tiles) - {0})]:
        if sel.any():
            out[key] = {"n": int(sel.sum()), "verdict_agreement": float((ve[sel] == va[sel]).mean()),
                        "max_abs_dp_unsafe": float(dp[sel].max())}
    for name, p, v in (("exact", pe, ve), ("approx", pa, va)):
        m = binary_metrics(labels, v.astype(int).tolist(), p.tolist())
        out[f"{name}_f1"], out[f"{name}_fpr"] = m.f1, m.fpr
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="checkpoint directory or hub id ('default': mmguard-mini)")
    p.add_argument("--data", type=Path, required=True, help="labeled JSONL (mmguard data schema)")
    p.add_argument("--split", default=None, help="only items of this split")
    p.add_argument("--limit", type=int, default=600, help="items, spread evenly over the file (0: all)")
    p.add_argument("--approx", nargs="+", choices=sorted(APPROXIMATIONS),
                   default=["real-tiles-only", "real-tokens-only", "int8"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--images-only", action="store_true", help="only the items that carry an image")
    p.add_argument("--resize-to-tiles", type=int, choices=(1, 2, 3, 4), default=None,
                   help="resize every image to this many tiles first (most test images have 4)")
    p.add_argument("--out", type=Path, default=Path("approx_agreement.json"))
    a = p.parse_args(argv)
    if not a.data.is_file():
        p.error(f"file not found: {a.data}")
    source: Any = None if a.model == "default" else a.model
    if source is None:
        from mmguard.models import default_model_path

        source = default_model_path()
    records, conversations, bad = load_items(a.data, a.limit, a.split)
    if a.images_only:
        pairs = [(r, c) for r, c in zip(records, conversations, strict=True) if c.image is not None]
        records, conversations = [r for r, _ in pairs], [c for _, c in pairs]
    if not conversations:
        p.error(f"no usable items in {a.data}")
    labels = [r.y for r in records]

    def classify(base: Any = None, **options: Any) -> tuple[list[Any], float, Any]:
        # quantization changes the model in place, so only it needs a model of its own
        if base is not None and "quantize" not in options:
            engine = FastEngine.from_engine(base, **options)
        else:
            engine = load_fast_engine(source, device=a.device, dtype=a.dtype, **options)
        guard = Guard(engine, threshold=a.threshold, batch_size=a.batch_size)
        t0 = time.perf_counter()
        verdicts = guard.classify_batch(conversations, categories=False)
        return verdicts, time.perf_counter() - t0, engine

    if a.resize_to_tiles:
        from transformers import AutoConfig

        tile_size = int(AutoConfig.from_pretrained(str(source)).vision_config.image_size)
        conversations = resized_to_tiles(conversations, a.resize_to_tiles, tile_size)
    exact, exact_s, engine = classify()
    tiles = [engine.expected_tiles(c.image) if c.image is not None else 0 for c in conversations]
    counts = {k: tiles.count(k) for k in sorted(set(tiles) - {0})}
    print(f"{len(conversations)} items ({sum(counts.values())} with an image: "
          f"{', '.join(f'{n} of {k} tiles' for k, n in counts.items())}; {bad} unreadable skipped) from {a.data}",
          flush=True)
    report: dict[str, Any] = {"model": str(source), "data": str(a.data), "threshold": a.threshold,
                              "images_only": a.images_only, "resize_to_tiles": a.resize_to_tiles,
                              "exact_seconds": exact_s, "approximations": {}}
    print(f"{'approximation':<16} {'agree':>7} {'s->u':>5} {'u->s':>5} {'max|dp|':>9} {'mean|dp|':>9} "
          f"{'F1 exact':>9} {'F1 appr':>8} {'FPR ex':>7} {'FPR ap':>7} {'time ratio':>10}")
    for name in a.approx:
        approx, approx_s, _ = classify(engine, **APPROXIMATIONS[name])
        row = compare(exact, approx, labels, a.threshold, tiles)
        row["time_ratio_vs_exact"] = approx_s / exact_s
        report["approximations"][name] = row
        print(f"{name:<16} {row['verdict_agreement']:>7.3f} {row['flips_safe_to_unsafe']:>5} "
              f"{row['flips_unsafe_to_safe']:>5} {row['max_abs_dp_unsafe']:>9.2e} {row['mean_abs_dp_unsafe']:>9.2e} "
              f"{row['exact_f1']:>9.3f} {row['approx_f1']:>8.3f} {row['exact_fpr']:>7.3f} {row['approx_fpr']:>7.3f} "
              f"{row['time_ratio_vs_exact']:>10.2f}", flush=True)
        slices = [(k, v) for k, v in row.items() if k.endswith("images")]
        print("    " + "; ".join(f"{k}: agree {v['verdict_agreement']:.3f}, max|dp| {v['max_abs_dp_unsafe']:.2e}"
                                for k, v in slices), flush=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
