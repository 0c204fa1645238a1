"""Extra rows for the mmguard-mini model card from an ``mmguard eval`` predictions.jsonl.

Usage: python scripts/mini_fpr_slices.py EVAL_DIR/predictions.jsonl [GUARD_NAME]
Prints F1/FPR per task and the false positive rate on XSTest's safe prompts and on benign
image+text items (per task), at the threshold the eval used (the guard's label), then the image
sources one by one with ROC-AUC: an AUC near 0.5 on FigStep means the model does not read the image
(its verdicts there follow the instruction text, which is the same for safe and unsafe items).
"""

from __future__ import annotations

import json
import sys


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
        tp = fp = fn = tn = 0
        for r in sel:
            y, p = r["label"] == "unsafe", pred(r)
            if p is None:
                continue
            tp += y and p
            fp += (not y) and p
            fn += y and not p
            tn += (not y) and not p
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
        fpr = fp / (fp + tn) if fp + tn else float("nan")
        return {"n": tp + fp + fn + tn, "precision": prec, "recall": rec, "f1": f1, "fpr": fpr}

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
    print("| Image source (prompt) | n | unsafe | Recall | FPR | ROC-AUC |")
    print("|---|---|---|---|---|---|")
    for source in ("figstep_safebench", "mm_harmfulbench", "synth_typographic", "synth_request_neutral_image",
                   "synth_photo_question", "skimage_benign_photos"):
        sel = [r for r in rows if r["source"] == source and r["task"] == "prompt"]
        if not sel:
            continue
        s = stats(sel)
        print(f"| {source} | {s['n']} | {sum(r['label'] == 'unsafe' for r in sel)} | {s['recall']:.3f} "
              f"| {s['fpr']:.3f} | {_auc(sel, name)} |")


def _auc(rows: list[dict], name: str) -> str:
    from sklearn.metrics import roc_auc_score

    pairs = [(r["label"] == "unsafe", r["predictions"][name].get("unsafe_probability")) for r in rows]
    pairs = [(y, p) for y, p in pairs if p is not None]
    if len({y for y, _ in pairs}) < 2:
        return "-"
    return f"{roc_auc_score([y for y, _ in pairs], [p for _, p in pairs]):.3f}"


if __name__ == "__main__":
    main()
