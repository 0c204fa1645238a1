"""Command line: ``mmguard classify | prompt | policy | demo`` plus the tools' commands.

Exit codes (documented in the README):
  0  success; for ``classify`` of one conversation: the verdict is safe
  1  ``classify`` of one conversation: the verdict is unsafe
  2  bad input or usage (the message names the problem); for a JSONL batch: some lines were invalid
  3  the model could not be loaded or failed
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import platform
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core

from . import __version__

_BOOL_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0", "y", "n", "t", "f"})


def _flags_show_no_type() -> None:
    """typer 0.29's rich help prints a flag's type (``<bool>``) as if the flag took a value; a flag has no
    value to describe. Patched once, for flags only; every other option keeps typer's rendering."""
    original = typer.core.TyperOption.display_type_rich
    if getattr(original, "_mmguard_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._mmguard_flags = True  # type: ignore[attr-defined]
    typer.core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_type()


class _Group(typer.core.TyperGroup):
    """The mmguard command group: a flag given a value (``--json true``) is a usage error that says what a
    flag is, instead of click's "unexpected extra argument (true)"."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _refuse_flag_values(self, ctx, args)
        return super().parse_args(ctx, args)


def _refuse_flag_values(group: Any, ctx: Any, args: list[str]) -> None:
    name = next((a for a in args if not a.startswith("-")), None)
    cmd = group.get_command(ctx, name) if name else None
    params = getattr(cmd, "params", [])
    if cmd is None or any(p.param_type_name == "argument" for p in params):
        return  # a command with positional arguments: a word after a flag may be one of them
    flags = {o for p in params if getattr(p, "is_flag", False) for o in (*p.opts, *p.secondary_opts)}
    rest = args[args.index(name) + 1:]
    for flag, value in itertools.pairwise(rest):
        if flag in flags and value.lower() in _BOOL_WORDS:
            raise typer.BadParameter(
                f"a flag takes no value: write {flag} to turn it on, leave it out for off (got '{flag} {value}')",
                ctx=ctx, param_hint=f"'{flag}'",
            )


app = typer.Typer(
    name="mmguard",
    cls=_Group,
    help="Moderate human-AI conversations with images (Llama Guard 3 Vision).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("torch", "transformers"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"mmguard {__version__} ({', '.join(parts)}; Python {platform.python_version()})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True,
                     help="Print the versions of mmguard, torch and transformers, and exit."),
    ] = False,
) -> None:
    pass

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
# mmguard.ocr.DEFAULT_OCR_TIMEOUT_S (a test holds them equal), not imported: --help stays fast; the default of every
# command's --ocr-timeout (classify, eval, serve)
OCR_TIMEOUT_S = 5.0
OcrTimeoutOpt = Annotated[
    float,
    typer.Option("--ocr-timeout", min=0.1, help="Seconds of OCR per image; beyond it the verdict stands on the "
                 "main check with a warning and text_unread (a dense page of text takes ~10 s on 2 cores)."),
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


def _readable_file(path: Path, what: str) -> None:
    """Fail with one line unless ``path`` is a file this process can open (checked before a model loads)."""
    if not path.exists():
        _fail(f"{what}: file not found: {path}")
    if not path.is_file():
        _fail(f"{what}: not a file: {path}")
    try:
        path.open("rb").close()
    except OSError as err:
        _fail(f"{what}: cannot read {path}: {err.strerror or err}")


def _exists(path: str) -> bool:
    """``Path(path).exists()`` that says no for a name the OS refuses (ENAMETOOLONG raises, it does not answer)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def _read_input(spec: str) -> Any:
    from .jsonl import MAX_LINE_BYTES, loads_strict

    where = "stdin" if spec == "-" else spec
    try:
        if spec == "-":
            stream = getattr(sys.stdin, "buffer", None)
            data = (stream.read(MAX_LINE_BYTES + 1) if stream is not None
                    else sys.stdin.read(MAX_LINE_BYTES + 1).encode("utf-8", "surrogateescape"))
        else:
            _readable_file(Path(spec), "--input")
            with Path(spec).open("rb") as fh:
                data = fh.read(MAX_LINE_BYTES + 1)
    except OSError as err:
        _fail(f"cannot read {where}: {err.strerror or err}")
    if len(data) > MAX_LINE_BYTES:  # read no further: /dev/zero as --input filled memory until the kernel killed it
        _fail(f"--input {where}: over the limit of {MAX_LINE_BYTES} bytes (a JSONL line's)")
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as err:
        _fail(f"--input {where}: not UTF-8: invalid byte 0x{data[err.start]:02X} at byte {err.start + 1}")
    try:
        return loads_strict(raw)
    except json.JSONDecodeError as err:
        _fail(f"--input {where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}")
    except ValueError as err:
        _fail(f"--input {where}: {err}")


def _conversation(prompt: str | None, response: str | None, image: str | None, input_: str | None) -> Any:
    from .conversation import Conversation, ConversationError, check_text
    from .images import ImageError

    try:
        # name the option: a non-UTF-8 argument arrives as lone surrogates (Python's surrogateescape)
        for option, text in (("--prompt", prompt), ("--response", response)):
            if text is not None:
                check_text(text, option)
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
    except ImageError as err:
        if image is not None and not image.startswith("data:") and len(image) < 4096 and not _exists(image):
            # a missing file's name can also read as base64: say both what was tried and what is missing
            _fail(f"--image: no file {image!r} exists, and as a data URL or base64 image: {err}")
        _fail(str(err))
    except ConversationError as err:
        _fail(str(err))


def _load_guard(model: str | None, policy: Any, device: str, dtype: str, threshold: float | None, fmt: str,
                batch_size: int = 8, fast: bool = False, quantize: str | None = None,
                read_text: str = "auto", ocr_timeout_s: float = OCR_TIMEOUT_S) -> Any:
    from .checkpoints import resolve_device
    from .engine import EngineError
    from .guard import READ_TEXT_MODES, Guard
    from .ocr import OcrUnavailable
    from .prompt import PromptFormat

    try:
        resolve_device(device)
    except EngineError as err:  # a bad flag, not a model that failed: say so before anything loads
        _fail(f"--device: {err}")
    try:
        fmt_enum = PromptFormat(fmt)
    except ValueError:
        _fail(f"unknown --format {fmt!r}; use hf, hf-release or native")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        _fail(f"--threshold must be within [0, 1], got {threshold}")
    if read_text not in READ_TEXT_MODES:
        _fail(f"unknown --read-text {read_text!r}; use off, auto or on")
    try:
        return Guard.from_pretrained(model, policy=policy, device=device, dtype=dtype, threshold=threshold,
                                     prompt_format=fmt_enum, batch_size=batch_size, fast=fast,
                                     fast_options={"quantize": quantize} if quantize else None,
                                     read_text=read_text, ocr_timeout_s=ocr_timeout_s)
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

    from .termio import printable

    console = Console()
    style = "bold red" if verdict.is_unsafe else "bold green"
    console.print(f"[{style}]{verdict.label.upper()}[/]  p(unsafe) = {verdict.unsafe_probability:.4f}"
                  f"  (threshold {verdict.threshold:g}, judged: {verdict.task} / {verdict.role})")
    if verdict.violated:
        table = Table("code", "category", "p(unsafe, listed first)")
        for v in verdict.violated:
            p = verdict.category_probabilities.get(v.code, 0.0)
            table.add_row(printable(v.code), printable(v.name), f"{p:.4f}")
        console.print(table)
    if verdict.read_text is not None:
        console.print(f"text in the image: {printable(repr(verdict.read_text))}" if verdict.read_text
                      else "text in the image: none")
    if len(verdict.check_probabilities) > 1:
        checks = ", ".join(f"{k} {p:.4f}" for k, p in verdict.check_probabilities.items())
        console.print(f"checks: {checks}; flagged by: {', '.join(verdict.flagged_by) or 'none'}")
    for w in verdict.warnings:
        console.print(f"[yellow]warning:[/] {printable(w)}")


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
    threshold: Annotated[float | None, typer.Option(
        help="Unsafe if p(unsafe) >= threshold (default: the model's validated per-task thresholds in its "
             "mmguard.json, else 0.5).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU).")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Model batch size for --jsonl.")] = 8,
    fmt: FormatOpt = "hf",
    fast: FastOpt = False,
    quantize: QuantizeOpt = None,
    read_text: ReadTextOpt = "auto",
    ocr_timeout: OcrTimeoutOpt = OCR_TIMEOUT_S,
    as_json: JsonOpt = False,
) -> None:
    """Classify one conversation, or every line of a JSONL file (--jsonl)."""
    active = _load_policy(policy, exclude)
    if jsonl is not None:
        if prompt or response or image or input_:
            _fail("--jsonl cannot be combined with --prompt/--response/--image/--input")
        _readable_file(jsonl, "--jsonl")
        if output is not None:
            if output.is_dir():
                _fail(f"--output: {output} is a folder; give a file name")
            if not output.parent.is_dir():
                _fail(f"--output: folder not found: {output.parent}")
            if output.exists() and output.resolve() == jsonl.resolve():
                _fail("--output is the --jsonl input file; writing would erase it")
        guard = _load_guard(model, active, device, dtype, threshold, fmt, batch_size, fast, quantize, read_text,
                            ocr_timeout)
        from .engine import EngineError

        try:
            bad = _classify_jsonl(guard, jsonl, output, batch_size)
        except EngineError as err:  # the model itself failed (non-finite scores): no verdict can be trusted
            _fail(f"model error: {err}", EXIT_MODEL)
        if bad:
            typer.echo(f"error: {bad} line(s) of {jsonl} were invalid; their output rows hold "
                       "'mmguard': {'line': N, 'error': ...} and the other lines were classified", err=True)
            raise typer.Exit(EXIT_INPUT)
        return
    conv = _conversation(prompt, response, image, input_)
    guard = _load_guard(model, active, device, dtype, threshold, fmt, fast=fast, quantize=quantize,
                        read_text=read_text, ocr_timeout_s=ocr_timeout)
    from .engine import EngineError

    try:
        verdict = guard.classify(conv)
    except ValueError as err:
        _fail(str(err))
    except EngineError as err:
        _fail(f"model error: {err}", EXIT_MODEL)
    _print_verdict(verdict, as_json)
    if verdict.is_unsafe:
        raise typer.Exit(EXIT_UNSAFE)


def _classify_jsonl(guard: Any, path: Path, output: Path | None, batch_size: int) -> int:
    """Stream a JSONL file through the guard, one output row per line (schema: :mod:`mmguard.jsonl`);
    returns the number of lines that got an error row."""
    from .jsonl import JsonlLine, dumps_row, iter_lines, parse_line
    from .termio import progress_bar

    try:
        out = output.open("w", encoding="utf-8") if output else sys.stdout
    except OSError as err:
        _fail(f"cannot write {output}: {err.strerror or err}")
    bad = 0
    chunk: list[JsonlLine] = []

    def flush() -> None:
        nonlocal bad
        if not chunk:
            return
        good = [x for x in chunk if x.conversation is not None]
        for x, verdict in zip(good, _judge(guard, [x.conversation for x in good], batch_size), strict=True):
            if isinstance(verdict, str):
                x.error = verdict
            else:
                x.verdict = verdict
        for x in chunk:
            if x.error is not None:
                bad += 1
                typer.echo(f"error: {path}:{x.line}: {x.error}", err=True)
            try:
                out.write(dumps_row(x.row()) + "\n")
            except OSError as err:  # a full disk, a closed pipe: the rows cannot be kept, so stop and say so
                _fail(f"cannot write {output or 'stdout'}: {err.strerror or err}")
        try:
            out.flush()
        except OSError as err:
            _fail(f"cannot write {output or 'stdout'}: {err.strerror or err}")
        progress.advance(task, len(chunk))
        chunk.clear()

    with progress_bar("classify", transient=output is None) as progress:
        total = sum(1 for _ in iter_lines(path)) if not progress.disable else None
        task = progress.add_task("classify", total=total)
        for n, raw in iter_lines(path):
            chunk.append(parse_line(raw, n, base_dir=path.parent))
            if len(chunk) >= batch_size * 4:
                flush()
        flush()
    if output:
        out.close()
    return bad


def _judge(guard: Any, convs: list[Any], batch_size: int) -> list[Any]:
    """Verdicts for ``convs``; a conversation the guard refuses (``ValueError``, e.g. a prompt it cannot
    render) gets its message instead, found by judging that batch one conversation at a time."""
    if not convs:
        return []
    try:
        return list(guard.classify_batch(convs, batch_size=batch_size))
    except ValueError:
        pass
    out: list[Any] = []
    for conv in convs:
        try:
            out.append(guard.classify(conv))
        except ValueError as err:
            out.append(str(err) or type(err).__name__)
    return out


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

    from .termio import printable

    table = Table("code", "prompt label", "title", "active", *(["description"] if descriptions else []),
                  title=f"policy: {printable(active.name)}")
    for c in active.categories:
        row = [printable(c.code), printable(c.label), printable(c.title),
               "no (excluded)" if c.code in active.excluded else "yes"]
        if descriptions:
            row.append(printable(c.description))
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
    from .termio import printable

    console = Console()
    guard = _load_guard(model, None, device, "auto", None, "hf")
    console.print(f"model: {printable(guard.engine.source)}  device: {guard.engine.device}  "
                  f"tile: {guard.engine.tile_size}px")
    recorded = " (chosen on a validation split, from the model's mmguard.json)" if guard.model_thresholds else ""
    console.print(f"thresholds: prompt {guard.threshold_for('prompt'):g}, response "
                  f"{guard.threshold_for('response'):g}{recorded}")
    if guard.engine.is_random_weights:
        console.print(f"[bold yellow]NOTE: the default {RANDOM_WEIGHTS_WARNING}.[/] "
                      "Pass --model with a Llama Guard 3 Vision checkpoint for real verdicts.")
    examples = example_conversations()
    verdicts = guard.classify_batch([c for _, c in examples])
    reading = any(v.read_text is not None for v in verdicts)  # the OCR stage ran (read_text auto/on)
    columns = ["example", "task", "image", "verdict", "p(unsafe)", "codes"]
    table = Table(*columns, *(["text read in the image", "flagged by"] if reading else []), title="mmguard demo")
    for (name, _conv), v in zip(examples, verdicts, strict=True):
        row = [name, v.task, "yes" if v.has_image else "no", f"[{'red' if v.is_unsafe else 'green'}]{v.label}[/]",
               f"{v.unsafe_probability:.3f}", ",".join(v.codes)]
        if reading:
            read = "" if v.read_text is None else (v.read_text[:40] + "..." if len(v.read_text) > 40 else v.read_text)
            row += [printable(read) or ("(none)" if v.has_image else ""), ", ".join(v.flagged_by)]
        table.add_row(*row)
    console.print(table)
    for (name, _conv), v in zip(examples, verdicts, strict=True):
        for w in v.warnings:
            console.print(f"[yellow]warning[/] ({name}): {printable(w)}")


# Tools built on the API register here: (module, attribute, command name, kind)
_TOOLS = [
    ("mmguard.server.cli", "command", "serve", "command"),
    ("mmguard.proxy.cli", "command", "proxy", "command"),
    ("mmguard.eval.cli", "command", "eval", "command"),
    ("mmguard.train.cli", "command", "train", "command"),
    ("mmguard.train.cli", "soup_command", "soup", "command"),
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
    if not sys.stderr.isatty():
        # the Hugging Face libraries draw tqdm bars ("Loading weights", ...) on stderr even into pipes and logs
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _register_tools(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
