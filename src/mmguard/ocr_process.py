"""RapidOCR in a child process, so that a read past its deadline is stopped, not only abandoned.

OCR time grows with the text in an image: on 2 cores a 1200 px page of 99 long lines took 17.5 s, a
FigStep-like line 0.04 s. In-process, :class:`mmguard.ocr_reader.OcrReader` could only abandon a read at its
deadline; the read kept the one OCR worker busy, so every image submitted in those seconds (other
conversations in the batch, other clients of the server) timed out unread and was judged without its text:
one cheap image switched OCR off for everyone. :class:`ProcessOcrEngine` runs :class:`mmguard.ocr.RapidOcrEngine`
in a child process; at the deadline the reader calls :meth:`ProcessOcrEngine.cancel`, which kills the child,
and a fresh one starts at once (about a second) in the reader's worker thread. A crash of the native OCR
code on a hostile image ends the child, not the guard's process.

The child is ``python -m mmguard.ocr_process FD`` (not :mod:`multiprocessing`, whose spawn re-imports the
caller's main script: a user script without ``if __name__ == "__main__"`` would run again). It talks over a
socket pair: the parent sends pixels (a 12-byte header of height, width and channels, then the raw BGR
bytes), the child answers one JSON object per image. Nothing is unpickled on either side.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

from PIL import Image

from .ocr import OcrUnavailable, RapidOcrEngine, _describe, merge_reads, prepare_views

__all__ = ["DEFAULT_OCR_MEMORY_LIMIT_MB", "OcrStopped", "ProcessOcrEngine"]

DEFAULT_OCR_MEMORY_LIMIT_MB = 4096

_HEADER = struct.Struct("<III")  # height, width, channels of the BGR uint8 pixels that follow
_LENGTH = struct.Struct("<I")  # bytes of the JSON answer that follows


class OcrStopped(RuntimeError):
    """The read ended without an answer: stopped at its deadline, or the OCR process died."""


class ProcessOcrEngine:
    """An :class:`mmguard.ocr.OcrEngine` whose reads run in a child process and can be stopped.

    ``options`` are :class:`mmguard.ocr.RapidOcrEngine`'s keyword arguments. The constructor starts the
    child and waits for its engine to load (raises :class:`mmguard.ocr.OcrUnavailable` when it cannot).
    Reads are serialised (one child, one image at a time); ``restarts`` counts the children replaced.

    ``memory_limit_mb`` caps the child's data memory (``RLIMIT_DATA``; None: no cap; ignored where the
    ``resource`` module is missing). A read that needs more fails with a warning on the verdict instead of
    growing the host's memory; the densest page we measured peaked at 1.1 GB resident, and a 2,000 MB cap
    still read it.
    """

    def __init__(self, options: dict[str, Any] | None = None, *, start_timeout_s: float = 120.0,
                 memory_limit_mb: int | None = DEFAULT_OCR_MEMORY_LIMIT_MB) -> None:
        if memory_limit_mb is not None and memory_limit_mb < 256:
            raise ValueError(f"memory_limit_mb must be >= 256 (the engine alone takes ~400 MB), got {memory_limit_mb}")
        self.options = dict(options or {})
        self.max_side = int(self.options.get("max_side", 1280))
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self.identity = ""
        self._lock = threading.Lock()  # held for a whole read, and for a restart
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._busy = False
        self._cancelled: set[int] = set()  # threads whose read was stopped (maybe between two of its views)
        self._owner: int | None = None  # the thread whose view the child is reading
        self._start()

    # -- the child -------------------------------------------------------------------------------
    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # the child imports mmguard from wherever this process found it (a checkout on sys.path included)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mmguard.ocr_process", str(theirs.fileno()), json.dumps(self.options),
                 str(self.memory_limit_mb or 0)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
            )
        except OSError as err:
            ours.close()
            raise OcrUnavailable(f"cannot start the OCR process: {err}") from None
        finally:
            theirs.close()
        ours.settimeout(self.start_timeout_s)
        try:
            hello = _recv_answer(ours)
        except (OSError, OcrStopped) as err:
            proc.kill()
            proc.wait()
            ours.close()
            raise OcrUnavailable(f"the OCR process did not start: {err}") from None
        if "ready" not in hello:
            proc.wait()
            ours.close()
            raise OcrUnavailable(str(hello.get("error", hello)))
        ours.settimeout(None)  # a read is bounded by the reader's deadline and cancel(), not by the socket
        self._proc, self._sock, self.identity = proc, ours, str(hello["ready"])

    def _replace(self) -> None:
        """End the current child (whatever its state) and start a fresh one."""
        self.close()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        proc, sock = self._proc, self._sock
        self._proc = self._sock = None
        if sock is not None:
            sock.close()  # an idle child reads EOF and exits
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may already be gone
            self.close()

    # -- OcrEngine ---------------------------------------------------------------------------------
    def read(self, image: Image.Image) -> str:
        # here, so that at most max_side² pixels a view cross the socket; a large image is read in several views
        me = threading.get_ident()
        self._cancelled.discard(me)
        texts = []
        for view in prepare_views(image, self.max_side):
            if me in self._cancelled:  # stopped between two views: the rest are not read either
                self._cancelled.discard(me)
                raise OcrStopped("the OCR process was stopped at the deadline")
            texts.append(self._read_view(view))
        return merge_reads(texts)

    def _read_view(self, pixels: Any) -> str:
        height, width, channels = pixels.shape
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._replace()
            assert self._sock is not None
            self._busy, self._owner = True, threading.get_ident()
            try:
                self._sock.sendall(_HEADER.pack(height, width, channels) + pixels.tobytes())
                answer = _recv_answer(self._sock)
            except (OSError, ValueError, OcrStopped) as err:  # ValueError: a garbled answer
                stopped = self._owner in self._cancelled  # killed by cancel(), not dead of itself
                self._busy = False
                code = self._proc.wait() if self._proc is not None else None
                self._replace()  # now, in this (worker) thread: the next read finds a loaded child
                if stopped:
                    raise OcrStopped("the OCR process was stopped at the deadline") from None
                raise OcrStopped(f"the OCR process died (exit code {code}): {err}") from None
            finally:
                self._busy = False
        if "text" in answer:
            return str(answer["text"])
        raise RuntimeError(str(answer.get("error", answer)))

    def cancel(self, thread: int | None = None) -> None:
        """Stop the read in progress on ``thread`` (None: whichever), called by :class:`mmguard.ocr_reader.OcrReader` at
        its deadline, from another thread: the child is killed; the reading thread starts a new one. A read of
        another thread is left alone: readers share the process's engine, and one reader's deadline killed
        another's read (a 60 s read stopped after 1.3 s by a reader of 1 s)."""
        proc, owner = self._proc, self._owner
        target = owner if thread is None else thread
        if target is None:
            return
        self._cancelled.add(target)
        if self._busy and owner == target and proc is not None and proc.poll() is None:
            proc.kill()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise OcrStopped("the OCR process closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_answer(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    answer = json.loads(_recv_exactly(sock, length))
    if not isinstance(answer, dict):
        raise OcrStopped(f"unexpected answer from the OCR process: {answer!r}")
    return answer


def _send_answer(sock: socket.socket, answer: dict[str, Any]) -> None:
    data = json.dumps(answer).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _limit_memory(limit_mb: int) -> None:
    """Cap this process's data memory (heap and private mappings: what OCR's buffers are), not its address
    space, which thread stacks and malloc arenas reserve without using."""
    try:
        import resource
    except ImportError:  # not a Unix
        return
    limit = limit_mb << 20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _serve(fd: int, options: dict[str, Any], memory_limit_mb: int = 0) -> None:
    """The child's loop: load the engine, then answer one image at a time until the parent goes away."""
    import numpy as np

    if memory_limit_mb:
        _limit_memory(memory_limit_mb)
    sock = socket.socket(fileno=fd)
    try:
        engine = RapidOcrEngine(**options)
    except Exception as err:
        _send_answer(sock, {"error": _describe(err)})
        return
    _send_answer(sock, {"ready": engine.identity})
    while True:
        try:
            height, width, channels = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
            raw = _recv_exactly(sock, height * width * channels)
        except (OSError, OcrStopped):
            return  # the parent closed its end (or exited)
        try:
            pixels = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, channels)
            _send_answer(sock, {"text": engine.read_pixels(pixels)})
        except Exception as err:
            _send_answer(sock, {"error": _describe(err)})


if __name__ == "__main__":
    _serve(int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
