"""Paper-style robustness summaries, tables (Markdown) and plots (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .pgd import budget_label

__all__ = ["summarise", "write_report"]

GCG_SETTINGS = [
    ("prompt", "user", "Prompt classification (suffix in the prompt)"),
    ("response", "user", "Response classification (suffix in the prompt only)"),
    ("response", "agent", "Response classification (suffix in the response)"),
]


def _rate(k: int, n: int) -> float | None:
    return None if n == 0 else k / n


def summarise(pgd: list[dict[str, Any]], gcg: list[dict[str, Any]], transfer: list[dict[str, Any]],
              budgets: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"pgd": {}, "gcg": [], "transfer": {}}
    for task in ("prompt", "response"):
        rows = [r for r in pgd if r["task"] == task]
        items = sorted({r["item_id"] for r in rows})
        if not items:
            continue
        first = {r["item_id"]: r for r in rows}
        n = len(items)
        clean_missed = sum(1 for i in items if not first[i]["clean_unsafe"])
        per_budget = []
        for b in budgets:
            lab = budget_label(b)
            br = [r for r in rows if r["budget"] == lab]
            done = {r["item_id"] for r in br}
            mis = sum(1 for r in br if r["success"])
            caught = [r for r in br if r["clean_unsafe"]]
            flips = sum(1 for r in caught if r["success"])
            per_budget.append({
                "budget": lab, "items": len(done), "misclassified": mis,
                "misclassification_rate": _rate(mis, len(done)),
                "caught_clean": len(caught), "flipped": flips, "flip_rate": _rate(flips, len(caught)),
                "mean_linf_255": (sum(r["linf"] for r in caught) / len(caught) * 255) if caught else None,
            })
        out["pgd"][task] = {"items": n, "clean_missed": clean_missed,
                            "clean_misclassification_rate": _rate(clean_missed, n), "budgets": per_budget}
    for task, loc, label in GCG_SETTINGS:
        rows = [r for r in gcg if r["task"] == task and r["location"] == loc]
        if not rows:
            continue
        n = len(rows)
        clean_missed = sum(1 for r in rows if not r["clean_unsafe"])
        mis = sum(1 for r in rows if r["success"])
        caught = [r for r in rows if r["clean_unsafe"]]
        flips = sum(1 for r in caught if r["success"])
        out["gcg"].append({
            "setting": label, "task": task, "location": loc, "items": n,
            "clean_misclassification_rate": _rate(clean_missed, n),
            "misclassification_rate": _rate(mis, n), "caught_clean": len(caught), "flipped": flips,
            "flip_rate": _rate(flips, len(caught)),
            "retokenizes": sum(1 for r in caught if r["retokenizes"]),
        })
    for check in sorted({r["check"] for r in transfer}):
        for task in ("prompt", "response"):
            rows = [r for r in transfer if r["check"] == check and r["task"] == task]
            if rows:
                k = sum(1 for r in rows if r["flipped"])
                out["transfer"][f"{check}/{task}"] = {"check": check, "task": task, "items": len(rows),
                                                      "flipped": k, "flip_rate": k / len(rows)}
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _plots(summary: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if summary["pgd"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for task, s in summary["pgd"].items():
            labels = ["clean"] + [b["budget"] for b in s["budgets"]]
            ys = [s["clean_misclassification_rate"]] + [b["misclassification_rate"] for b in s["budgets"]]
            ax.plot(range(len(labels)), [100 * (y or 0) for y in ys], marker="o",
                    label=f"{task} classification (n={s['items']})")
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel("L-inf budget")
        ax.set_ylabel("unsafe items misclassified as safe (%)")
        ax.set_ylim(0, 100)
        ax.set_title("PGD image attack")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "pgd_misclassification.png", dpi=120)
        plt.close(fig)
        files.append("pgd_misclassification.png")
    if summary["gcg"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(summary["gcg"]))
        base = [100 * (g["clean_misclassification_rate"] or 0) for g in summary["gcg"]]
        att = [100 * (g["misclassification_rate"] or 0) for g in summary["gcg"]]
        ax.bar([x - 0.2 for x in xs], base, 0.4, label="no attack")
        ax.bar([x + 0.2 for x in xs], att, 0.4, label="GCG")
        ax.set_xticks(list(xs), [g["setting"].replace(" (", "\n(") for g in summary["gcg"]], fontsize=7)
        ax.set_ylabel("unsafe items misclassified as safe (%)")
        ax.set_ylim(0, 100)
        ax.set_title("GCG text attack")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gcg_success.png", dpi=120)
        plt.close(fig)
        files.append("gcg_success.png")
    return files


def write_report(out: Path, meta: dict[str, Any], summary: dict[str, Any], results: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "plots": _plots(summary, out)}
    payload = {"meta": meta, "summary": summary, "results": results}
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=_json_default))
    lines = [f"# Robustness report: {meta.get('model_label', meta.get('model'))}", ""]
    lines += [f"- model: `{meta.get('model')}`" + (" (**random/toy weights**: numbers say nothing about a "
                                                  "real guard)" if meta.get("random_weights") else "")]
    for key in ("data", "command", "device", "threshold", "seed", "pgd", "gcg", "elapsed_minutes", "note"):
        if key in meta and meta[key] not in (None, ""):
            lines.append(f"- {key}: `{meta[key]}`" if key != "note" else f"- note: {meta[key]}")
    lines.append("")
    lines.append("Misclassification rate = unsafe items judged `safe` (clean misses included, as in the "
                 "paper);"
                 " flip rate = share of the items the guard catches clean that the attack turns `safe`. "
                 "Every success is a fresh `guard.classify` of the final input (for PGD: the 8-bit PNG read "
                 "back from disk).")
    lines.append("")
    if summary["pgd"]:
        lines += ["## PGD (image, L-inf, white-box)", ""]
        tasks = list(summary["pgd"])
        lines.append("| budget | " + " | ".join(f"{t}: misclassified | {t}: flip rate" for t in tasks) + " |")
        lines.append("|---|" + "---|---|" * len(tasks))
        row = ["clean"]
        for t in tasks:
            s = summary["pgd"][t]
            row += [f"{_pct(s['clean_misclassification_rate'])} ({s['clean_missed']}/{s['items']})", "-"]
        lines.append("| " + " | ".join(row) + " |")
        for i, b in enumerate(summary["pgd"][tasks[0]]["budgets"]):
            row = [b["budget"]]
            for t in tasks:
                bb = summary["pgd"][t]["budgets"][i]
                row += [f"{_pct(bb['misclassification_rate'])} ({bb['misclassified']}/{bb['items']})",
                        f"{_pct(bb['flip_rate'])} ({bb['flipped']}/{bb['caught_clean']})"]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "![PGD](pgd_misclassification.png)", ""]
    if summary["gcg"]:
        lines += ["## GCG (text suffix, white-box)", "",
                  "| setting | items | no attack | GCG | flip rate | suffix re-encodes |",
                  "|---|---|---|---|---|---|"]
        for g in summary["gcg"]:
            lines.append(f"| {g['setting']} | {g['items']} | {_pct(g['clean_misclassification_rate'])} | "
                         f"{_pct(g['misclassification_rate'])} | {_pct(g['flip_rate'])} ({g['flipped']}/"
                         f"{g['caught_clean']}) | {g['retokenizes']}/{g['caught_clean']} |")
        lines += ["", "![GCG](gcg_success.png)", ""]
    if summary["transfer"]:
        lines += ["## Transfer and black-box checks", "",
                  "| check | task | items | still/newly safe | rate |", "|---|---|---|---|---|"]
        for t in summary["transfer"].values():
            lines.append(f"| {t['check']} | {t['task']} | {t['items']} | {t['flipped']} | "
                         f"{_pct(t['flip_rate'])} |")
        lines += ["", "jpeg75 / resize0.5: share of successful PGD images (smallest winning budget) that "
                  "still flip after "
                  "JPEG quality 75 / half-size resizing. typographic: share of items caught clean that are "
                  "judged safe when the request is rendered into an image.", ""]
    if meta.get("skipped"):
        lines += [f"Skipped for the time budget: {meta['skipped']}", ""]
    if (meta.get("unloadable") or {}).get("count"):
        lines += [f"Not attacked, could not be loaded: {meta['unloadable']['count']} unsafe item(s); first: "
                  + "; ".join(meta["unloadable"]["first"]), ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    if isinstance(o, tuple):
        return list(o)
    return str(o)
