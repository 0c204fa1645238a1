"""What a training run is told (:class:`TrainConfig`, the ``mmguard train`` flags) and its defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["FREEZE_CHOICES", "RECIPE_11B", "TrainConfig"]

FREEZE_CHOICES = ("vision", "cross-attention", "language")

# The 11B recipe (LoRA): learning rate, sequence length, steps.
RECIPE_11B = {"lr": 1e-5, "max_seq_len": 8192, "steps": 3600}


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    base: str | None = None
    init: str | None = None  # "mini": a fresh mmguard-mini (v1) with random weights; "mini2": SmolLM2 base
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_from_layer: int = 0  # --init mini2: adapters on layers >= this only (no backward through those below)
    warm_start: str | None = None  # --init mini2: start the adapters and new layers from this mini v2 checkpoint
    freeze: list[str] = field(default_factory=list)
    lr: float | None = None
    steps: int | None = None
    max_seq_len: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 42
    resume: bool = False
    max_minutes: float | None = None
    stop_at: int | None = None  # stop (and save) after this step of the ``steps`` schedule: a budget cut, by step
    save_every: int = 500
    eval_every: int = 0
    eval_items: int = 256
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    augment: float = 1.0  # probability of each formatter augmentation
    max_items: int | None = None
    unsafe_repeat: int = 1  # each unsafe train example is used this many times (safe items dominate the sets)
    reading: int = 0  # auxiliary transcription items (mmguard.train.reading), aimed at learning to read
    save_dtype: str = "auto"  # "auto": keep the training dtype; "bfloat16"/"float16" to shrink the files
    autocast: str = "none"  # "bf16": bfloat16 autocast (CPUs with AMX/AVX512-BF16 run it ~2x faster than fp32)
    transcripts: bool = False  # typographic items also in the form of the OCR check (mmguard.ocr)
    share_prefix: bool = False  # text batches of one template compute its prefix (task line, categories) once
    compile: bool = False  # torch.compile each transformer layer (engine.compile_layers): faster steps after warm-up
    trim_memory: bool = False  # hand freed heap pages back to the OS (glibc malloc_trim) ...
    trim_every: int = 1  # ... after every this many steps
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    log_every: int = 10

    def resolved(self) -> TrainConfig:
        """Fill in defaults: the 11B recipe for LoRA, small-model defaults for full fine-tuning."""
        c = TrainConfig(**asdict(self))
        defaults = RECIPE_11B if c.lora else {"lr": 1e-3, "max_seq_len": 1024, "steps": 1000}
        for k, v in defaults.items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        for f in c.freeze:
            if f not in FREEZE_CHOICES:
                raise ValueError(f"unknown --freeze {f!r}; choose from {', '.join(FREEZE_CHOICES)}")
        if (c.base is None) == (c.init is None):
            raise ValueError("give exactly one of --base (a checkpoint) or --init mini")
        if c.init not in (None, "mini", "mini2"):
            raise ValueError(f"unknown --init {c.init!r}; choose 'mini' (from scratch) or 'mini2' (SmolLM2 base)")
        if c.init == "mini2" and not c.lora:
            raise ValueError("--init mini2 trains LoRA adapters (give --lora): only they and the new layers ship")
        if c.warm_start is not None:
            if c.init != "mini2":
                raise ValueError("--warm-start continues a mini v2 checkpoint: it needs --init mini2 --lora")
            if not (Path(c.warm_start) / "adapter_config.json").is_file():
                raise ValueError(f"--warm-start {c.warm_start}: no adapter_config.json (not mini v2)")
        if c.lora_from_layer < 0 or (c.lora_from_layer and not (c.lora and c.init == "mini2")):
            raise ValueError("--lora-from-layer N needs --init mini2 --lora and N >= 0")
        if c.trim_every < 1 or (c.trim_every != 1 and not c.trim_memory):
            raise ValueError("--trim-every N needs --trim-memory and N >= 1")
        if c.autocast not in ("none", "bf16"):
            raise ValueError(f"unknown --autocast {c.autocast!r}; choose none or bf16")
        if c.stop_at is not None and not 1 <= c.stop_at <= (c.steps or c.stop_at):
            raise ValueError(f"--stop-at {c.stop_at}: give a step from 1 to --steps ({c.steps})")
        return c
