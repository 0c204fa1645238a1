"""Runs, reports, the SQLite cache (rerun and interrupted-run resume) and the CLI with a tiny local guard."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from mmguard.conversation import Conversation
from mmguard.eval.cache import ResultCache
from mmguard.eval.guards import Prediction
from mmguard.eval.report import write_report
from mmguard.eval.runner import run_eval

# the metric fixture of test_eval_metrics: 4 unsafe, 6 safe prompts with known scores
SCORES = [
    (1, 0.95),
    (1, 0.85),
    (1, 0.65),
    (1, 0.35),
    (0, 0.75),
    (0, 0.45),
    (0, 0.25),
    (0, 0.15),
    (0, 0.05),
    (0, 0.02),
]


class ScriptedGuard:
    """A test double: reads ``p=0.83`` and ``codes=S1`` from the judged turn; counts what it is asked."""

    def __init__(
        self, name: str = "scripted", *, fail_on_call: int | None = None, error_text: str = ""
    ) -> None:
        self.name = name
        self.calls = 0
        self.items = 0
        self.fail_on_call = fail_on_call
        self.error_text = error_text

    @property
    def cache_id(self) -> str:
        return "scripted:v1"

    def describe(self) -> dict[str, Any]:
        return {"kind": "scripted"}

    def predict(self, conversations: Sequence[Conversation], progress: Any = None) -> list[Prediction]:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        out = []
        for c in conversations:
            text = c.turns[-1].text
            self.items += 1
            if self.error_text and self.error_text in text:
                out.append(Prediction(label="error", unsafe_probability=float("nan"), error="refused"))
                continue
            p = float(re.search(r"p=([\d.]+)", text).group(1))  # type: ignore[union-attr]
            m = re.search(r"codes=([\w,]+)", text)
            codes = m.group(1).split(",") if m and p >= 0.5 else []
            out.append(
                Prediction(
                    label="unsafe" if p >= 0.5 else "safe",
                    unsafe_probability=p,
                    codes=[x for x in codes if not x.startswith("Z")],
                    unknown_codes=[x for x in codes if x.startswith("Z")],
                )
            )
        if progress is not None:
            progress(len(conversations))
        return out


def _dataset(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (32, 24), (10, 120, 200)).save(tmp_path / "img" / "x.png")
    lines = []
    for i, (y, p) in enumerate(SCORES):
        codes = ["S1"] if y else []
        lines.append(
            {
                "id": f"p{i}",
                "source": "alpha" if i % 2 else "beta",
                "split": "test",
                "messages": [{"role": "user", "content": f"prompt {i} p={p} codes=S1"}],
                "label": "unsafe" if y else "safe",
                "codes": codes,
            }
        )
    # response items, one with an image and a code the guard writes outside the policy
    lines.append(
        {
            "id": "r0",
            "source": "alpha",
            "split": "test",
            "label": "unsafe",
            "codes": ["S10"],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "path": "img/x.png"}, {"type": "text", "text": "q"}],
                },
                {"role": "assistant", "content": "answer p=0.9 codes=S10,Z9"},
            ],
        }
    )
    lines.append(
        {
            "id": "r1",
            "source": "alpha",
            "split": "test",
            "label": "safe",
            "codes": [],
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok p=0.1"}],
        }
    )
    lines.append(
        {
            "id": "r2",
            "source": "beta",
            "split": "test",
            "label": "unsafe",
            "codes": ["S42"],
            "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "bad p=0.3"}],
        }
    )
    lines.append(
        {
            "id": "t0",
            "source": "alpha",
            "split": "train",
            "label": "safe",
            "messages": [{"role": "user", "content": "not evaluated p=0.99"}],
        }
    )
    f = tmp_path / "eval.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return f


def test_run_and_report_match_hand_computed_metrics(tmp_path: Path) -> None:
    data = _dataset(tmp_path)
    guard = ScriptedGuard()
    done: list[int] = []
    with (tmp_path / "preds.jsonl").open("w") as preds:
        result = run_eval(
            [data],
            [guard],
            ResultCache(None),
            split="test",
            chunk_size=4,
            progress=done.append,
            predictions=preds,
        )
    assert len(result.records) == 13 and sum(done) == 13
    report = write_report(result, tmp_path / "out", target_fpr=0.2)
    row = next(r for r in report["results"] if r["task"] == "prompt" and r["slice"] == "all")
    m = row["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 5, 1)
    assert m["precision"] == pytest.approx(0.75) and m["fpr"] == pytest.approx(1 / 6)
    assert m["roc_auc"] == pytest.approx(21 / 24) and m["ece"] == pytest.approx(0.287)
    assert m["threshold_at_target"]["threshold"] == pytest.approx(0.65)
    slices = {(r["task"], r["slice"], r["name"]) for r in report["results"]}
    assert {
        ("prompt", "source", "alpha"),
        ("prompt", "source", "beta"),
        ("response", "modality", "image+text"),
        ("response", "modality", "text"),
        ("response", "all", "all"),
    } <= slices
    # the response slice with only one image item is degenerate: NaN (null) and a note, not a crash
    img = next(r for r in report["results"] if r["task"] == "response" and r["name"] == "image+text")
    assert img["metrics"]["roc_auc"] is None and img["metrics"]["notes"]
    cats = next(c for c in report["categories"] if c["task"] == "all")
    by = {r["code"]: r for r in cats["rows"]}
    assert by["S1"]["precision"] == pytest.approx(0.75) and by["S1"]["recall"] == pytest.approx(0.75)
    assert by["S10"]["f1"] == 1.0 and by["S42"]["support"] == 1 and not by["S42"]["in_policy"]
    assert report["data"]["unknown_label_codes"] == {"S42": 1}
    assert report["guards"][0]["unknown_predicted_codes"] == {"Z9": 1}
    out = tmp_path / "out"
    for name in (
        "report.md",
        "report.json",
        "pr_curves.png",
        "roc_curves.png",
        "reliability.png",
        "category_f1.png",
    ):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "| Prompt classification | 0.750 | 0.750 | 0.750 | 0.167 |" in md
    assert "Response classification" in md and "## By modality" in md and "## By source" in md
    assert "S42 ×1" in md and "Z9 ×1" in md
    assert len((tmp_path / "preds.jsonl").read_text().splitlines()) == 13


def test_rerun_reads_every_result_from_the_cache(tmp_path: Path) -> None:
    data = _dataset(tmp_path)
    cache_file = tmp_path / "cache.sqlite"
    first = ScriptedGuard()
    r1 = run_eval([data], [first], ResultCache(cache_file), chunk_size=5)
    assert first.items == 13 and r1.guards[0].computed == 13
    again = ScriptedGuard()
    r2 = run_eval([data], [again], ResultCache(cache_file), chunk_size=5)
    assert again.calls == 0 and r2.guards[0].cached == 13 and r2.guards[0].computed == 0
    assert [r.preds["scripted"].unsafe_probability for r in r2.records] == [
        r.preds["scripted"].unsafe_probability for r in r1.records
    ]


def test_interrupted_run_resumes_without_recomputing(tmp_path: Path) -> None:
    data = _dataset(tmp_path)
    cache_file = tmp_path / "cache.sqlite"
    crashing = ScriptedGuard(fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        run_eval([data], [crashing], ResultCache(cache_file), chunk_size=4)
    assert ResultCache(cache_file).count("scripted:v1") == 8  # two chunks finished before the interrupt
    resumed = ScriptedGuard()
    result = run_eval([data], [resumed], ResultCache(cache_file), chunk_size=4)
    assert resumed.items == 5 and result.guards[0].cached == 8 and len(result.records) == 13


def test_item_errors_are_reported_and_retried_next_time(tmp_path: Path) -> None:
    data = _dataset(tmp_path)
    cache_file = tmp_path / "cache.sqlite"
    flaky = ScriptedGuard(error_text="prompt 3 ")
    result = run_eval([data], [flaky], ResultCache(cache_file))
    assert result.guards[0].errors == 1 and result.guards[0].error_examples[0]["id"] == "p3"
    report = write_report(result, tmp_path / "out", plots=False)
    prompt = next(r for r in report["results"] if r["task"] == "prompt" and r["slice"] == "all")
    assert prompt["metrics"]["n"] == 9  # the failed item is left out, not scored as safe
    assert "1 item(s) failed" in (tmp_path / "out" / "report.md").read_text()
    healed = ScriptedGuard()
    run_eval([data], [healed], ResultCache(cache_file))
    assert healed.items == 1


def _cli() -> typer.Typer:
    from mmguard.eval.cli import command

    app = typer.Typer()
    app.command("eval")(command)
    app.command("noop", hidden=True)(lambda: None)  # keep "eval" as a subcommand
    return app


def test_cli_with_a_local_checkpoint_writes_the_report_and_resumes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = _dataset(tmp_path)
    out = tmp_path / "report"
    args = [
        "eval",
        "--data",
        str(data),
        "--guard",
        f"tiny=local:{tiny_model_dir}",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batch-size",
        "4",
        "--no-progress",
        "--target-fpr",
        "0.1",
    ]
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["guards"][0]["computed"] == 13
    assert any("random weights" in w for w in report["guards"][0]["warnings"])
    assert {r["task"] for r in report["results"]} == {"prompt", "response"}
    for name in ("report.md", "pr_curves.png", "reliability.png", "category_f1.png"):
        assert (out / name).is_file()
    res2 = CliRunner().invoke(_cli(), args)
    assert res2.exit_code == 0, res2.output
    again = json.loads((out / "report.json").read_text())
    assert again["guards"][0]["cached"] == 13 and again["guards"][0]["computed"] == 0
    p1 = [r["metrics"]["auprc"] for r in report["results"]]
    assert p1 == [r["metrics"]["auprc"] for r in again["results"]]


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}], "label": "safe"}\n{"label": 3}\n')
    res = CliRunner().invoke(
        _cli(), ["eval", "--data", str(bad), "--out", str(tmp_path / "o"), "--split", "all"]
    )
    assert res.exit_code == 2
    assert f"error: {bad}:2:" in res.output and "Traceback" not in res.output
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"messages": [{"role": "user", "content": "x"}], "label": "safe"}\n')
    res = CliRunner().invoke(
        _cli(), ["eval", "--data", str(ok), "--guard", "nonsense", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "unknown guard spec 'nonsense'" in res.output
