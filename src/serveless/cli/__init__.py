"""The `serveless` command line.

`app` is built in `app.py`; each module here adds one group of commands to it: `data`
(pack), `models` (models, partition), `run` (run, demo), `report` (report, export), `jobs`
(`serveless jobs`: list, show, clean, delete), `experiments` (the paper's figures),
`calibrate` (here or on a backend), `plan` (plan, simulate, fit). Options and helpers that
several commands share are in `common`.
"""

from __future__ import annotations

import importlib

from .app import app

# Each module adds its commands to the app; --help lists them in this order.
for _module in ("data", "models", "run", "report", "jobs", "experiments", "calibrate", "plan"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    """The `serveless` script: a bug prints one line unless --debug asks for the traceback."""
    import sys

    from . import common

    try:
        app()
    except Exception as exc:  # not a user mistake (those exit 2 with their message)
        if common.DEBUG or "--debug" in sys.argv:
            raise
        # said here, outside the command: typer.Exit would be raised past typer, with a
        # traceback of its own
        common.say_error(f"internal error: {type(exc).__name__}: {exc} (run again with "
                         "'serveless --debug …' for the traceback, and please report it)")
        raise SystemExit(1) from None
