"""Loading guard checkpoints: the weights (a whole Mllama, or a base plus adapters), the tokenizer, the image
processor and the checkpoint's ``mmguard.json``, each checked so that a broken checkpoint is one
:class:`mmguard.engine.EngineError` naming the file, never a traceback, and never a guard that quietly runs on
random or wrong weights: weights missing from the checkpoint (transformers fills them with random values), adapter
tensors that do not match their configuration (peft drops them), a configuration far larger than its weight files
(a 67 MB file whose config.json says 100,000 layers allocated without bound), a tokenizer file that does not load
(it fell back to the Llama 3 tokenizer), or control tokens that user text could spell.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .engine import Engine, EngineError
from .files import read_json_object

__all__ = [
    "IMAGE_VERDICT_RULES",
    "MODEL_INFO_FILE",
    "load_engine",
    "load_image_processor",
    "make_image_processor",
    "model_thresholds",
    "read_model_info",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _image_processor_class() -> Any:
    # transformers >= 5 splits the processor into a torchvision and a PIL backend; torchvision is optional
    try:
        import torchvision  # noqa: F401
        from transformers import MllamaImageProcessor

        return MllamaImageProcessor
    except Exception:
        try:
            from transformers import MllamaImageProcessorPil

            return MllamaImageProcessorPil
        except ImportError:
            from transformers import MllamaImageProcessor

            return MllamaImageProcessor


def make_image_processor(tile_size: int = 560, max_image_tiles: int = 4) -> Any:
    """transformers' Mllama image processor with the Llama 3.2 Vision settings and the given tile size."""
    cls = _image_processor_class()
    return cls(
        do_convert_rgb=True,
        do_normalize=True,
        do_pad=True,
        do_rescale=True,
        do_resize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        max_image_tiles=max_image_tiles,
        resample=2,
        rescale_factor=1 / 255,
        size={"height": tile_size, "width": tile_size},
    )


def load_image_processor(source: str | Path, tile_size: int) -> Any:
    cls = _image_processor_class()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proc = cls.from_pretrained(source)
    except Exception as err:  # a checkpoint without preprocessor_config.json
        log.info("no image processor config in %s (%s); using Llama 3.2 Vision defaults", source, err)
        return make_image_processor(tile_size)
    size = getattr(proc, "size", None)
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    if height is not None and height != tile_size:
        raise EngineError(f"image processor tile size {height} differs from the vision model's image_size {tile_size}")
    if getattr(proc, "max_image_tiles", 4) > 4:
        proc.max_image_tiles = 4
    return proc


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise EngineError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    """``auto`` (CUDA when there is one, else the CPU) or a torch device name, checked: a name torch does not
    know, ``meta`` (no data), or an accelerator this machine lacks is an :class:`EngineError` naming it."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise EngineError(f"unknown device {str(device)[:40]!r}; use auto, cpu, cuda or cuda:N") from None
    if kind == "meta":
        raise EngineError("device 'meta' holds no data; use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise EngineError(f"device {device!r} requested but MPS is not available")
    return device


MODEL_INFO_FILE = "mmguard.json"
IMAGE_VERDICT_RULES = ("max", "text")  # how a guard with OCR combines its checks (Guard.image_verdict)
# mmguard.json's fields and their JSON types ("false" in quotes had read as true)
_INFO_TYPES: dict[str, tuple[type, str]] = {
    "base": (str, "a string"), "adapter": (bool, "true or false"), "reads_text_in_images": (bool, "true or false"),
    "image_verdict": (str, "a string"), "thresholds": (dict, "an object"),
}


def read_model_info(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``mmguard.json``, checked before any weights load: ``base`` (a base rebuilt locally,
    :mod:`mmguard.base_models`), ``adapter`` (the folder holds peft adapters for it), ``reads_text_in_images``
    (false: the guard's ``read_text="auto"`` turns OCR on), ``image_verdict`` (:data:`IMAGE_VERDICT_RULES`) and
    ``thresholds`` (:func:`model_thresholds`). Absent (``{}``) for ordinary checkpoints such as Llama Guard 3
    Vision."""
    path = Path(directory) / MODEL_INFO_FILE
    if not path.exists():
        return {}
    try:
        info = read_json_object(path)
    except ValueError as err:
        raise EngineError(str(err)) from None
    for key, (kind, said) in _INFO_TYPES.items():
        value = info.get(key)
        if value is not None and not isinstance(value, kind):
            raise EngineError(f"{path}: {key} must be {said}, got {str(value)[:80]!r}")
    rule = info.get("image_verdict")
    if rule is not None and rule not in IMAGE_VERDICT_RULES:
        raise EngineError(f"{path}: image_verdict must be one of {', '.join(IMAGE_VERDICT_RULES)}, got {rule[:80]!r}")
    try:
        model_thresholds(info)
    except ValueError as err:
        raise EngineError(f"{path}: {err}") from None
    return info


def model_thresholds(info: dict[str, Any]) -> dict[str, float]:
    """``mmguard.json``'s ``thresholds`` (per task, chosen on validation), checked."""
    raw = info.get("thresholds")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not set(raw) <= {"prompt", "response"}:
        raise ValueError(f"mmguard.json: thresholds must map prompt / response to a number, got {str(raw)[:80]!r}")
    out = {}
    for task, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"mmguard.json: thresholds.{task} must be within [0, 1], got {value!r}")
        out[task] = float(value)
    return out


# -- checks of what transformers and peft would take without a word ----------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def check_config_fits_weights(weights: str | Path, config: Any) -> None:
    """Refuse a configuration that cannot be what the weight files hold, before the model is built: its size
    must be positive, and its parameters (counted low: the MLPs and embeddings only) must fit in the files at
    half a byte each (4-bit). Building a model allocates all of them first."""
    folder = Path(weights)
    if not folder.is_dir():
        return  # a hub id: transformers fetches and checks
    sizes = []
    for part in (config.text_config, config.vision_config):
        dims = {k: getattr(part, k, None) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")}
        if any(not isinstance(v, int) or v <= 0 for v in dims.values()):
            raise EngineError(f"{folder / 'config.json'}: {type(part).__name__} needs positive whole numbers for "
                              f"{', '.join(dims)}, got {dims}")
        sizes.append(dims)
    vocab = getattr(config.text_config, "vocab_size", 0)
    if not isinstance(vocab, int) or vocab <= 0:
        raise EngineError(f"{folder / 'config.json'}: vocab_size must be a positive whole number, got {vocab!r}")
    layers_text = sizes[0]["num_hidden_layers"] + len(getattr(config.text_config, "cross_attention_layers", []) or [])
    low = (layers_text * 3 * sizes[0]["hidden_size"] * sizes[0]["intermediate_size"]
           + vocab * sizes[0]["hidden_size"]
           + sizes[1]["num_hidden_layers"] * 2 * sizes[1]["hidden_size"] * sizes[1]["intermediate_size"])
    on_disk = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if low / 2 > on_disk:
        raise EngineError(f"{folder / 'config.json'} describes a model of at least {low / 1e6:,.0f}M parameters, "
                          f"but its weight files hold {on_disk / 1e6:,.1f} MB: weights are missing, or the "
                          "configuration is not theirs")


def check_adapters(peft_model: Any, folder: Path) -> None:
    """Every tensor of the adapter file is used, and every adapter tensor of the model comes from it: peft drops
    tensors its configuration does not name, and keeps fresh ones it finds no tensor for (a target_modules of
    q_proj alone scored 5e-7 against 0.63, exit 0)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return  # a .bin adapter: peft reports its own errors
    with safe_open(str(path), "pt") as fh:
        stored = set(fh.keys())
    expected = set(get_peft_model_state_dict(peft_model))
    unused, missing = sorted(stored - expected), sorted(expected - stored)
    if unused or missing:
        example = (unused or missing)[0]
        raise EngineError(f"{path}: its tensors do not match adapter_config.json ({len(unused)} not used, "
                          f"{len(missing)} missing; e.g. {example})")


def load_engine(source: str | Path, *, device: str | None = "auto", dtype: str | torch.dtype | None = "auto",
                local_files_only: bool | None = None) -> Engine:
    """Load an Mllama guard checkpoint (a local directory or a Hugging Face id) with its tokenizer and
    image processor. A checkpoint that ships its own tokenizer uses it; otherwise the Llama 3.2 Vision
    tokenizer built from ``llama-models`` is used."""
    from transformers import AutoConfig, AutoTokenizer, MllamaForConditionalGeneration

    from .tiny import TINY_MARKER
    from .tokenizer import load_default_tokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    src = str(source)
    is_dir = Path(src).is_dir()
    if not is_dir and (src.startswith((".", "/", "~")) or (os.sep in src and not src.count("/") == 1)):
        raise EngineError(f"model directory not found: {src}")
    kwargs: dict[str, Any] = {}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    info = read_model_info(src) if is_dir else {}
    weights = src
    if info.get("base"):  # a guard that ships only what training changed (mmguard-mini v2)
        from .base_models import BaseModelError, resolve_base

        try:
            weights = str(resolve_base(str(info["base"])))
        except BaseModelError as err:
            raise EngineError(str(err)) from None
    elif is_dir and (Path(src) / "adapter_config.json").is_file() and not (Path(src) / "config.json").is_file():
        raise EngineError(f"{src} holds peft adapters but no {MODEL_INFO_FILE} naming their base (\"base\": ...)")
    if info.get("adapter"):
        absent = [n for n in ("adapter_config.json", "adapter_model.safetensors") if not (Path(src) / n).is_file()]
        if absent:
            raise EngineError(f"{src}: {MODEL_INFO_FILE} says it holds adapters, but {', '.join(absent)} is missing")
    try:
        config = AutoConfig.from_pretrained(weights, **kwargs)
    except Exception as err:
        raise EngineError(f"cannot load a model config from {src!r}: {_first_line(err)}") from None
    if getattr(config, "model_type", None) != "mllama":
        raise EngineError(f"{src} is a {getattr(config, 'model_type', '?')!r} model; mmguard needs an Mllama model")
    check_config_fits_weights(weights, config)
    from .termio import library_bars_only_on_terminal

    with warnings.catch_warnings(), library_bars_only_on_terminal():
        warnings.simplefilter("ignore")
        try:  # anything here is the checkpoint's fault: truncated files, shapes unlike config.json's, ...
            model, loading = MllamaForConditionalGeneration.from_pretrained(
                weights, dtype=torch_dtype, output_loading_info=True, **kwargs)
        except Exception as err:
            raise EngineError(f"cannot load the weights of {weights!r}: {_first_line(err)}") from None
        missing = list(loading.get("missing_keys") or [])
        if missing:  # transformers filled them with random values
            raise EngineError(f"{weights}: {len(missing)} weight tensor(s) the configuration needs are not in the "
                              f"checkpoint (e.g. {sorted(missing)[0]})")
        if info.get("adapter"):
            from peft import PeftModel

            try:
                adapted = PeftModel.from_pretrained(model, src)
            except Exception as err:
                raise EngineError(f"cannot load the adapters in {src!r}: {_first_line(err)}") from None
            check_adapters(adapted, Path(src))
            model = adapted.merge_and_unload()
            model.to(torch_dtype)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorator confuses mypy about .to
    model.eval()
    tokenizer: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except Exception as err:
        if is_dir and any((Path(src) / n).exists() for n in _TOKENIZER_FILES):  # there, but broken
            raise EngineError(f"cannot load the tokenizer in {src}: {_first_line(err)}") from None
        log.info("no tokenizer in %s; using the Llama 3.2 Vision tokenizer from llama-models", src)
        tokenizer = load_default_tokenizer()
    processor = load_image_processor(src, int(config.vision_config.image_size))
    engine = Engine(model, tokenizer, processor, device=device, dtype=torch_dtype, source=src)
    engine.is_random_weights = is_dir and (Path(src) / f"{TINY_MARKER}.json").exists()
    engine.model_info = info
    return engine
