"""The benchmark scripts run end to end on the tiny model (plumbing: their timings mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from mmguard.tiny import noise_image

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_throughput_measures_every_candidate(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    args = ["--tiny", "--cpu", "--tiles", "1", "0", "--reps", "1", "--batch", "2", "--prompt-len", "120",
            "--approx", "--quantize", "int8", "--max-seconds", "300", "--out", str(out)]
    assert load("gpu_throughput").main(args) == 0
    report = json.loads(out.read_text())
    image, text = report["scenarios"]
    for key in ("recipe_b1", "engine", "plain_forward", "fast", "fast_mask_free_text", "fast_prompt_response_pairs",
                "fast_pairs_two_calls_kept", "fast_real_tiles_only_APPROX", "fast_real_tokens_only_APPROX"):
        assert image[key]["classifications_per_s"] > 0, key
    assert "fast_pairs_two_calls_kept/fast" in image["ratios"]
    for scenario in (image, text):  # the exact candidates are exact on the benchmark's own inputs
        assert scenario["fast_vs_engine_max_abs_dp_unsafe"] < 1e-5
        assert scenario["mask_free_text_vs_engine_max_abs_dp_unsafe"] < 1e-5
    quantized = report["quantized"]
    assert quantized[0]["quantize"] == "int8" and {r["scenario"] for r in quantized[1:]} == {"1-tile", "text-only"}


def run_approx_agreement(model_dir: Path, tmp_path: Path, *options: str) -> dict:
    """bench/approx_agreement.py on three labeled items: a text prompt, a 2-tile image prompt and response."""
    noise_image(112, 56, 3).save(tmp_path / "a.png")
    rows = [
        {"id": "1", "label": "safe", "messages": [{"role": "user", "content": "hello"}]},
        {"id": "2", "label": "unsafe", "messages": [{"role": "user", "content": [
            {"type": "image", "path": "a.png"}, {"type": "text", "text": "how do I make this?"}]}]},
        {"id": "3", "label": "safe", "messages": [{"role": "user", "content": [
            {"type": "image", "path": "a.png"}, {"type": "text", "text": "what is it?"}]},
            {"role": "assistant", "content": "a pattern"}]},
    ]
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "agree.json"
    args = ["--model", str(model_dir), "--data", str(data), "--device", "cpu", "--dtype", "float32",
            "--out", str(out), *options]
    assert load("approx_agreement").main(args) == 0
    return json.loads(out.read_text())


def test_approx_agreement_reports_each_approximation(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = run_approx_agreement(tiny_model_dir, tmp_path, "--approx", "real-tiles-only", "real-tokens-only", "int8")
    for name in ("real-tiles-only", "real-tokens-only", "int8"):
        row = report["approximations"][name]
        assert row["n"] == 3 and row["image_items"]["n"] == 2 and row["2-tile images"]["n"] == 2
        assert 0.0 <= row["verdict_agreement"] <= 1.0 and row["max_abs_dp_unsafe"] >= 0.0


def test_preprocess_throughput_runs(capsys) -> None:
    assert load("preprocess_throughput").main(["--images", "2", "--reps", "1", "--workers", "1", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "x" in ln.split()[-1]]
    assert len(lines) == 8 and all(float(ln.split()[-1].rstrip("x")) > 0 for ln in lines)


def test_cpu_fast_engine_runs_on_mini(capsys) -> None:
    assert load("cpu_fast_engine").main(["--n", "3", "--reps", "1", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "FastEngine keep_images" in out
    assert "3 images encoded, 3 encodings reused" in out


def test_cpu_default_model_bench_prints_its_figures(capsys) -> None:
    assert load("cpu_default_model").main(["--n", "2", "--reps", "1", "--images", "1"]) == 0
    out = capsys.readouterr().out
    assert "text prompt, batch 1: p50" in out and "items/s" in out and "ms per image" in out


def test_approx_agreement_resizes_images_to_fewer_tiles(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--images-only --resize-to-tiles 1: the text item is left out and the 2-tile images become 1 tile."""
    report = run_approx_agreement(tiny_model_dir, tmp_path, "--approx", "real-tiles-only", "--images-only",
                                  "--resize-to-tiles", "1")
    row = report["approximations"]["real-tiles-only"]
    assert row["n"] == 2 and row["1-tile images"]["n"] == 2 and "2-tile images" not in row


def test_train_share_prefix_times_both_ways_on_the_same_batches(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from test_train_trainer import _write_data

    data = _write_data(tmp_path / "data")
    out = tmp_path / "share.json"
    assert load("train_share_prefix").main(["--tiny", "--data", str(data), "--batches", "2", "--batch-size", "2",
                                            "--threads", "1", "--no-autocast", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["timed_batches"] >= 1 and report["mean_prefix_tokens"] > 100
    assert report["step_s_plain_p50"] > 0 and report["step_s_shared_p50"] > 0
    assert report["max_abs_loss_diff"] < 1e-4  # the same loss either way
    assert report["train_set"]["tokens_shared"] < report["train_set"]["tokens_plain"]


def test_train_step_levers_times_three_ways_on_the_same_batches(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from test_train_trainer import _write_data

    data = _write_data(tmp_path / "data")
    out = tmp_path / "levers.json"
    assert load("train_step_levers").main(["--tiny", "--data", str(data), "--batches", "3", "--batch-size", "2",
                                           "--threads", "1", "--from-layer", "1", "--short-len", "200",
                                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["timed_batches"] >= 1
    assert set(report["levers"]) == {"make mini", "lower layers frozen", "shorter sequences"}
    assert all(r["step_s_p50"] > 0 for r in report["levers"].values())
    params = report["trainable_params"]
    assert params["lower layers frozen"] < params["make mini"]  # layer 0's adapters are left out
    assert 0 < report["items_over_short_len"] <= report["train_items"]  # prompts of ~250 tokens get cut at 200


def test_train_compile_times_eager_and_compiled_steps_on_the_same_batches(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(BENCH.parent / "tests"))
    from test_train_trainer import _write_data

    data = _write_data(tmp_path / "data")
    out = tmp_path / "compile.json"
    assert load("train_compile").main(["--tiny", "--data", str(data), "--batches", "2", "--batch-size", "2",
                                       "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["compiled_layers"] > 0 and report["first_batches_compiled_s"] > 0
    assert sum(report["timed_batch_kinds"].values()) >= 1
    assert all(s > 0 for s in report["step_s_p50"].values())
    assert report["max_abs_loss_diff"] < 0.05  # bf16 autocast: close, not bitwise


def test_ocr_box_cap_compares_both_engines_on_each_set(datasets_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cap.json"
    argv = ["--datasets", str(datasets_dir), "--figstep", "2", "--harmful", "2", "--photos", "1", "--out", str(out)]
    assert load("ocr_box_cap").main(argv) == 0
    report = json.loads(out.read_text())
    assert {name: s["images"] for name, s in report["sets"].items()} == {
        "figstep": 2, "mm_harmfulbench": 2, "skimage_photos": 1}
    assert all(0 <= s["read_identically"] <= s["images"] and s["ratio_of_means"] > 0
               for s in report["sets"].values())
    hostile = report["hostile"]
    assert set(hostile) == {"line_above_99_words", "line_above_200_words"}
    assert all(h["uncapped"]["has_request"] and not h["capped"]["has_request"] for h in hostile.values())


def test_ocr_other_views_reads_what_each_way_hides(datasets_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "views.json"
    argv = ["--model", str(tiny_model_dir), "--read-text", "on", "--datasets", str(datasets_dir), "--figstep", "2",
            "--out", str(out)]
    assert load("ocr_other_views").main(argv) == 0
    ways = json.loads(out.read_text())["ways"]
    assert set(ways) == {"plain", "hidden_under_alpha", "white_on_clear", "later_frame"}
    # real OCR on a random model: the reading is measured, the verdicts mean nothing
    assert ways["plain"]["with"]["similarity_mean"] > 0.8
    for way in ("hidden_under_alpha", "white_on_clear", "later_frame"):
        assert ways[way]["with"]["similarity_mean"] > 0.8, way
        assert ways[way]["without"]["similarity_mean"] < 0.2, way
