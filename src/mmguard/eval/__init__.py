"""Evaluation harness: run guards over labeled JSONL conversations and report what the paper reports.

``mmguard eval --data test.jsonl --guard default --out report/`` (see ``docs/eval.md``), or from Python::

    from mmguard.eval import ResultCache, make_guard, run_eval, write_report
    result = run_eval(["test.jsonl"], [make_guard("default")], ResultCache("cache.sqlite"))
    write_report(result, "report/")
"""

from .cache import ResultCache
from .data import DataError, LabeledItem, iter_records
from .guards import (
    OPENAI_TO_CODES,
    ChatJudgeGuard,
    EvalGuard,
    GuardSpecError,
    LocalGuard,
    MmguardServerGuard,
    OpenAIModerationGuard,
    Prediction,
    make_guard,
)
from .metrics import (
    binary_metrics,
    calibration,
    category_metrics,
    expected_calibration_error,
    threshold_for_fpr,
    threshold_sweep,
)
from .report import build_report, write_report
from .runner import EvalError, RunResult, run_eval

__all__ = [
    "OPENAI_TO_CODES",
    "ChatJudgeGuard",
    "DataError",
    "EvalError",
    "EvalGuard",
    "GuardSpecError",
    "LabeledItem",
    "LocalGuard",
    "MmguardServerGuard",
    "OpenAIModerationGuard",
    "Prediction",
    "ResultCache",
    "RunResult",
    "binary_metrics",
    "build_report",
    "calibration",
    "category_metrics",
    "expected_calibration_error",
    "iter_records",
    "make_guard",
    "run_eval",
    "threshold_for_fpr",
    "threshold_sweep",
    "write_report",
]
