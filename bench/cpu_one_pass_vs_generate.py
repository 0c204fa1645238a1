"""CPU benchmark: one-pass scoring against the model-card recipe (greedy ``generate(max_new_tokens=20)``).

Both run in the same process on the same conversations and the same tiny Mllama checkpoint, so the
printed ratios are what matters (absolute times on a shared machine are noise).

    .venv/bin/python bench/cpu_one_pass_vs_generate.py            # builds a format-imprinted tiny model
    .venv/bin/python bench/cpu_one_pass_vs_generate.py --model DIR --n 32 --batch-size 8

The imprinted tiny model writes real Llama Guard answers (``\\n\\nsafe<|eot_id|>``), so ``generate`` stops
at ``<|eot_id|>`` as it would with the real model instead of always running 20 tokens.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmguard.guard import Guard
from mmguard.tiny import imprint_format, make_tiny_checkpoint, synthetic_conversation
from mmguard.verdict import parse_output


def model_card_recipe(guard: Guard, convs: list, batch_size: int) -> list[str]:
    """Render, tokenize, ``generate(max_new_tokens=20)`` greedily, decode and parse (image and text apart)."""
    engine = guard.engine
    prefix = len(engine.decision_prefix_ids("\n\n"))
    items = []
    for c in convs:
        item = engine.encode(guard.render(c), c.image)
        item.input_ids = item.input_ids[:-prefix] if prefix else item.input_ids
        items.append(item)
    labels: list[str] = [""] * len(items)
    for want_image in (True, False):
        idx = [i for i, it in enumerate(items) if (it.image is not None) == want_image]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            batch = engine.collate([items[i] for i in chunk])
            batch.pop("position_ids")
            with torch.inference_mode():
                out = engine.model.generate(**batch, do_sample=False, max_new_tokens=20, pad_token_id=engine.pad_id)
            for row, i in enumerate(chunk):
                text = engine.tokenizer.decode(out[row, batch["input_ids"].shape[1]:], skip_special_tokens=False)
                labels[i] = parse_output(text).label or "?"
    return labels


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: build a format-imprinted tiny model)")
    ap.add_argument("--n", type=int, default=24, help="conversations (half with images)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random", action="store_true",
                    help="use a random-weight tiny model: generate() then always runs all 20 tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model
    if model_dir is None:
        model_dir = Path(tempfile.mkdtemp()) / ("random" if args.random else "imprinted")
        make_tiny_checkpoint(model_dir, seed=3)
        if not args.random:
            print("building a format-imprinted tiny model (about a minute)...")
            imprint_format(model_dir, steps=120, lr=1e-2, seed=3)
    guard = Guard.from_pretrained(model_dir, device="cpu", dtype="float32")
    rng = random.Random(11)
    convs = [synthetic_conversation(rng, with_image=i % 2 == 0)[0] for i in range(args.n)]

    # warm-up both paths once
    guard.classify_batch(convs[:2], batch_size=1)
    model_card_recipe(guard, convs[:2], 1)

    one_pass_labels = [v.label for v in guard.classify_batch(convs, batch_size=1)]
    recipe_labels = model_card_recipe(guard, convs, 1)
    agree = sum(a == b for a, b in zip(one_pass_labels, recipe_labels, strict=True))

    rows = []
    for bs in (1, args.batch_size):
        t_one = timed(lambda bs=bs: guard.classify_batch(convs, batch_size=bs), args.repeats)
        t_gen = timed(lambda bs=bs: model_card_recipe(guard, convs, bs), args.repeats)
        rows.append((bs, len(convs) / t_one, len(convs) / t_gen, t_gen / t_one))

    print(f"\nmodel: {model_dir}  conversations: {len(convs)} ({sum(c.has_image for c in convs)} with image)"
          f"  threads: {args.threads}  repeats: {args.repeats} (median)")
    print(f"verdict agreement one-pass vs generate: {agree}/{len(convs)}"
          f"  (unsafe by one-pass: {one_pass_labels.count('unsafe')})")
    print(f"{'batch':>5} | {'one-pass conv/s':>15} | {'generate(20) conv/s':>19} | {'speed-up':>8}")
    print("-" * 58)
    for bs, a, b, ratio in rows:
        print(f"{bs:>5} | {a:>15.2f} | {b:>19.2f} | {ratio:>7.2f}x")


if __name__ == "__main__":
    main()
