"""scripts/mini_acceptance.py: thresholds and the image verdict rule come from validation alone, and the rule is
written into the model's mmguard.json (synthetic predictions, so each outcome is known in advance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mini_acceptance.py"


def _row(i: int, task: str, label: str, modality: str, model: float, ocr: float | None) -> dict:
    pred: dict = {"unsafe_probability": max(model, ocr) if ocr is not None else model}
    if ocr is not None:
        pred["check_probabilities"] = {"model": model, "ocr": ocr}
    return {"id": str(i), "source": "synth", "task": task, "label": label, "modality": modality,
            "predictions": {"g": pred}}


def _split(path: Path, pixels_flag_benign: bool) -> Path:
    rows, i = [], 0
    for k in range(40):  # text prompts and responses: separable, the rule does not touch them
        for task in ("prompt", "response"):
            unsafe = k % 2 == 0
            rows.append(_row(i, task, "unsafe" if unsafe else "safe", "text", 0.9 if unsafe else 0.1, None))
            i += 1
    for k in range(20):  # image prompts: the text check is right; the model's check flags every benign image
        unsafe = k % 2 == 0
        model = 0.95 if (unsafe or pixels_flag_benign) else 0.05
        rows.append(_row(i, "prompt", "unsafe" if unsafe else "safe", "image+text", model, 0.9 if unsafe else 0.1))
        i += 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp: Path, val_pixels_flag_benign: bool, *extra: str) -> tuple[str, dict, dict]:
    val = _split(tmp / "val.jsonl", val_pixels_flag_benign)
    test = _split(tmp / "test.jsonl", True)
    info = tmp / "mmguard.json"
    info.write_text(json.dumps({"adapter": True}))
    out = tmp / "acc.json"
    res = subprocess.run([sys.executable, str(SCRIPT), str(val), str(test), "--json", str(out), "--model-info",
                          str(info), *extra], capture_output=True, text=True, timeout=120, check=True)
    return res.stdout, json.loads(out.read_text()), json.loads(info.read_text())


def test_validation_chooses_the_text_rule_when_pixels_flag_benign_images(tmp_path: Path) -> None:
    stdout, acc, info = _run(tmp_path, True)
    assert acc["image_verdict"] == "text"
    assert info == {"adapter": True, "image_verdict": "text", "thresholds": acc["thresholds"]}  # exact
    assert "image verdict rule: 'text'" in stdout
    assert acc["test"]["benign image+text prompts"]["fpr"] == 0.0  # the text check decides on test too


def test_a_tie_on_validation_keeps_max_and_test_never_decides(tmp_path: Path) -> None:
    # on validation both rules are perfect (the pixels flag nothing benign): max, the default, is kept, even
    # though on test (where the pixels flag every benign image) text would have scored better
    _, acc, info = _run(tmp_path, False)
    assert acc["image_verdict"] == "max" and info["image_verdict"] == "max"
    assert acc["test"]["benign image+text prompts"]["fpr"] == 1.0


def test_a_fixed_rule_is_applied_as_given(tmp_path: Path) -> None:
    _, acc, info = _run(tmp_path, True, "--image-verdict", "max")
    assert acc["image_verdict"] == "max" and info["image_verdict"] == "max"
    assert acc["test"]["benign image+text prompts"]["fpr"] == 1.0


def test_the_threshold_sits_midway_in_the_gap_so_noise_and_rounding_decide_nothing() -> None:
    """The recorded threshold flags exactly the validation items the table counted, with room on both sides
    (it used to equal the lowest flagged probability, and was then rounded to 4 decimals: 0.588079 -> 0.5881
    unflagged that very item)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mini_acceptance", SCRIPT)
    assert spec is not None and spec.loader is not None
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)
    probs = [0.05, 0.2, 0.45, 0.5871653, 0.58807927, 0.62, 0.9, 0.95]
    labels = ["safe", "safe", "safe", "safe", "unsafe", "unsafe", "unsafe", "unsafe"]
    rows = [{"task": "prompt", "label": y, "predictions": {"g": {"unsafe_probability": p}}}
            for p, y in zip(probs, labels, strict=True)]
    thr = acc.choose(rows, "g", "prompt", "max")
    assert 0.5871653 < thr < 0.58807927  # between the highest safe and the lowest flagged
    assert abs(thr - (0.5871653 + 0.58807927) / 2) < 1e-6
    assert acc.metrics(rows, "g", thr, "max")["f1"] == 1.0
    assert min(abs(thr - p) for p in probs) > 4e-4  # no item within float noise of it


def test_items_the_guard_failed_on_are_counted_not_dropped_silently(tmp_path: Path) -> None:
    val = _split(tmp_path / "val.jsonl", False)
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    rows[0]["predictions"]["g"] = {"error": "HTTP 400", "unsafe_probability": None}
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = _split(tmp_path / "test.jsonl", True)
    res = subprocess.run([sys.executable, str(SCRIPT), str(val), str(test)], capture_output=True, text=True,
                         timeout=120, check=True)
    assert f"{val}: 1 of {len(rows)} items have no prediction of 'g'" in res.stderr
    assert "test.jsonl" not in res.stderr  # nothing failed there
