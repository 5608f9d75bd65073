"""The `smolctl` command line: a Typer app whose commands all come in through the registry.

Commands live one per module under smolctl/cli/ and are registered through the
`smolctl.commands` entry-point group -- the same door an outside package uses (see registry.py).
Nothing here imports torch or transformers: `smolctl --help` stays fast.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from smolctl import __version__
from smolctl.cli.registry import OneLineErrors, load_commands


def _version(value: bool) -> None:
    if value:
        typer.echo(f"smolctl {__version__}")
        raise typer.Exit()


def make_app() -> typer.Typer:
    app = typer.Typer(
        name="smolctl",
        cls=OneLineErrors,
        help="Pretrain, resume, chat with and export SmolLM2-135M.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
        """Pretrain, resume, chat with and export SmolLM2-135M."""

    load_commands(app)
    return app


app = make_app()


def main() -> None:
    # datasets logs a reader's failure ("Failed to load JSON from file ...") before raising it, and
    # smolctl reports that error itself, in one line: its log says errors only where the user asks.
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    app()
