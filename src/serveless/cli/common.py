"""What every command shares: consoles, the store and backend options, and how a user
mistake becomes one line on stderr with exit status 2 (never a traceback)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.text import Text

from ..store import Store, StoreError

T = TypeVar("T")

# Lines written to a pipe or a file are never wrapped: a log must keep paths whole for grep.
PIPE_WIDTH = 1000


class CliConsole(Console):
    """A console that wraps only for a person at a terminal.

    Rich takes its width from COLUMNS (or 80) even when the output is a pipe, and then
    breaks long paths mid-name. Here a pipe or file gets a width no line reaches, and
    plain text is soft-wrapped (left whole) everywhere: a terminal folds it on screen,
    copy and paste still give back one line.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(soft_wrap=True, **kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        isatty = getattr(self.file, "isatty", None)
        try:
            piped = isatty is None or not isatty()
        except ValueError:  # closed stream
            piped = True
        if piped:
            return ConsoleDimensions(PIPE_WIDTH, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = CliConsole()
err_console = CliConsole(stderr=True)

StoreOpt = Annotated[str, typer.Option("--store", help="fsspec URL or folder of the store")]
StoreOptions = Annotated[list[str] | None, typer.Option(
    "--store-option", help="key=value passed to fsspec for the store (repeatable)")]
BackendOpt = Annotated[str, typer.Option("--backend", help="local or lithops")]
BackendOptions = Annotated[list[str] | None, typer.Option(
    "--backend-option", help="key=value for the backend (repeatable)")]


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """key=value pairs; values that parse as JSON (numbers, true/false) are typed."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"option {pair!r} must be key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def open_store(url: str, options: list[str] | None) -> Store:
    return guarded(lambda: Store(url, parse_options(options)))


def say(text: str, err: bool = False) -> None:
    """Plain text (paths, reasons): no markup, so a '[' in a file name is printed as is."""
    (err_console if err else console).print(text, markup=False, highlight=False)


def fail(message: str, code: int = 2) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", message))  # no markup in paths
    raise typer.Exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    from ..models import ModelError
    from ..partition import PartitionError
    from ..pipeline import JobError
    from ..records import RecordError

    return (JobError, ModelError, PartitionError, StoreError, RecordError, ValueError,
            FileNotFoundError)


def guarded(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except user_errors() as exc:
        fail(str(exc))


