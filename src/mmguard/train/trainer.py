"""The training recipe on transformers' ``Trainer`` (:func:`train`); its components live beside it:

* :mod:`.config` (the run's settings), :mod:`.model_setup` (mmguard-mini's architecture, freezing, LoRA),
  :mod:`.sequences` (examples to token sequences), :mod:`.batches` (batches and the collator),
  :mod:`.loss` (the answer-only loss).
* Data: labeled JSONL (``mmguard data build``), items with ``trainable`` true from the train split,
  expanded by :class:`mmguard.data.formatter.Formatter` and tokenized with
  :func:`mmguard.data.formatter.tokenize` (labels masked to the answer).
* Batches: image and text-only items are never mixed (Mllama skips cross-attention for text-only
  batches, see :mod:`mmguard.engine`), so the dataset yields ready-made batches of one kind,
  left-padded by :meth:`mmguard.engine.Engine.collate`.
* Loss: cross-entropy at the supervised (answer) positions only; the vocabulary projection runs
  only there, which makes CPU training of small models affordable.
* Full fine-tuning or LoRA (peft), optional freezing of the vision encoder, the cross-attention
  layers or the language model, checkpoints, resume, a wall-clock budget (``max_minutes``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .batches import BatchDataset, Collator, make_batches
from .config import TrainConfig
from .loss import answer_loss
from .model_setup import apply_freeze, apply_lora, build_mini_model, warm_start_lora
from .sequences import load_training_items

log = logging.getLogger(__name__)

__all__ = ["resident_gb", "train"]

def _make_trainer_class(autocast: str = "none") -> Any:
    from transformers import Trainer

    class GuardTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # compute_loss returns each batch's mean and ignores num_items_in_batch, so the Trainer must divide
            # by --grad-accum itself; it skips that for models whose forward takes **kwargs (Mllama's does),
            # which summed the accumulated means: twice the gradient and the logged loss at --grad-accum 2
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
                loss = answer_loss(model, inputs)
            return (loss, {"loss": loss}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # type: ignore[override]
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = answer_loss(model, inputs)
            return loss.detach(), None, None

    return GuardTrainer


def resident_gb() -> float | None:
    """This process's resident memory in GB (Linux ``/proc``; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def _glibc_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _make_callbacks(cfg: TrainConfig, start: float) -> list[Any]:
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        """Stop cleanly (and save) once ``max_minutes`` of wall time have passed, or at step ``stop_at`` (the
        same cut, reproducible: the learning-rate schedule stays the one of ``steps``)."""

        stopped_early = False
        stopped_at_step = False

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
            if cfg.stop_at is not None and state.global_step >= cfg.stop_at:
                log.info("--stop-at %d reached; stopping", cfg.stop_at)
                Budget.stopped_at_step = True
            elif cfg.max_minutes is not None and time.time() - start > cfg.max_minutes * 60:
                log.warning("time budget of %.1f min reached at step %d; stopping", cfg.max_minutes,
                            state.global_step)
                Budget.stopped_early = True
            else:
                return control
            control.should_training_stop = True
            control.should_save = True
            return control

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
            if logs:
                elapsed = (time.time() - start) / 60
                shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()}
                rss = resident_gb()
                if rss is not None:
                    shown["rss_gb"] = round(rss, 2)
                print(f"[step {state.global_step}/{state.max_steps} {elapsed:.1f} min] {json.dumps(shown)}",
                      flush=True)

    class TrimMemory(TrainerCallback):
        """Batches of varying lengths leave glibc's heap fragmented: freed buffers are kept, and resident
        memory grew ~20 MB a step. ``malloc_trim(0)`` every ``every`` steps (``--trim-every``) hands the free pages
        back, without the cost of serving every large allocation by mmap (``MALLOC_MMAP_THRESHOLD_``)."""

        def __init__(self, trim: Any, every: int) -> None:
            self.trim = trim
            self.every = every

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
            if state.global_step % self.every == 0:
                self.trim(0)
            return control

    callbacks: list[Any] = [Budget(), Progress()]
    if cfg.trim_memory:
        trim = _glibc_malloc_trim()
        if trim is None:
            log.warning("--trim-memory: this C library has no malloc_trim (not glibc); ignored")
        else:
            callbacks.append(TrimMemory(trim, cfg.trim_every))
    return callbacks


def _latest_checkpoint(out: Path) -> str | None:
    cks = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(cks[-1]) if cks else None


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training; writes a loadable guard checkpoint to ``config.out`` and returns a summary."""
    from transformers import MllamaForConditionalGeneration, TrainingArguments, set_seed

    from ..checkpoints import make_image_processor, resolve_device, resolve_dtype
    from ..engine import Engine
    from ..tokenizer import load_default_tokenizer

    cfg = config.resolved()
    start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device) if cfg.dtype != "auto" else torch.float32
    if cfg.dtype == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # model, tokenizer, image processor
    if cfg.init == "mini":
        model = build_mini_model(seed=cfg.seed)
        tokenizer = load_default_tokenizer()
        processor = make_image_processor(int(model.config.vision_config.image_size))
    elif cfg.init == "mini2":
        from transformers import AutoTokenizer

        from ..base_models import smollm2_mllama_base
        from ..checkpoints import load_image_processor
        from ..termio import library_bars_only_on_terminal

        base_dir = smollm2_mllama_base()
        with library_bars_only_on_terminal():
            model = MllamaForConditionalGeneration.from_pretrained(base_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        processor = load_image_processor(base_dir, int(model.config.vision_config.image_size))
    else:
        from ..checkpoints import load_engine

        assert cfg.base is not None
        # the engine's loader: a checkpoint that ships adapters on a rebuilt base (mini v2) arrives merged
        loaded = load_engine(cfg.base, device="cpu", dtype=dtype)
        model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.image_processor
    model.to(dtype)
    counts = apply_freeze(model, cfg.freeze)
    engine = Engine(model, tokenizer, processor, device="cpu", dtype=dtype, source=cfg.base or "mini")
    if cfg.lora and cfg.warm_start:
        # the same adapters and new layers, trainable again: the output ships like a fresh mini v2 run's
        model = warm_start_lora(model, cfg)
    elif cfg.lora:
        model = apply_lora(model, cfg)
    if cfg.lora:
        counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts["frozen"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("parameters: %s", counts)
    if cfg.compile:
        from ..engine import compile_layers

        log.info("compiled %d layers; the first steps compile them", compile_layers(model))

    # data
    items, stats = load_training_items(cfg.data, tokenizer, cfg, "train", cfg.max_items)
    if not items:
        from ..data.schema import DataError

        raise DataError("no trainable train-split items in " + ", ".join(cfg.data))
    batches = make_batches(items, cfg.batch_size, cfg.seed, cfg.share_prefix)
    eval_ds = None
    if cfg.eval_every:
        ev_items, _ = load_training_items(cfg.data, tokenizer, cfg, "validation", cfg.eval_items)
        if ev_items:
            eval_ds = BatchDataset(make_batches(ev_items, cfg.batch_size, cfg.seed))
    print(f"data: {json.dumps(stats)}; {len(batches)} batches of <= {cfg.batch_size}; "
          f"parameters {json.dumps(counts)}", flush=True)

    assert cfg.steps is not None and cfg.lr is not None
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        max_steps=cfg.steps,
        warmup_steps=max(1, int(cfg.warmup_ratio * cfg.steps)),
        lr_scheduler_type="cosine",
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.log_every,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=2,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=cfg.eval_every or None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16 and device != "cpu",
        disable_tqdm=True,
        label_names=["labels"],
        max_grad_norm=1.0,
        save_only_model=False,
    )
    trainer_cls = _make_trainer_class(cfg.autocast)
    callbacks = _make_callbacks(cfg, start)
    trainer = trainer_cls(model=model, args=args, train_dataset=BatchDataset(batches), eval_dataset=eval_ds,
                          data_collator=Collator(engine, cfg.share_prefix), callbacks=callbacks)
    # with disable_tqdm the Trainer adds PrinterCallback, which prints every log dict that Progress prints too
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    resume = _latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume is None:
        log.warning("--resume given but no checkpoint in %s; starting fresh", out)
    result = trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "loss" in h]

    # final save: merged weights + tokenizer + image processor, loadable by Guard.from_pretrained; for
    # mini2 only the adapters and the new layers, with mmguard.json naming the base they apply to
    final = trainer.model
    if cfg.lora and cfg.init != "mini2":
        final = final.merge_and_unload()
    final.eval()
    save_dtype = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float32": torch.float32}[cfg.save_dtype]
    if save_dtype is not None:
        final.to(save_dtype)
    final.save_pretrained(out)
    if cfg.init == "mini2":
        from ..base_models import BASE_NAME

        (out / "mmguard.json").write_text(json.dumps(
            {"base": BASE_NAME, "adapter": True, "reads_text_in_images": False}, indent=2))
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "minutes": round((time.time() - start) / 60, 2),
        "stopped_by_budget": callbacks[0].stopped_early,
        "stopped_at_step": callbacks[0].stopped_at_step,
        "resumed_from": resume,
        "data": stats,
        "config": asdict(cfg),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if not math.isfinite(result.training_loss):
        log.warning("training loss is not finite")
    return summary
