"""Terminal output shared by the command line tools.

* :func:`progress_bar`: a rich progress bar drawn on stderr, and only when stderr is a terminal (a pipe, a
  file or a CI log gets no bar at all, and stdout never does, so piped JSON stays clean).
* :func:`library_bars_only_on_terminal`: the same rule for the bars transformers draws itself.
* :class:`StderrHandler`: a logging handler that writes to whatever ``sys.stderr`` is when a record is
  emitted. ``logging.StreamHandler()`` binds the stream object at setup; when that object is a capture
  (pytest, typer's ``CliRunner``) that is closed later, every later record prints ``--- Logging error ---
  ValueError: I/O operation on closed file``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = [
    "RateColumn",
    "StderrHandler",
    "library_bars_only_on_terminal",
    "printable",
    "progress_bar",
    "stderr_is_terminal",
]


def printable(value: object) -> str:
    """Outside text as rich prints it verbatim: markup escaped (an image reading ``[/]`` crashed ``mmguard
    classify``, and ``[black on black]`` hid its text) and a lone surrogate as its escape (not encodable)."""
    return escape(str(value).encode("utf-8", "backslashreplace").decode("utf-8"))


@contextlib.contextmanager
def library_bars_only_on_terminal() -> Iterator[None]:
    """transformers and huggingface_hub draw tqdm bars ("Loading weights") on stderr whatever it is; off a
    terminal (a log file, a pipe, a server's journal) they are turned off for the block and restored after."""
    if stderr_is_terminal():
        yield
        return
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` on the current ``sys.stderr`` (looked up at each record, never kept)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ and setStream assign it: ignored
        pass


class RateColumn(ProgressColumn):
    """Items per second, blank until rich has measured a speed (never ``None it/s``)."""

    def __init__(self, unit: str = "it/s") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.1f} {self.unit}", style="progress.data.speed")


def progress_bar(label: str, *, unit: str = "it/s", transient: bool = False, enabled: bool = True) -> Progress:
    """A ``rich.progress.Progress`` on stderr: label, bar, done/total, rate, elapsed and time left.

    It is disabled (draws nothing, costs nothing) unless ``enabled`` and stderr is a terminal.
    """
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=transient,
        disable=not (enabled and stderr_is_terminal()),  # the real stream, whatever FORCE_COLOR says
    )
