"""``mmguard data build`` and ``mmguard data stats`` end to end on a small subset."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mmguard.data.cli import app
from mmguard.data.schema import read_examples


def test_build_then_stats(datasets_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["build", "--datasets", str(datasets_dir), "--out", str(out), "--max-per-source", "20",
            "--source", "advbench", "--source", "skimage_benign_photos", "--source", "gsm8k",
            "--typographic", "6", "--photo-questions", "4", "--request-with-image", "4",
            "--response-with-image", "4",
            "--no-noncommercial"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["counts"].values()) == sum(r["count"] for r in stats["rows"])
    items = [e for split in ("train", "validation", "test") for e in read_examples(out / f"{split}.jsonl")]
    assert len(items) == sum(stats["counts"].values())
    images = [e for e in items if e.modality == "image+text"]
    assert images and all(
        (out / p).is_file() and p.startswith("images/") for e in images for p in e.image_paths()
    )
    assert {e.source for e in images} >= {"skimage_benign_photos", "synth_typographic"}
    res = runner.invoke(app, ["stats", str(out / "train.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["total"] == stats["counts"]["train"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    res = runner.invoke(app, ["stats", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output
