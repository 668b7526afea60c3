"""`python -m serveless`."""

from .cli import app

app()
