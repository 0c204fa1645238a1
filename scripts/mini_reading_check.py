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

from mmguard.checkpoints import load_engine
from mmguard.data.schema import read_examples
from mmguard.train.batches import Collator
from mmguard.train.loss import answer_logits
from mmguard.train.reading import RenderedText, reading_prompt_ids, reading_texts, reading_tokens
from mmguard.train.sequences import SequenceItem


def transcription_scores(engine, texts: list[str], blank: bool, batch: int = 16) -> tuple[float, float]:
    prompt = reading_prompt_ids(engine.tokenizer)
    collate = Collator(engine)
    correct = total = 0
    loss_sum = 0.0
    for start in range(0, len(texts), batch):
        items = []
        for text in texts[start:start + batch]:
            ids, labels = reading_tokens(engine.tokenizer, text, prompt)
            image = Image.new("RGB", (760, 760), "white") if blank else RenderedText(text)
            items.append(SequenceItem(ids, labels, image))
        with torch.no_grad():
            logits, target = answer_logits(engine.model, collate([items]))
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
        correct += int((logits.argmax(-1) == target).sum())
        total += len(target)
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
