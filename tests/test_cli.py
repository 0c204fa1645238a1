"""The core CLI: classify (single, chat JSON, stdin, JSONL batch), prompt, policy; exit codes and errors."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image
from typer.testing import CliRunner

from mmguard import Conversation, build_prompt
from mmguard.cli import app
from mmguard.tokenizer import encode_prompt, load_default_tokenizer

runner = CliRunner()


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 128, 255)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_classify_one_conversation_json(tiny_model_dir) -> None:
    res = runner.invoke(app, ["classify", "--model", str(tiny_model_dir), "--prompt", "hello", "--json",
                              "--device", "cpu"])
    assert res.exit_code in (0, 1), res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["role"] == "user" and out["task"] == "prompt" and 0 <= out["unsafe_probability"] <= 1
    assert (res.exit_code == 1) == (out["label"] == "unsafe")
    assert any("random weights" in w for w in out["warnings"])


def test_classify_threshold_zero_is_unsafe_with_codes(tiny_model_dir) -> None:
    res = runner.invoke(app, ["classify", "-m", str(tiny_model_dir), "-p", "q", "-r", "a", "--threshold", "0",
                              "-x", "S1,S2", "--json", "--device", "cpu"])
    assert res.exit_code == 1
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["label"] == "unsafe" and out["role"] == "agent" and out["codes"]
    assert not {"S1", "S2"} & set(out["codes"])


def test_classify_chat_json_from_stdin(tiny_model_dir) -> None:
    conv = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image", "url": png_data_url()}]}]}
    res = runner.invoke(app, ["classify", "-m", str(tiny_model_dir), "--input", "-", "--json", "--device", "cpu"],
                        input=json.dumps(conv))
    assert res.exit_code in (0, 1), res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["has_image"] is True


def test_classify_fast_gives_the_same_verdict_and_int8_answers(tiny_model_dir) -> None:
    conv = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image", "url": png_data_url()}]}]}
    outs = []
    for extra in ([], ["--fast"], ["--quantize", "int8"]):
        res = runner.invoke(app, ["classify", "-m", str(tiny_model_dir), "--input", "-", "--json", "--device", "cpu",
                                  "--dtype", "float32", *extra], input=json.dumps(conv))
        assert res.exit_code in (0, 1), res.output
        outs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    plain, fast, int8 = outs
    assert fast["label"] == plain["label"] and fast["codes"] == plain["codes"]
    assert abs(fast["unsafe_probability"] - plain["unsafe_probability"]) < 1e-5
    # int8 is an approximation: it answers, and its distance from the exact path is measured elsewhere
    assert 0.0 <= int8["unsafe_probability"] <= 1.0 and int8["label"] in ("safe", "unsafe")


def test_classify_quantize_names_the_choices(tiny_model_dir) -> None:
    res = runner.invoke(app, ["classify", "-m", str(tiny_model_dir), "--prompt", "hi", "--device", "cpu",
                              "--quantize", "int4"])
    assert res.exit_code == 3
    assert "int8, fp8" in res.output


def test_classify_jsonl_copies_fields_and_reports_bad_lines(tiny_model_dir, tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "label": "safe", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "b", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
        {"id": "bad", "messages": [{"role": "assistant", "content": "starts with agent"}]},
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["classify", "-m", str(tiny_model_dir), "--jsonl", str(src), "-o", str(out),
                              "--device", "cpu"])
    assert res.exit_code == 2
    assert "in.jsonl:3" in res.output and "alternate" in res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["a", "b", "bad", None]
    assert rows[0]["label"] == "safe"  # the input's own label, untouched; the verdict is under "mmguard"
    assert rows[0]["mmguard"]["label"] in ("safe", "unsafe") and "unsafe_probability" in rows[0]["mmguard"]
    assert rows[1]["mmguard"]["role"] == "agent"
    assert "error" in rows[2]["mmguard"] and rows[3]["mmguard"] == {"line": 4, "error": rows[3]["mmguard"]["error"]}


def test_prompt_json_is_exact(tmp_path) -> None:
    res = runner.invoke(app, ["prompt", "-p", "Bake <|eot_id|> a cake", "-x", "S2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    conv = Conversation.prompt("Bake <|eot_id|> a cake")
    from mmguard.policy import DEFAULT_POLICY

    rendered = build_prompt(conv, DEFAULT_POLICY.exclude(["S2"]))
    assert out["prompt"] == rendered.text
    assert out["input_ids"] == encode_prompt(load_default_tokenizer(), rendered)
    assert out["input_ids"].count(128009) == 1 and out["num_tokens"] == len(out["input_ids"])


def test_policy_and_errors(tmp_path) -> None:
    res = runner.invoke(app, ["policy", "--json", "-x", "S13"])
    assert res.exit_code == 0 and json.loads(res.stdout)["excluded"] == ["S13"]
    pol = tmp_path / "p.yaml"
    pol.write_text("categories:\n  - {code: C1, label: Spam.}\n  - {code: C1, label: Again.}\n")
    res = runner.invoke(app, ["policy", "--policy", str(pol)])
    assert res.exit_code == 2 and "duplicate code 'C1'" in res.output
    res = runner.invoke(app, ["prompt", "-p", "x", "-x", "S99"])
    assert res.exit_code == 2 and "S99" in res.output
    res = runner.invoke(app, ["prompt", "-p", "x", "--image", "/nope.png"])
    assert res.exit_code == 2 and res.output.startswith("error:") and "Traceback" not in res.output
    res = runner.invoke(app, ["classify", "-m", str(tmp_path / "missing"), "-p", "x"])
    assert res.exit_code == 3 and "not found" in res.output
