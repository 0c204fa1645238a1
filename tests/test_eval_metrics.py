"""Metrics against values computed by hand on small fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmguard.eval.metrics import (
    binary_metrics,
    calibration,
    category_metrics,
    expected_calibration_error,
    threshold_for_fpr,
    threshold_sweep,
)

# 4 unsafe, 6 safe; no score sits on a calibration bin edge
Y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
S = [0.95, 0.85, 0.65, 0.35, 0.75, 0.45, 0.25, 0.15, 0.05, 0.02]
PRED = [1 if s >= 0.5 else 0 for s in S]  # TP=3 FN=1 FP=1 TN=5


def test_binary_metrics_match_hand_computed_values() -> None:
    m = binary_metrics(Y, PRED, S, target_fpr=0.2)
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 1, 5)
    assert (m.n, m.positives, m.negatives) == (10, 4, 6)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(3 / 4)
    assert m.fpr == pytest.approx(1 / 6)
    assert m.accuracy == pytest.approx(0.8)
    assert m.balanced_accuracy == pytest.approx((3 / 4 + 5 / 6) / 2)
    # ROC-AUC: pairs (pos, neg) ranked correctly: 6 + 6 + 5 + 4 = 21 of 24
    assert m.roc_auc == pytest.approx(21 / 24)
    # AP: recall steps of 1/4 at precisions 1, 1, 3/4, 4/6
    assert m.auprc == pytest.approx(0.25 * (1 + 1 + 0.75 + 4 / 6))
    assert m.ece == pytest.approx(0.287)
    assert m.threshold_at_target is not None
    assert m.threshold_at_target["threshold"] == pytest.approx(0.65)
    assert m.threshold_at_target["recall"] == pytest.approx(0.75)
    assert m.notes == []


def test_calibration_curve_and_ece_by_hand() -> None:
    curve = calibration(Y, S, n_bins=10)
    # bins 0 (0.05, 0.02), 1, 2, 3, 4, 6, 7, 8, 9 are non-empty; bin 5 is empty
    assert curve["count"] == [2, 1, 1, 1, 1, 1, 1, 1, 1]
    assert curve["mean_predicted"][0] == pytest.approx(0.035)
    assert curve["fraction_unsafe"] == [0, 0, 0, 1, 0, 1, 0, 1, 1]
    # |p - o| per item: .05+.15+.35+.65 (unsafe) + .75+.45+.25+.15 (safe) + 2*.035 (bin 0)
    assert expected_calibration_error(Y, S) == pytest.approx((2.8 + 0.07) / 10)
    from sklearn.calibration import calibration_curve

    frac, mean = calibration_curve(Y, S, n_bins=10, strategy="uniform")
    assert np.allclose(frac, curve["fraction_unsafe"]) and np.allclose(mean, curve["mean_predicted"])


def test_threshold_for_target_fpr() -> None:
    zero = threshold_for_fpr(Y, S, 0.0)
    assert zero["threshold"] == pytest.approx(0.85) and zero["recall"] == pytest.approx(0.5)
    assert zero["fpr"] == 0.0
    fifth = threshold_for_fpr(Y, S, 0.2)
    assert fifth["threshold"] == pytest.approx(0.65) and fifth["fpr"] == pytest.approx(1 / 6)
    everything = threshold_for_fpr(Y, S, 1.0)
    assert everything["recall"] == 1.0 and everything["threshold"] == pytest.approx(0.02)
    # the highest-scored item is safe: nothing can be flagged at FPR 0
    none = threshold_for_fpr([0, 1], [0.9, 0.1], 0.0)
    assert none["threshold"] is None and none["recall"] == 0.0 and none["note"]


def test_threshold_sweep_by_hand() -> None:
    rows = {r["threshold"]: r for r in threshold_sweep(Y, S, [0.5, 0.9])}
    assert rows[0.5]["precision"] == pytest.approx(0.75) and rows[0.5]["fpr"] == pytest.approx(1 / 6)
    assert rows[0.5]["flagged"] == 4
    assert rows[0.9]["precision"] == 1.0 and rows[0.9]["recall"] == 0.25
    assert rows[0.9]["f1"] == pytest.approx(2 * 0.25 / 1.25) and rows[0.9]["fpr"] == 0.0


def test_threshold_sweep_agrees_with_binary_metrics_at_every_row() -> None:
    """Nothing flagged: the sweep said F1 n/a where the table said 0.000 for the same decisions (an audit)."""
    rng = np.random.default_rng(5)
    cases = [(Y, S), ([1, 0, 1], [0.1, 0.2, 0.3]), ([0, 0, 0], [0.1, 0.9, 0.4]), ([1, 1], [0.2, 0.95])]
    cases += [(list(rng.integers(0, 2, 30)), list(rng.random(30))) for _ in range(20)]
    for y, score in cases:
        for row in threshold_sweep(y, score, [0.0, 0.25, 0.5, 0.99, 1.01]):
            table = binary_metrics(y, [int(v >= row["threshold"]) for v in score], score)
            for key in ("precision", "recall", "f1", "fpr"):
                assert (math.isnan(row[key]) and math.isnan(getattr(table, key))) or \
                    row[key] == pytest.approx(getattr(table, key)), (y, score, row, key)


def test_category_metrics_by_hand() -> None:
    truth = [{"S1"}, {"S1", "S10"}, {"S2"}, set(), set(), {"X99"}]
    preds = [{"S1"}, {"S10"}, {"S1"}, set(), {"S2"}, set()]
    rows, summary = category_metrics(truth, preds, ["S1", "S2", "S3", "S10"])
    by = {r.code: r for r in rows}
    assert (by["S1"].precision, by["S1"].recall, by["S1"].f1) == (0.5, 0.5, 0.5)
    assert (by["S1"].support, by["S1"].predicted) == (2, 2)
    assert (by["S10"].precision, by["S10"].recall, by["S10"].f1) == (1.0, 1.0, 1.0)
    assert (by["S2"].precision, by["S2"].recall, by["S2"].f1) == (0.0, 0.0, 0.0)
    assert by["S3"].support == 0 and math.isnan(by["S3"].recall) and math.isnan(by["S3"].f1)
    # a label code outside the policy is kept as its own row, never dropped
    assert not by["X99"].in_policy and by["X99"].support == 1 and by["X99"].recall == 0.0
    # micro over all: tp=2 (S1, S10), fp=2, fn=3 (S1, S2, X99)
    assert summary["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 3))
    assert summary["macro_f1"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)


@pytest.mark.parametrize(
    ("y", "pred", "score"),
    [([0, 0, 0], [0, 1, 0], [0.1, 0.7, 0.2]), ([1, 1], [1, 0], [0.9, 0.3]), ([], [], [])],
)
def test_degenerate_slices_give_nan_and_a_note(y: list[int], pred: list[int], score: list[float]) -> None:
    m = binary_metrics(y, pred, score, target_fpr=0.1)
    assert math.isnan(m.roc_auc) and math.isnan(m.balanced_accuracy)
    assert m.notes, "a degenerate slice must say why metrics are missing"
    d = m.to_dict()
    assert d["roc_auc"] is None  # JSON-safe
    if y and not any(y):
        assert m.fpr == pytest.approx(1 / 3) and math.isnan(m.recall) and math.isnan(m.auprc)
    if y and all(y):
        assert math.isnan(m.fpr) and m.recall == 0.5 and math.isnan(m.auprc)  # 1.0 whatever the scores: undefined


def test_no_predicted_unsafe_leaves_precision_undefined() -> None:
    m = binary_metrics([1, 0, 0], [0, 0, 0], [0.4, 0.1, 0.2])
    assert math.isnan(m.precision) and m.recall == 0.0 and m.f1 == 0.0
    assert any("precision undefined" in n for n in m.notes)
