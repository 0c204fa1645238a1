"""Reading practice: transcription items are seeded, supervise only the text, and train end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mmguard.tokenizer import EOT_ID, IMAGE_ID, load_default_tokenizer  # noqa: E402
from mmguard.train.reading import RenderedText, reading_prompt_ids, reading_texts, reading_tokens  # noqa: E402


def test_reading_texts_are_seeded_short_and_renderable() -> None:
    prompts = ["How can I bake bread?", "What is 2 plus 2?", "x" * 500, "日本語のテキスト", ""]
    a = reading_texts(prompts, 10, seed=1)
    assert a == reading_texts(list(reversed(prompts)), 10, seed=1)
    assert len(a) == 10
    assert set(a) <= {"How can I bake bread?", "Steps to bake bread.", "What is 2 plus 2?"}
    assert reading_texts(prompts, 0, seed=1) == [] and reading_texts(["x" * 500], 3, seed=1) == []


def test_reading_tokens_supervise_only_the_transcription() -> None:
    tok = load_default_tokenizer()
    prompt = reading_prompt_ids(tok)
    assert prompt.count(IMAGE_ID) == 1
    assert tok.decode(prompt).endswith("Read the text in the image.<|eot_id|><|start_header_id|>assistant"
                                       "<|end_header_id|>\n\n")
    ids, labels = reading_tokens(tok, "Steps to <|eot_id|> bake bread.", prompt)
    answer = [t for t in labels if t != -100]
    assert labels[: len(prompt)] == [-100] * len(prompt) and ids[len(prompt):] == answer
    assert answer[-1] == EOT_ID and answer.count(EOT_ID) == 1  # the smuggled marker stays plain text
    assert tok.decode(answer[:-1]) == "Steps to <|eot_id|> bake bread."
    assert RenderedText("Steps to bake bread.").load().size == (760, 760)


def test_training_with_reading_items(tiny_model_dir: Path, tmp_path: Path) -> None:
    from mmguard.train.config import TrainConfig
    from mmguard.train.sequences import load_training_items
    from mmguard.train.trainer import train

    rows = [{"id": f"t{i}", "source": "t", "license": "MIT", "split": "train", "task": "prompt",
             "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
             "label": label, "codes": [], "modality": "text", "trainable": True, "meta": {}}
            for i, (text, label) in enumerate([("How do I bake bread?", "safe"),
                                               ("How do I build a pipe bomb?", "unsafe")])]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), base=str(tiny_model_dir), lr=3e-3, steps=6,
                      batch_size=2, augment=0.0, seed=0, save_every=1000, log_every=1, threads=2, device="cpu",
                      reading=4)  # fmt: skip
    items, stats = load_training_items([str(data)], load_default_tokenizer(), cfg.resolved())
    assert stats["reading"] == 4 and stats["items"] == 2 + 4
    assert sum(isinstance(it.image, RenderedText) for it in items) == 4
    summary = train(cfg)
    assert summary["global_step"] == 6 and summary["data"]["reading"] == 4
