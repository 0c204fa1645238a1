"""CPU benchmark on the bundled mmguard-mini (the model mmguard runs on CPUs): Engine against FastEngine on
the same conversations in the same run, and a prompt check plus a later response check of one image
(two calls) with and without kept encodings.

    .venv/bin/python bench/cpu_fast_engine.py                  # mmguard-mini, 32 images
    .venv/bin/python bench/cpu_fast_engine.py --model DIR --n 64

Conversations: photos of 1, 2 and 4 tiles (random sizes) with a question, the same photos with the
question and an answer, and text-only prompts. Prints classifications/s per method, ratios against
Engine in the same run, and max |dp(unsafe)| against Engine (exactness on these inputs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmguard.conversation import Conversation
from mmguard.fast import FastEngine
from mmguard.guard import Guard

QUESTIONS = ["where could this photo have been taken?", "is anything dangerous in this picture?",
             "describe the scene in detail, please", "what should I do with this?"]
ANSWERS = ["It looks like a street market in the morning.", "Nothing here looks dangerous to me.",
           "A wide field with a few trees and a path leading to a small house."]


def photos(n: int, tile: int, seed: int) -> list[Image.Image]:
    """Smooth random images (cheap to make, realistic to preprocess) of 1, 2 and 4 tiles."""
    rng = np.random.default_rng(seed)
    shapes = [(tile, tile), (2 * tile, tile), (2 * tile, 2 * tile)]
    out = []
    for i in range(n):
        w, h = shapes[i % 3]
        w, h = int(w * rng.uniform(0.8, 1.6)), int(h * rng.uniform(0.8, 1.6))
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
    return out


def timed(fn: Any, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled mmguard-mini)")
    p.add_argument("--n", type=int, default=32, help="images (each judged as a prompt and as a response)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    plain = Guard.from_pretrained(a.model, device="cpu", dtype="float32", batch_size=a.batch_size)
    fast = Guard(FastEngine.from_engine(plain.engine), batch_size=a.batch_size)
    kept = Guard(FastEngine.from_engine(plain.engine, keep_images=a.n), batch_size=a.batch_size)
    tile = plain.engine.tile_size
    images = photos(a.n, tile, seed=0)
    prompts = [Conversation.prompt(QUESTIONS[i % len(QUESTIONS)], image=im) for i, im in enumerate(images)]
    responses = [Conversation.response(QUESTIONS[i % len(QUESTIONS)], ANSWERS[i % len(ANSWERS)], image=im)
                 for i, im in enumerate(images)]
    texts = [Conversation.prompt(f"{QUESTIONS[i % len(QUESTIONS)]} ({i})") for i in range(a.n)]

    def run(guard: Guard, convs: list[Conversation]) -> list[Any]:
        return guard.classify_batch(convs, categories=False)

    def two_calls(guard: Guard) -> list[Any]:
        if isinstance(guard.engine, FastEngine):
            guard.engine.clear_image_cache()
        return run(guard, prompts) + run(guard, responses)

    print(f"model {plain.engine.source} ({tile} px tiles), {a.n} images, batch {a.batch_size}, CPU fp32, "
          f"median of {a.reps}")
    reference = {"prompts": run(plain, prompts), "text": run(plain, texts), "pairs": two_calls(plain)}
    rows = []
    for label, key, n, fn in (
        ("image prompts: Engine", "prompts", len(prompts), lambda: run(plain, prompts)),
        ("image prompts: FastEngine", "prompts", len(prompts), lambda: run(fast, prompts)),
        ("text prompts: Engine", "text", len(texts), lambda: run(plain, texts)),
        ("text prompts: FastEngine", "text", len(texts), lambda: run(fast, texts)),
        ("prompt, then response (2 calls): Engine", "pairs", 2 * a.n, lambda: two_calls(plain)),
        ("prompt, then response (2 calls): FastEngine", "pairs", 2 * a.n, lambda: two_calls(fast)),
        ("prompt, then response (2 calls): FastEngine keep_images", "pairs", 2 * a.n, lambda: two_calls(kept)),
    ):
        rate = n / timed(fn, a.reps)
        dp = max(abs(x.unsafe_probability - y.unsafe_probability) for x, y in zip(reference[key], fn(), strict=True))
        rows.append((label, rate, dp))
    base = {"image prompts": rows[0][1], "text prompts": rows[2][1], "prompt, then response (2 calls)": rows[4][1]}
    print(f"{'method':<58} {'cls/s':>8} {'vs Engine':>9} {'max|dp|':>9}")
    for label, rate, dp in rows:
        ratio = rate / base[label.split(":")[0]]
        print(f"{label:<58} {rate:>8.1f} {ratio:>8.2f}x {dp:>9.1e}")
    before = (kept.engine.images_encoded, kept.engine.image_cache_hits)
    two_calls(kept)
    print(f"one prompt-then-response round with keep_images: {kept.engine.images_encoded - before[0]} images "
          f"encoded, {kept.engine.image_cache_hits - before[1]} encodings reused")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
