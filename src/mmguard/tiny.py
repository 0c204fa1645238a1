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

__all__ = ["TINY_MARKER", "make_tiny_checkpoint", "tiny_config"]

TINY_MARKER = "mmguard_random_weights"


def tiny_config(*, image_size: int = 56, hidden_size: int = 64, text_layers: int = 4, seed: int = 0) -> Any:
    from transformers import MllamaConfig

    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_global_layers": 2,
        "attention_heads": 4,
        "image_size": image_size,
        "patch_size": 14,
        "max_num_tiles": 4,
        "intermediate_layers_indices": [1, 3],
        "vision_output_dim": 32 * 3,
        "norm_eps": 1e-5,
    }
    text = {
        "vocab_size": 128256,
        "hidden_size": hidden_size,
        "num_hidden_layers": text_layers,
        "cross_attention_layers": [1, 3] if text_layers >= 4 else [text_layers - 1],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": hidden_size * 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 4096,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
        "tie_word_embeddings": False,
    }
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=128256)
    cfg.pad_token_id = 128004
    return cfg


def make_tiny_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    image_size: int = 56,
    hidden_size: int = 64,
    text_layers: int = 4,
    gate_init: float = 0.5,
) -> Path:
    """Write a random-weight Mllama checkpoint (model, tokenizer, image processor) to ``directory``.

    ``gate_init`` opens the tanh-gated cross-attention and tile-embedding gates (the library initialises
    them to 0, which would make the image invisible to the text and hide image bugs in tests).
    """
    import torch
    from transformers import MllamaForConditionalGeneration

    from .engine import make_image_processor
    from .tokenizer import load_default_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = tiny_config(image_size=image_size, hidden_size=hidden_size, text_layers=text_layers, seed=seed)
    model = MllamaForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(gate_init)
    model.eval()
    model.save_pretrained(directory)
    load_default_tokenizer().save_pretrained(directory)
    make_image_processor(image_size).save_pretrained(directory)
    (directory / f"{TINY_MARKER}.json").write_text(
        json.dumps({"warning": "random weights: verdicts are meaningless", "seed": seed}, indent=2)
    )
    return directory
