"""Extra rows for the mmguard-mini model card from an ``mmguard eval`` predictions.jsonl.

Usage: python scripts/mini_fpr_slices.py EVAL_DIR/predictions.jsonl [GUARD_NAME]
Prints F1/FPR per task and the false positive rate on XSTest's safe prompts and on benign
image+text items (per task), at the threshold the eval used (the guard's label), then the image
sources one by one with ROC-AUC: an AUC near 0.5 on FigStep means the model does not read the image
(its verdicts there follow the instruction text, which is the same for safe and unsafe items), and
so do equal median p(unsafe) for the harmful and the benign items of a source.
"""

from __future__ import annotations

import json
import math
import statistics
import sys

from mmguard.eval.metrics import binary_metrics


def main() -> None:
    path = sys.argv[1]
    name = sys.argv[2] if len(sys.argv) > 2 else None
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    if name is None:
        name = next(iter(rows[0]["predictions"]))

    def pred(r: dict) -> bool | None:
        p = r["predictions"].get(name)
        return None if not p or "label" not in p else p["label"] == "unsafe"

    def stats(sel: list[dict]) -> dict:
        scored = [(r["label"] == "unsafe", pred(r), r["predictions"][name].get("unsafe_probability"))
                  for r in sel if pred(r) is not None]  # fmt: skip
        m = binary_metrics([int(y) for y, _, _ in scored], [int(p) for _, p, _ in scored],
                           [float(p if s is None else s) for _, p, s in scored])  # fmt: skip
        return {"n": m.n, "precision": m.precision, "recall": m.recall, "f1": m.f1, "fpr": m.fpr, "auc": m.roc_auc}

    slices = {
        "prompt (all)": [r for r in rows if r["task"] == "prompt"],
        "response (all)": [r for r in rows if r["task"] == "response"],
        "prompt, text": [r for r in rows if r["task"] == "prompt" and r["modality"] == "text"],
        "prompt, image+text": [r for r in rows if r["task"] == "prompt" and r["modality"] == "image+text"],
        "response, text": [r for r in rows if r["task"] == "response" and r["modality"] == "text"],
        "response, image+text": [r for r in rows
                                 if r["task"] == "response" and r["modality"] == "image+text"],
        "XSTest safe prompts (FPR)": [r for r in rows if r["source"] == "xstest" and r["label"] == "safe"],
        "benign image+text prompts (FPR)": [r for r in rows if r["modality"] == "image+text"
                                            and r["task"] == "prompt" and r["label"] == "safe"],
        "benign image+text responses (FPR)": [r for r in rows if r["modality"] == "image+text"
                                              and r["task"] == "response" and r["label"] == "safe"],
    }
    print("| Slice | n | Precision | Recall | F1 | FPR |")
    print("|---|---|---|---|---|---|")
    for k, sel in slices.items():
        s = stats(sel)
        print(f"| {k} | {s['n']} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} "
              f"| {s['fpr']:.3f} |")
    print()
    print("| Image source (prompt) | n | unsafe | Recall | FPR | ROC-AUC | median p(unsafe), unsafe / safe items |")
    print("|---|---|---|---|---|---|---|")
    for source in ("figstep_safebench", "mm_harmfulbench", "synth_typographic", "synth_request_neutral_image",
                   "synth_photo_question", "skimage_benign_photos"):
        sel = [r for r in rows if r["source"] == source and r["task"] == "prompt"]
        if not sel:
            continue
        s = stats(sel)
        medians = " / ".join(_median_probability(sel, name, label) for label in ("unsafe", "safe"))
        print(f"| {source} | {s['n']} | {sum(r['label'] == 'unsafe' for r in sel)} | {s['recall']:.3f} "
              f"| {s['fpr']:.3f} | {'-' if math.isnan(s['auc']) else format(s['auc'], '.3f')} | {medians} |")


def _median_probability(rows: list[dict], name: str, label: str) -> str:
    """Equal medians for both labels (near 0.5 on typography) mean the model cannot tell them apart."""
    ps = [r["predictions"][name].get("unsafe_probability") for r in rows if r["label"] == label]
    ps = [p for p in ps if p is not None]
    return f"{statistics.median(ps):.3f}" if ps else "-"


if __name__ == "__main__":
    main()
