"""Command line: ``mmguard classify | prompt | policy | demo`` plus the tools' commands.

Exit codes (documented in the README):
  0  success; for ``classify`` of one conversation: the verdict is safe
  1  ``classify`` of one conversation: the verdict is unsafe
  2  bad input or usage (the message names the problem); for a JSONL batch: some lines were invalid
  3  the model could not be loaded or failed
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(
    name="mmguard",
    help="Moderate human-AI conversations with images (Llama Guard 3 Vision).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

EXIT_UNSAFE = 1
EXIT_INPUT = 2
EXIT_MODEL = 3

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Model directory or Hugging Face id (default: bundled model).")
]
PromptOpt = Annotated[str | None, typer.Option("--prompt", "-p", help="The user's message.")]
ResponseOpt = Annotated[
    str | None, typer.Option("--response", "-r", help="The agent's reply (judges the response instead of the prompt).")
]
ImageOpt = Annotated[str | None, typer.Option("--image", "-i", help="Image file, data URL or base64 (user turn).")]
InputOpt = Annotated[
    str | None,
    typer.Option("--input", help="One conversation as chat-messages JSON from a file, or '-' for stdin."),
]
PolicyOpt = Annotated[str | None, typer.Option("--policy", help="Policy YAML/JSON file (default: MLCommons S1-S13).")]
ExcludeOpt = Annotated[
    list[str] | None, typer.Option("--exclude", "-x", help="Category codes to leave out, e.g. -x S6 -x S8 or -x S6,S8.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
FormatOpt = Annotated[str, typer.Option("--format", help="Prompt format: hf (default), hf-release or native.")]
FastOpt = Annotated[
    bool,
    typer.Option("--fast", help="Use mmguard.fast.FastEngine: exact mask-free vision attention, each distinct "
                 "image encoded once (same verdicts; see docs/performance.md)."),
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option("--quantize", help="Approximation, implies --fast: int8 (torchao, CPU or GPU) or fp8 (H100/H200). "
                 "Not the model's exact computation: measure its agreement with bench/approx_agreement.py."),
]
ReadTextOpt = Annotated[
    str,
    typer.Option("--read-text", help="Read text in images with OCR and judge it too: off, on, or auto (on when "
                 "the model cannot read, e.g. mmguard-mini v2)."),
]


def _fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _excluded(values: list[str] | None) -> list[str]:
    return [c.strip() for v in values or [] for c in v.split(",") if c.strip()]


def _load_policy(policy: str | None, exclude: list[str] | None) -> Any:
    from .policy import PolicyError, load_policy

    try:
        p = load_policy(policy)
        codes = _excluded(exclude)
        return p.exclude(codes) if codes else p
    except PolicyError as err:
        _fail(str(err))


def _read_input(spec: str) -> Any:
    try:
        raw = sys.stdin.read() if spec == "-" else Path(spec).read_text(encoding="utf-8")
    except OSError as err:
        _fail(f"cannot read {spec}: {err.strerror or err}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        _fail(f"{'stdin' if spec == '-' else spec}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}")


def _conversation(prompt: str | None, response: str | None, image: str | None, input_: str | None) -> Any:
    from .conversation import Conversation, ConversationError
    from .images import ImageError

    try:
        if input_ is not None:
            if prompt is not None or response is not None or image is not None:
                _fail("use either --input or --prompt/--response/--image, not both")
            base = Path(input_).parent if input_ != "-" else Path.cwd()
            return Conversation.from_messages(_read_input(input_), base_dir=base)
        if prompt is None:
            _fail("give --prompt TEXT (and optionally --response, --image) or --input FILE")
        if response is None:
            return Conversation.prompt(prompt, image)
        return Conversation.response(prompt, response, image)
    except (ConversationError, ImageError) as err:
        _fail(str(err))


def _load_guard(model: str | None, policy: Any, device: str, dtype: str, threshold: float, fmt: str,
                batch_size: int = 8, fast: bool = False, quantize: str | None = None,
                read_text: str = "auto") -> Any:
    from .engine import EngineError
    from .guard import READ_TEXT_MODES, Guard
    from .ocr import OcrUnavailable
    from .prompt import PromptFormat

    try:
        fmt_enum = PromptFormat(fmt)
    except ValueError:
        _fail(f"unknown --format {fmt!r}; use hf, hf-release or native")
    if not 0.0 <= threshold <= 1.0:
        _fail(f"--threshold must be within [0, 1], got {threshold}")
    if read_text not in READ_TEXT_MODES:
        _fail(f"unknown --read-text {read_text!r}; use off, auto or on")
    try:
        return Guard.from_pretrained(model, policy=policy, device=device, dtype=dtype, threshold=threshold,
                                     prompt_format=fmt_enum, batch_size=batch_size, fast=fast,
                                     fast_options={"quantize": quantize} if quantize else None,
                                     read_text=read_text)
    except OcrUnavailable as err:
        _fail(str(err), EXIT_MODEL)
    except (EngineError, OSError, ValueError) as err:
        _fail(f"cannot load model {model or '(default)'}: {err}", EXIT_MODEL)


def _print_verdict(verdict: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(verdict.to_dict(), ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    style = "bold red" if verdict.is_unsafe else "bold green"
    console.print(f"[{style}]{verdict.label.upper()}[/]  p(unsafe) = {verdict.unsafe_probability:.4f}"
                  f"  (threshold {verdict.threshold:g}, judged: {verdict.task} / {verdict.role})")
    if verdict.violated:
        table = Table("code", "category", "p(unsafe, listed first)")
        for v in verdict.violated:
            table.add_row(v.code, v.name, f"{verdict.category_probabilities.get(v.code, 0.0):.4f}")
        console.print(table)
    if verdict.read_text is not None:
        console.print(f"text in the image: {verdict.read_text!r}" if verdict.read_text else "text in the image: none")
    if len(verdict.check_probabilities) > 1:
        checks = ", ".join(f"{k} {p:.4f}" for k, p in verdict.check_probabilities.items())
        console.print(f"checks: {checks}; flagged by: {', '.join(verdict.flagged_by) or 'none'}")
    for w in verdict.warnings:
        console.print(f"[yellow]warning:[/] {w}")


@app.command()
def classify(
    prompt: PromptOpt = None,
    response: ResponseOpt = None,
    image: ImageOpt = None,
    input_: InputOpt = None,
    jsonl: Annotated[
        Path | None, typer.Option("--jsonl", help="Classify every conversation of a JSONL file (one per line).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where --jsonl verdicts go (default stdout).")
    ] = None,
    model: ModelOpt = None,
    policy: PolicyOpt = None,
    exclude: ExcludeOpt = None,
    threshold: Annotated[float, typer.Option(help="Unsafe if p(unsafe) >= threshold.")] = 0.5,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU).")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Model batch size for --jsonl.")] = 8,
    fmt: FormatOpt = "hf",
    fast: FastOpt = False,
    quantize: QuantizeOpt = None,
    read_text: ReadTextOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Classify one conversation, or every line of a JSONL file (--jsonl)."""
    active = _load_policy(policy, exclude)
    if jsonl is not None:
        if prompt or response or image or input_:
            _fail("--jsonl cannot be combined with --prompt/--response/--image/--input")
        if not jsonl.is_file():
            _fail(f"file not found: {jsonl}")
        guard = _load_guard(model, active, device, dtype, threshold, fmt, batch_size, fast, quantize, read_text)
        bad = _classify_jsonl(guard, jsonl, output, batch_size)
        if bad:
            typer.echo(f"error: {bad} line(s) of {jsonl} were invalid; their output lines hold an 'error' field",
                       err=True)
            raise typer.Exit(EXIT_INPUT)
        return
    conv = _conversation(prompt, response, image, input_)
    guard = _load_guard(model, active, device, dtype, threshold, fmt, fast=fast, quantize=quantize,
                        read_text=read_text)
    try:
        verdict = guard.classify(conv)
    except ValueError as err:
        _fail(str(err))
    _print_verdict(verdict, as_json)
    if verdict.is_unsafe:
        raise typer.Exit(EXIT_UNSAFE)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                yield n, line


def _classify_jsonl(guard: Any, path: Path, output: Path | None, batch_size: int) -> int:
    """Stream a JSONL file through the guard; returns the number of invalid lines."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .conversation import Conversation, ConversationError
    from .images import ImageError

    total = sum(1 for _ in _jsonl_lines(path))
    out = output.open("w", encoding="utf-8") if output else sys.stdout
    bad = 0
    # (extra fields, conversation or None, error or None); written in input order
    chunk: list[tuple[dict[str, Any], Any, str | None]] = []

    def flush() -> None:
        if not chunk:
            return
        convs = [c for _, c, err in chunk if err is None]
        verdicts = iter(guard.classify_batch(convs, batch_size=batch_size) if convs else [])
        for extra, _, err in chunk:
            row = {**extra, "error": err} if err is not None else {**extra, **next(verdicts).to_dict()}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        progress.advance(task, len(chunk))
        chunk.clear()

    columns = [TextColumn("classify"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} it/s"),
               TimeRemainingColumn()]
    with Progress(*columns, transient=output is None,
                  disable=not sys.stderr.isatty() and output is None) as progress:
        task = progress.add_task("classify", total=total)
        for n, line in _jsonl_lines(path):
            obj: Any = None
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ConversationError("each line must be a JSON object with 'messages'")
                extra = {k: v for k, v in obj.items() if k != "messages"}
                chunk.append((extra, Conversation.from_messages(obj, base_dir=path.parent), None))
            except (json.JSONDecodeError, ConversationError, ImageError) as err:
                bad += 1
                typer.echo(f"error: {path}:{n}: {err}", err=True)
                keep = {k: v for k, v in obj.items() if k != "messages"} if isinstance(obj, dict) else {}
                chunk.append(({**keep, "line": n}, None, str(err)))
            if len(chunk) >= batch_size * 4:
                flush()
        flush()
    if output:
        out.close()
    return bad


@app.command()
def prompt(
    prompt: PromptOpt = None,
    response: ResponseOpt = None,
    image: ImageOpt = None,
    input_: InputOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Use this checkpoint's tokenizer.")] = None,
    policy: PolicyOpt = None,
    exclude: ExcludeOpt = None,
    fmt: FormatOpt = "hf",
    as_json: JsonOpt = False,
) -> None:
    """Print the exact prompt and token count that would be sent to the model."""
    from .prompt import PromptFormat, build_prompt
    from .tokenizer import encode_prompt, load_default_tokenizer

    active = _load_policy(policy, exclude)
    conv = _conversation(prompt, response, image, input_)
    try:
        rendered = build_prompt(conv, active, format=PromptFormat(fmt))
    except ValueError as err:
        _fail(str(err))
    if model:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model)
        except Exception as err:
            _fail(f"cannot load a tokenizer from {model}: {err}", EXIT_MODEL)
    else:
        tok = load_default_tokenizer()
    ids = encode_prompt(tok, rendered)
    if as_json:
        typer.echo(json.dumps({"prompt": rendered.text, "input_ids": ids, "num_tokens": len(ids),
                               "role": rendered.role, "has_image": rendered.has_image,
                               "format": rendered.format.value, "escaped_markers": rendered.escaped_markers},
                              ensure_ascii=False))
        return
    typer.echo(rendered.text)
    typer.echo(f"\n--- {len(ids)} tokens; judged role: {rendered.role}; image: {'yes' if rendered.has_image else 'no'}",
               err=True)


@app.command("policy")
def show_policy(
    policy: PolicyOpt = None,
    exclude: ExcludeOpt = None,
    descriptions: Annotated[bool, typer.Option("--descriptions", help="Show long descriptions.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the active policy: codes, prompt labels, titles."""
    active = _load_policy(policy, exclude)
    if as_json:
        typer.echo(json.dumps(active.to_dict(), ensure_ascii=False, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("code", "prompt label", "title", "active", *(["description"] if descriptions else []),
                  title=f"policy: {active.name}")
    for c in active.categories:
        row = [c.code, c.label, c.title, "no (excluded)" if c.code in active.excluded else "yes"]
        if descriptions:
            row.append(c.description)
        table.add_row(*row)
    Console().print(table)


@app.command()
def demo(
    model: ModelOpt = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Classify a few example conversations (text, image+text, response) with the default model."""
    from rich.console import Console
    from rich.table import Table

    from .examples import example_conversations
    from .guard import RANDOM_WEIGHTS_WARNING

    console = Console()
    guard = _load_guard(model, None, device, "auto", 0.5, "hf")
    console.print(f"model: {guard.engine.source}  device: {guard.engine.device}  tile: {guard.engine.tile_size}px")
    if guard.engine.is_random_weights:
        console.print(f"[bold yellow]NOTE: the default {RANDOM_WEIGHTS_WARNING}.[/] "
                      "Pass --model with a Llama Guard 3 Vision checkpoint for real verdicts.")
    examples = example_conversations()
    verdicts = guard.classify_batch([c for _, c in examples])
    table = Table("example", "task", "image", "verdict", "p(unsafe)", "codes", title="mmguard demo")
    for (name, _conv), v in zip(examples, verdicts, strict=True):
        table.add_row(name, v.task, "yes" if v.has_image else "no",
                      f"[{'red' if v.is_unsafe else 'green'}]{v.label}[/]", f"{v.unsafe_probability:.3f}",
                      ",".join(v.codes))
    console.print(table)


# Tools built on the API register here: (module, attribute, command name, kind)
_TOOLS = [
    ("mmguard.server.cli", "command", "serve", "command"),
    ("mmguard.proxy.cli", "command", "proxy", "command"),
    ("mmguard.eval.cli", "command", "eval", "command"),
    ("mmguard.train.cli", "command", "train", "command"),
    ("mmguard.attacks.cli", "command", "attack", "command"),
    ("mmguard.data.cli", "app", "data", "group"),
    ("mmguard.batch.cli", "command", "batch", "command"),
]


def _register_tools(argv: list[str]) -> None:
    """Register the tool commands. Only the tool being run is imported (they pull in torch, FastAPI,
    scikit-learn...): a core command imports none, the top-level help imports all to list them."""
    names = {name for _, _, name, _ in _TOOLS}
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in names:
        wanted = {command}
    elif command is None:
        wanted = names
    else:
        return
    for module, attr, name, kind in _TOOLS:
        if name not in wanted:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("mmguard"):
                continue  # tool not built yet
            raise
        obj = getattr(mod, attr, None)
        if obj is None:
            continue
        if kind == "group":
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)


def main() -> None:
    _register_tools(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
