"""Command line: ``mmguard classify | prompt | policy | demo`` plus the tools' commands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="mmguard",
    help="Moderate human-AI conversations with images (Llama Guard 3 Vision).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Tools built on the API register here: (module, attribute, command name, kind)
_TOOLS = [
    ("mmguard.server.cli", "command", "serve", "command"),
    ("mmguard.eval.cli", "command", "eval", "command"),
    ("mmguard.train.cli", "command", "train", "command"),
    ("mmguard.attacks.cli", "command", "attack", "command"),
    ("mmguard.data.cli", "app", "data", "group"),
]


def _register_tools() -> None:
    for module, attr, name, kind in _TOOLS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("mmguard"):
                continue  # tool not built yet
            raise
        obj = getattr(mod, attr)
        if kind == "group":
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)


def main() -> None:
    _register_tools()
    app()


if __name__ == "__main__":
    main()
