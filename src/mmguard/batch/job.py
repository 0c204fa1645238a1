"""``run_batch``: plan (or reload) a job, skip committed chunks, run the rest on an engine, summarise."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..jsonl import MAX_LINE_BYTES, VERDICT_KEY
from ..server.settings import ServerSettings
from .plan import (
    MANIFEST_NAME,
    Chunk,
    FingerprintMismatch,
    GuardSpec,
    InputFile,
    JobPlan,
    fingerprint,
    input_digest,
    job_settings,
    plan_inputs,
    settings_diff,
)
from .storage import StorageError, is_uri, join, open_storage
from .work import ChunkResult

__all__ = ["BatchOptions", "BatchSummary", "JobExists", "run_batch"]


class JobExists(ValueError):
    """The output folder already holds a job (or other files) and ``resume`` was not asked."""


@dataclass(frozen=True)
class BatchOptions:
    """What shapes chunks and the reading of inputs (all part of the fingerprint)."""

    chunk_size: int = 32  # = classify --jsonl's 4 x batch size: the same model calls, bit-identical rows
    max_line_bytes: int = MAX_LINE_BYTES  # as classify --jsonl
    max_image_bytes: int = ServerSettings().max_image_bytes
    max_image_pixels: int = ServerSettings().max_image_pixels
    remote_image_hosts: tuple[str, ...] = ()
    remote_image_timeout_s: float = ServerSettings().remote_image_timeout_s

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.image_settings()  # the server's validation of the image rules

    def image_settings(self) -> ServerSettings:
        return ServerSettings(max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                              remote_images=bool(self.remote_image_hosts),
                              remote_image_hosts=self.remote_image_hosts,
                              remote_image_timeout_s=self.remote_image_timeout_s)

    def fingerprinted(self) -> dict[str, Any]:
        return {"chunk_size": self.chunk_size, "max_line_bytes": self.max_line_bytes,
                "max_image_bytes": self.max_image_bytes, "max_image_pixels": self.max_image_pixels,
                "remote_image_hosts": list(self.remote_image_hosts)}


@dataclass
class BatchSummary:
    output: str
    engine: str
    lines: int = 0  # rows of the whole job, committed
    verdicts: int = 0
    errors: int = 0
    unsafe: int = 0
    chunks: int = 0
    chunks_run: int = 0
    chunks_skipped: int = 0  # already committed by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # part -> why
    retried: int = 0  # chunks that needed more than one attempt
    seconds: float = 0.0  # this run, engine start-up included
    lines_run: int = 0  # rows judged in this run

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def text(self) -> str:
        rate = self.lines_run / self.seconds if self.seconds > 0 else 0.0
        head = (f"batch ({self.engine}): {self.lines} lines in {self.chunks} chunks -> {self.verdicts} verdicts "
                f"({self.unsafe} unsafe), {self.errors} error rows; this run: {self.chunks_run} chunks judged, "
                f"{self.chunks_skipped} already done, {self.retried} retried, {len(self.failed)} failed; "
                f"{self.seconds:.1f} s, {rate:.1f} lines/s; output {self.output}")
        for part, why in sorted(self.failed.items()):
            head += f"\n  failed {part}: {why}"
        return head


Engine = Callable[[JobPlan, list[Chunk], Callable[[ChunkResult], None]], None]


def _part_stats(output: str, chunk: Chunk) -> dict[str, int] | None:
    """Counts of a committed part read back (its run was killed before the manifest recorded it); None when the
    part is not its chunk's whole output (a row unreadable, or not one row per line): the chunk runs again."""
    storage, path = open_storage(join(output, chunk.part))
    rows = errors = unsafe = 0
    try:
        with storage.open_read(path) as fh:
            for raw in fh:
                verdict = json.loads(raw)[VERDICT_KEY]
                rows += 1
                errors += "error" in verdict
                unsafe += bool(verdict.get("is_unsafe"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"rows": rows, "errors": errors, "unsafe": unsafe} if rows == chunk.lines else None


def _absolute(location: str) -> str:
    return location if is_uri(location) else str(Path(location.removeprefix("file://")).resolve())


def _is_temp(name: str) -> bool:
    """A temporary file this tool writes (``LocalStorage``: ``.NAME.XXXX.tmp``; object stores: ``NAME.tmp-PID``)
    for a part or the manifest: only those are removed. A user's own ``notes.tmp`` is not."""
    own = name.lstrip(".")
    if not (own.startswith("part-") or own.startswith(MANIFEST_NAME)):
        return False
    return (name.startswith(".") and name.endswith(".tmp")) or ".tmp-" in name


def load_or_plan(inputs: Sequence[str], output: str, spec: GuardSpec, options: BatchOptions,
                 resume: bool) -> JobPlan:
    """The job's plan: reloaded from the manifest on resume (refused if the settings differ), else made."""
    sized = []
    for uri in inputs:
        storage, path = open_storage(uri)
        if not storage.exists(path):
            raise StorageError(f"input not found: {uri}")
        size = storage.size(path)
        sized.append(InputFile(uri, size, digest=input_digest(storage, path, size)))
    settings = job_settings(spec, options.fingerprinted(), sized)
    fp = fingerprint(settings)
    out_storage, out_path = open_storage(output)
    manifest_path = join(out_path, MANIFEST_NAME) if out_path else MANIFEST_NAME
    names = out_storage.listdir(out_path)
    if resume and MANIFEST_NAME in names:
        old = JobPlan.from_json(out_storage.read_bytes(manifest_path, 1 << 30), join(output, MANIFEST_NAME))
        if old.fingerprint != fp:
            differ = ", ".join(settings_diff(old.settings, settings)) or "fingerprint"
            raise FingerprintMismatch(
                f"cannot resume the job in {output}: it was started with other settings ({differ} differ); "
                "rerun with the same settings, or write to a new folder")
        return old
    if resume and [n for n in names if not _is_temp(n)]:  # a job writes its manifest before any part
        raise JobExists(f"{output} holds files but no {MANIFEST_NAME}: not a job this tool can resume; choose an "
                        "empty folder")
    if not resume and [n for n in names if not _is_temp(n)]:
        raise JobExists(f"{output} is not empty; pass --resume to continue its job, or choose an empty folder")
    out_storage.makedirs(out_path)
    planned, chunks = plan_inputs(sized, options.chunk_size, options.max_line_bytes)
    plan = JobPlan(fp, settings, planned, chunks)
    plan.write(output)
    return plan


def run_batch(
    inputs: Sequence[str],
    output: str,
    spec: GuardSpec,
    options: BatchOptions | None = None,
    *,
    engine: str = "local",
    resume: bool = False,
    retries: int = 2,
    workers: int = 1,
    ray_address: str | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 0.0,
    torch_threads: int | None = None,
    progress: bool | None = None,
    guard: Any = None,
    on_chunk: Callable[[ChunkResult], None] | None = None,
) -> BatchSummary:
    """Judge every line of ``inputs`` into ``output/part-*.jsonl`` and ``output/manifest.json``.

    ``engine="local"`` runs the chunks in this process (``guard``: an already loaded one, else ``spec``
    loads it); ``engine="ray"`` runs them on a Ray Data actor pool of ``workers`` guards. ``progress``:
    a bar on stderr (default: when stderr is a terminal). ``on_chunk`` is called with each chunk's result
    as it completes (in this process, in completion order).
    """
    options = options or BatchOptions()
    started = time.perf_counter()
    # Ray workers do not share this process's working directory: local paths travel absolute
    inputs = [_absolute(i) for i in inputs]
    output = _absolute(output)
    if spec.model and not is_uri(spec.model) and Path(spec.model).exists():
        spec = replace(spec, model=str(Path(spec.model).resolve()))
    plan = load_or_plan(inputs, output, spec, options, resume)
    out_storage, out_path = open_storage(output)
    present = out_storage.listdir(out_path)
    for name in present:
        if _is_temp(name):  # left by a killed run; never a committed part
            out_storage.remove(join(out_path, name))
    committed = {n for n in present if n.startswith("part-") and not _is_temp(n)}
    summary = BatchSummary(output=output, engine=engine, chunks=len(plan.chunks))
    pending = [c for c in plan.chunks if c.part not in committed]
    summary.chunks_skipped = len(plan.chunks) - len(pending)
    for c in plan.chunks:
        if c.part in committed and c.part not in plan.done:
            stats = _part_stats(output, c)
            if stats is None:  # not this chunk's whole output: run it again
                out_storage.remove(join(out_path, c.part))
                pending.append(c)
                summary.chunks_skipped -= 1
            else:
                plan.done[c.part] = stats
    show = sys.stderr.isatty() if progress is None else progress
    last_write = time.monotonic()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("lines"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not show, transient=False) as bar:
        task = bar.add_task("batch", total=sum(c.lines for c in pending))

        def on_done(result: ChunkResult) -> None:
            nonlocal last_write
            summary.chunks_run += 1
            summary.retried += result.attempts > 1
            if result.failure:
                summary.failed[result.part] = result.failure
            else:
                plan.done[result.part] = result.stats()
                summary.lines_run += result.rows
                bar.advance(task, result.rows)
            if on_chunk is not None:
                on_chunk(result)
            if time.monotonic() - last_write > 10:  # progress survives in the manifest, cheaply
                plan.write(output)
                last_write = time.monotonic()

        if pending:
            run_engine(engine, plan, pending, on_done, spec=spec, options=options, output=output,
                       retries=retries, workers=workers, ray_address=ray_address, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker, torch_threads=torch_threads, guard=guard, progress=show)
    for c in pending:  # a chunk the engine never reported (a Ray task that kept failing)
        if c.part not in plan.done and c.part not in summary.failed:
            summary.failed[c.part] = "not completed by the engine (see its log)"
    for stats in plan.done.values():
        summary.lines += stats["rows"]
        summary.errors += stats["errors"]
        summary.unsafe += stats["unsafe"]
    summary.verdicts = summary.lines - summary.errors
    summary.seconds = time.perf_counter() - started
    plan.summary = summary.to_dict()
    plan.write(output)
    return summary


def run_engine(engine: str, plan: JobPlan, pending: list[Chunk], on_done: Callable[[ChunkResult], None], *,
               spec: GuardSpec, options: BatchOptions, output: str, retries: int, workers: int,
               ray_address: str | None, cpus_per_worker: float | None, gpus_per_worker: float,
               torch_threads: int | None, guard: Any, progress: bool) -> None:
    if engine == "local":
        from .local_engine import run_local

        run_local(plan, pending, on_done, spec=spec, options=options, output=output, retries=retries,
                  guard=guard, torch_threads=torch_threads)
    elif engine == "ray":
        from .ray_engine import run_ray

        run_ray(plan, pending, on_done, spec=spec, options=options, output=output, retries=retries,
                workers=workers, ray_address=ray_address, cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker, torch_threads=torch_threads, progress=progress)
    else:
        raise ValueError(f"unknown engine {engine!r}; use 'local' or 'ray'")
