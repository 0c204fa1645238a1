"""Image preprocessing throughput of FastEngine (transformers' Mllama image processor at 560 px tiles), inline
vs its thread pool (``preprocess_workers``), on this machine's CPU. Preprocessing runs on the CPU even when
the model runs on a GPU, where at the issue's target (25 classifications/s) one image has 40 ms.

    python bench/preprocess_throughput.py            # workers 1, 2, 4, 8 (up to the core count)

Prints images/s per image size and worker count, and the ratio to inline (workers=1) in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmguard.checkpoints import make_image_processor
from mmguard.engine import Engine
from mmguard.fast import FastEngine
from mmguard.tokenizer import load_default_tokenizer

SIZES = {"4-tile 1120x1120": (1120, 1120), "2-tile 1120x560": (1120, 560), "1-tile 560x560": (560, 560),
         "photo 4000x3000": (4000, 3000)}


def engine_with_560_tiles(workers: int) -> FastEngine:
    """A tiny random Mllama with 560 px tiles: only its image processor and tile size are used here."""
    from transformers import MllamaForConditionalGeneration

    from mmguard.tiny import tiny_config

    model = MllamaForConditionalGeneration(tiny_config(image_size=560)).eval()
    plain = Engine(model, load_default_tokenizer(), make_image_processor(560), device="cpu",
                   dtype=model.dtype, source="random")
    # the device is the CPU here, where the default is inline; the pool is what a GPU host gets
    return FastEngine.from_engine(plain, preprocess_workers=workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="images per measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=None)
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    workers = a.workers or [w for w in (1, 2, 4, 8) if w <= cores]
    if 1 not in workers:
        workers = [1, *workers]
    print(f"{cores} CPU cores; {a.images} images per measurement, median of {a.reps}")
    rng = np.random.default_rng(0)
    print(f"{'images':<18} {'workers':>7} {'images/s':>9} {'ms/image':>9} {'vs inline':>9}")
    for label, (w, h) in SIZES.items():
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(a.images)]
        base = None
        for n in workers:
            engine = engine_with_560_tiles(n)
            times = []
            for _ in range(a.reps + 1):  # the first round warms up (and starts the pool)
                t0 = time.perf_counter()
                for get in engine._preprocessed(images):
                    get()
                times.append(time.perf_counter() - t0)
            rate = len(images) / statistics.median(times[1:])
            base = base or rate
            print(f"{label:<18} {n:>7} {rate:>9.1f} {1000 / rate:>9.1f} {rate / base:>8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
