"""``mmguard batch``: JSONL conversations in, ``part-*.jsonl`` verdicts and a manifest out."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from ..cli import OCR_TIMEOUT_S, OcrTimeoutOpt, ReadTextOpt

__all__ = ["command"]

EXIT_INPUT = 2
EXIT_MODEL = 3


def _split(values: list[str] | None) -> list[str]:
    return [c.strip() for v in values or [] for c in v.split(",") if c.strip()]


def command(
    inputs: Annotated[list[str], typer.Argument(help="JSONL files: local paths or URIs (s3://, gs://, ...).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder (local or URI) for part files "
                                        "and manifest.json.")],
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray Data actor pool).")] = "local",
    workers: Annotated[int, typer.Option(min=1, help="Ray: guards in the actor pool.")] = 2,
    chunk_size: Annotated[
        int | None,
        typer.Option(min=1, help="Lines per chunk, the unit of work, retry and commit (default 4 x batch size: "
                     "the model calls classify --jsonl makes, so the rows are bit-identical)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the job in --output: skip committed chunks.")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model directory or Hugging Face id.")] = None,
    policy: Annotated[str | None, typer.Option(help="Policy YAML/JSON file (default: MLCommons S1-S13).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", "-x", help="Category codes to leave out.")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="Unsafe if p(unsafe) >= threshold (default: the model's validated per-task thresholds in its "
             "mmguard.json, else 0.5, as classify uses).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto (on each worker).")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Model batch size.")] = 8,
    fmt: Annotated[str, typer.Option("--format", help="Prompt format: hf, hf-release or native.")] = "hf",
    fast: Annotated[bool, typer.Option(help="Use mmguard.fast.FastEngine (same verdicts).")] = False,
    read_text: ReadTextOpt = "auto",
    ocr_timeout: OcrTimeoutOpt = OCR_TIMEOUT_S,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(min=64, help="Longest conversation judged, in tokens with the template (default: "
                                 "the model's context); a longer line gets an 'error' field naming the limit.")
    ] = None,
    retries: Annotated[int, typer.Option(min=0, help="Extra attempts per failing chunk.")] = 2,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray: an existing cluster ('auto', 'ray://host:10001'); default: start "
                                 "a local one.")
    ] = None,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="Ray: GPUs per guard.")] = 0.0,
    cpus_per_worker: Annotated[
        float | None, typer.Option(min=0.01, help="Ray: CPUs per guard (default: fractional, leaving half a CPU "
                                   "to Ray Data).")
    ] = None,
    torch_threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads per guard (Ray default 1; local default torch's).")
    ] = None,
    max_image_mb: Annotated[float, typer.Option(help="Largest image in MiB (the server's default).")] = 20.0,
    remote_image_host: Annotated[
        list[str] | None,
        typer.Option(help="Allow http(s) image URLs from this host (repeatable; '*.example.com'), as the server."),
    ] = None,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar on stderr (default: when it "
                                  "is a terminal).")
    ] = None,
) -> None:
    """Judge every line of JSONL files in resumable chunks, in this process or on Ray."""
    from ..guard import READ_TEXT_MODES
    from ..policy import PolicyError, load_policy
    from ..prompt import PromptFormat
    from .job import BatchOptions, JobExists, run_batch
    from .plan import FingerprintMismatch, GuardSpec
    from .storage import StorageError

    def fail(message: str, code: int = EXIT_INPUT) -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code)

    if engine not in ("local", "ray"):
        fail(f"unknown --engine {engine!r}; use local or ray")
    if fmt not in {f.value for f in PromptFormat}:
        fail(f"unknown --format {fmt!r}; use hf, hf-release or native")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        fail(f"--threshold must be within [0, 1], got {threshold}")
    if read_text not in READ_TEXT_MODES:
        fail(f"unknown --read-text {read_text!r}; use {', '.join(READ_TEXT_MODES)}")
    if engine == "local":
        from ..checkpoints import resolve_device
        from ..engine import EngineError

        try:
            resolve_device(device)  # (Ray workers check theirs: a GPU may be theirs only)
        except EngineError as err:
            fail(f"--device: {err}")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            fail("--engine ray needs Ray: pip install 'mmguard[ray]'")
    try:
        active = load_policy(policy)
        codes = _split(exclude)
        active = active.exclude(codes) if codes else active
    except PolicyError as err:
        fail(str(err))
    spec = GuardSpec(model=model, policy=active.to_dict(), threshold=threshold, prompt_format=fmt, device=device,
                     dtype=dtype, batch_size=batch_size, fast=fast, read_text=read_text,
                     ocr_timeout_s=ocr_timeout, max_prompt_tokens=max_prompt_tokens)
    if not (math.isfinite(max_image_mb) and max_image_mb > 0):
        fail(f"--max-image-mb: must be a positive number of MB, got {max_image_mb}")
    try:
        options = BatchOptions(chunk_size=chunk_size or 4 * batch_size,
                               max_image_bytes=int(max_image_mb * 1024 * 1024),
                               remote_image_hosts=tuple(_split(remote_image_host)))
    except ValueError as err:
        fail(str(err))
    try:
        summary = run_batch(inputs, output, spec, options, engine=engine, resume=resume, retries=retries,
                            workers=workers, ray_address=ray_address, cpus_per_worker=cpus_per_worker,
                            gpus_per_worker=gpus_per_worker, torch_threads=torch_threads, progress=progress)
    except (FingerprintMismatch, JobExists, StorageError) as err:
        fail(str(err))
    except (IsADirectoryError, NotADirectoryError, FileExistsError, FileNotFoundError, PermissionError) as err:
        fail(f"cannot read or write the job's files: {err}")  # an input that is a folder, an output that is a file
    except OSError as err:
        fail(f"cannot load model {model or '(default)'}: {err}", EXIT_MODEL)
    except KeyboardInterrupt:  # Ctrl-C: what was committed stays; say how to go on
        typer.echo(f"interrupted: the chunks committed in {output} are kept; the same command with --resume "
                   "finishes the job", err=True)
        raise typer.Exit(130) from None
    typer.echo(summary.text(), err=True)
    if summary.failed:
        typer.echo(f"error: {len(summary.failed)} chunk(s) failed; rerun with --resume to retry them", err=True)
        raise typer.Exit(EXIT_MODEL)
    if summary.errors:
        typer.echo(f"error: {summary.errors} line(s) were invalid; their rows hold an 'error' field", err=True)
        raise typer.Exit(EXIT_INPUT)
