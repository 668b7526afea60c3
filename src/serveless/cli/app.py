"""The `serveless` Typer app; command modules add their commands to it on import."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Batch DNN inference over image sets on serverless functions.")
models_app = typer.Typer(no_args_is_help=True, help="Built-in models.")
app.add_typer(models_app, name="models")
