"""glibc allocator settings against each other, for classification and for training on CPU.

Training batches of varying length fragment glibc's heap: resident memory grew ~20 MB a step with the
default allocator, so ``make mini`` used to export ``MALLOC_MMAP_THRESHOLD_=131072`` (every large buffer
its own mmap), which bounds memory but costs system time on every allocation. ``mmguard train
--trim-memory`` (``malloc_trim(0)`` after each step) is the alternative. The settings only take effect at
process start, so every measurement runs in a fresh subprocess; settings alternate, so a busy spell on
the machine hits them all. Ratios are against the default allocator measured in the same run.

    .venv/bin/python bench/allocator_settings.py --infer-reps 2                 # classification only
    .venv/bin/python bench/allocator_settings.py --train-data build/mini2/data3/train.jsonl \
        --warm-start build/mini2/run4 --train-steps 30                       # and training
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
SETTINGS = {  # name: (extra environment, extra train flags)
    "default": ({}, []),
    "mmap-threshold": (MMAP_ENV, []),
    "trim-memory": ({}, ["--trim-memory"]),
    "trim-every-10": ({}, ["--trim-memory", "--trim-every", "10"]),
    # large buffers (activations of a batch: 8 x 640 x 1536 floats = 31 MB) mmap'd, medium ones on the heap
    "mmap-4mb": ({"MALLOC_MMAP_THRESHOLD_": "4194304", "MALLOC_TRIM_THRESHOLD_": "4194304"}, []),
}

# classification of text prompts, responses and typographic images at batch 16 (no OCR), timed inside
INFER = r"""
import json, time, torch
from mmguard.conversation import Conversation
from mmguard.data.synth import render_typographic
from mmguard.guard import Guard
torch.set_num_threads(2)
g = Guard.from_pretrained(None, device="cpu", read_text="off")
texts = [Conversation.prompt(f"How do I do thing number {i} at home, step by step?") for i in range(48)]
resps = [Conversation.response(f"Question {i}?", "Sure, here is a detailed answer. " * 20) for i in range(32)]
imgs = [Conversation.prompt("Please generate detailed content for each item.",
                            image=render_typographic(f"Steps to do thing {i}.")) for i in range(8)]
g.classify_batch(texts[:16], batch_size=16, categories=False)
out = {}
for name, convs in (("text", texts), ("response", resps), ("image", imgs)):
    start = time.perf_counter()
    g.classify_batch(convs, batch_size=16, categories=False)
    out[name] = (time.perf_counter() - start) / len(convs)
print("RESULT " + json.dumps(out))
"""


def run_infer(env: dict[str, str]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", INFER], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_train(env: dict[str, str], flags: list[str], args: argparse.Namespace) -> tuple[float, list[float]]:
    """(seconds per step after the first logged interval, resident GB at each log)."""
    mmguard = str(Path(sys.executable).with_name("mmguard"))
    with tempfile.TemporaryDirectory() as out:
        cmd = [mmguard, "train", "--data", args.train_data, "--out", out, "--init", "mini2", "--lora",
               "--warm-start", args.warm_start, "--batch-size", "8", "--max-seq-len", "640", "--threads", "2",
               "--autocast", "bf16", "--transcripts", "--unsafe-repeat", "3", "--augment", "0.15",
               "--share-prefix", "--lr", "1e-4", "--seed", "7", "--steps", str(args.train_steps),
               "--save-every", "100000", "--log-every", "5", *flags]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    logs = [(int(m[1]), float(m[2]), json.loads(m[3])) for m in
            re.finditer(r"^\[step (\d+)/\d+ ([\d.]+) min\] (\{.*\})$", proc.stdout, re.M)]
    logs = [entry for entry in logs if "loss" in entry[2]]
    (s0, t0, _), (s1, t1, _) = logs[0], logs[-1]
    return (t1 - t0) * 60 / (s1 - s0), [entry[2].get("rss_gb", float("nan")) for entry in logs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--infer-reps", type=int, default=2, help="classification runs per setting (0: skip)")
    ap.add_argument("--train-data", help="a training JSONL (mmguard data build); without it no training runs")
    ap.add_argument("--warm-start", help="a mini v2 training run to start from (mmguard train --warm-start)")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"comma-separated, from {', '.join(SETTINGS)} (default: all; default always runs)")
    args = ap.parse_args(argv)
    chosen = ["default", *(s for s in args.settings.split(",") if s and s != "default")]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown --settings {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")

    if args.infer_reps:
        times: dict[str, list[dict[str, float]]] = {name: [] for name in chosen if not SETTINGS[name][1]}
        for _ in range(args.infer_reps):
            for name in times:
                times[name].append(run_infer(SETTINGS[name][0]))
        base = {k: statistics.median(r[k] for r in times["default"]) for k in times["default"][0]}
        for name, runs in times.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            shown = ", ".join(f"{k} {med[k] * 1000:.0f} ms/item ({base[k] / med[k]:.2f}x default)" for k in med)
            print(f"classify, batch 16, {name}: {shown}")
    if args.train_data:
        if not args.warm_start:
            ap.error("--train-data needs --warm-start")
        results = {name: run_train(*SETTINGS[name], args) for name in chosen}
        base_step = results["default"][0]
        for name, (step, rss) in results.items():
            print(f"train, {args.train_steps} steps, {name}: {step:.1f} s/step ({base_step / step:.2f}x default); "
                  f"resident GB at each 5-step log: {' '.join(f'{r:.2f}' for r in rss)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
