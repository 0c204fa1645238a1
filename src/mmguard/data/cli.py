"""``mmguard data build | stats | sample``: build the labeled JSONL splits from ``shared/datasets``, inspect a
file, keep a seeded share of each kind of train item."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..termio import printable, stderr_is_terminal
from .build import BuildConfig, build, count_rows
from .schema import DataError, read_examples
from .sources import CONVERTERS

app = typer.Typer(help="Labeled safety data: build JSONL splits, show statistics.", no_args_is_help=True)
_console = Console()


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit 2 (bad input), like every mmguard command."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("source", "split", "task", "label", "modality"):
        table.add_column(col)
    table.add_column("count", justify="right")
    for r in rows:  # values from the data: a lone surrogate or [markup] printed as written
        table.add_row(*(printable(r[k]) for k in ("source", "split", "task", "label", "modality")), str(r["count"]))
    table.add_section()
    table.add_row("total", "", "", "", "", str(sum(r["count"] for r in rows)))
    return table


@app.command("build")
def build_command(
    datasets: Annotated[Path, typer.Option(help="Folder holding the dataset folders (shared/datasets).")],
    out: Annotated[Path, typer.Option(help="Output folder for {train,validation,test}.jsonl, images/, stats.json.")],
    seed: Annotated[int, typer.Option(help="Seed for sampling and synthesized items.")] = 0,
    max_per_source: Annotated[int | None, typer.Option(min=1, help="Keep at most N items per source (seeded).")] = None,
    no_noncommercial: Annotated[
        bool, typer.Option("--no-noncommercial", help="Keep non-commercial and test-only items out of train.")
    ] = False,
    no_model_outputs: Annotated[
        bool, typer.Option("--no-model-outputs", help="Also keep third-party model outputs out of train.")
    ] = False,
    source: Annotated[list[str] | None, typer.Option(help="Only these dataset folders (repeatable).")] = None,
    typographic: Annotated[int, typer.Option(min=0, help="Typographic (FigStep-style) prompt items.")] = 400,
    photo_questions: Annotated[int, typer.Option(min=0, help="Benign photo + benign question items.")] = 200,
    request_with_image: Annotated[int, typer.Option(min=0, help="Harmful request + neutral image items.")] = 300,
    response_with_image: Annotated[int, typer.Option(min=0, help="Response items with an image.")] = 300,
    templated_responses: Annotated[
        int,
        typer.Option(
            min=0,
            help="Templated compliance/refusal replies to train and validation prompts (response items; never in "
                 "test).",
        ),
    ] = 0,
) -> None:
    """Convert every dataset, add image items, split by content hash and write the JSONL files."""
    if not datasets.is_dir():
        _fail(f"--datasets: {'not a folder' if datasets.exists() else 'folder not found'}: {datasets}")
    if out.exists() and not out.is_dir():
        _fail(f"--out: {out} is a file, not a folder")
    if source:
        unknown = [s for s in source if s not in CONVERTERS]
        if unknown:
            raise typer.BadParameter(f"unknown source(s) {unknown}; known: {', '.join(CONVERTERS)}")
    config = BuildConfig(
        datasets=datasets, out=out, seed=seed, max_per_source=max_per_source,
        exclude_noncommercial=no_noncommercial, exclude_model_outputs=no_model_outputs,
        sources=list(source) if source else None, typographic=typographic, photo_questions=photo_questions,
        request_with_image=request_with_image, response_with_image=response_with_image,
        templated_responses=templated_responses,
    )  # fmt: skip
    steps = len(config.sources or [n for n in CONVERTERS if (datasets / n).is_dir()]) + 4
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=not stderr_is_terminal(),
    ) as progress:  # fmt: skip
        task = progress.add_task("building", total=steps)

        def tick(name: str, n: int) -> None:
            progress.update(task, advance=1, description=f"{name} ({n} items)")

        try:
            result = build(config, tick)
        except DataError as err:
            _fail(str(err))
        except OSError as err:  # a source file not readable, --out not writable, a disk full
            _fail(f"{err.filename or out}: {err.strerror or err}")
    _console.print(_table(result.rows, printable(out)))
    _console.print(f"written: {json.dumps(result.counts)}; duplicates dropped: {sum(result.duplicates.values())}")
    if result.excluded_from_train:
        _console.print(f"kept out of train: {json.dumps(result.excluded_from_train)}")
    _console.print(f"stats: {printable(out / 'stats.json')}")


@app.command("stats")
def stats_command(
    file: Annotated[Path, typer.Argument(help="A JSONL file in the mmguard data schema.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Count the items of FILE per source × split × task × label × modality (validates every line)."""
    try:
        examples = list(read_examples(file))
    except DataError as err:
        _fail(str(err))
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"{file}: cannot read: {err}")
    rows = count_rows(examples)
    if as_json:
        codes = Counter(c for e in examples for c in e.codes)
        typer.echo(json.dumps({"total": len(examples), "rows": rows, "codes": dict(sorted(codes.items()))}, indent=2))
        return
    _console.print(_table(rows, printable(file)))


@app.command("sample")
def sample_command(
    file: Annotated[Path, typer.Argument(help="A built JSONL file (its train split is sampled).")],
    out: Annotated[Path, typer.Option(help="Output JSONL; image paths are rewritten relative to its folder.")],
    share: Annotated[list[str], typer.Option(
        help="KIND=FRACTION of the train items to keep (repeatable); KIND: prompt, response, prompt/text, "
             "prompt/image+text, response/text, response/image+text. Kinds not named are kept whole.")],
    seed: Annotated[int, typer.Option(help="Seed of the draws (one per train item, in file order).")] = 0,
) -> None:
    """Keep a seeded share of each kind of train item of FILE (a training stage's mix); other splits whole."""
    from .sample import parse_shares, relocate_images, sample_train
    from .schema import write_examples

    if out.resolve() == file.resolve():
        _fail("--out: must not be FILE itself")
    try:
        shares = parse_shares(share)
        examples = list(sample_train(read_examples(file), shares, seed))
        if file.parent.resolve() != out.parent.resolve():  # image paths are relative to the file's folder
            examples = [relocate_images(ex, file.parent, out.parent) for ex in examples]
    except DataError as err:
        _fail(str(err))
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"{file}: cannot read: {err}")
    try:
        write_examples(out, examples)
    except OSError as err:
        _fail(f"--out: cannot write {out}: {err.strerror or err}")
    _console.print(_table(count_rows(examples), printable(out)))
