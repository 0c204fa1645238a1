"""``mmguard train --init mini2``: LoRA on the SmolLM2 base; what it saves loads and classifies, and
training can start again from it (plumbing: two steps prove nothing about quality)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmguard.conversation import Conversation
from mmguard.guard import Guard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_available() -> None:
    from mmguard.base_models import BaseModelError, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except BaseModelError as err:
        pytest.skip(str(err))


def _data(tmp: Path) -> Path:
    rows = []
    for i in range(12):
        unsafe = i % 3 == 0
        text = "How do I build a pipe bomb?" if unsafe else f"Suggest a name for my cat number {i}."
        rows.append({"id": f"t:{i}", "source": "toy", "license": "MIT", "split": "train", "task": "prompt",
                     "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
                     "label": "unsafe" if unsafe else "safe", "codes": ["S9"] if unsafe else [],
                     "modality": "text", "trainable": True, "meta": {}})
    path = tmp / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mini2_trains_ships_adapters_and_loads(base_available: None, tmp_path: Path) -> None:
    from mmguard.train.config import TrainConfig
    from mmguard.train.trainer import train

    data = _data(tmp_path)
    out = tmp_path / "run"
    summary = train(TrainConfig(data=[str(data)], out=str(out), init="mini2", lora=True, steps=2, batch_size=4,
                                lr=1e-4, max_seq_len=640, seed=0, threads=2, save_every=100, augment=0.0,
                                autocast="bf16", save_dtype="bfloat16"))
    assert summary["global_step"] == 2
    info = json.loads((out / "mmguard.json").read_text())
    assert info["adapter"] and not info["reads_text_in_images"]
    assert not (out / "model.safetensors").exists()  # only the adapters and the new layers
    assert (out / "adapter_model.safetensors").stat().st_size < 30 * 1024 * 1024

    guard = Guard.from_pretrained(out, device="cpu", read_text="off")
    assert guard.engine.model_info["base"] == info["base"]
    v = guard.classify(Conversation.prompt("How do I build a pipe bomb?"), threshold=0.0)
    assert 0.0 <= v.unsafe_probability <= 1.0 and v.codes

    # a second stage starts from the saved adapters and new layers (--warm-start): at a vanishing learning
    # rate it saves the same guard again, adapters only (a fresh LoRA would start from the bare base)
    stage2 = tmp_path / "stage2"
    train(TrainConfig(data=[str(data)], out=str(stage2), init="mini2", lora=True, warm_start=str(out), steps=1,
                      batch_size=4, lr=1e-12, max_seq_len=640, seed=1, threads=2, save_every=100, augment=0.0,
                      save_dtype="bfloat16"))
    assert not (stage2 / "model.safetensors").exists()
    p2 = Guard.from_pretrained(stage2, device="cpu", read_text="off").classify(
        Conversation.prompt("How do I build a pipe bomb?"), threshold=0.0).unsafe_probability
    assert p2 == pytest.approx(v.unsafe_probability, abs=1e-3)
    with pytest.raises(ValueError, match="warm-start"):
        TrainConfig(data=[str(data)], out=str(stage2), base=str(out), lora=True, warm_start=str(out)).resolved()
    # a warm start keeps its adapters' shape: --lora-r 8 and --lora-from-layer 20 were ignored without a word
    from mmguard.engine import EngineError

    for option, message in (({"lora_r": 8}, "r 16.*--lora-r asks for 8"),
                            ({"lora_from_layer": 20}, "target_modules.*--lora-from-layer")):
        with pytest.raises(EngineError, match=message):
            train(TrainConfig(data=[str(data)], out=str(tmp_path / "odd"), init="mini2", lora=True,
                              warm_start=str(out), steps=1, batch_size=4, seed=1, threads=2, **option))

    # and training can start from the saved guard (its adapters are merged on load)
    again = train(TrainConfig(data=[str(data)], out=str(tmp_path / "again"), base=str(out), lora=True, steps=1,
                              batch_size=4, lr=1e-4, max_seq_len=640, seed=0, threads=2, save_every=100,
                              augment=0.0))
    assert again["global_step"] == 1
    assert Guard.from_pretrained(tmp_path / "again", device="cpu").classify(Conversation.prompt("hi")).label


def test_lora_from_layer_puts_adapters_on_the_upper_layers_only(base_available: None) -> None:
    import torch
    from transformers import MllamaForConditionalGeneration

    from mmguard.base_models import smollm2_mllama_base
    from mmguard.train.config import TrainConfig
    from mmguard.train.model_setup import apply_lora

    base = MllamaForConditionalGeneration.from_pretrained(smollm2_mllama_base(), dtype=torch.float32)
    cross = set(base.config.text_config.cross_attention_layers)
    cfg = TrainConfig(data=["unused"], out="unused", init="mini2", lora=True, lora_from_layer=10).resolved()
    model = apply_lora(base, cfg)
    with_adapters = {int(n.split("language_model.layers.")[1].split(".")[0])
                     for n, _ in model.named_parameters() if "lora_A" in n}
    expected = {i for i in range(10, base.config.text_config.num_hidden_layers) if i not in cross}
    assert with_adapters == expected
    # the new layers still train whole, wherever they sit (cross-attention below layer 10 included)
    assert any(f"layers.{min(cross)}." in n and "cross_attn" in n
               for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="lora-from-layer"):
        TrainConfig(data=["unused"], out="unused", base="x", lora=True, lora_from_layer=4).resolved()
