"""``mmguard train --compile`` against make mini's eager step, in one run, on the same batches.

    .venv/bin/python bench/train_compile.py --data build/mini2/data3/train.jsonl --batches 24

One training step (forward + backward, bf16 autocast, LoRA dropout off, ``bench/train_share_prefix.py``'s step)
two ways on the same batches of ``mmguard train``'s own batching for stages 3 and later (``--share-prefix``:
text batches through their template prefix's cache, image batches through cross-attention):

* **eager**: the model as ``make mini`` has trained it so far;
* **compiled layers**: a copy with every transformer layer compiled (``mmguard.engine.compile_layers``).

The first batch of each kind (text, image) is run untimed on both, so the compiled model's compilation (printed
apart: torch caches it on disk, so a second run on this machine compiles faster) stays out of the step times.
Then the order of the two alternates from batch to batch, so a busy machine slows both alike. Printed: p50 and
total seconds per step each way, their ratios, and the largest loss difference (bf16 kernels fused otherwise
are not bitwise equal; ``tests/test_train_trainer.py`` checks float32 losses and gradients). ``--tiny`` runs a
tiny random checkpoint (plumbing only, its timings mean nothing).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_share_prefix import step_seconds, training_bench_parser, training_bench_ready
from train_step_levers import load, lora_model

from mmguard.engine import compile_layers
from mmguard.train.batches import Collator, make_batches
from mmguard.train.sequences import load_training_items


def main(argv: list[str] | None = None) -> int:
    ap = training_bench_parser(
        __doc__, data="build/mini2/data3/train.jsonl", max_items=40000, batches=24,
        max_items_help="train examples read; a build lists its image items late, so read enough to reach them",
        batches_help="timed batches (a third of them image batches)")
    args = ap.parse_args(argv)
    if not training_bench_ready(args):
        return 2
    base, engine, _ = load(args)
    eager, cfg = lora_model(base, args.data, 0, args.tiny)
    del base
    compiled = copy.deepcopy(eager)
    layers = compile_layers(compiled)
    for m in (eager, compiled):
        m.train()
    items, _ = load_training_items(cfg.data, engine.tokenizer, cfg, "train", args.max_items)
    full = [b for b in make_batches(items, args.batch_size, seed=0, share_prefix=True) if len(b) == args.batch_size]
    text = [b for b in full if b[0].image is None]
    image = [b for b in full if b[0].image is not None]
    if not text:
        print("error: no full text batch in these items", file=sys.stderr)
        return 2
    warm = [text[0], *image[:1]]
    want = {"image": args.batches // 3 if image else 0}
    want["text"] = args.batches - want["image"]
    timed = []  # in the trainer's order, the warm-up batches left out
    for batch in full:
        kind = "text" if batch[0].image is None else "image"
        if want[kind] and not any(batch is w for w in warm):
            timed.append(batch)
            want[kind] -= 1
    collate = Collator(engine, share_prefix=True)
    t0 = time.perf_counter()
    for batch in warm:
        step_seconds(compiled, collate, batch, True)
    compile_s = time.perf_counter() - t0
    for batch in warm:
        step_seconds(eager, collate, batch, True)
    runs = {"eager": eager, "compiled layers": compiled}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, list[float]] = {k: [] for k in runs}
    for i, batch in enumerate(timed):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            s, loss = step_seconds(runs[name], collate, batch, True)
            seconds[name].append(s)
            losses[name].append(loss)
    kinds = {"text": sum(b[0].image is None for b in timed), "image": sum(b[0].image is not None for b in timed)}
    p50 = {k: statistics.median(v) for k, v in seconds.items()}
    total = {k: sum(v) for k, v in seconds.items()}
    report: dict[str, Any] = {
        "model": "tiny random (plumbing)" if args.tiny else "mini v2 base (SmolLM2-135M in Mllama) + LoRA",
        "threads": args.threads, "batch_size": args.batch_size, "timed_batch_kinds": kinds,
        "compiled_layers": layers, "first_batches_compiled_s": round(compile_s, 1),
        "step_s_p50": {k: round(v, 3) for k, v in p50.items()},
        "step_s_total": {k: round(v, 2) for k, v in total.items()},
        "speedup_p50": round(p50["eager"] / p50["compiled layers"], 2),
        "speedup_total": round(total["eager"] / total["compiled layers"], 2),
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled layers"],
                                                               strict=True)),
    }
    print(f"{report['model']}, {args.threads} threads, bf16 autocast, batch {args.batch_size}, shared prefixes, "
          f"{len(timed)} timed batches ({kinds['text']} text, {kinds['image']} image)")
    print(f"  compiling {layers} layers: the first text and image batch took {compile_s:.0f} s")
    for k in runs:
        print(f"  {k:<16} step p50 {p50[k]:6.2f} s, total {total[k]:7.2f} s")
    print(f"  compiled layers: {report['speedup_p50']:.2f}x p50, {report['speedup_total']:.2f}x total; "
          f"largest loss difference {report['max_abs_loss_diff']:.2e}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
