"""Training with shared template prefixes against plain batches, in one run, on the same batches.

    .venv/bin/python bench/train_share_prefix.py                      # mini v2's base + LoRA, real train data
    .venv/bin/python bench/train_share_prefix.py --data FILE --batches 6 --threads 2

The items are ``mmguard train``'s own (``load_training_items`` with mini v2's recipe: ``--unsafe-repeat 3``,
``--augment 0.15``), batched with ``--share-prefix`` grouping. For ``--batches`` text batches that share a
prefix, one optimizer-free training step (forward + backward, bf16 autocast as in ``make mini``, LoRA dropout
off so the losses compare) runs both ways, alternating which goes first so a busy machine slows both alike:
plain (every row its whole prompt, left-padded) and shared (the prefix once, then each row's remainder).
Printed: seconds per step each way, their ratio, the loss difference, and over the whole training set the
share of text batches that get a prefix and the tokens each way (what a whole run saves depends on it: image
batches are unchanged).
``--tiny`` runs a tiny random checkpoint (tests: plumbing only, its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from mmguard.train.batches import Collator, make_batches, shared_prefix_len
from mmguard.train.config import TrainConfig
from mmguard.train.loss import answer_loss
from mmguard.train.model_setup import apply_lora
from mmguard.train.sequences import SequenceItem, load_training_items


def tokens(batch: list[SequenceItem], share: bool) -> int:
    """Token positions one step runs through the model (padding included)."""
    width = max(len(it.input_ids) for it in batch)
    p = shared_prefix_len(batch) if share else 0
    return p + len(batch) * (width - p)


def step_seconds(model: Any, collate: Collator, batch: list[SequenceItem], autocast: bool) -> tuple[float, float]:
    inputs = collate([batch])
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = answer_loss(model, inputs)
    loss.backward()
    return time.perf_counter() - t0, float(loss.detach())


def load(args: argparse.Namespace) -> tuple[Any, Any, TrainConfig]:
    from mmguard.engine import Engine

    if args.tiny:
        from mmguard.checkpoints import load_engine
        from mmguard.tiny import make_tiny_checkpoint

        folder = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", seed=0)
        engine = load_engine(folder, device="cpu", dtype="float32")
        cfg = TrainConfig(data=[str(args.data)], out="unused", base=str(folder), lora=True, max_seq_len=640,
                          unsafe_repeat=3, augment=0.15, seed=0, lora_dropout=0.0).resolved()
        return apply_lora(engine.model, cfg), engine, cfg
    from transformers import AutoTokenizer, MllamaForConditionalGeneration

    from mmguard.base_models import smollm2_mllama_base
    from mmguard.checkpoints import load_image_processor

    base_dir = smollm2_mllama_base()
    model = MllamaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    processor = load_image_processor(base_dir, int(model.config.vision_config.image_size))
    engine = Engine(model, tokenizer, processor, device="cpu", dtype=torch.float32, source="mini2-base")
    cfg = TrainConfig(data=[str(args.data)], out="unused", init="mini2", lora=True, max_seq_len=640,
                      unsafe_repeat=3, augment=0.15, transcripts=True, seed=0, lora_dropout=0.0).resolved()
    return apply_lora(model, cfg), engine, cfg


def training_bench_parser(doc: str | None, *, data: str, max_items: int, max_items_help: str, batches: int,
                          batches_help: str | None = None) -> argparse.ArgumentParser:
    """The options every training benchmark takes; each adds its own after these."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(data))
    ap.add_argument("--max-items", type=int, default=max_items, help=max_items_help)
    ap.add_argument("--batches", type=int, default=batches, help=batches_help)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    return ap


def training_bench_ready(args: argparse.Namespace) -> bool:
    """Set the thread count; False (with the error printed) when the training build is missing."""
    torch.set_num_threads(args.threads)
    if not args.data.is_file():
        print(f"error: {args.data} not found (build it: mmguard data build ..., see scripts/make_mini.sh)",
              file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = training_bench_parser(__doc__, data="build/mini2/data/train.jsonl", max_items=3000,
                               max_items_help="train examples read (the statistics use them)", batches=6)
    ap.add_argument("--no-autocast", action="store_true", help="fp32 instead of bf16 autocast")
    args = ap.parse_args(argv)
    if not training_bench_ready(args):
        return 2
    model, engine, cfg = load(args)
    model.train()
    items, _ = load_training_items(cfg.data, engine.tokenizer, cfg, "train", args.max_items)
    batches = make_batches(items, args.batch_size, seed=0, share_prefix=True)
    text = [b for b in batches if b[0].image is None]
    with_prefix = [b for b in text if shared_prefix_len(b)]
    plain_tokens = sum(tokens(b, False) for b in batches)
    shared_tokens = sum(tokens(b, True) for b in batches)
    timed = [b for b in with_prefix if len(b) == args.batch_size][:args.batches]
    if not timed:
        print("error: no full text batch with a shared prefix in these items", file=sys.stderr)
        return 2
    plain_collate, shared_collate = Collator(engine), Collator(engine, share_prefix=True)
    autocast = not args.no_autocast
    step_seconds(model, shared_collate, timed[0], autocast)  # warm-up
    plain_s, shared_s, dloss = [], [], []
    for i, batch in enumerate(timed):
        runs = [(plain_collate, plain_s), (shared_collate, shared_s)]
        losses = {}
        for collate, sink in (runs if i % 2 == 0 else runs[::-1]):
            seconds, loss = step_seconds(model, collate, batch, autocast)
            sink.append(seconds)
            losses[collate.share_prefix] = loss
        dloss.append(abs(losses[True] - losses[False]))
    p50_plain, p50_shared = statistics.median(plain_s), statistics.median(shared_s)
    report = {
        "model": "tiny random (plumbing)" if args.tiny else "mini v2 base (SmolLM2-135M in Mllama) + LoRA",
        "threads": args.threads, "autocast": "bf16" if autocast else "none", "batch_size": args.batch_size,
        "timed_batches": len(timed),
        "mean_prefix_tokens": statistics.mean(shared_prefix_len(b) for b in timed),
        "mean_row_tokens": statistics.mean(len(it.input_ids) for b in timed for it in b),
        "step_s_plain_p50": round(p50_plain, 3), "step_s_shared_p50": round(p50_shared, 3),
        "speedup_text_step": round(p50_plain / p50_shared, 2),
        "max_abs_loss_diff": max(dloss),
        "train_set": {"items": len(items), "batches": len(batches), "text_batches": len(text),
                      "text_batches_with_prefix": len(with_prefix),
                      "tokens_plain": plain_tokens, "tokens_shared": shared_tokens,
                      "token_ratio": round(plain_tokens / shared_tokens, 2)},
    }
    t = report["train_set"]
    print(f"{report['model']}, {args.threads} threads, autocast {report['autocast']}, batch {args.batch_size}")
    print(f"timed: {len(timed)} text batches, prefix {report['mean_prefix_tokens']:.0f} of "
          f"{report['mean_row_tokens']:.0f} tokens per row on average")
    print(f"training step (forward + backward) p50: plain {p50_plain:.2f} s, shared prefix {p50_shared:.2f} s "
          f"-> {report['speedup_text_step']:.2f}x; max |loss difference| {max(dloss):.2e}")
    print(f"train set ({t['items']} items, {t['batches']} batches): {t['text_batches_with_prefix']} of "
          f"{t['text_batches']} text batches share a prefix; tokens run {t['tokens_plain']} plain vs "
          f"{t['tokens_shared']} shared ({t['token_ratio']:.2f}x fewer)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
