"""The `serveless` Typer app; command modules add their commands to it on import."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import common

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Batch DNN inference over image sets on serverless functions.")
models_app = typer.Typer(no_args_is_help=True, help="Built-in models.")
app.add_typer(models_app, name="models")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"serveless {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_version, help="print the version and exit")]
    = False,
    debug: Annotated[bool, typer.Option(
        "--debug", help="show the traceback of an error (for reporting a bug)")] = False,
) -> None:
    common.DEBUG = debug
