"""Metrics of a guard over labeled items, computed with scikit-learn.

``unsafe`` is the positive class. Decisions (precision, recall, F1, FPR, balanced accuracy) use the
guard's own label; ranking metrics (AUPRC, ROC-AUC), calibration and the threshold sweep use its
unsafe probability. A slice with one class only gives ``NaN`` for the metrics that need both classes
and says so in ``notes``; nothing here raises on degenerate input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BinaryMetrics",
    "CategoryMetrics",
    "binary_metrics",
    "calibration",
    "category_metrics",
    "expected_calibration_error",
    "threshold_for_fpr",
    "threshold_sweep",
]

NAN = float("nan")
DEFAULT_SWEEP = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _f(x: Any) -> float:
    v = float(x)
    return v if math.isfinite(v) else NAN


@dataclass
class BinaryMetrics:
    n: int
    positives: int
    negatives: int
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float
    recall: float
    f1: float
    fpr: float
    accuracy: float
    balanced_accuracy: float
    auprc: float
    roc_auc: float
    ece: float
    threshold_at_target: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def binary_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    y_score: Sequence[float],
    *,
    n_bins: int = 10,
    target_fpr: float | None = None,
) -> BinaryMetrics:
    """Every binary metric for one slice."""
    from sklearn.metrics import (
        average_precision_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y = np.asarray(y_true, dtype=int)
    pred = np.asarray(y_pred, dtype=int)
    score = np.asarray(y_score, dtype=float)
    n = int(y.size)
    pos = int(y.sum())
    neg = n - pos
    notes: list[str] = []
    if n == 0:
        return BinaryMetrics(
            0, 0, 0, 0, 0, 0, 0, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, None, ["no items"]
        )
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, _ = precision_recall_fscore_support(y, pred, labels=[1], average=None, zero_division=np.nan)
    precision, recall, f1 = _f(p[0]), _f(r[0]), _f(f[0])
    if tp + fp == 0:
        notes.append("no item predicted unsafe: precision undefined")
    fpr = fp / neg if neg else NAN
    both = pos > 0 and neg > 0
    if not both:
        notes.append(
            f"only {'unsafe' if pos else 'safe'} items: "
            + ("recall, " if not pos else "FPR, ")
            + "balanced accuracy, ROC-AUC and AUPRC undefined"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = _f(balanced_accuracy_score(y, pred)) if both else NAN
        auprc = _f(average_precision_score(y, score)) if both else NAN  # no negatives: 1.0 whatever the scores
        roc = _f(roc_auc_score(y, score)) if both else NAN
    if not pos:
        recall = f1 = NAN
    ece = expected_calibration_error(y, score, n_bins=n_bins)
    target = threshold_for_fpr(y, score, target_fpr) if target_fpr is not None else None
    return BinaryMetrics(
        n=n,
        positives=pos,
        negatives=neg,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        precision=precision,
        recall=recall,
        f1=f1,
        fpr=_f(fpr),
        accuracy=(tp + tn) / n,
        balanced_accuracy=bal,
        auprc=auprc,
        roc_auc=roc,
        ece=ece,
        threshold_at_target=target,
        notes=notes,
    )


def _bin_ids(score: np.ndarray, n_bins: int) -> np.ndarray:
    # exactly scikit-learn's calibration_curve(strategy="uniform") binning
    bins = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(bins[1:-1], score)


def calibration(
    y_true: Sequence[int], y_score: Sequence[float], *, n_bins: int = 10
) -> dict[str, list[float]]:
    """Reliability curve: per non-empty bin, mean predicted probability, observed unsafe rate, count."""
    y = np.asarray(y_true, dtype=float)
    s = np.clip(np.asarray(y_score, dtype=float), 0.0, 1.0)
    if y.size == 0:
        return {"mean_predicted": [], "fraction_unsafe": [], "count": []}
    ids = _bin_ids(s, n_bins)
    counts = np.bincount(ids, minlength=n_bins)
    sum_pred = np.bincount(ids, weights=s, minlength=n_bins)
    sum_true = np.bincount(ids, weights=y, minlength=n_bins)
    keep = counts > 0
    return {
        "mean_predicted": (sum_pred[keep] / counts[keep]).tolist(),
        "fraction_unsafe": (sum_true[keep] / counts[keep]).tolist(),
        "count": counts[keep].astype(int).tolist(),
    }


def expected_calibration_error(y_true: Sequence[int], y_score: Sequence[float], *, n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin size / n) * |mean predicted probability - observed unsafe rate|."""
    curve = calibration(y_true, y_score, n_bins=n_bins)
    n = sum(curve["count"])
    if n == 0:
        return NAN
    return float(
        sum(
            c / n * abs(p - o)
            for p, o, c in zip(curve["mean_predicted"], curve["fraction_unsafe"], curve["count"], strict=True)
        )
    )


def threshold_sweep(
    y_true: Sequence[int], y_score: Sequence[float], thresholds: Iterable[float] = DEFAULT_SWEEP
) -> list[dict[str, float]]:
    """Precision, recall, F1 and FPR when ``unsafe_probability >= t`` decides, for each ``t``."""
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(y_score, dtype=float)
    pos = int(y.sum())
    neg = int(y.size - pos)
    rows = []
    for t in thresholds:
        pred = s >= t
        tp = int(np.sum(pred & (y == 1)))
        fp = int(np.sum(pred & (y == 0)))
        precision = tp / (tp + fp) if tp + fp else NAN
        recall = tp / pos if pos else NAN
        # 2TP / (2TP + FP + FN), as binary_metrics (scikit-learn) gives it: 0.0 when nothing is flagged, not
        # undefined (the sweep's row said n/a where the table said 0.000 for the same decisions)
        f1 = 2 * tp / (2 * tp + fp + (pos - tp)) if pos else NAN
        rows.append(
            {
                "threshold": float(t),
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "fpr": fp / neg if neg else NAN,
                "flagged": int(pred.sum()),
            }
        )
    return rows


def threshold_for_fpr(y_true: Sequence[int], y_score: Sequence[float], target_fpr: float) -> dict[str, Any]:
    """The lowest threshold whose false positive rate stays at or under ``target_fpr`` (most recall).

    ``threshold`` is ``None`` when no item can be flagged within the target (then nothing is flagged).
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, dtype=int)
    s = np.asarray(y_score, dtype=float)
    pos = int(y.sum())
    neg = int(y.size - pos)
    out: dict[str, Any] = {
        "target_fpr": float(target_fpr),
        "threshold": None,
        "fpr": None,
        "recall": None,
        "note": "",
    }
    if neg == 0 or pos == 0:
        out["note"] = "needs both safe and unsafe items"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    ok = np.nonzero(fpr <= target_fpr + 1e-12)[0]
    idx = int(ok[-1])
    if not math.isfinite(float(thr[idx])):
        out.update(fpr=0.0, recall=0.0, note="no threshold flags anything within the target FPR")
        return out
    out.update(threshold=float(thr[idx]), fpr=float(fpr[idx]), recall=float(tpr[idx]))
    return out


@dataclass
class CategoryMetrics:
    code: str
    support: int  # items labeled with the code
    predicted: int  # items the guard flagged with the code
    precision: float
    recall: float
    f1: float
    in_policy: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def category_metrics(
    true_codes: Sequence[Iterable[str]], pred_codes: Sequence[Iterable[str]], codes: Sequence[str]
) -> tuple[list[CategoryMetrics], dict[str, float]]:
    """Per-code precision/recall/F1 (one-vs-rest over the given items) plus micro and macro F1.

    Codes found in the labels or predictions but absent from ``codes`` get rows too (``in_policy=False``).
    """
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    truth = [set(t) for t in true_codes]
    preds = [set(p) for p in pred_codes]
    extra = sorted((set().union(*truth, *preds) if truth else set()) - set(codes))
    all_codes = [*codes, *extra]
    if not truth or not all_codes:
        return [], {"micro_f1": NAN, "macro_f1": NAN}
    yt = np.array([[c in t for c in all_codes] for t in truth], dtype=int)
    yp = np.array([[c in p for c in all_codes] for p in preds], dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, support = precision_recall_fscore_support(yt, yp, average=None, zero_division=np.nan)
        present = yt.sum(axis=0) > 0
        micro = _f(f1_score(yt, yp, average="micro", zero_division=np.nan))
        macro = _f(np.nanmean(np.where(present, f, np.nan))) if present.any() else NAN
    rows = [
        CategoryMetrics(
            code=c,
            support=int(support[i]),
            predicted=int(yp[:, i].sum()),
            precision=_f(p[i]),
            recall=_f(r[i]) if support[i] else NAN,
            f1=_f(f[i]) if support[i] else NAN,
            in_policy=c in codes,
        )
        for i, c in enumerate(all_codes)
    ]
    return rows, {"micro_f1": micro, "macro_f1": macro}
