"""The Llama 3.2 Vision tokenizer, built offline, and injection-proof prompt encoding.

The byte-level BPE ranks come from Meta's ``llama-models`` package (``llama3/tokenizer.model``, tiktoken
format); transformers' ``TikTokenConverter`` turns them into a fast tokenizer. Special tokens take the
names and ids of the Hugging Face Llama 3.2 Vision tokenizer: ids 128000-128255 as in Llama 3.1 and
``<|image|>`` appended at 128256.

Encoding never lets user text become a control token: a rendered prompt is a sequence of segments,
template-owned special tokens are inserted by id, and every text segment is encoded with special-token
matching switched off (``split_special_tokens=True``), so a user who types ``<|eot_id|>`` gets the
ordinary tokens for those characters.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .prompt import RenderedPrompt

__all__ = [
    "BOS_ID",
    "EOT_ID",
    "IMAGE_ID",
    "LLAMA3_PATTERN",
    "SAFE_ID",
    "UNSAFE_ID",
    "build_llama3_tokenizer",
    "encode_prompt",
    "encode_text",
    "llama3_special_tokens",
    "load_default_tokenizer",
]

BOS_ID = 128000
EOT_ID = 128009
IMAGE_ID = 128256
SAFE_ID = 19193
UNSAFE_ID = 39257
DOUBLE_NEWLINE_ID = 271

# Llama 3 pre-tokenisation regex (llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_special_tokens() -> dict[str, int]:
    """Names and ids of the special tokens of the Hugging Face Llama 3.2 Vision tokenizer."""
    named = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128002: "<|reserved_special_token_0|>",
        128003: "<|reserved_special_token_1|>",
        128004: "<|finetune_right_pad_id|>",
        128005: "<|reserved_special_token_2|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128010: "<|python_tag|>",
    }
    tokens = {name: i for i, name in named.items()}
    for k, i in enumerate(range(128011, 128256)):
        tokens[f"<|reserved_special_token_{3 + k}|>"] = i
    tokens["<|image|>"] = IMAGE_ID
    return tokens


def _tiktoken_model_path() -> Path:
    import llama_models

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"llama-models does not ship {path}; reinstall the 'llama-models' package")
    return path


def build_llama3_tokenizer() -> PreTrainedTokenizerBase:
    """Build the exact Llama 3.2 Vision tokenizer from ``llama-models`` (no network)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(_tiktoken_model_path()), pattern=LLAMA3_PATTERN)
    backend = converter.converted()
    specials = llama3_special_tokens()
    base_size = backend.get_vocab_size()
    if base_size != 128000:
        raise RuntimeError(f"unexpected Llama 3 base vocabulary size {base_size} (expected 128000)")
    # added in id order so each lands on its Hugging Face id
    backend.add_special_tokens(
        [AddedToken(name, normalized=False, special=True) for name, _ in sorted(specials.items(), key=lambda kv: kv[1])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    for name, i in specials.items():
        got = tok.convert_tokens_to_ids(name)
        if got != i:
            raise RuntimeError(f"special token {name} got id {got}, expected {i}")
    return tok


def _cache_dir() -> Path:
    return Path(os.environ.get("MMGUARD_CACHE", Path.home() / ".cache" / "mmguard"))


@lru_cache(maxsize=1)
def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """The Llama 3.2 Vision tokenizer, built once and cached on disk (building takes ~20 s)."""
    from transformers import AutoTokenizer

    target = _cache_dir() / "llama3.2-vision-tokenizer"
    if (target / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    tok = build_llama3_tokenizer()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    with contextlib.suppress(OSError):  # another process won the race; its copy is identical
        tmp.replace(target)
    return AutoTokenizer.from_pretrained(target if (target / "tokenizer.json").is_file() else tmp)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Encode text that must never produce a special token, whatever characters it holds."""
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return list(ids)


def special_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id or not isinstance(i, int):
        raise ValueError(f"tokenizer has no special token {token}")
    return i


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: RenderedPrompt) -> list[int]:
    """Token ids of a rendered prompt: template specials by id, all text as plain text. Exactly one BOS."""
    ids: list[int] = []
    for seg in prompt.segments:
        if seg.special:
            ids.append(special_id(tokenizer, seg.text))
        else:
            ids.extend(encode_text(tokenizer, seg.text))
    return ids
