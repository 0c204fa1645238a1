"""Training on transformers' ``Trainer``.

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

import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["FREEZE_CHOICES", "TrainConfig", "build_mini_model", "mini_config", "train"]

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


# -- mmguard-mini architecture -----------------------------------------------------------------------
MINI_TILE_SIZE = 112


def mini_config() -> Any:
    """The mmguard-mini architecture: Llama 3 vocabulary, hidden 48, 112 px tiles (see the model card).

    Four 112 px tiles show a square image at 224 px, where FigStep-size typography is still legible;
    at 56 px tiles (v1-v3) it was not, and the model learned to ignore images.
    """
    from ..tiny import small_mllama_config

    return small_mllama_config(
        vision={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "image_size": MINI_TILE_SIZE},
        text={
            "hidden_size": 48,  # the two 128k-row vocabulary matrices are ~95% of the bytes: keep the file < 30 MB
            "num_hidden_layers": 10,  # depth is nearly free in bytes
            "cross_attention_layers": [2, 5, 8],
            "intermediate_size": 256,
            "max_position_embeddings": 8192,
        },
    )


def build_mini_model(seed: int = 0, gate_init: float = 0.5) -> Any:
    """A freshly initialised mmguard-mini (random weights, deterministic given ``seed``)."""
    from ..tiny import random_mllama

    return random_mllama(mini_config(), seed=seed, gate_init=gate_init)


# -- freezing / LoRA ---------------------------------------------------------------------------------
def _is_cross_attention(name: str, cross_layers: set[int]) -> bool:
    marker = "language_model.layers."
    if marker not in name:
        return False
    idx = int(name.split(marker, 1)[1].split(".", 1)[0])
    return idx in cross_layers


def apply_freeze(model: Any, freeze: list[str]) -> dict[str, int]:
    """Freeze parts of an Mllama model; returns counts of trainable and frozen parameters."""
    cross = set(model.config.text_config.cross_attention_layers)
    for name, p in model.named_parameters():
        part = "other"
        if "vision_model" in name or "multi_modal_projector" in name:
            part = "vision"
        elif _is_cross_attention(name, cross):
            part = "cross-attention"
        elif "language_model" in name or "lm_head" in name:
            part = "language"
        if part in freeze:
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    """LoRA on the language model. For ``--init mini2`` the adapters go on the pretrained (self-attention)
    layers only (``lora_from_layer``: those from that layer up), and the layers the base adds fresh
    (cross-attention, vision tower, projector) are trained whole (``modules_to_save``): together they are
    all a mini v2 checkpoint ships. Below the lowest layer with a trainable weight autograd runs no backward:
    on text-only batches (cross-attention layers skipped) that is ``lora_from_layer``; an image batch still
    backpropagates down to the first cross-attention layer, whose weights train."""
    from peft import LoraConfig, get_peft_model

    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    modules_to_save = None
    if cfg.init == "mini2":
        tc = model.config.text_config
        layers = [i for i in range(cfg.lora_from_layer, tc.num_hidden_layers) if i not in tc.cross_attention_layers]
        if not layers:
            raise ValueError(f"--lora-from-layer {cfg.lora_from_layer}: the model has {tc.num_hidden_layers} layers")
        pretrained = "|".join(str(i) for i in layers)
        targets = rf".*language_model\.layers\.({pretrained})\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
        modules_to_save = ["vision_model", "multi_modal_projector",
                           *(f"language_model.layers.{i}" for i in tc.cross_attention_layers)]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, lcfg)
    # The embeddings are never a target and stay frozen, so no save needs them. peft's default ("auto") asks the
    # Hub for the base's config at every save (checkpoints included) when the base is not a local folder (mini2's
    # is named by BASE_NAME): offline that is a failed lookup and two warnings each time, or a DNS wait.
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
    return peft_model


# -- data --------------------------------------------------------------------------------------------
@dataclass
class SequenceItem:
    """One training sequence: token ids, labels (-100 off the answer) and its image, if any."""

    input_ids: list[int]
    labels: list[int]
    image: Any  # PackedImage / reading.RenderedText (decoded or rendered at collation), a PIL image, or None


class PackedImage:
    """A training image held as PNG bytes (lossless) and decoded at collation: tens of thousands of
    decoded 760 px images would hold gigabytes."""

    __slots__ = ("data",)

    def __init__(self, image: Any) -> None:
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        self.data = buf.getvalue()

    def load(self) -> Any:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.data)) as im:
            return im.convert("RGB")


def _truncate(
    ids: list[int], labels: list[int], max_len: int, image_id: int
) -> tuple[list[int], list[int]] | None:
    """Cut the middle of the prompt so the sequence fits ``max_len``; the answer is always kept."""
    if len(ids) <= max_len:
        return ids, labels
    answer_start = next(i for i, lab in enumerate(labels) if lab != -100)
    tail_prompt = min(64, answer_start)
    head = max_len - (len(ids) - answer_start) - tail_prompt
    if head < 32:
        return None
    new_ids = ids[:head] + ids[answer_start - tail_prompt:]
    new_labels = labels[:head] + labels[answer_start - tail_prompt:]
    if (image_id in ids) != (image_id in new_ids):
        return None
    return new_ids, new_labels


def load_training_items(paths: list[str], tokenizer: Any, cfg: TrainConfig, split: str = "train",
                        limit: int | None = None) -> tuple[list[SequenceItem], dict[str, int]]:
    from ..data.formatter import AugmentationConfig, Formatter, token_format, tokenize
    from ..data.schema import read_examples

    a = cfg.augment if split == "train" else 0.0
    formatter = Formatter(config=AugmentationConfig(a, a, a), seed=cfg.seed)
    items: list[SequenceItem] = []
    stats = {"examples": 0, "skipped_untrainable": 0, "truncated": 0, "dropped_long": 0}
    reading_pool: list[str] = []  # texts for --reading: every trainable text prompt of the split
    for path in paths:
        base = Path(path).parent
        examples = [ex for ex in read_examples(path) if ex.split == split]
        if split == "train" and cfg.reading:
            reading_pool += [ex.prompt_text for ex in examples
                             if ex.trainable and ex.task == "prompt" and ex.modality == "text"]  # fmt: skip
        balanced = _balanced_sources(examples)
        for ex in examples:
            if not ex.trainable:
                stats["skipped_untrainable"] += 1
                continue
            if limit is not None and stats["examples"] >= limit:
                break
            stats["examples"] += 1
            repeated = ex.label == "unsafe" or ex.source in balanced
            repeat = cfg.unsafe_repeat if (split == "train" and repeated) else 1
            # formatting is seeded per example, so one call serves every repeat and the image is held once
            forms = formatter.format(ex, base)
            if cfg.transcripts and split == "train" and ex.meta.get("kind") == "typographic":
                forms += formatter.format(transcript_example(ex), base)
            # one PNG per decoded image, shared by the example's repeats and augmentations (keyed while the
            # example's images are alive, so an id is never reused)
            packed: dict[int, PackedImage] = {}
            for t in forms * repeat:
                tok = tokenize(tokenizer, t)
                assert cfg.max_seq_len is not None
                cut = _truncate(tok.input_ids, tok.labels, cfg.max_seq_len, token_format(tokenizer).image_id)
                if cut is None:
                    stats["dropped_long"] += 1
                    continue
                if len(cut[0]) < len(tok.input_ids):
                    stats["truncated"] += 1
                image = tok.image
                if image is not None:
                    if id(image) not in packed:
                        packed[id(image)] = PackedImage(image)
                    image = packed[id(image)]
                items.append(SequenceItem(cut[0], cut[1], image))
    if split == "train" and cfg.reading:
        reading = reading_items(reading_pool, tokenizer, cfg.reading, cfg.seed)
        stats["reading"] = len(reading)
        items += reading
    stats["items"] = len(items)
    return items, stats


def transcript_example(ex: Any) -> Any:
    """A typographic example in the form of the guard's OCR check (:func:`mmguard.ocr.with_transcription`):
    text only, with what OCR reads from the rendered image (the request, then the empty items)."""
    from ..data.schema import Example
    from ..data.synth import typographic_text
    from ..ocr import TRANSCRIPTION_PREFIX, normalise_text

    read = normalise_text(typographic_text(str(ex.meta["rendered_text"])) + " 1. 2. 3.")
    messages = []
    for msg in ex.messages:
        content = msg["content"]
        if isinstance(content, list) and any(p.get("type") != "text" for p in content):
            content = [p for p in content if p.get("type") == "text"]
            content.append({"type": "text", "text": TRANSCRIPTION_PREFIX + read})
        messages.append({**msg, "content": content})
    return Example(id=ex.id + ":transcript", source=ex.source, license=ex.license, split=ex.split, task=ex.task,
                   messages=messages, label=ex.label, codes=list(ex.codes), modality="text",
                   trainable=ex.trainable, meta={**ex.meta, "kind": "typographic_transcript"})


def reading_items(prompts: list[str], tokenizer: Any, n: int, seed: int) -> list[SequenceItem]:
    """``n`` transcription items (see :mod:`mmguard.train.reading`) drawn from ``prompts``, harmful and
    benign alike; their images are rendered at collation."""
    from .reading import RenderedText, reading_prompt_ids, reading_texts, reading_tokens

    prompt_ids = reading_prompt_ids(tokenizer)
    items = []
    for text in reading_texts(prompts, n, seed):
        ids, labels = reading_tokens(tokenizer, text, prompt_ids)
        items.append(SequenceItem(ids, labels, RenderedText(text)))
    return items


def _balanced_sources(examples: list[Any], min_unsafe_share: float = 0.4) -> set[str]:
    """Sources whose trainable items are at least ``min_unsafe_share`` unsafe and include safe ones.

    ``--unsafe-repeat`` makes up for the many all-safe sources; inside a source that already holds both
    labels in similar numbers (the typographic items are 1:1 by construction) it repeats the safe items
    too. Otherwise repetition would turn the form of such items (typography, a fixed instruction) into a
    label signal: mini v4 learned "typography means unsafe" that way.
    """
    counts: dict[str, list[int]] = {}
    for ex in examples:
        if ex.trainable:
            c = counts.setdefault(ex.source, [0, 0])
            c[ex.label == "unsafe"] += 1
    return {src for src, (safe, unsafe) in counts.items() if safe and unsafe / (safe + unsafe) >= min_unsafe_share}


def make_batches(items: list[SequenceItem], batch_size: int, seed: int,
                 share_prefix: bool = False) -> list[list[SequenceItem]]:
    """Shuffled batches, each all-image or all-text, grouped loosely by length to limit padding.

    ``share_prefix``: text items are first grouped by their template (the first :data:`TEMPLATE_KEY_TOKENS`
    token ids: same policy, same judged role), so most text batches share the template prefix that
    :func:`answer_logits` computes once; the groups' remainders make mixed batches as before."""
    rng = random.Random(seed)
    batches: list[list[SequenceItem]] = []

    def add(group: list[SequenceItem], whole_only: bool) -> list[SequenceItem]:
        rng.shuffle(group)
        # sort within windows of 32 batches: less padding, still random
        window = batch_size * 32
        for s in range(0, len(group), window):
            chunk = sorted(group[s:s + window], key=lambda it: len(it.input_ids))
            for i in range(0, len(chunk), batch_size):
                if whole_only and len(chunk) - i < batch_size:
                    return chunk[i:]  # the group's remainder
                batches.append(chunk[i:i + batch_size])
        return []

    for want_image in (True, False):
        group = [it for it in items if (it.image is not None) == want_image]
        if share_prefix and not want_image:
            templates: dict[tuple[int, ...], list[SequenceItem]] = {}
            for it in group:
                templates.setdefault(tuple(it.input_ids[:TEMPLATE_KEY_TOKENS]), []).append(it)
            group = [rest for members in templates.values() for rest in add(members, whole_only=True)]
        add(group, whole_only=False)
    rng.shuffle(batches)
    return batches


TEMPLATE_KEY_TOKENS = 96  # within the task line + 13 categories (~135 tokens with Llama 3's tokenizer)
MIN_SHARED_PREFIX = 32  # a shorter common prefix is not worth a second forward call


def shared_prefix_len(items: list[SequenceItem]) -> int:
    """How many leading tokens every row of a text batch shares, stopping before the position that predicts
    the first answer token (its hidden state must come from the rows' own forward). 0: none worth sharing."""
    if len(items) < 2 or any(it.image is not None for it in items):
        return 0
    first = items[0].input_ids
    limit = min(next(i for i, lab in enumerate(it.labels) if lab != -100) for it in items) - 1
    n = 0
    while n < limit and all(it.input_ids[n] == first[n] for it in items[1:]):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, batches: list[list[SequenceItem]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[SequenceItem]:
        return self.batches[i]


class Collator:
    """Turns one ready-made batch into model inputs with the engine's left-padding logic, plus labels.

    ``share_prefix``: a text batch whose rows share a prefix (:func:`shared_prefix_len`) becomes
    ``prefix_ids`` (1, P) plus the rows' remainders, right-padded (causal attention never looks right, so
    the padding needs no mask): :func:`answer_logits` runs the prefix once and every row from its KV."""

    def __init__(self, engine: Any, share_prefix: bool = False) -> None:
        self.engine = engine
        self.share_prefix = share_prefix

    def __call__(self, wrapped: list[list[SequenceItem]]) -> dict[str, Any]:
        from ..engine import EncodedItem
        from .reading import RenderedText

        items = [it for batch in wrapped for it in batch]
        shared = shared_prefix_len(items) if self.share_prefix else 0
        if shared:
            width = max(len(it.input_ids) for it in items) - shared
            ids = torch.full((len(items), width), self.engine.pad_id, dtype=torch.long)
            labels = torch.full((len(items), width), -100, dtype=torch.long)
            for i, it in enumerate(items):
                ids[i, :len(it.input_ids) - shared] = torch.tensor(it.input_ids[shared:], dtype=torch.long)
                labels[i, :len(it.labels) - shared] = torch.tensor(it.labels[shared:], dtype=torch.long)
            return {"prefix_ids": torch.tensor([items[0].input_ids[:shared]], dtype=torch.long),
                    "input_ids": ids, "labels": labels}
        images = [it.image.load() if isinstance(it.image, (RenderedText, PackedImage)) else it.image for it in items]
        enc = [EncodedItem(it.input_ids, im, None) for it, im in zip(items, images, strict=True)]  # type: ignore[arg-type]
        batch = self.engine.collate(enc)
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for i, it in enumerate(items):
            labels[i, width - len(it.labels):] = torch.tensor(it.labels, dtype=torch.long)
        batch["labels"] = labels
        return batch


def answer_logits(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` at the supervised positions only (the vocabulary projection runs only there)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    prefix = inputs.pop("prefix_ids", None)
    base = model
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    if prefix is not None:
        inputs.update(_shared_prefix_inputs(base, prefix, inputs["input_ids"]))
    hidden = base.model(**inputs, use_cache=prefix is not None).last_hidden_state
    target = labels[:, 1:]
    mask = target != -100
    return base.lm_head(hidden[:, :-1][mask]), target[mask]


def _shared_prefix_inputs(base: Any, prefix: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
    """The prefix's KV, computed once (with gradients) and broadcast over the rows, as a cache the rows'
    forward extends; their positions continue the prefix's."""
    from transformers import DynamicCache

    from ..engine import _cache_of

    cache = _cache_of(base.model(input_ids=prefix, use_cache=True))
    cross = set(base.config.text_config.cross_attention_layers)
    n = rows.shape[0]
    data = [(None, None) if idx in cross else (layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1))
            for idx, layer in enumerate(cache.layers)]
    start = prefix.shape[1]
    positions = torch.arange(start, start + rows.shape[1], device=rows.device)[None].expand(n, -1)
    return {"cache": DynamicCache(ddp_cache_data=data, config=base.config), "position_ids": positions}


def answer_loss(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over supervised positions."""
    logits, target = answer_logits(model, inputs)
    return torch.nn.functional.cross_entropy(logits.float(), target)


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

    from ..engine import Engine, make_image_processor, resolve_device, resolve_dtype
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
        from ..engine import _load_image_processor
        from ..termio import library_bars_only_on_terminal

        base_dir = smollm2_mllama_base()
        with library_bars_only_on_terminal():
            model = MllamaForConditionalGeneration.from_pretrained(base_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        processor = _load_image_processor(base_dir, int(model.config.vision_config.image_size))
    else:
        from ..engine import load_engine

        assert cfg.base is not None
        # the engine's loader: a checkpoint that ships adapters on a rebuilt base (mini v2) arrives merged
        loaded = load_engine(cfg.base, device="cpu", dtype=dtype)
        model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.image_processor
    model.to(dtype)
    counts = apply_freeze(model, cfg.freeze)
    engine = Engine(model, tokenizer, processor, device="cpu", dtype=dtype, source=cfg.base or "mini")
    if cfg.lora and cfg.warm_start:
        from peft import PeftModel

        # the same adapters and new layers, trainable again: the output ships like a fresh mini v2 run's
        model = PeftModel.from_pretrained(model, cfg.warm_start, is_trainable=True)
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
        raise ValueError("no trainable train-split items in " + ", ".join(cfg.data))
    batches = make_batches(items, cfg.batch_size, cfg.seed, cfg.share_prefix)
    eval_ds = None
    if cfg.eval_every:
        ev_items, _ = load_training_items(cfg.data, tokenizer, cfg, "validation", cfg.eval_items)
        if ev_items:
            eval_ds = _BatchDataset(make_batches(ev_items, cfg.batch_size, cfg.seed))
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
    trainer = trainer_cls(model=model, args=args, train_dataset=_BatchDataset(batches), eval_dataset=eval_ds,
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
