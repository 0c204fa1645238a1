"""``mmguard batch`` on the local engine: the same rows as ``classify --jsonl``, every line exactly once,
resume after ``kill -9``, the job fingerprint, chunking, object-store URIs and the image rules."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmguard.batch import BatchOptions, FingerprintMismatch, GuardSpec, JobExists, run_batch
from mmguard.cli import _register_tools, app

REPO = Path(__file__).resolve().parents[1]
BAD_LINES = {  # position -> a line that cannot be judged
    5: "{not json",
    17: json.dumps({"id": "no-messages"}),
    40: json.dumps({"id": "bad-role", "messages": [{"role": "system", "content": "hi"}]}),
    77: json.dumps([1, 2, 3]),
    150: json.dumps({"id": "missing-image", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image", "path": "images/none.png"}]}]}),
}


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (rng.randint(20, 90), rng.randint(20, 90)),
                    tuple(rng.randint(0, 255) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_conversations(folder: Path, n: int = 240, *, bad: bool = True) -> Path:
    """``n`` JSONL lines (text, images by relative path and data URL, prompt and response checks, blank
    lines between some, and ``BAD_LINES`` when ``bad``) in ``folder/convs.jsonl``, images beside it."""
    rng = random.Random(1)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(6):
        (folder / "images" / f"img{k}.png").write_bytes(_png(k))
    words = ["please", "tell", "me", "about", "the", "weather", "a", "recipe", "for", "cake", "how", "do", "I",
             "fix", "my", "bike", "knife", "steal"]
    lines = []
    for i in range(n):
        if bad and i in BAD_LINES:
            lines.append(BAD_LINES[i])
            continue
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        kind = i % 4
        if kind == 1:
            content.insert(0, {"type": "image", "path": f"images/img{i % 6}.png"})
        elif kind == 2:
            url = "data:image/png;base64," + base64.b64encode(_png(100 + i % 3)).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if i % 3 == 0:
            messages.append({"role": "assistant", "content": "sure: " + text[::-1]})
        lines.append(json.dumps({"id": f"c{i}", "meta": {"i": i}, "messages": messages}))
        if i % 50 == 7:
            lines.append("   ")
    path = folder / "convs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for p in sorted(out.glob("part-*.jsonl")) for x in p.read_text("utf-8").splitlines()]


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the one field that measures time."""
    out = []
    for r in rows:
        r = json.loads(json.dumps(r))
        r["mmguard"].pop("latency_ms", None)
        out.append(r)
    return out


def classify_jsonl_rows(model_dir: Path, src: Path, tmp: Path) -> list[dict[str, Any]]:
    _register_tools(["classify"])
    out = tmp / "classify.jsonl"
    res = CliRunner().invoke(app, ["classify", "-m", str(model_dir), "--device", "cpu", "--dtype", "float32",
                                   "--jsonl", str(src), "-o", str(out)])
    assert res.exit_code in (0, 2), res.output
    return [json.loads(x) for x in out.read_text("utf-8").splitlines()]


def spec_for(model_dir: Path, **kw: Any) -> GuardSpec:
    return GuardSpec(model=str(model_dir), device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def job_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conversations(tmp_path_factory.mktemp("batch_in"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, job_input: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return comparable(classify_jsonl_rows(tiny_model_dir, job_input, tmp_path_factory.mktemp("ref")))


def test_local_batch_equals_classify_jsonl(tiny_model_dir, tiny_guard, job_input, reference, tmp_path) -> None:
    out = tmp_path / "out"
    summary = run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), guard=tiny_guard)
    rows = comparable(read_rows(out))
    assert len(reference) == 240
    assert rows == reference  # every line once, in input order, the same verdicts bit for bit
    assert summary.lines == 240 and summary.errors == len(BAD_LINES) and summary.chunks == 8
    assert summary.verdicts == 240 - len(BAD_LINES) and not summary.failed
    assert summary.unsafe == sum(bool(r["mmguard"].get("is_unsafe")) for r in rows)
    errors = {r["mmguard"]["line"]: r["mmguard"]["error"] for r in rows if "error" in r["mmguard"]}
    assert len(errors) == len(BAD_LINES)
    assert any("images/none.png" in e for e in errors.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["part"] for c in manifest["chunks"]] == sorted(p.name for p in out.glob("part-*.jsonl"))
    assert sum(d["rows"] for d in manifest["done"].values()) == 240
    assert manifest["summary"]["lines"] == 240
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_chunks_are_deterministic(job_input) -> None:
    from mmguard.batch.plan import InputFile, plan_inputs

    sized = [InputFile(str(job_input), job_input.stat().st_size)]
    assert plan_inputs(sized, 7, 1 << 20) == plan_inputs(sized, 7, 1 << 20)
    planned, chunks = plan_inputs(sized, 7, 1 << 20)
    assert sum(c.lines for c in chunks) == 240 == planned[0].lines and len(chunks) == 35
    assert [c.part for c in chunks] == [f"part-00000-{k:06d}.jsonl" for k in range(35)]
    raw = job_input.read_bytes()
    for c in chunks:  # each chunk's byte range holds exactly its lines (blank lines aside)
        assert len([x for x in raw[c.start:c.end].split(b"\n") if x.strip()]) == c.lines


def test_resume_refuses_other_settings_and_refuses_a_used_folder(tiny_model_dir, tiny_guard, tmp_path) -> None:
    job_input = write_conversations(tmp_path / "in", n=40)
    out = tmp_path / "out"
    run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), guard=tiny_guard)
    with pytest.raises(JobExists, match="--resume"):
        run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), guard=tiny_guard)
    with pytest.raises(FingerprintMismatch, match="threshold"):
        run_batch([str(job_input)], str(out), spec_for(tiny_model_dir, threshold=0.3), resume=True, guard=tiny_guard)
    with pytest.raises(FingerprintMismatch, match="exclusions"):
        from mmguard.policy import load_policy

        policy = load_policy(None).exclude(["S6"]).to_dict()
        run_batch([str(job_input)], str(out), spec_for(tiny_model_dir, policy=policy), resume=True, guard=tiny_guard)
    with pytest.raises(FingerprintMismatch, match="options"):
        run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), BatchOptions(chunk_size=5), resume=True,
                  guard=tiny_guard)
    other = tmp_path / "other-model"
    from mmguard.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(other, seed=1)  # same architecture and sizes, other weights
    with pytest.raises(FingerprintMismatch, match="model"):
        run_batch([str(job_input)], str(out), spec_for(other), resume=True, guard=tiny_guard)
    done = run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), resume=True, guard=tiny_guard)
    assert done.chunks_skipped == 2 and done.chunks_run == 0 and done.lines == 40


def test_a_folder_with_the_users_files_is_left_alone(tiny_model_dir, tiny_guard, tmp_path) -> None:
    """A folder holding only *.tmp files counted as empty, and --resume adopted any folder without a manifest;
    the run then deleted every *.tmp file in it (the user's too)."""
    job_input = write_conversations(tmp_path / "in", n=8)
    for resume in (False, True):
        out = tmp_path / f"out-{resume}"
        out.mkdir()
        (out / "notes.tmp").write_text("mine")
        (out / "draft.tmp-backup").write_text("mine too")
        with pytest.raises(JobExists, match="empty folder"):
            run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), resume=resume, guard=tiny_guard)
        assert sorted(p.name for p in out.iterdir()) == ["draft.tmp-backup", "notes.tmp"]


def test_a_line_with_many_images_is_refused_before_any_is_read(tiny_model_dir, tiny_guard, tmp_path) -> None:
    """Each image part was read into memory before the one-image rule refused the line: 400 references to one
    15 MB file in a 15 KB line took 6.4 GB. Here the file is no image: read first, the error would say so."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(1 << 20))
    parts = [{"type": "image", "path": "big.bin"}] * 400 + [{"type": "text", "text": "hi"}]
    (folder / "in.jsonl").write_text(json.dumps({"id": 1, "messages": [{"role": "user", "content": parts}]}) + "\n")
    out = tmp_path / "out"
    done = run_batch([str(folder / "in.jsonl")], str(out), spec_for(tiny_model_dir), guard=tiny_guard)
    (row,) = read_rows(out)
    assert done.errors == 1 and "400 images given" in row["mmguard"]["error"], row


def test_paths_that_are_not_utf8_work(tiny_model_dir, tiny_guard, tmp_path) -> None:
    """An input, model or output path with a byte that is not UTF-8 ended the job with a traceback (the output's
    after every part was committed, and again on every resume)."""
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/in\xff"))
    job_input = write_conversations(folder, n=8)
    out = os.fsdecode(bytes(tmp_path) + b"/out\xff")
    done = run_batch([str(job_input)], out, spec_for(tiny_model_dir), guard=tiny_guard)
    assert done.lines == 8 and len(read_rows(Path(out))) == 8
    again = run_batch([str(job_input)], out, spec_for(tiny_model_dir), resume=True, guard=tiny_guard)
    assert again.chunks_run == 0 and again.lines == 8


@pytest.mark.parametrize("tamper", ["a part outside the folder", "a list", "an input out of range"])
def test_a_tampered_manifest_is_refused_never_followed(tiny_model_dir, tiny_guard, tmp_path, tamper: str) -> None:
    """A manifest's part named '../escaped-part.jsonl' was written outside the output folder on resume; a
    manifest holding [] or a chunk of an input it does not list ended the job with a traceback."""
    from mmguard.batch import StorageError

    job_input = write_conversations(tmp_path / "in", n=8)
    out = tmp_path / "out"
    run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), guard=tiny_guard)
    manifest = json.loads((out / "manifest.json").read_text())
    part = manifest["chunks"][0]["part"]
    (out / part).unlink()
    del manifest["done"][part]
    if tamper == "a part outside the folder":
        manifest["chunks"][0]["part"] = "../escaped-part.jsonl"
    elif tamper == "an input out of range":
        manifest["chunks"][0]["input"] = 5
    (out / "manifest.json").write_text(json.dumps([] if tamper == "a list" else manifest))
    with pytest.raises(StorageError, match="not a readable mmguard batch manifest"):
        run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), resume=True, guard=tiny_guard)
    assert not (tmp_path / "escaped-part.jsonl").exists()


def test_outputs_are_written_with_the_usual_file_mode(tiny_model_dir, tiny_guard, tmp_path) -> None:
    """mkstemp made every part and the manifest owner-only (0600), whatever the umask."""
    job_input = write_conversations(tmp_path / "in", n=8)
    old = os.umask(0o022)
    try:
        run_batch([str(job_input)], str(tmp_path / "out"), spec_for(tiny_model_dir), guard=tiny_guard)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {oct(0o644)}


def test_resume_refuses_an_input_edited_to_the_same_size(tiny_model_dir, tiny_guard, tmp_path) -> None:
    """The fingerprint held each input's size only: an input edited in place to the same size resumed with exit 0,
    its old and new rows mixed in the output."""
    job_input = write_conversations(tmp_path / "in", n=8)
    out = tmp_path / "out"
    run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), BatchOptions(chunk_size=1), guard=tiny_guard)
    (out / sorted(p.name for p in out.glob("part-*"))[-1]).unlink()
    text = job_input.read_text()
    edited = text.replace("cake", "cane", 1)
    assert edited != text and len(edited) == len(text)
    job_input.write_text(edited)
    with pytest.raises(FingerprintMismatch, match="inputs"):
        run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), BatchOptions(chunk_size=1), resume=True,
                  guard=tiny_guard)


@pytest.mark.parametrize("damage", ["torn", "short"])
def test_resume_runs_a_part_again_when_it_is_not_its_chunks_whole_output(tiny_model_dir, tiny_guard, tmp_path,
                                                                         damage: str) -> None:
    """A part the manifest had not recorded yet (the run was killed) was trusted as it stood: a torn one ended
    the resumed run with a traceback, a short one lost its chunk's other lines with exit 0."""
    job_input = write_conversations(tmp_path / "in", n=40)
    out = tmp_path / "out"
    run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), BatchOptions(chunk_size=10), guard=tiny_guard)
    whole = read_rows(out)
    manifest = json.loads((out / "manifest.json").read_text())
    part = sorted(manifest["done"])[1]
    del manifest["done"][part]  # as if killed after the part's commit, before the manifest's
    (out / "manifest.json").write_text(json.dumps(manifest))
    lines = (out / part).read_bytes().splitlines(keepends=True)
    (out / part).write_bytes(lines[0][:20] if damage == "torn" else lines[0])
    done = run_batch([str(job_input)], str(out), spec_for(tiny_model_dir), BatchOptions(chunk_size=10), resume=True,
                     guard=tiny_guard)
    assert done.chunks_run == 1 and done.lines == 40
    assert comparable(read_rows(out)) == comparable(whole)


def test_kill_9_then_resume_gives_every_line_once(tiny_model_dir, job_input, reference, tmp_path) -> None:
    """A real ``mmguard batch`` process killed with SIGKILL after some chunks, then ``--resume``."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmguard.cli", "batch", str(job_input), "-o", str(out), "-m", str(tiny_model_dir),
           "--device", "cpu", "--dtype", "float32", "--chunk-size", "8"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.jsonl"))) < 5:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no chunk committed in 120 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    committed = len(list(out.glob("part-*.jsonl")))
    assert proc.returncode == -signal.SIGKILL and committed < 30, "the job finished before it was killed"
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 2, resumed.stderr  # 2: the bad lines hold error rows
    assert f"{committed} already done" in resumed.stderr or f"{30 - committed} chunks judged" in resumed.stderr
    rows = comparable(read_rows(out))
    # chunks of 8 lines are other model calls than classify's 32: labels agree, probabilities up to rounding
    assert [r.get("id") for r in rows] == [r.get("id") for r in reference]
    for a, b in zip(rows, reference, strict=True):
        if "unsafe_probability" in b["mmguard"]:
            assert a["mmguard"]["unsafe_probability"] == pytest.approx(b["mmguard"]["unsafe_probability"], abs=1e-5)
    assert [r["mmguard"]["line"] for r in rows] == [r["mmguard"]["line"] for r in reference]
    assert [r["mmguard"].get("label") for r in rows] == [r["mmguard"].get("label") for r in reference]
    assert [r["mmguard"].get("error") for r in rows] == [r["mmguard"].get("error") for r in reference]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_ctrl_c_says_how_to_finish_the_job(tiny_model_dir, job_input, tmp_path) -> None:
    """SIGINT ended the job with exit 130 and not a word (a traceback at worst)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmguard.cli", "batch", str(job_input), "-o", str(out), "-m", str(tiny_model_dir),
           "--device", "cpu", "--dtype", "float32", "--chunk-size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ)
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, "no chunk committed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err.decode() and "Traceback" not in err.decode(), err


def test_cli_summary_exit_codes_and_no_bar_off_a_terminal(tiny_model_dir, tmp_path) -> None:
    src = write_conversations(tmp_path / "in", n=12, bad=False)
    _register_tools(["batch"])
    runner = CliRunner()
    res = runner.invoke(app, ["batch", str(src), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir),
                              "--device", "cpu", "--dtype", "float32", "--chunk-size", "5"])
    assert res.exit_code == 0, res.output
    assert "batch (local): 12 lines in 3 chunks -> 12 verdicts" in res.output
    assert "\x1b[" not in res.output and "━" not in res.output  # no progress bar off a terminal
    res = runner.invoke(app, ["batch", str(src), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir)])
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(app, ["batch", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "input not found" in res.output
    res = runner.invoke(app, ["batch", str(src), "-o", str(tmp_path / "o3"), "--engine", "spark"])
    assert res.exit_code == 2 and "unknown --engine" in res.output


def test_cli_default_threshold_is_the_models_own_as_in_classify(tiny_model_dir, job_input, reference,
                                                                   tmp_path) -> None:
    """A model with validated thresholds in its mmguard.json (mmguard-mini v2 ships them): batch rows equal
    classify --jsonl's, which decides at those thresholds (batch used a blanket 0.5 before)."""
    import shutil

    probs = sorted(r["mmguard"]["unsafe_probability"] for r in reference if "unsafe_probability" in r["mmguard"])
    cut = probs[len(probs) // 2]  # flags about half, where 0.5 flags all or none of the tiny model's items
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "mmguard.json").write_text(json.dumps({"thresholds": {"prompt": cut, "response": cut}}))
    expected = comparable(classify_jsonl_rows(model, job_input, tmp_path))
    labels = [r["mmguard"].get("label") for r in expected]
    assert 0 < labels.count("unsafe") < labels.count("safe") + labels.count("unsafe")  # the cut splits them
    _register_tools(["batch"])
    res = CliRunner().invoke(app, ["batch", str(job_input), "-o", str(tmp_path / "out"), "-m", str(model),
                                   "--device", "cpu", "--dtype", "float32"])
    assert res.exit_code in (0, 2), res.output
    assert comparable(read_rows(tmp_path / "out")) == expected


def test_images_stay_inside_the_input_folder_and_follow_the_server_limits(tiny_model_dir, tiny_guard,
                                                                          tmp_path) -> None:
    folder = tmp_path / "in"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "ok.png").write_bytes(_png(1))
    (tmp_path / "secret.png").write_bytes(_png(2))
    (folder / "images" / "big.png").write_bytes(_png(3) + b"\0" * 3000)

    def line(i: int, part: dict[str, Any]) -> str:
        return json.dumps({"id": i, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]})

    parts = [
        {"type": "image", "path": "images/ok.png"},
        {"type": "image", "path": "../secret.png"},
        {"type": "image", "path": str(tmp_path / "secret.png")},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}},
        {"type": "image", "path": "images/big.png"},
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}},
    ]
    src = folder / "convs.jsonl"
    src.write_text("\n".join(line(i, p) for i, p in enumerate(parts)) + "\n")
    out = tmp_path / "out"
    run_batch([str(src)], str(out), spec_for(tiny_model_dir), BatchOptions(max_image_bytes=2000), guard=tiny_guard)
    rows = {r["id"]: r["mmguard"] for r in read_rows(out)}
    assert "error" not in rows[0] and rows[0]["has_image"] is True
    assert "must be relative to the input file's folder" in rows[1]["error"]
    assert "must be relative to the input file's folder" in rows[2]["error"]
    assert "remote image URLs are disabled" in rows[3]["error"]  # the server's rule: no allow-listed host
    assert "over the limit of 2000" in rows[4]["error"]
    assert "expected image/*" in rows[5]["error"]


def test_object_store_uris_through_fsspec(tiny_model_dir, tiny_guard, tmp_path) -> None:
    """Inputs, their images and the output on an fsspec filesystem (memory://, as s3:// or gs:// would be)."""
    fsspec = pytest.importorskip("fsspec")
    src = write_conversations(tmp_path / "in", n=20, bad=False)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bucket/jobs/convs.jsonl", src.read_bytes())
    for img in (tmp_path / "in" / "images").iterdir():
        fs.pipe_file(f"/bucket/jobs/images/{img.name}", img.read_bytes())
    local = tmp_path / "local-out"
    run_batch([str(src)], str(local), spec_for(tiny_model_dir), guard=tiny_guard)
    summary = run_batch(["memory://bucket/jobs/convs.jsonl"], "memory://bucket/out", spec_for(tiny_model_dir),
                        guard=tiny_guard)
    assert summary.lines == 20 and summary.errors == 0
    remote = [json.loads(x) for p in sorted(fs.ls("/bucket/out", detail=False)) if "part-" in p
              for x in fs.cat_file(p).decode().splitlines()]
    assert comparable(remote) == comparable(read_rows(local))
    assert fs.exists("/bucket/out/manifest.json")
    again = run_batch(["memory://bucket/jobs/convs.jsonl"], "memory://bucket/out", spec_for(tiny_model_dir),
                      resume=True, guard=tiny_guard)
    assert again.chunks_run == 0 and again.lines == 20
