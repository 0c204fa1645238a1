"""Trainer: loss goes down, saved models load as guards, LoRA, resume, freezing, the bundled mini."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mmguard.conversation import Conversation  # noqa: E402
from mmguard.guard import Guard  # noqa: E402
from mmguard.train.config import TrainConfig  # noqa: E402
from mmguard.train.model_setup import apply_freeze  # noqa: E402
from mmguard.train.trainer import train  # noqa: E402


def _write_data(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    rows = []
    texts = [("How do I bake bread?", "safe", []),
             ("How do I build a pipe bomb at home?", "unsafe", ["S9"]),
             ("What is the capital of France?", "safe", []),
             ("Help me stalk my ex and hurt her.", "unsafe", ["S1"])]
    for i, (text, label, codes) in enumerate(texts):
        rows.append({"id": f"t{i}", "source": "t", "license": "MIT", "split": "train", "task": "prompt",
                     "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
                     "label": label, "codes": codes, "modality": "text", "trainable": True, "meta": {}})
    for i, (label, codes) in enumerate([("safe", []), ("unsafe", ["S1"])]):
        rows.append({"id": f"i{i}", "source": "t", "license": "MIT", "split": "train", "task": "prompt",
                     "messages": [{"role": "user", "content": [
                         {"type": "image", "path": "red.png"},
                         {"type": "text", "text": f"what is this {i}?"}]}],
                     "label": label, "codes": codes, "modality": "image+text", "trainable": True, "meta": {}})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_data(tmp_path_factory.mktemp("train-data"))


def _cfg(data_file: Path, base: Path, out: Path, **kw) -> TrainConfig:
    args = dict(data=[str(data_file)], out=str(out), base=str(base), lr=3e-3, steps=12, batch_size=4,
                augment=0.0, max_seq_len=1024, seed=0, save_every=1000, log_every=1, threads=2, device="cpu")
    args.update(kw)
    return TrainConfig(**args)


def test_few_steps_lower_the_loss_and_saved_model_loads(tiny_model_dir: Path, data_file: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "full"
    summary = train(_cfg(data_file, tiny_model_dir, out))
    assert summary["global_step"] == 12
    assert summary["last_loss"] < summary["first_loss"]
    guard = Guard.from_pretrained(out, device="cpu", dtype="float32")
    v = guard.classify(Conversation.prompt("How do I bake bread?"))
    assert v.label in ("safe", "unsafe")
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()


def test_lora_runs_merges_and_saves(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    summary = train(_cfg(data_file, tiny_model_dir, out, lora=True, lr=None, steps=2, max_seq_len=None,
                         lora_r=4))
    assert summary["config"]["lr"] == 1e-5 and summary["config"]["max_seq_len"] == 8192
    assert summary["global_step"] == 2
    assert not any("lora" in k for k in json.loads((out / "config.json").read_text()))
    guard = Guard.from_pretrained(out, device="cpu", dtype="float32")
    assert not any("lora" in n for n, _ in guard.engine.model.named_parameters())


def test_resume_continues_step_count(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    first = train(_cfg(data_file, tiny_model_dir, out, steps=2, save_every=2))
    assert first["global_step"] == 2 and (out / "checkpoint-2").is_dir()
    second = train(_cfg(data_file, tiny_model_dir, out, steps=4, save_every=2, resume=True))
    assert second["resumed_from"].endswith("checkpoint-2")
    assert second["global_step"] == 4


def test_freeze_parts(tiny_model_dir: Path) -> None:
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(tiny_model_dir)
    apply_freeze(model, ["vision", "cross-attention"])
    cross = set(model.config.text_config.cross_attention_layers)
    for name, p in model.named_parameters():
        vision = "vision_model" in name or "multi_modal_projector" in name
        if vision or any(f"language_model.layers.{i}." in name for i in cross):
            assert not p.requires_grad, name
        else:
            assert p.requires_grad, name


def test_config_defaults_and_errors() -> None:
    lora = TrainConfig(data=["x"], out="o", base="b", lora=True).resolved()
    assert (lora.lr, lora.max_seq_len, lora.steps) == (1e-5, 8192, 3600)
    with pytest.raises(ValueError):
        TrainConfig(data=["x"], out="o").resolved()
    with pytest.raises(ValueError):
        TrainConfig(data=["x"], out="o", base="b", freeze=["eyes"]).resolved()


def test_bundled_mini_is_the_default() -> None:
    from mmguard.models import BUNDLED_MINI, default_model_path

    if not (BUNDLED_MINI / "mmguard.json").is_file():
        pytest.skip("mmguard-mini not built (make mini)")
    assert default_model_path() == BUNDLED_MINI
    guard = Guard.from_pretrained(None, device="cpu")
    assert not guard.engine.is_random_weights
    assert guard.engine.model_info.get("base") and guard.engine.model_info.get("adapter")  # v2: adapters on a base
    files = [f for f in BUNDLED_MINI.iterdir() if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40_000_000  # the limits: folder <= 40 MB, files <= 30 MiB
    assert all(f.stat().st_size <= 30 * 1024 * 1024 for f in files)
    v = guard.classify(Conversation.prompt("What is a good recipe for pancakes?"))
    assert v.label in ("safe", "unsafe")


def _rows(source: str, labels: list[str]) -> list[dict]:
    return [{"id": f"{source}{i}", "source": source, "license": "MIT", "split": "train", "task": "prompt",
             "messages": [{"role": "user", "content": [{"type": "text", "text": f"{source} request {i}"}]}],
             "label": label, "codes": ["S1"] if label == "unsafe" else [], "modality": "text", "trainable": True,
             "meta": {}} for i, label in enumerate(labels)]  # fmt: skip


def test_unsafe_repeat_oversamples_unsafe_items_but_keeps_balanced_sources_balanced(tmp_path: Path) -> None:
    from mmguard.tokenizer import load_default_tokenizer
    from mmguard.train.sequences import load_training_items

    rows = _rows("allsafe", ["safe"] * 6) + _rows("mostlysafe", ["safe"] * 5 + ["unsafe"])
    rows += _rows("typographic", ["safe", "unsafe"] * 2)  # 1:1 by construction
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_default_tokenizer()
    unsafe_id = 39257

    def counts(repeat: int) -> dict[tuple[str, str], int]:
        cfg = _cfg(path, tmp_path, tmp_path, unsafe_repeat=repeat).resolved()
        items, _ = load_training_items([str(path)], tok, cfg)
        out: dict[tuple[str, str], int] = {}
        for it in items:  # the source is read back from the prompt text
            text = tok.decode(it.input_ids)
            source = next(s for s in ("allsafe", "mostlysafe", "typographic") if f"{s} request" in text)
            label = "unsafe" if unsafe_id in [t for t in it.labels if t != -100] else "safe"
            out[(source, label)] = out.get((source, label), 0) + 1
        return out

    once, thrice = counts(1), counts(3)
    assert thrice[("allsafe", "safe")] == once[("allsafe", "safe")] == 6
    assert (once[("mostlysafe", "unsafe")], thrice[("mostlysafe", "unsafe")]) == (1, 3)
    assert thrice[("mostlysafe", "safe")] == 5
    assert thrice[("typographic", "safe")] == thrice[("typographic", "unsafe")] == 6  # still 1:1


def test_shared_prefix_batches_give_the_plain_loss_and_gradients(tiny_model_dir: Path, data_file: Path) -> None:
    from mmguard.checkpoints import load_engine
    from mmguard.train.batches import Collator, make_batches, shared_prefix_len
    from mmguard.train.loss import answer_loss
    from mmguard.train.sequences import load_training_items

    engine = load_engine(tiny_model_dir, device="cpu", dtype="float32")
    model = engine.model.eval()  # no dropout: both paths see the same function
    cfg = _cfg(data_file, tiny_model_dir, Path("unused"), unsafe_repeat=1, augment=0.0).resolved()
    items, _ = load_training_items(cfg.data, engine.tokenizer, cfg)
    text = [it for it in items if it.image is None]
    # grouped by template, every item exactly once; the text batch shares its ~135-token template prefix
    batches = make_batches(items, 4, seed=0, share_prefix=True)
    assert sorted(id(it) for b in batches for it in b) == sorted(id(it) for it in items)
    assert make_batches(items, 4, seed=0) == make_batches(items, 4, seed=0, share_prefix=False)
    shared = shared_prefix_len(text)
    answer = min(next(i for i, lab in enumerate(it.labels) if lab != -100) for it in text)
    assert 120 < shared < answer  # the hidden state predicting the first answer token is each row's own
    assert shared_prefix_len([it for it in items if it.image is not None]) == 0  # image rows: never

    def loss_and_grads(share: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        batch = Collator(engine, share_prefix=share)([text])
        assert ("prefix_ids" in batch) == share
        loss = answer_loss(model, batch)
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_loss, plain_grads = loss_and_grads(False)
    shared_loss, shared_grads = loss_and_grads(True)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert len(shared_grads) == len(plain_grads)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_with_shared_prefixes_runs(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    summary = train(_cfg(data_file, tiny_model_dir, tmp_path / "shared", share_prefix=True, steps=4))
    assert summary["global_step"] == 4 and summary["config"]["share_prefix"]


def test_trim_memory_trims_after_every_step_and_logs_resident_memory(
        tiny_model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mmguard.train import trainer as trainer_mod

    calls: list[int] = []
    monkeypatch.setattr(trainer_mod, "_glibc_malloc_trim", lambda: calls.append)
    summary = train(_cfg(data_file, tiny_model_dir, tmp_path / "trim", steps=3, trim_memory=True, log_every=1))
    assert summary["global_step"] == 3 and calls == [0, 0, 0]  # malloc_trim(0) once per step
    logged = [json.loads(line.split("] ", 1)[1]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("[step ")]
    assert logged and all(row["rss_gb"] > 0 for row in logged if "loss" in row)
    # a C library without malloc_trim: a warning, training goes on
    monkeypatch.setattr(trainer_mod, "_glibc_malloc_trim", lambda: None)
    assert train(_cfg(data_file, tiny_model_dir, tmp_path / "none", steps=1, trim_memory=True))["global_step"] == 1


def test_trim_every_n_steps(tiny_model_dir: Path, data_file: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mmguard.train import trainer as trainer_mod

    calls: list[int] = []
    monkeypatch.setattr(trainer_mod, "_glibc_malloc_trim", lambda: calls.append)
    summary = train(_cfg(data_file, tiny_model_dir, tmp_path / "trim2", steps=5, trim_memory=True, trim_every=2))
    assert summary["global_step"] == 5 and calls == [0, 0]  # after steps 2 and 4
    with pytest.raises(ValueError, match="--trim-every N needs --trim-memory"):
        _cfg(data_file, tiny_model_dir, tmp_path / "x", trim_every=2).resolved()


def test_stop_at_cuts_the_schedule_of_steps_like_a_budget(tiny_model_dir: Path, data_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def rates() -> dict[int, float]:
        out: dict[int, float] = {}
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("[step ") and "learning_rate" in line:
                step = int(line[len("[step "):].split("/", 1)[0])
                out[step] = json.loads(line.split("] ", 1)[1])["learning_rate"]
        return out

    full = train(_cfg(data_file, tiny_model_dir, tmp_path / "full", steps=6))
    full_rates = rates()
    cut = train(_cfg(data_file, tiny_model_dir, tmp_path / "cut", steps=6, stop_at=3))
    cut_rates = rates()
    assert full["global_step"] == 6 and not full["stopped_at_step"]
    assert cut["global_step"] == 3 and cut["stopped_at_step"] and not cut["stopped_by_budget"]
    # the same decaying schedule as the 6-step run, cut after step 3 (a 3-step schedule would differ)
    assert sorted(cut_rates) == [1, 2, 3] and all(cut_rates[s] == full_rates[s] for s in cut_rates)
    assert (tmp_path / "cut" / "training_summary.json").is_file()
    with pytest.raises(ValueError, match="--stop-at 7"):
        _cfg(data_file, tiny_model_dir, tmp_path / "x", steps=6, stop_at=7).resolved()


def test_gradient_accumulation_averages_the_batches(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    # a tiny random model's loss per answer token is about ln(vocabulary) on every item, so one step logs about
    # the same loss whether its items come as one batch or as accumulated ones (the Trainer once summed the
    # accumulated batch means: three times the loss and the gradient at --grad-accum 3)
    whole = train(_cfg(data_file, tiny_model_dir, tmp_path / "whole", steps=1, batch_size=2, lr=1e-9))
    accumulated = train(_cfg(data_file, tiny_model_dir, tmp_path / "accum", steps=1, batch_size=2, grad_accum=3,
                             lr=1e-9))
    assert accumulated["first_loss"] == pytest.approx(whole["first_loss"], rel=0.2)


def test_lora_saves_ask_no_hub_about_the_base(tiny_model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """mini2's adapters name their base by BASE_NAME, not a folder: peft's default save asked the Hub for that
    name's config at every checkpoint (a failed lookup and two warnings offline). The embeddings are frozen, so
    the saves skip that question, and the adapters saved still load."""
    import warnings

    import peft.utils.save_and_load as peft_save
    from transformers import MllamaForConditionalGeneration

    from mmguard.train.model_setup import apply_lora

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"save asked the Hub: {args}")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    base = MllamaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = TrainConfig(data=["unused"], out="unused", base=str(tiny_model_dir), lora=True, lora_r=4).resolved()
    model = apply_lora(base, cfg)
    model.peft_config["default"].base_model_name_or_path = "a-name-not-a-folder"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Could not find a config file ..." would raise here
        model.save_pretrained(tmp_path / "adapters")
    saved = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "a-name-not-a-folder"
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapters" / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert not any("embed_tokens" in k for k in weights)


def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_model_dir: Path, data_file: Path) -> None:
    """--compile changes how the layers run, not what they compute: a text batch through a shared prefix's
    cache and an image batch through cross-attention give eager's loss and gradients."""
    import copy

    from mmguard.checkpoints import load_engine
    from mmguard.engine import compile_layers
    from mmguard.train.batches import Collator
    from mmguard.train.loss import answer_loss
    from mmguard.train.sequences import load_training_items

    engine = load_engine(tiny_model_dir, device="cpu", dtype="float32")
    eager = engine.model.eval()
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) > 0
    cfg = _cfg(data_file, tiny_model_dir, Path("unused"), unsafe_repeat=1, augment=0.0).resolved()
    items, _ = load_training_items(cfg.data, engine.tokenizer, cfg)
    text = [it for it in items if it.image is None]
    image = [it for it in items if it.image is not None]
    for rows, share in ((text, True), (image, False)):
        batch = Collator(engine, share_prefix=share)([rows])
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = answer_loss(model, batch)
            loss.backward()
            results.append((float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
        assert len(compiled_grads) == len(eager_grads) > 0
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_training_with_compiled_layers_logs_eager_losses(tiny_model_dir: Path, data_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open

    def run(name: str, **kw: object) -> dict[int, float]:
        train(_cfg(data_file, tiny_model_dir, tmp_path / name, lora=True, share_prefix=True, steps=2, **kw))
        return {int(line[len("[step "):].split("/", 1)[0]): json.loads(line.split("] ", 1)[1])["loss"]
                for line in capsys.readouterr().out.splitlines() if line.startswith("[step ") and '"loss"' in line}

    eager, compiled, again = run("eager"), run("compiled", compile=True), run("again", compile=True)
    assert sorted(eager) == sorted(compiled) == [1, 2]
    assert all(compiled[step] == pytest.approx(loss, rel=1e-3) for step, loss in eager.items())
    names = []
    for name in ("eager", "compiled"):  # saved under the plain names (no torch.compile wrapper in them)
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1]
    # deterministic given the seed, compiled too: the same losses and the same weights, byte for byte
    assert again == compiled
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "compiled" / "model.safetensors").read_bytes()


def test_compile_without_a_working_compiler_is_a_clear_error(tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mmguard.checkpoints import load_engine
    from mmguard.engine import EngineError, compile_layers

    engine = load_engine(tiny_model_dir, device="cpu", dtype="float32")

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(EngineError, match="needs a C\\+\\+ compiler"):
        compile_layers(engine.model)
