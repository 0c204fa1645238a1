"""Tiny random-weight Mllama checkpoints with the real Llama 3.2 Vision tokenizer.

They have the exact architecture family of Llama Guard 3 Vision (``MllamaForConditionalGeneration``,
gated cross-attention layers, tiled vision encoder) at toy sizes, and are written with
``save_pretrained`` so that every test loads them through the real ``from_pretrained`` path.
Their verdicts are meaningless: they prove plumbing, never quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["GATE_PARAMS", "TINY_MARKER", "imprint_format", "make_tiny_checkpoint", "noise_image", "random_mllama",
           "small_mllama_config", "tiny_config"]

TINY_MARKER = "mmguard_random_weights"


# tanh-gated parameters of Mllama (cross-attention and tile embeddings); the library initialises them to 0
GATE_PARAMS = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")


def small_mllama_config(*, text: dict[str, Any], vision: dict[str, Any]) -> Any:
    """An Mllama config with Llama 3.2 Vision's vocabulary, special ids and tiling, at the given sizes.

    ``text`` and ``vision`` hold only what differs between small models (sizes, layers, tile size)."""
    from transformers import MllamaConfig

    vision_cfg = {"patch_size": 14, "max_num_tiles": 4, "norm_eps": 1e-5, "num_global_layers": 2,
                  "attention_heads": 4, "intermediate_layers_indices": [1, 3], **vision}
    vision_cfg.setdefault("vision_output_dim",
                          vision_cfg["hidden_size"] * (len(vision_cfg["intermediate_layers_indices"]) + 1))
    text_cfg = {
        "vocab_size": 128256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
        "tie_word_embeddings": False,
        **text,
    }
    cfg = MllamaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=128256)
    cfg.pad_token_id = 128004
    return cfg


def tiny_config(*, image_size: int = 56, hidden_size: int = 64, text_layers: int = 4) -> Any:
    return small_mllama_config(
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "image_size": image_size},
        text={
            "hidden_size": hidden_size,
            "num_hidden_layers": text_layers,
            "cross_attention_layers": [1, 3] if text_layers >= 4 else [text_layers - 1],
            "intermediate_size": hidden_size * 2,
            "max_position_embeddings": 4096,
        },
    )


def random_mllama(cfg: Any, *, seed: int, gate_init: float) -> Any:
    """A freshly initialised ``MllamaForConditionalGeneration`` (deterministic given ``seed``) with its
    tanh gates set to ``gate_init``."""
    import torch
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(GATE_PARAMS):
                p.fill_(gate_init)
    return model


def make_tiny_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    image_size: int = 56,
    hidden_size: int = 64,
    text_layers: int = 4,
    gate_init: float = 0.5,
    tokenizer: Any = None,
) -> Path:
    """Write a random-weight Mllama checkpoint (model, tokenizer, image processor) to ``directory``.

    ``gate_init`` opens the tanh-gated cross-attention and tile-embedding gates (the library initialises
    them to 0, which would make the image invisible to the text and hide image bugs in tests).
    ``tokenizer`` (default: Llama 3.2 Vision's) may be any guard tokenizer, e.g. mini v2's SmolLM2 one
    (:func:`mmguard.base_models.guard_tokenizer`); the vocabulary and special ids follow it.
    """
    from .checkpoints import make_image_processor
    from .model_format import TokenFormat
    from .tokenizer import load_default_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(image_size=image_size, hidden_size=hidden_size, text_layers=text_layers)
    if tokenizer is None:
        tokenizer = load_default_tokenizer()
    else:
        fmt = TokenFormat(tokenizer)
        cfg.text_config.vocab_size = len(tokenizer)
        cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = fmt.bos_id, fmt.eot_id
        cfg.text_config.pad_token_id = cfg.pad_token_id = fmt.pad_id
        cfg.image_token_index = fmt.image_id
    model = random_mllama(cfg, seed=seed, gate_init=gate_init)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    make_image_processor(image_size).save_pretrained(directory)
    (directory / f"{TINY_MARKER}.json").write_text(
        json.dumps({"warning": "random weights: verdicts are meaningless", "seed": seed}, indent=2)
    )
    return directory


# Words that make a synthetic request unsafe, and the code each maps to (for format imprinting only).
_TRIGGERS = {"knife": "S1", "steal": "S2", "bomb": "S9", "hate": "S10", "poison": "S11"}
_FILLER = ["please", "tell", "me", "about", "the", "weather", "a", "recipe", "for", "cake", "how", "do", "I",
           "fix", "my", "bike", "write", "poem", "cat", "garden", "today", "music", "history", "of", "Rome"]


def synthetic_conversation(rng: Any, with_image: bool | None = None) -> tuple[Any, list[str]]:
    """A random toy conversation and its toy violated codes.

    Toy rule (chosen so a 2-layer model learns it in seconds, not because it means anything): a
    conversation with an image is unsafe, with codes given by trigger words (S1 if none); a text-only
    conversation is safe.
    """
    from PIL import Image

    from .conversation import Conversation

    words = [rng.choice(_FILLER) for _ in range(rng.randint(3, 10))]
    trigger_codes: list[str] = []
    if rng.random() < 0.5:
        for trig in rng.sample(sorted(_TRIGGERS), rng.choice([1, 1, 2])):
            words.insert(rng.randint(0, len(words)), trig)
            trigger_codes.append(_TRIGGERS[trig])
    text = " ".join(words)
    image = None
    if with_image if with_image is not None else rng.random() < 0.5:
        size = (rng.randint(20, 120), rng.randint(20, 120))
        image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    if rng.random() < 0.3:
        conv = Conversation.response(" ".join(rng.choice(_FILLER) for _ in range(5)), text, image)
    else:
        conv = Conversation.prompt(text, image)
    if image is None:
        return conv, []
    order = {f"S{i}": i for i in range(1, 14)}
    return conv, sorted(set(trigger_codes or ["S1"]), key=order.__getitem__)


def imprint_format(directory: str | Path, *, steps: int = 120, seed: int = 0, lr: float = 3e-3) -> Path:
    """Briefly train a tiny checkpoint so it writes the Llama Guard answer format
    (``\\n\\nsafe<|eot_id|>`` / ``\\n\\nunsafe\\nS1,S9<|eot_id|>``) on toy trigger-word data.

    This gives tests a model whose greedy output is parseable, so one-pass scoring can be checked
    against ``generate()``. It is still a toy: its verdicts say nothing about real safety.
    """
    import random

    import torch

    from .checkpoints import load_engine
    from .prompt import build_prompt

    engine = load_engine(directory, device="cpu", dtype="float32")
    model = engine.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(steps):
        items, answers = [], []
        with_image = rng.random() < 0.5
        for _ in range(8):
            conv, codes = synthetic_conversation(rng, with_image)
            items.append(engine.encode(build_prompt(conv), conv.image))
            target = "unsafe\n" + ",".join(codes) if codes else "safe"
            answers.append(engine.format.answer_ids("", target))
        batch = engine.collate(items, extra=answers)
        width = batch["input_ids"].shape[1]
        hidden = model.model(**batch, use_cache=False).last_hidden_state
        rows, cols, targets = [], [], []
        for r, ans in enumerate(answers):
            # the prompt's last position predicts "\n\n", the decision position predicts ans[0], and so on
            start = width - len(ans) - 2
            for k, tok in enumerate([*engine.decision_prefix_ids("\n\n"), *ans]):
                rows.append(r)
                cols.append(start + k)
                targets.append(tok)
        logits = model.lm_head(hidden[rows, cols])
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(directory)
    (Path(directory) / f"{TINY_MARKER}.json").write_text(
        json.dumps({"warning": "toy weights trained on trigger words: verdicts are meaningless",
                    "seed": seed, "imprint_steps": steps, "final_loss": float(loss.detach())}, indent=2)
    )
    return Path(directory)


def noise_image(width: int, height: int, seed: int = 0) -> Any:
    """A uniform-noise RGB image, deterministic given ``seed`` (test input with no content)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
