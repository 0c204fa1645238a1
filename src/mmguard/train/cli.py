"""``mmguard train``: full fine-tuning or LoRA of an Mllama guard on mmguard JSONL data."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer


def command(
    data: Annotated[
        list[Path], typer.Option("--data", "-d", help="Labeled JSONL (repeatable); train split used.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: checkpoints and the final model.")],
    base: Annotated[str | None, typer.Option(help="Checkpoint to fine-tune (local folder or HF id).")] = None,
    init: Annotated[str | None, typer.Option(
        help="'mini2': mmguard-mini v2 on the SmolLM2-135M-Instruct base (with --lora); 'mini': the v1 "
        "architecture from scratch.")] = None,
    lora: Annotated[bool, typer.Option(
        "--lora/--full",
        help="LoRA adapters (merged at the end) or full fine-tuning. LoRA defaults: lr 1e-5, seq len 8192, "
        "3600 steps.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.", min=1)] = 16,
    lora_from_layer: Annotated[int, typer.Option(
        help="With --init mini2: adapters on the layers from this one up only; the lower layers stay as the "
             "base has them and need no backward (bench/train_step_levers.py).", min=0)] = 0,
    warm_start: Annotated[str | None, typer.Option(
        help="With --init mini2: start the adapters and new layers from this mini v2 checkpoint (a second "
             "training stage; its data order follows --seed).")] = None,
    freeze: Annotated[list[str] | None, typer.Option(
        help="Freeze a part: vision, cross-attention, language (repeatable).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (LoRA 1e-5, full 1e-3).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (LoRA 3600, full 1000).", min=1)] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Longer prompts are cut in the middle (LoRA 8192, "
                                                    "full 1024).", min=64)] = None,
    batch_size: Annotated[int, typer.Option(help="Conversations per batch.", min=1)] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.", min=1)] = 1,
    seed: Annotated[int, typer.Option(help="Seed for init, data order and augmentation.")] = 42,
    resume: Annotated[bool, typer.Option(help="Resume from the latest checkpoint in --out.")] = False,
    max_minutes: Annotated[float | None, typer.Option(
        help="Wall-clock budget: stop cleanly and save when reached.", min=0.0)] = None,
    stop_at: Annotated[int | None, typer.Option(
        help="Stop cleanly and save after this step, keeping the learning-rate schedule of --steps (the same "
             "cut as a budget, but reproducible).", min=1)] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.", min=1)] = 500,
    eval_every: Annotated[int, typer.Option(help="Validation loss every N steps (0: never).", min=0)] = 0,
    augment: Annotated[float, typer.Option(help="Probability of each policy augmentation.", min=0.0,
                                           max=1.0)] = 1.0,
    max_items: Annotated[int | None, typer.Option(help="Use at most N train examples.", min=1)] = None,
    unsafe_repeat: Annotated[int, typer.Option(
        help="Use each unsafe train example N times (the shared sets are mostly safe); sources already "
        "balanced (>= 40% unsafe, e.g. typographic items) repeat their safe items too.", min=1)] = 1,
    reading: Annotated[int, typer.Option(
        help="Add N reading-practice items: train prompts rendered as typography, the target is the text "
        "(an aid to learning to read; it did not pay off in a CPU hour, see mmguard.train.reading).", min=0)] = 0,
    save_dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16 for the saved weights.")]
    = "auto",
    autocast: Annotated[str, typer.Option(
        help="none or bf16 (bfloat16 autocast: about 2x faster on CPUs with AMX or AVX512-BF16).")] = "none",
    transcripts: Annotated[bool, typer.Option(
        "--transcripts/--no-transcripts",
        help="Also train on each typographic item in the form of the OCR check (see mmguard.ocr).")] = False,
    share_prefix: Annotated[bool, typer.Option(
        "--share-prefix/--no-share-prefix",
        help="Batch text items by template and compute the shared prompt prefix (task line, categories) once "
             "per batch: same loss and gradients, fewer tokens (bench/train_share_prefix.py).")] = False,
    trim_memory: Annotated[bool, typer.Option(
        "--trim-memory/--no-trim-memory",
        help="Hand freed heap memory back to the OS after every step (glibc malloc_trim): bounded resident "
             "memory on CPU with batches of varying length.")] = False,
    trim_every: Annotated[int, typer.Option(
        help="With --trim-memory: trim after every N steps (bench/allocator_settings.py).", min=1)] = 1,
    compile: Annotated[bool, typer.Option(
        "--compile/--no-compile",
        help="torch.compile every transformer layer: 1.5-1.7x faster steps on CPU once compiled; the first "
             "steps compile (minutes; torch caches the result on disk). Needs a C++ compiler "
             "(bench/train_compile.py).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="Training dtype: auto (bf16 on GPU, fp32 on CPU), float32, "
                                       "bfloat16.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.", min=1)] = None,
    log_every: Annotated[int, typer.Option(help="Log loss every N steps.", min=1)] = 10,
) -> None:
    """Fine-tune an Mllama guard (or train mmguard-mini from scratch) with transformers' Trainer."""
    from ..termio import StderrHandler
    from .trainer import TrainConfig, train

    # a handler on the current sys.stderr, not the stream object of the moment (see mmguard.termio)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        handlers=[StderrHandler()])
    cfg = TrainConfig(
        data=[str(p) for p in data], out=str(out), base=base, init=init, lora=lora, lora_r=lora_r,
        lora_from_layer=lora_from_layer,
        warm_start=warm_start,
        freeze=list(freeze or []), lr=lr, steps=steps, max_seq_len=max_seq_len, batch_size=batch_size,
        grad_accum=grad_accum, seed=seed, resume=resume, max_minutes=max_minutes, stop_at=stop_at,
        save_every=save_every,
        eval_every=eval_every, augment=augment, max_items=max_items, unsafe_repeat=unsafe_repeat,
        reading=reading,
        save_dtype=save_dtype, autocast=autocast, transcripts=transcripts, share_prefix=share_prefix,
        trim_memory=trim_memory, trim_every=trim_every, compile=compile, device=device,
        dtype=dtype, threads=threads, log_every=log_every,
    )
    try:
        cfg.resolved()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(2) from None
    missing = [p for p in data if not p.is_file()]
    if missing:
        print(f"error: --data: file not found: {missing[0]}", file=sys.stderr)
        raise typer.Exit(2)
    from ..data.schema import DataError, read_examples
    from ..engine import EngineError

    try:  # every line read before the model loads; what only formatting finds comes with its line later
        trainable = sum(ex.trainable and ex.split == "train" for p in data for ex in read_examples(p))
        if not trainable:
            raise DataError("no trainable train-split items in " + ", ".join(map(str, data)))
        summary = train(cfg)
    except DataError as err:
        print(f"error: --data: {err}", file=sys.stderr)
        raise typer.Exit(2) from None
    except EngineError as err:  # a model or checkpoint that cannot be used as asked (--warm-start, --base)
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(3) from None
    summary.pop("config", None)
    print(json.dumps(summary, indent=2, default=str))


def soup_command(
    ingredients: Annotated[list[Path], typer.Argument(
        help="Checkpoint folders to average (2 or more; same architecture and starting point). Files other "
             "than the weights are copied from the first.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the soup (not an ingredient).")],
    weight: Annotated[list[float] | None, typer.Option(
        help="One weight per ingredient, in order (repeatable); uniform when omitted.")] = None,
) -> None:
    """Average fine-tuned checkpoints into one (a model soup: same size, no cost at inference)."""
    from .soup import SoupConfig, SoupError, make_soup

    missing = [p for p in ingredients if not p.is_dir()]
    if missing:
        print(f"error: not a folder: {missing[0]}", file=sys.stderr)
        raise typer.Exit(2)
    try:
        folder = make_soup(SoupConfig(ingredients=ingredients, out=out, weights=weight or ()))
    except SoupError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(2) from None
    print((folder / "soup.json").read_text(), end="")
