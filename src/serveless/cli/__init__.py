"""The `serveless` command line.

`app` is built in `app.py`; each module here adds one group of commands to it:
`jobs` (pack, models, partition, run, demo, report), `experiments` (the paper's
figures). Options and helpers that several commands share are in `common`.
"""

from __future__ import annotations

from . import experiments, jobs  # noqa: F401  (registers their commands)
from .app import app

__all__ = ["app"]
