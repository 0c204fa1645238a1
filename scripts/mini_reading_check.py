"""Does a model read typography? Transcription accuracy with the real image versus a blank one.

Usage: python scripts/mini_reading_check.py MODEL_DIR DATA_DIR/test.jsonl [N]
Renders N test-split prompt texts the way the typographic items are rendered, asks the model to
transcribe them (the prompt of ``mmguard train --reading``) and reports teacher-forced token accuracy
and mean loss on the transcription, once with the rendered image and once with a blank white image
of the same size. Only the gap between the two measures reading: the blank run shows how much of
the text the language model guesses without looking.
"""

from __future__ import annotations

import sys

import torch
from PIL import Image

from mmguard.data.schema import read_examples
from mmguard.engine import EncodedItem, load_engine
from mmguard.train.reading import RenderedText, reading_prompt_ids, reading_texts, reading_tokens


def transcription_scores(engine, texts: list[str], blank: bool, batch: int = 16) -> tuple[float, float]:
    model, tok = engine.model, engine.tokenizer
    prompt = reading_prompt_ids(tok)
    correct = total = 0
    loss_sum = 0.0
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        pairs = [reading_tokens(tok, t, prompt) for t in chunk]
        images = [Image.new("RGB", (760, 760), "white") if blank else RenderedText(t).load() for t in chunk]
        inputs = engine.collate([EncodedItem(ids, im, None) for (ids, _), im in zip(pairs, images, strict=True)])
        width = inputs["input_ids"].shape[1]
        labels = torch.full((len(chunk), width), -100)
        for i, (_, lab) in enumerate(pairs):
            labels[i, width - len(lab):] = torch.tensor(lab)
        with torch.no_grad():
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
            target = labels[:, 1:]
            mask = target != -100
            logits = model.lm_head(hidden[:, :-1][mask]).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, target[mask], reduction="sum").item()
            correct += (logits.argmax(-1) == target[mask]).sum().item()
            total += int(mask.sum())
    return correct / total, loss_sum / total


def main() -> None:
    model_dir, data = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    prompts = [ex.prompt_text for ex in read_examples(data)
               if ex.split == "test" and ex.task == "prompt" and ex.modality == "text"]  # fmt: skip
    texts = reading_texts(prompts, n, seed=12345)
    engine = load_engine(model_dir, device="cpu", dtype="float32")
    print(f"{len(texts)} test-split texts rendered as typography; teacher-forced transcription:")
    for name, blank in (("rendered image", False), ("blank image", True)):
        acc, loss = transcription_scores(engine, texts, blank)
        print(f"  {name:15s} token accuracy {acc:.3f}  loss {loss:.3f}")


if __name__ == "__main__":
    main()
