"""`python -m serveless.cli`."""

from serveless.cli import app

app()
