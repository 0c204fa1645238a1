"""scripts/make_mini.sh's control flow, with a stand-in `mmguard` that records its calls and writes placeholder
outputs (plumbing only: no data is built and nothing is trained): the stages in order with their flags, stage
5R on its seeded sample, the soup of stages 4 and 5R shipped with every stage's summary, a second run skipping
what is done, and STAGE5_STEPS=0 shipping stage 4 alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the stand-in: one line of JSON per call, and the files the next step of the recipe reads
FAKE_MMGUARD = r"""#!/usr/bin/env bash
set -euo pipefail
"$REAL_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$CALLS"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
case "$1 ${2:-}" in
  "data build") mkdir -p "$out"; echo '{}' > "$out/train.jsonl" ;;
  "data sample") mkdir -p "$(dirname "$out")"; echo '{}' > "$out" ;;  # as the real one, which makes the folder
  train*)
    mkdir -p "$out"
    for f in adapter_config.json mmguard.json tokenizer.json tokenizer_config.json preprocessor_config.json; do
      echo '{}' > "$out/$f"
    done
    echo "weights of $out" > "$out/adapter_model.safetensors"
    echo "{\"out\": \"$out\"}" > "$out/training_summary.json" ;;
  soup*)
    mkdir -p "$out"; cp "$2"/*.json "$out/"
    echo "soup of $2 and $3" > "$out/adapter_model.safetensors"
    echo "{\"ingredients\": [\"$2\", \"$3\"]}" > "$out/soup.json" ;;
  *) echo "unexpected call: $*" >&2; exit 2 ;;
esac
"""


def _run(tmp: Path, **env: str) -> list[list[str]]:
    bin_dir = tmp / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "mmguard").write_text(FAKE_MMGUARD)
        (bin_dir / "mmguard").chmod(0o755)
        # the recipe's inline Python needs the real one (a symlink would lose the virtual environment)
        (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / "python").chmod(0o755)
    calls = tmp / "calls.jsonl"
    calls.write_text("")
    full_env = {**os.environ, "PY": str(bin_dir), "ASSET": str(tmp / "asset"), "EVAL": "0", "CALLS": str(calls),
                "REAL_PYTHON": sys.executable, **env}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "make_mini.sh"), str(tmp / "datasets"),
                           str(tmp / "work")], env=full_env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]


def _flag(call: list[str], name: str) -> str:
    """The value of the last ``name`` in a call (the CLI keeps the last of a repeated option)."""
    return call[len(call) - 1 - call[::-1].index(name) + 1]


def test_recipe_trains_five_stages_and_ships_the_soup_of_4_and_5r(tmp_path: Path) -> None:
    work = tmp_path
    calls = _run(work)
    w = str(work / "work")
    steps = [(c[0], c[1]) if c[0] == "data" else (c[0], _flag(c, "--out")) for c in calls]
    assert steps == [("data", "build"), ("train", f"{w}/run"), ("train", f"{w}/run2"), ("data", "build"),
                     ("train", f"{w}/run3"), ("train", f"{w}/run4"), ("data", "sample"), ("train", f"{w}/run5r"),
                     ("soup", f"{w}/soup")]
    sample = calls[6]
    assert sample[2] == f"{w}/data3/train.jsonl" and _flag(sample, "--out") == f"{w}/data5r/train.jsonl"
    assert [sample[i + 1] for i, a in enumerate(sample) if a == "--share"] == ["prompt/image+text=0.5",
                                                                              "response=0.4"]
    assert _flag(sample, "--seed") == "6"
    stage5 = calls[7]
    assert _flag(stage5, "--data") == f"{w}/data5r/train.jsonl" and _flag(stage5, "--warm-start") == f"{w}/run4"
    assert (_flag(stage5, "--steps"), _flag(stage5, "--lr"), _flag(stage5, "--seed")) == ("200", "2e-4", "6")
    assert (_flag(stage5, "--unsafe-repeat"), _flag(stage5, "--grad-accum"), _flag(stage5, "--batch-size")) == (
        "2", "2", "8")
    assert "--share-prefix" in stage5 and "--stop-at" not in stage5
    assert all("--compile" in c for c in calls if c[0] == "train")  # every stage trains compiled layers
    assert calls[8][1:3] == [f"{w}/run4", f"{w}/run5r"]

    asset = work / "asset"
    assert (asset / "adapter_model.safetensors").read_text() == f"soup of {w}/run4 and {w}/run5r\n"
    assert json.loads((asset / "soup.json").read_text())["ingredients"] == [f"{w}/run4", f"{w}/run5r"]
    summaries = {p.name: json.loads(p.read_text())["out"] for p in asset.glob("training_summary*.json")}
    assert summaries == {"training_summary.json": f"{w}/run5r",
                         **{f"training_summary_stage{i}.json": f"{w}/{r}"
                            for i, r in enumerate(["run", "run2", "run3", "run4"], start=1)}}
    from mmguard.base_models import BASE_NAME

    assert json.loads((asset / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_NAME

    # interrupted after everything finished: a second run trains nothing and builds nothing again
    assert _run(work) == []
    assert (asset / "adapter_model.safetensors").read_text() == f"soup of {w}/run4 and {w}/run5r\n"


def test_stage5_steps_0_ships_stage_4_alone(tmp_path: Path) -> None:
    work = tmp_path
    calls = _run(work, STAGE5_STEPS="0")
    assert [c[0] for c in calls] == ["data", "train", "train", "data", "train", "train"]
    asset = work / "asset"
    assert (asset / "adapter_model.safetensors").read_text() == f"weights of {work / 'work'}/run4\n"
    assert not (asset / "soup.json").exists()
    assert json.loads((asset / "training_summary.json").read_text())["out"] == f"{work / 'work'}/run4"
    assert sorted(p.name for p in asset.glob("training_summary_stage*.json")) == [
        f"training_summary_stage{i}.json" for i in (1, 2, 3)]


def test_budget_recipe_trains_one_schedule_then_5r_and_ships_their_soup(tmp_path: Path) -> None:
    calls = _run(tmp_path, RECIPE="budget", BUDGET_STEPS="12", BUDGET5_STEPS="5")
    w = str(tmp_path / "work")
    steps = [(c[0], c[1]) if c[0] == "data" else (c[0], _flag(c, "--out")) for c in calls]
    # only data3 is built (no plain training build), the sample is drawn from it
    assert steps == [("data", "build"), ("train", f"{w}/run"), ("data", "sample"), ("train", f"{w}/run5r"),
                     ("soup", f"{w}/soup")]
    assert _flag(calls[0], "--out") == f"{w}/data3" and "--templated-responses" in calls[0]
    first, second = calls[1], calls[3]
    assert _flag(first, "--data") == f"{w}/data3/train.jsonl" and "--warm-start" not in first
    assert (_flag(first, "--steps"), _flag(first, "--lr"), _flag(first, "--seed")) == ("12", "5e-4", "0")
    assert "--share-prefix" in first and "--stop-at" not in first  # the schedule runs out
    assert _flag(second, "--warm-start") == f"{w}/run" and _flag(second, "--steps") == "5"
    assert (_flag(second, "--grad-accum"), _flag(second, "--unsafe-repeat")) == ("2", "2")
    assert all("--compile" in c for c in calls if c[0] == "train")
    assert (tmp_path / "asset" / "adapter_model.safetensors").read_text() == f"soup of {w}/run and {w}/run5r\n"
    assert json.loads((tmp_path / "asset" / "training_summary_stage1.json").read_text())["out"] == f"{w}/run"


def test_unknown_recipe_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "make_mini.sh"), str(tmp_path), str(tmp_path / "w")],
                          env={**os.environ, "RECIPE": "fast"}, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "RECIPE is shipped or budget" in done.stderr
    assert not (tmp_path / "w").exists()
