"""How ``mmguard eval --chunk-size`` changes evaluation time with the bundled model on CPU.

The engine sorts each chunk of items by length before cutting it into batches, so that a long item does
not pad fifteen short ones to its length. A chunk of 64 items from a file that mixes short prompts and long
responses still holds items of many lengths; a larger chunk lets the sort group them better. This times
``mmguard eval`` (fresh output folder, so no cached answers) on a seeded sample of a split, at each chunk
size in turn, and checks that the probabilities agree. Ratios are against the first chunk size, measured in
the same run.

    .venv/bin/python bench/eval_chunk_size.py build/mini2/std-data/validation.jsonl --items 400
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sample(src: Path, n: int, seed: int) -> Path:
    """A seeded sample of ``src``'s lines, written next to it (image paths in the file are relative)."""
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    chosen = sorted(random.Random(seed).sample(range(len(lines)), min(n, len(lines))))
    out = src.with_name(f".bench-sample-{seed}-{len(chosen)}.jsonl")
    out.write_text("".join(lines[i] + "\n" for i in chosen), encoding="utf-8")
    return out


def run(data: Path, chunk: int, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """(seconds for the whole eval, item id -> P(unsafe))."""
    mmguard = str(Path(sys.executable).with_name("mmguard"))
    with tempfile.TemporaryDirectory() as out:
        cmd = [mmguard, "eval", "--data", str(data), "--split", "all", "--guard", f"g=local:{args.model}",
               "--read-text", args.read_text, "--prefix-cache", "--batch-size", str(args.batch_size),
               "--chunk-size", str(chunk), "--out", out, "--no-plots", "--no-progress"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        probs = {}
        for line in (Path(out) / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            probs[row["id"]] = row["predictions"]["g"]["unsafe_probability"]
    return seconds, probs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="a split JSONL (mmguard data build)")
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunks", default="64,512", help="comma-separated chunk sizes; the first is the baseline")
    ap.add_argument("--model", default="src/mmguard/assets/mmguard-mini")
    ap.add_argument("--read-text", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1, help="runs per chunk size, alternating (median time)")
    args = ap.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]
    data = sample(args.data, args.items, args.seed)
    try:
        runs: dict[int, list[tuple[float, dict[str, float]]]] = {c: [] for c in chunks}
        for _ in range(args.reps):  # alternating, so that a busy spell on the machine hits every size
            for c in chunks:
                runs[c].append(run(data, c, args))
        results = {c: (statistics.median(s for s, _ in r), r[0][1]) for c, r in runs.items()}
    finally:
        data.unlink()
    base_s, base_p = results[chunks[0]]
    print(f"# {len(base_p)} items sampled (seed {args.seed}) from {args.data}; read_text {args.read_text}, "
          f"prefix cache, batch {args.batch_size}")
    for c, (s, p) in results.items():
        diff = max(abs(p[k] - base_p[k]) for k in base_p)
        print(f"chunk {c}: {s:.0f} s ({s / len(p) * 1000:.0f} ms/item, {base_s / s:.2f}x chunk {chunks[0]}); "
              f"max |P(unsafe) difference| {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
