"""Two training-speed levers of mini v2 against make mini's step, in one run, on the same batches.

    .venv/bin/python bench/train_step_levers.py --data build/mini2/data3/train.jsonl --max-items 40000 --batches 30
    .venv/bin/python bench/train_step_levers.py --data FILE --batches 12 --from-layer 8 --short-len 384

Three ways to run one training step (forward + backward, bf16 autocast and LoRA dropout off, as in
``bench/train_share_prefix.py``) on the first ``--batches`` batches of ``mmguard train``'s own batching
(mini v2's recipe: ``--unsafe-repeat 3 --augment 0.15 --transcripts``, ``--max-seq-len 640``), so text, image and
response batches come in the mix a run sees:

* **make mini**: LoRA on every pretrained layer, sequences of at most 640 tokens;
* **lower layers frozen** (``--lora-from-layer``): adapters only from ``--from-layer`` up; the vision tower and
  cross-attention layers still train, so a text batch runs no backward below ``--from-layer`` and an image batch
  none below the first cross-attention layer;
* **shorter sequences**: the same batches cut to ``--short-len`` tokens the way ``--max-seq-len`` cuts them (the
  middle of the prompt goes, the answer stays; items that cannot be cut are dropped from the batch).

The order of the three rotates from batch to batch so a busy machine slows all alike. Printed: p50 and total
seconds per step each way, the ratios against make mini's, and what each lever costs in information (the share
of training items ``--short-len`` would cut or drop; the adapter parameters ``--from-layer`` leaves out). These
are speeds only: whether a lever keeps the model's quality takes a training run and a validation eval.
``--tiny`` runs a tiny random checkpoint (tests: plumbing only, its timings mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from train_share_prefix import training_bench_parser, training_bench_ready

from mmguard.train.batches import Collator, make_batches
from mmguard.train.config import TrainConfig
from mmguard.train.loss import answer_loss
from mmguard.train.model_setup import apply_lora
from mmguard.train.sequences import SequenceItem, _truncate, load_training_items

LEVERS = ("make mini", "lower layers frozen", "shorter sequences")


def step_seconds(model: Any, collate: Collator, batch: list[SequenceItem]) -> float:
    inputs = collate([batch])
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = answer_loss(model, inputs)
    loss.backward()
    return time.perf_counter() - t0


def shorten(batch: list[SequenceItem], max_len: int, image_id: int) -> list[SequenceItem]:
    out = []
    for it in batch:
        cut = _truncate(it.input_ids, it.labels, max_len, image_id)
        if cut is not None:
            out.append(SequenceItem(cut[0], cut[1], it.image))
    return out


def load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(base model, engine for tokenizer and images, image token id)."""
    from mmguard.data.formatter import token_format
    from mmguard.engine import Engine

    if args.tiny:
        from mmguard.checkpoints import load_engine
        from mmguard.tiny import make_tiny_checkpoint

        folder = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", seed=0)
        engine = load_engine(folder, device="cpu", dtype="float32")
    else:
        from transformers import AutoTokenizer, MllamaForConditionalGeneration

        from mmguard.base_models import smollm2_mllama_base
        from mmguard.checkpoints import load_image_processor

        base_dir = smollm2_mllama_base()
        model = MllamaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        processor = load_image_processor(base_dir, int(model.config.vision_config.image_size))
        engine = Engine(model, tokenizer, processor, device="cpu", dtype=torch.float32, source="mini2-base")
    return engine.model, engine, token_format(engine.tokenizer).image_id


def lora_model(base: Any, data: Path, from_layer: int, tiny: bool) -> tuple[Any, TrainConfig]:
    if tiny:  # the tiny checkpoint is not a mini2 base: plain LoRA, lower layers frozen by hand below
        cfg = TrainConfig(data=[str(data)], out="unused", base="tiny", lora=True, max_seq_len=640, unsafe_repeat=3,
                          augment=0.15, seed=0, lora_dropout=0.0).resolved()
        model = apply_lora(copy.deepcopy(base), cfg)
        for name, p in model.named_parameters():
            layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
            if "lora_" in name and layer is not None and "language_model" in name and int(layer) < from_layer:
                p.requires_grad_(False)
        return model, cfg
    cfg = TrainConfig(data=[str(data)], out="unused", init="mini2", lora=True, lora_from_layer=from_layer,
                      max_seq_len=640, unsafe_repeat=3, augment=0.15, transcripts=True, seed=0,
                      lora_dropout=0.0).resolved()
    return apply_lora(copy.deepcopy(base), cfg), cfg


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> int:
    ap = training_bench_parser(
        __doc__, data="build/mini2/data3/train.jsonl", max_items=3000, batches=12,
        max_items_help="train examples read (the statistics use them); a build lists its image items late, so "
                       "the default reads none: pass the whole file (e.g. 40000) for a run's mix of batches")
    ap.add_argument("--from-layer", type=int, default=8, help="lower layers frozen: adapters from this layer up")
    ap.add_argument("--short-len", type=int, default=384, help="shorter sequences: at most this many tokens")
    args = ap.parse_args(argv)
    if not training_bench_ready(args):
        return 2
    base, engine, image_id = load(args)
    full, cfg = lora_model(base, args.data, 0, args.tiny)
    lower, _ = lora_model(base, args.data, args.from_layer, args.tiny)
    del base
    for m in (full, lower):
        m.train()
    items, _ = load_training_items(cfg.data, engine.tokenizer, cfg, "train", args.max_items)
    batches = [b for b in make_batches(items, args.batch_size, seed=0) if len(b) == args.batch_size]
    timed = batches[:args.batches]
    if not timed:
        print("error: no full batch in these items", file=sys.stderr)
        return 2
    collate = Collator(engine)
    runs = {LEVERS[0]: (full, lambda b: b), LEVERS[1]: (lower, lambda b: b),
            LEVERS[2]: (full, lambda b: shorten(b, args.short_len, image_id))}
    step_seconds(full, collate, timed[0])  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in LEVERS}
    for i, batch in enumerate(timed):
        order = list(LEVERS[i % 3:] + LEVERS[:i % 3])
        for lever in order:
            model, prepare = runs[lever]
            rows = prepare(batch)
            seconds[lever].append(step_seconds(model, collate, rows) if rows else 0.0)
    long_items = sum(len(it.input_ids) > args.short_len for it in items)
    dropped = sum(_truncate(it.input_ids, it.labels, args.short_len, image_id) is None for it in items)
    kinds = {"image": sum(b[0].image is not None for b in timed), "text": sum(b[0].image is None for b in timed)}
    base_p50, base_total = statistics.median(seconds[LEVERS[0]]), sum(seconds[LEVERS[0]])
    report: dict[str, Any] = {
        "model": "tiny random (plumbing)" if args.tiny else "mini v2 base (SmolLM2-135M in Mllama) + LoRA",
        "threads": args.threads, "batch_size": args.batch_size, "timed_batches": len(timed),
        "timed_batch_kinds": kinds, "from_layer": args.from_layer, "short_len": args.short_len,
        "levers": {
            lever: {"step_s_p50": round(statistics.median(s), 3), "step_s_total": round(sum(s), 2),
                    "speedup_p50": round(base_p50 / statistics.median(s), 2),
                    "speedup_total": round(base_total / sum(s), 2)}
            for lever, s in seconds.items()
        },
        "trainable_params": {"make mini": trainable(full), "lower layers frozen": trainable(lower)},
        "train_items": len(items), "items_over_short_len": long_items, "items_short_len_drops": dropped,
    }
    print(f"{report['model']}, {args.threads} threads, bf16 autocast, batch {args.batch_size}, "
          f"{len(timed)} batches ({kinds['text']} text, {kinds['image']} image)")
    for lever, r in report["levers"].items():
        print(f"  {lever:<20} step p50 {r['step_s_p50']:6.2f} s, total {r['step_s_total']:7.2f} s -> "
              f"{r['speedup_p50']:.2f}x p50, {r['speedup_total']:.2f}x total")
    print(f"lower layers frozen (adapters from layer {args.from_layer}): {trainable(lower):,} trainable parameters "
          f"against {trainable(full):,}")
    print(f"shorter sequences ({args.short_len} tokens): {long_items} of {len(items)} training items would be cut, "
          f"{dropped} dropped")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
