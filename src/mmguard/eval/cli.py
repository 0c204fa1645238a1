"""``mmguard eval``: run guards over labeled JSONL and write the report (registered by ``mmguard.cli``)."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli import OCR_TIMEOUT_S

__all__ = ["command"]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def command(
    data: Annotated[list[Path], typer.Option("--data", "-d", help="Labeled JSONL file (repeatable).")],
    guard: Annotated[
        list[str] | None,
        typer.Option(
            "--guard",
            "-g",
            help="Guard spec (repeatable): default, mmguard-mini, llama-guard-3-vision, "
            "local:PATH, mmguard-server:URL, openai-moderation:URL[#MODEL], chat-judge:URL#MODEL; "
            "prefix NAME= to name it.",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder for report.md/json and plots.")
    ] = Path("eval-report"),
    cache: Annotated[
        Path | None, typer.Option("--cache", help="SQLite result cache (default OUT/cache.sqlite).")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="Decision threshold on the unsafe probability, for every guard (default: each guard's "
                     "own, as it classifies when deployed: a local model's validated per-task thresholds in its "
                     "mmguard.json, else 0.5; a server's own).", min=0.0, max=1.0),
    ] = None,
    target_fpr: Annotated[
        float, typer.Option(help="Report the threshold meeting this false positive rate.", min=0.0, max=1.0)
    ] = 0.05,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many items.", min=1)] = None,
    split: Annotated[
        str, typer.Option(help="Split to evaluate (train, validation, test) or 'all'.")
    ] = "test",
    batch_size: Annotated[int, typer.Option(help="Batch size for local guards.", min=1)] = 8,
    read_text: Annotated[
        str, typer.Option("--read-text", help="Local guards: read text in images with OCR (off, on, or auto: on "
                          "when the model cannot read).")
    ] = "auto",
    ocr_timeout: Annotated[
        float, typer.Option("--ocr-timeout", min=0.1, help="Local guards: seconds of OCR per image (items read past it "
                            "are judged blind, counted in the report and not cached).")
    ] = OCR_TIMEOUT_S,
    prefix_cache: Annotated[
        bool, typer.Option("--prefix-cache", help="Local guards: compute the template prefix (task and categories) "
                           "once and reuse it (exact; faster on text items).")
    ] = False,
    concurrency: Annotated[int, typer.Option(help="Concurrent requests per remote guard.", min=1)] = 4,
    retries: Annotated[int, typer.Option(help="Retries of a failed remote request.", min=0)] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds per remote request.", min=0.1)] = 60.0,
    device: Annotated[str, typer.Option(help="Device for local guards (auto, cpu, cuda).")] = "auto",
    dtype: Annotated[str, typer.Option(help="Dtype for local guards (auto, float32, bfloat16).")] = "auto",
    chunk_size: Annotated[int, typer.Option(help="Items read and judged per step (streaming).", min=1)] = 64,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Evaluate one or more guards on labeled conversations: metrics, slices, plots, resumable cache."""
    from ..conversation import ConversationError
    from ..images import ImageError
    from ..policy import PolicyError
    from .cache import ResultCache
    from .data import DataError, scan
    from .guards import GuardSpecError, make_guard
    from .report import write_report
    from .runner import EvalError, run_eval

    if read_text not in ("off", "auto", "on"):
        raise _fail(f"--read-text must be off, auto or on, got {read_text!r}")
    split_filter = None if split == "all" else split
    if split_filter not in (None, "train", "validation", "test"):
        raise _fail(f"--split must be train, validation, test or all, got {split!r}")
    resolved = [d.resolve() for d in data]
    twice = next((d for d, r in zip(data, resolved, strict=True) if resolved.count(r) > 1), None)
    if twice is not None:  # its items would count twice in every figure
        raise _fail(f"--data {twice} is given more than once")
    written = {(out / name).resolve() for name in ("predictions.jsonl", "report.json", "report.md", "cache.sqlite")}
    overwritten = [str(d) for d in data if d.resolve() in written]
    if overwritten:  # opened for writing below: the data would be gone before it was read
        raise _fail(f"--data {overwritten[0]} is a file --out {out} writes; choose another --out")
    try:
        found = scan(data, split=split_filter, limit=limit)
    except DataError as err:
        raise _fail(str(err)) from None
    if found.count == 0:
        raise _fail(f"no items to evaluate in {', '.join(map(str, data))} (split {split})")
    specs = guard or ["default"]
    guards: list[Any] = []
    for spec in specs:
        try:
            guards.append(
                make_guard(
                    spec,
                    threshold=threshold,
                    device=device,
                    dtype=dtype,
                    batch_size=batch_size,
                    concurrency=concurrency,
                    retries=retries,
                    timeout=timeout,
                    read_text=read_text,
                    ocr_timeout_s=ocr_timeout,
                    prefix_cache=prefix_cache,
                )
            )
        except GuardSpecError as err:
            raise _fail(str(err)) from None
        except Exception as err:  # model loading: missing files, bad checkpoints, no CUDA ...
            raise _fail(f"cannot load guard {spec!r}: {type(err).__name__}: {err}") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        store = ResultCache(cache if cache is not None else out / "cache.sqlite")
    except (OSError, sqlite3.Error) as err:
        raise _fail(str(err)) from None
    total = found.count * len(guards)
    typer.echo(
        f"evaluating {found.count} items × {len(guards)} guard(s): {', '.join(g.name for g in guards)}",
        err=True,
    )
    try:
        with (
            _progress_bar(total, enabled=progress) as advance,
            (out / "predictions.jsonl").open("w", encoding="utf-8") as preds,
        ):
            result = run_eval(
                data,
                guards,
                store,
                split=split_filter,
                limit=limit,
                chunk_size=chunk_size,
                progress=advance,
                predictions=preds,
            )
        report = write_report(result, out, target_fpr=target_fpr, threshold=threshold, plots=plots)
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: {store.count()} result(s) are cached in {store.path}; rerun to resume", err=True
        )
        raise typer.Exit(code=130) from None
    except (DataError, ConversationError, ImageError) as err:  # the same line fails again until it is fixed
        raise _fail(f"{err} (finished results are cached in {store.path}; fix that line, then rerun to resume)"
                    ) from None
    except (EvalError, PolicyError, OSError) as err:
        raise _fail(f"{err} (finished results are cached in {store.path}; rerun to resume)") from None
    finally:
        store.close()
    failed = _summary(report, out)
    if failed:
        raise _fail(
            f"{', '.join(failed)}: every item failed, so the report has no numbers for "
            f"{'it' if len(failed) == 1 else 'them'} (the errors are listed in {out / 'report.md'})",
            code=3,
        )


class _progress_bar:
    """A rich progress bar with rate and time left; a context manager yielding ``advance(n)``."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.progress: Any = None

    def __enter__(self) -> Any:
        from ..termio import stderr_is_terminal

        if not (self.enabled and stderr_is_terminal()):
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]eval"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("elapsed,"),
            TimeRemainingColumn(),
            TextColumn("left"),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self.progress.start()
        task = self.progress.add_task("eval", total=self.total, rate="")

        def advance(n: int) -> None:
            self.progress.update(task, advance=n)
            speed = self.progress.tasks[0].speed
            self.progress.update(task, rate=f"{speed:.1f} items/s" if speed else "")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()


def _summary(report: dict[str, Any], out: Path) -> list[str]:
    """Print the overview, the warnings and the item errors; return the guards that answered no item."""

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for r in report["results"]:
        if r["slice"] != "all":
            continue
        m = r["metrics"]
        typer.echo(
            f"{r['guard']:<28} {r['task']:<9} n={m['n']:<6} P={f(m['precision'])} R={f(m['recall'])} "
            f"F1={f(m['f1'])} FPR={f(m['fpr'])} AUPRC={f(m['auprc'])}"
        )
    items = report["data"]["items"]
    failed = []
    for g in report["guards"]:
        for w in g["warnings"]:
            typer.echo(f"warning: {g['name']}: {w}", err=True)
        if g["errors"]:
            first = g["error_examples"][0] if g["error_examples"] else {"where": "?", "error": "?"}
            all_failed = g["errors"] >= items
            typer.echo(
                f"{'error' if all_failed else 'warning'}: {g['name']}: {g['errors']} of {items} item(s) failed"
                f"{' (no results)' if all_failed else ' and are left out of its metrics'}; "
                f"first: {first['where']}: {first['error']}",
                err=True,
            )
            if all_failed:
                failed.append(g["name"])
    typer.echo(
        f"report: {out / 'report.md'} (JSON: report.json, "
        f"plots: {', '.join(report.get('plots', [])) or 'none'})"
    )
    return failed
