"""Turn a run's per-item records into the report: JSON, Markdown and PNG plots.

Layout follows the Llama Guard 3 Vision paper: prompt classification and response classification are
separate rows, guards side by side; then every metric, slices by modality and by source set,
per-category scores, the threshold sweep and calibration.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import DEFAULT_SWEEP, binary_metrics, calibration, category_metrics, threshold_sweep
from .runner import ItemRecord, RunResult

__all__ = ["build_report", "write_markdown", "write_plots", "write_report"]

TASKS = ("prompt", "response")
TASK_TITLES = {"prompt": "Prompt classification", "response": "Response classification", "all": "All items"}


def _usable(records: Sequence[ItemRecord], guard: str) -> list[ItemRecord]:
    return [r for r in records if guard in r.preds and r.preds[guard].error is None]


def _arrays(records: Sequence[ItemRecord], guard: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.array([r.y for r in records], dtype=int)
    pred = np.array([1 if r.preds[guard].is_unsafe else 0 for r in records], dtype=int)
    score = np.array([r.preds[guard].unsafe_probability for r in records], dtype=float)
    return y, pred, score


def _slices(records: Sequence[ItemRecord]) -> list[tuple[str, str, list[ItemRecord]]]:
    """(kind, name, items) for every slice: all, each modality, each source."""
    out: list[tuple[str, str, list[ItemRecord]]] = [("all", "all", list(records))]
    for modality in ("text", "image+text"):
        sub = [r for r in records if r.modality == modality]
        if sub:
            out.append(("modality", modality, sub))
    for source in sorted({r.source for r in records}):
        out.append(("source", source, [r for r in records if r.source == source]))
    return out


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def build_report(
    result: RunResult, *, target_fpr: float = 0.05, threshold: float | None = None, n_bins: int = 10
) -> dict[str, Any]:
    """Everything the Markdown and the plots show, as plain JSON-able data."""
    recs = result.records
    policy = result.policy
    rows: list[dict[str, Any]] = []
    for guard in result.guard_names:
        usable = _usable(recs, guard)
        for task in TASKS:
            task_recs = [r for r in usable if r.task == task]
            if not task_recs:
                continue
            for kind, name, sub in _slices(task_recs):
                y, pred, score = _arrays(sub, guard)
                m = binary_metrics(y, pred, score, n_bins=n_bins, target_fpr=target_fpr)
                row: dict[str, Any] = {
                    "guard": guard,
                    "task": task,
                    "slice": kind,
                    "name": name,
                    "metrics": m.to_dict(),
                }
                if kind == "all":
                    row["sweep"] = threshold_sweep(y, score, DEFAULT_SWEEP)
                    row["calibration"] = calibration(y, score, n_bins=n_bins)
                rows.append(row)
    categories: list[dict[str, Any]] = []
    for guard in result.guard_names:
        usable = [r for r in _usable(recs, guard) if r.y == 0 or r.codes]
        for task in ("all", *TASKS):
            sub = usable if task == "all" else [r for r in usable if r.task == task]
            if not sub:
                continue
            truth = [r.codes for r in sub]
            preds = [r.preds[guard].codes if r.preds[guard].is_unsafe else [] for r in sub]
            cat_rows, summary = category_metrics(truth, preds, policy.codes)
            named = []
            for c in cat_rows:
                d = c.to_dict()
                d["name"] = policy.category(c.code).name if c.in_policy else "(not in policy)"
                named.append(d)
            categories.append({"guard": guard, "task": task, "n": len(sub), "rows": named, **summary})
    unlabeled = Counter(r.task for r in recs if r.y == 1 and not r.codes)
    data = {
        "items": len(recs),
        "files": result.data_files,
        "split": result.split,
        "by_task": dict(Counter(r.task for r in recs)),
        "by_modality": dict(Counter(r.modality for r in recs)),
        "by_source": dict(Counter(r.source for r in recs)),
        "unsafe": int(sum(r.y for r in recs)),
        "unsafe_without_codes": dict(unlabeled),
        "unknown_label_codes": dict(result.unknown_label_codes),
    }
    guards = []
    for g in result.guards:
        guards.append(
            {
                "name": g.name,
                "cache_id": g.cache_id,
                "description": g.description,
                "computed": g.computed,
                "cached": g.cached,
                "errors": g.errors,
                "error_examples": g.error_examples,
                "probability_kinds": dict(g.probability_kinds),
                "unknown_predicted_codes": dict(g.unknown_codes),
                "warnings": sorted(g.warnings),
            }
        )
    return _clean(
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "threshold": threshold,
            "target_fpr": target_fpr,
            "calibration_bins": n_bins,
            "policy": policy.name,
            "data": data,
            "guards": guards,
            "results": rows,
            "categories": categories,
        }
    )


# -- markdown --------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in body]
    return [*lines, ""]


def _metric_row(m: dict[str, Any]) -> list[Any]:
    t = m.get("threshold_at_target") or {}
    return [
        m["n"],
        m["positives"],
        m["precision"],
        m["recall"],
        m["f1"],
        m["fpr"],
        m["balanced_accuracy"],
        m["auprc"],
        m["roc_auc"],
        m["ece"],
        f"{t['threshold']:.4g}" if t.get("threshold") is not None else "n/a",
        t.get("recall"),
    ]


def _threshold_text(report: dict[str, Any]) -> str:
    """The decision thresholds behind the labels: one for all, or each guard's own (as deployed)."""
    if report["threshold"] is not None:
        return f"{report['threshold']} (guards that return their own label use it)"
    own = []
    for g in report["guards"]:
        desc = g.get("description") or {}
        per_task = desc.get("thresholds")
        if isinstance(per_task, dict) and per_task:
            values = ", ".join(f"{task} {value:g}" for task, value in sorted(per_task.items()))  # as applied
            own.append(f"{g['name']} {values}")
        elif desc.get("kind") == "mmguard-server":
            own.append(f"{g['name']} the server's")
        else:
            own.append(f"{g['name']} its own label")
    return "each guard's own (" + "; ".join(own) + ")"


def write_markdown(report: dict[str, Any], path: str | Path, *, plots: Sequence[str] = ()) -> Path:
    path = Path(path)
    guards = [g["name"] for g in report["guards"]]
    rows = report["results"]
    tf = report["target_fpr"]
    out: list[str] = ["# mmguard evaluation", ""]
    d = report["data"]
    out += [
        f"- Data: {', '.join(f'`{f}`' for f in d['files'])} (split: {d['split'] or 'all'}), "
        f"{d['items']} items, {d['unsafe']} unsafe",
        f"- Decision threshold: {_threshold_text(report)}; target FPR for threshold selection: {tf}",
        f"- Policy: {report['policy']}; created {report['created']}",
        "",
    ]
    notes: list[str] = []
    for g in report["guards"]:
        notes += [f"**{g['name']}**: {w}" for w in g["warnings"]]
        if g["errors"]:
            notes.append(
                f"**{g['name']}**: {g['errors']} item(s) failed and are left out of its metrics "
                f"(first: {g['error_examples'][0]['where']}: {g['error_examples'][0]['error']})"
            )
        if g["unknown_predicted_codes"]:
            notes.append(
                f"**{g['name']}**: answered codes outside the policy: "
                + ", ".join(f"{k} ×{v}" for k, v in sorted(g["unknown_predicted_codes"].items()))
            )
    if d["unknown_label_codes"]:
        notes.append(
            "label codes outside the policy (kept, scored as extra categories): "
            + ", ".join(f"{k} ×{v}" for k, v in sorted(d["unknown_label_codes"].items()))
        )
    if d["unsafe_without_codes"]:
        notes.append(
            "unsafe items without category codes (left out of per-category metrics): "
            + ", ".join(f"{k}: {v}" for k, v in d["unsafe_without_codes"].items())
        )
    if notes:
        out += ["## Warnings", "", *[f"- {n}" for n in notes], ""]

    # paper layout: tasks as rows, guards side by side
    out += ["## Overview (paper layout)", ""]
    header = ["Task"] + [f"{g} {m}" for g in guards for m in ("P", "R", "F1", "FPR", "AUPRC")]
    body = []
    for task in TASKS:
        line: list[Any] = [TASK_TITLES[task]]
        present = False
        for g in guards:
            r = next((x for x in rows if x["guard"] == g and x["task"] == task and x["slice"] == "all"), None)
            if r is None:
                line += ["–"] * 5
                continue
            present = True
            m = r["metrics"]
            line += [m["precision"], m["recall"], m["f1"], m["fpr"], m["auprc"]]
        if present:
            body.append(line)
    out += _table(header, body)

    mh = [
        "N",
        "Unsafe",
        "Precision",
        "Recall",
        "F1",
        "FPR",
        "Bal. acc",
        "AUPRC",
        "ROC-AUC",
        "ECE",
        f"Thr @FPR≤{tf}",
        "Recall @thr",
    ]
    for title, kind in (("All metrics", "all"), ("By modality", "modality"), ("By source", "source")):
        sel = [r for r in rows if r["slice"] == kind]
        if not sel:
            continue
        out += [f"## {title}", ""]
        lead = ["Task", "Guard"] if kind == "all" else ["Task", kind.capitalize(), "Guard"]
        body = []
        for task in TASKS:
            for r in sorted(
                (r for r in sel if r["task"] == task), key=lambda r: (r["name"], guards.index(r["guard"]))
            ):
                first = [task, r["guard"]] if kind == "all" else [task, r["name"], r["guard"]]
                body.append([*first, *_metric_row(r["metrics"])])
        out += _table(lead + mh, body)
        row_notes = sorted(
            {f"{r['task']} / {r['name']} / {r['guard']}: {n}" for r in sel for n in r["metrics"]["notes"]}
        )
        if row_notes:
            out += [*[f"- {n}" for n in row_notes], ""]

    out += [
        "## Per-category scores",
        "",
        "One-vs-rest over items with category labels (safe items, and unsafe items that list codes).",
        "",
    ]
    for task in ("all", *TASKS):
        cats = [c for c in report["categories"] if c["task"] == task]
        if not cats:
            continue
        out += [f"### {TASK_TITLES[task]}", ""]
        codes = list(dict.fromkeys(row["code"] for c in cats for row in c["rows"]))
        header = ["Code", "Name", "Support"] + [f"{c['guard']} {m}" for c in cats for m in ("P", "R", "F1")]
        body = []
        for code in codes:
            line = [code]
            first = next(row for c in cats for row in c["rows"] if row["code"] == code)
            line += [first["name"], first["support"]]
            for c in cats:
                row = next((x for x in c["rows"] if x["code"] == code), None)
                line += [row["precision"], row["recall"], row["f1"]] if row else ["–"] * 3
            body.append(line)
        body.append(["micro", "", ""] + [v for c in cats for v in ("", "", c["micro_f1"])])
        body.append(["macro", "", ""] + [v for c in cats for v in ("", "", c["macro_f1"])])
        out += _table(header, body)

    out += ["## Threshold sweep", "", "Decisions from `unsafe_probability >= threshold` (overall slice).", ""]
    for r in (r for r in rows if r["slice"] == "all"):
        t = r["metrics"].get("threshold_at_target") or {}
        out += [f"### {r['guard']} — {TASK_TITLES[r['task']]}", ""]
        if t:
            chosen = (
                f"threshold {t['threshold']:.4g} gives FPR {_fmt(t['fpr'])} and recall {_fmt(t['recall'])}"
                if t.get("threshold") is not None
                else (t.get("note") or "no threshold")
            )
            out += [f"Target FPR ≤ {tf}: {chosen}.", ""]
        sweep = [s for s in r["sweep"] if round(s["threshold"] * 10, 6) == round(s["threshold"] * 10)]
        out += _table(
            ["Threshold", "Precision", "Recall", "F1", "FPR", "Flagged"],
            [
                [f"{s['threshold']:.1f}", s["precision"], s["recall"], s["f1"], s["fpr"], s["flagged"]]
                for s in sweep
            ],
        )

    out += [
        "## Calibration",
        "",
        "Reliability curve bins (mean predicted unsafe probability vs observed unsafe rate); "
        "ECE is in the metric tables.",
        "",
    ]
    for r in (r for r in rows if r["slice"] == "all"):
        c = r["calibration"]
        out += [
            f"- {r['guard']} / {r['task']}: "
            + ", ".join(
                f"{p:.2f}→{o:.2f} (n={n})"
                for p, o, n in zip(c["mean_predicted"], c["fraction_unsafe"], c["count"], strict=True)
            )
        ]
    out += [""]
    out += [
        "## Data",
        "",
        f"- By task: {d['by_task']}",
        f"- By modality: {d['by_modality']}",
        f"- By source: {d['by_source']}",
        "",
    ]
    out += ["## Guards", ""]
    for g in report["guards"]:
        out += [
            f"- **{g['name']}**: {json.dumps(g['description'], default=str)}; computed {g['computed']}, "
            f"from cache {g['cached']}, errors {g['errors']}"
        ]
    out += [""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    out += ["See `docs/eval.md` for what each number means.", ""]
    path.write_text("\n".join(out), encoding="utf-8")
    return path


# -- plots -----------------------------------------------------------------------------------------
def write_plots(result: RunResult, report: dict[str, Any], out_dir: str | Path) -> list[str]:
    """PR curves, ROC curves, per-category F1 bars and reliability curves; returns the file names."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    out_dir = Path(out_dir)
    written: list[str] = []
    tasks = [t for t in TASKS if any(r.task == t for r in result.records)]
    if not tasks:
        return written

    def per_task_fig(name: str, draw: Any, xlabel: str, ylabel: str, diagonal: bool) -> None:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for guard in result.guard_names:
                recs = [r for r in _usable(result.records, guard) if r.task == task]
                if recs:
                    y, _, score = _arrays(recs, guard)
                    draw(ax, guard, task, y, score)
            if diagonal:
                ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
            ax.set(title=TASK_TITLES[task], xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    def pr(ax: Any, guard: str, task: str, y: np.ndarray, s: np.ndarray) -> None:
        if y.sum() == 0:
            return
        p, r, _ = precision_recall_curve(y, s)
        m = next(
            x["metrics"]
            for x in report["results"]
            if x["guard"] == guard and x["task"] == task and x["slice"] == "all"
        )
        ax.step(r, p, where="post", label=f"{guard} (AP {_fmt(m['auprc'])})")

    def roc(ax: Any, guard: str, task: str, y: np.ndarray, s: np.ndarray) -> None:
        if 0 < y.sum() < len(y):
            f, t, _ = roc_curve(y, s)
            ax.plot(f, t, label=guard)

    def rel(ax: Any, guard: str, task: str, y: np.ndarray, s: np.ndarray) -> None:
        c = calibration(y, s, n_bins=int(report.get("calibration_bins", 10)))
        if c["count"]:
            ax.plot(c["mean_predicted"], c["fraction_unsafe"], marker="o", label=guard)

    per_task_fig("pr_curves.png", pr, "Recall", "Precision", False)
    per_task_fig("roc_curves.png", roc, "False positive rate", "True positive rate", True)
    per_task_fig("reliability.png", rel, "Mean predicted unsafe probability", "Observed unsafe rate", True)

    cats = [c for c in report["categories"] if c["task"] == "all"]
    if cats:
        codes = list(dict.fromkeys(row["code"] for c in cats for row in c["rows"] if row["support"]))
        codes = codes or list(dict.fromkeys(row["code"] for c in cats for row in c["rows"]))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(codes) * max(1, len(cats))), 4.5))
        width = 0.8 / len(cats)
        x = np.arange(len(codes))
        for i, c in enumerate(cats):
            vals = [next((row["f1"] for row in c["rows"] if row["code"] == code), None) for code in codes]
            ax.bar(
                x + i * width - 0.4 + width / 2,
                [v if v is not None else 0.0 for v in vals],
                width,
                label=c["guard"],
            )
        ax.set_xticks(x, codes)
        ax.set(ylim=(0, 1.02), ylabel="F1", title="Per-category F1 (labeled codes only)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "category_f1.png", dpi=110)
        plt.close(fig)
        written.append("category_f1.png")
    return written


def write_report(
    result: RunResult,
    out_dir: str | Path,
    *,
    target_fpr: float = 0.05,
    threshold: float | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``; return the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(result, target_fpr=target_fpr, threshold=threshold)
    names = write_plots(result, report, out_dir) if plots else []
    report["plots"] = names
    (out_dir / "report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8"
    )
    write_markdown(report, out_dir / "report.md", plots=names)
    return report
