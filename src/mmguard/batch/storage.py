"""Where batch inputs and outputs live: local paths, or URIs (``s3://``, ``gs://``, ``memory://`` ...)
read and written through fsspec, or through pyarrow's filesystems when fsspec lacks the protocol.

Only what a batch job needs: sizes, bounded line reading, byte ranges, atomic writes, listing.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..files import atomic_output

__all__ = ["StorageError", "is_uri", "iter_lines", "join", "open_storage", "parent"]

_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_BLOCK = 1 << 20


class StorageError(OSError):
    """A path or URI cannot be read or written; the message names it."""


def is_uri(location: str) -> bool:
    return bool(_SCHEME_RE.match(location)) and not location.startswith("file://")


def _local(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def join(base: str, name: str) -> str:
    if is_uri(base):
        return base.rstrip("/") + "/" + name
    return str(Path(_local(base)) / name)


def parent(location: str) -> str:
    if is_uri(location):
        scheme, _, rest = location.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(_local(location)).parent)


def iter_lines(fh: IO[bytes], max_bytes: int, start: int = 0) -> Iterator[tuple[int, int, bytes | None]]:
    """``(start, end, line)`` for every line of a binary stream, from byte offset ``start``.

    A line longer than ``max_bytes`` is skipped in blocks and yielded as ``None``: one hostile line never
    sits in memory whole. ``line`` keeps its newline.
    """
    pos = start
    while True:
        line = fh.readline(max_bytes + 1)
        if not line:
            return
        end = pos + len(line)
        if len(line) > max_bytes and not line.endswith(b"\n"):  # as mmguard.jsonl.iter_lines
            while not line.endswith(b"\n"):  # skip the rest of the oversized line
                line = fh.readline(_BLOCK)
                if not line:
                    break
                end += len(line)
            yield pos, end, None
        else:
            yield pos, end, line
        pos = end


class Storage:
    """One filesystem: local, fsspec or pyarrow."""

    def size(self, path: str) -> int:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def open_read(self, path: str) -> IO[bytes]:
        raise NotImplementedError

    def read_range(self, path: str, start: int, end: int) -> IO[bytes]:
        """A stream positioned at ``start`` (callers stop reading at ``end``)."""
        fh = self.open_read(path)
        fh.seek(start)
        return fh

    def read_bytes(self, path: str, max_bytes: int) -> bytes:
        size = self.size(path)
        if size > max_bytes:
            raise StorageError(f"{path} has {size} bytes, over the limit of {max_bytes}")
        with self.open_read(path) as fh:
            return fh.read(max_bytes + 1)[:max_bytes]

    def write_atomic(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        raise NotImplementedError

    def remove(self, path: str) -> None:
        raise NotImplementedError

    def makedirs(self, path: str) -> None:
        raise NotImplementedError


class LocalStorage(Storage):
    def size(self, path: str) -> int:
        return os.stat(_local(path)).st_size

    def exists(self, path: str) -> bool:
        return os.path.exists(_local(path))

    def open_read(self, path: str) -> IO[bytes]:
        local = _local(path)
        # only regular files: a FIFO blocks the open forever, /dev/zero never ends
        if os.path.exists(local) and not stat.S_ISREG(os.stat(local).st_mode):
            raise StorageError(f"{path} is not a regular file")
        return open(local, "rb")

    def write_atomic(self, path: str, data: bytes) -> None:
        # readers see the old file or the whole new one, also after a crash
        with atomic_output(Path(_local(path)), durable=True) as fh:
            fh.write(data)

    def listdir(self, path: str) -> list[str]:
        p = Path(_local(path))
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def remove(self, path: str) -> None:
        Path(_local(path)).unlink(missing_ok=True)

    def makedirs(self, path: str) -> None:
        Path(_local(path)).mkdir(parents=True, exist_ok=True)


class FsspecStorage(Storage):
    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def open_read(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "rb")  # type: ignore[no-any-return]

    def write_atomic(self, path: str, data: bytes) -> None:
        # object stores publish an object whole when its upload completes; the temp name keeps a
        # half-written upload from ever carrying the final name on filesystems that stream
        tmp = f"{path}.tmp-{os.getpid()}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    def listdir(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(str(p).rstrip("/")) for p in self.fs.ls(path, detail=False))

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)


class ArrowStorage(Storage):
    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _info(self, path: str) -> Any:
        return self.fs.get_file_info(path)

    def size(self, path: str) -> int:
        return int(self._info(path).size)

    def exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info(path).type != pafs.FileType.NotFound)

    def open_read(self, path: str) -> IO[bytes]:
        return self.fs.open_input_file(path)  # type: ignore[no-any-return]

    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)

    def listdir(self, path: str) -> list[str]:
        import pyarrow.fs as pafs

        if not self.exists(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in infos)

    def remove(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)


def open_storage(location: str) -> tuple[Storage, str]:
    """The filesystem of ``location`` and the path to give it.

    Local paths (and ``file://``) need nothing; other URIs use fsspec when it knows the protocol and its
    library (s3fs, gcsfs, ...) is installed, else pyarrow's filesystems (S3, GCS, HDFS).
    """
    if not is_uri(location):
        return LocalStorage(), _local(location)
    errors: list[str] = []
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return FsspecStorage(fs), path
    except ImportError as err:
        errors.append(f"fsspec: {err}")
    except ValueError as err:
        errors.append(f"fsspec: {err}")
    try:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        return ArrowStorage(fs), path
    except ImportError as err:
        errors.append(f"pyarrow: {err}")
    except Exception as err:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError for unknown schemes
        errors.append(f"pyarrow: {err}")
    raise StorageError(f"cannot open {location}: no installed filesystem library handles it ({'; '.join(errors)})")
