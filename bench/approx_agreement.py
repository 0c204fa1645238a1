"""Verdict agreement of FastEngine's opt-in approximations with its exact path, on a trained model and
labeled data: the measurement issue 7 asks for before an approximation is used.

For every approximation (``real-tiles-only``: an image's padded tiles are not encoded; ``real-tokens-only``:
no padding token is; ``int8`` / ``fp8``: torchao quantization of every linear layer but lm_head) the same
conversations are classified by the exact FastEngine and by the approximation. Printed and written as
JSON: verdict agreement, flips in each direction, max / mean / p99 |dp(unsafe)|, and F1 / FPR of both
against the labels, overall and for the image+text items alone. Each approximation loads its own copy of
the model (quantization is in place).

    python bench/approx_agreement.py --model default --data TEST.jsonl --limit 600
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
from mmguard.fast import load_fast_engine
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


def compare(exact: list[Any], approx: list[Any], labels: list[int], threshold: float,
            with_image: list[bool]) -> dict[str, Any]:
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
    img = np.array(with_image)
    if img.any():
        out["image_items"] = {"n": int(img.sum()), "verdict_agreement": float((ve[img] == va[img]).mean()),
                              "max_abs_dp_unsafe": float(dp[img].max())}
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
    p.add_argument("--out", type=Path, default=Path("approx_agreement.json"))
    a = p.parse_args(argv)
    if not a.data.is_file():
        p.error(f"file not found: {a.data}")
    source: Any = None if a.model == "default" else a.model
    if source is None:
        from mmguard.models import default_model_path

        source = default_model_path()
    records, conversations, bad = load_items(a.data, a.limit, a.split)
    if not conversations:
        p.error(f"no usable items in {a.data}")
    labels = [r.y for r in records]
    with_image = [c.has_image for c in conversations]
    print(f"{len(conversations)} items ({sum(with_image)} with an image, {bad} unreadable skipped) from {a.data}",
          flush=True)

    def classify(**options: Any) -> tuple[list[Any], float]:
        guard = Guard(load_fast_engine(source, device=a.device, dtype=a.dtype, **options), threshold=a.threshold,
                      batch_size=a.batch_size)
        t0 = time.perf_counter()
        verdicts = guard.classify_batch(conversations, categories=False)
        return verdicts, time.perf_counter() - t0

    exact, exact_s = classify()
    report: dict[str, Any] = {"model": str(source), "data": str(a.data), "threshold": a.threshold,
                              "exact_seconds": exact_s, "approximations": {}}
    print(f"{'approximation':<16} {'agree':>7} {'s->u':>5} {'u->s':>5} {'max|dp|':>9} {'mean|dp|':>9} "
          f"{'F1 exact':>9} {'F1 appr':>8} {'FPR ex':>7} {'FPR ap':>7} {'time ratio':>10}")
    for name in a.approx:
        approx, approx_s = classify(**APPROXIMATIONS[name])
        row = compare(exact, approx, labels, a.threshold, with_image)
        row["time_ratio_vs_exact"] = approx_s / exact_s
        report["approximations"][name] = row
        print(f"{name:<16} {row['verdict_agreement']:>7.3f} {row['flips_safe_to_unsafe']:>5} "
              f"{row['flips_unsafe_to_safe']:>5} {row['max_abs_dp_unsafe']:>9.2e} {row['mean_abs_dp_unsafe']:>9.2e} "
              f"{row['exact_f1']:>9.3f} {row['approx_f1']:>8.3f} {row['exact_fpr']:>7.3f} {row['approx_fpr']:>7.3f} "
              f"{row['time_ratio_vs_exact']:>10.2f}", flush=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
