"""Files written whole or not at all (a reader, or a resumed job, never sees a half-written one), and JSON
configuration files read strictly."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_output", "read_json_object"]


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a checkpoint's ``mmguard.json``, ``adapter_config.json``): a
    ``ValueError`` naming the file when it cannot be read, is not JSON, nests past the parser or is not an
    object."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


@contextmanager
def atomic_output(path: Path, *, text: bool = False, durable: bool = False) -> Iterator[IO[Any]]:
    """A file handle whose content appears at ``path`` only once the block ends without an error.

    It is written beside ``path`` as ``.NAME.PID.RANDOM.tmp`` (opened ``"x"``: the umask's mode, where mkstemp
    makes files owner-only), then renamed over ``path``; on an error it is removed. ``durable``: the file and
    the rename are fsync'ed (they survive a crash)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with tmp.open("x", encoding="utf-8") if text else tmp.open("xb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
