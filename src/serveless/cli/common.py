"""What every command shares: consoles, the store and backend options, and how a user
mistake becomes one line on stderr with exit status 2 (never a traceback)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, NoReturn, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.text import Text

from ..cost import LAMBDA_GB_SECOND
from ..driver.spec import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MEMORY_MB,
    DEFAULT_MICRO_BATCH,
    DEFAULT_RETRIES,
)
from ..errors import USER_ERRORS
from ..report.wrap import wrap_text
from ..store import Store

T = TypeVar("T")
DEBUG = False  # `serveless --debug …`: tracebacks instead of one-line errors

# Lines written to a pipe or a file are never wrapped: a log must keep paths whole for grep.
PIPE_WIDTH = 1000


class CliConsole(Console):
    """A console that wraps only for a person at a terminal, and there only at words.

    Rich takes its width from COLUMNS (or 80) even when the output is a pipe, and then
    breaks long paths mid-name. Here a pipe or file gets a width no line reaches and text
    is never wrapped: copy and paste, and grep, get every line whole. At a terminal, text
    (not tables: report/tables.py fits those) is wrapped at word boundaries by
    report/wrap.py, so a path is never cut; one too long for the screen stands alone.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(soft_wrap=True, **kwargs)

    @property
    def piped(self) -> bool:
        isatty = getattr(self.file, "isatty", None)
        try:
            return isatty is None or not isatty()
        except ValueError:  # closed stream
            return True

    @property
    def size(self) -> ConsoleDimensions:
        if self.piped:
            return ConsoleDimensions(PIPE_WIDTH, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def print(self, *objects: Any, sep: str = " ", markup: bool | None = None,
              highlight: bool | None = None, emoji: bool | None = None,
              **kwargs: Any) -> None:
        # soft_wrap=True, given: the caller wants the text as it is (a command to copy)
        if (objects and kwargs.get("soft_wrap") is None and not self.piped
                and all(isinstance(o, str | Text) for o in objects)):
            parts = [o if isinstance(o, Text) else self.render_str(
                o, markup=markup, highlight=highlight, emoji=emoji) for o in objects]
            objects = (wrap_text(Text(sep).join(parts), self.width),)
        super().print(*objects, sep=sep, markup=markup, highlight=highlight, emoji=emoji,
                      **kwargs)


console = CliConsole()
err_console = CliConsole(stderr=True)

# Options shared by commands: one name, one meaning, one default everywhere. Bounds and
# choices are checked by the parser, before a command writes or invokes anything.
ARCHES = sorted(LAMBDA_GB_SECOND)
BACKENDS = ["local", "lithops"]
KEEP_ALIVE_S = 300.0

JobOpt = Annotated[str | None, typer.Option(
    "--job", metavar="NAME",
    help="job name (its folder in the store) [default: a new '<records>-<date>-<n>']")]
RecordsOpt = Annotated[str | None, typer.Option(
    "--records", metavar="DIR|GLOB", help="folder or glob of .tfrecord files")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", metavar="NAME|FILE.onnx",
    help="built-in model name or .onnx file [default: alexnet]")]
PresetOpt = Annotated[str | None, typer.Option(
    "--preset", metavar="NAME",
    help="'paper': the paper's stages (AlexNet conv1 | conv2 | conv3-5 | fc)")]
CutsOpt = Annotated[str | None, typer.Option(
    "--cuts", metavar="T1,T2,…",
    help="cut tensors (see 'partition MODEL --list') [default: none, the whole model]")]
MemoryOpt = Annotated[str | None, typer.Option(
    "--memory", metavar="MB[,MB…]",
    help=f"memory per stage; one value applies to all stages [default: {DEFAULT_MEMORY_MB}, "
         "1 vCPU]")]
ConcurrencyOpt = Annotated[int | None, typer.Option(
    "--concurrency", min=1, metavar="C",
    help=f"invocations in flight [default: {DEFAULT_CONCURRENCY}]")]
MicroBatchOpt = Annotated[int | None, typer.Option(
    "--micro-batch", min=1, metavar="B",
    help=f"images per onnxruntime run [default: {DEFAULT_MICRO_BATCH}]")]
RetriesOpt = Annotated[int | None, typer.Option(
    "--retries", min=0, metavar="N",
    help=f"retries per failed invocation [default: {DEFAULT_RETRIES}]")]
ArchOpt = Annotated[Literal[tuple(ARCHES)], typer.Option(  # type: ignore[valid-type]
    "--arch", help="Lambda prices of this architecture")]
MaxInstancesOpt = Annotated[int | None, typer.Option(
    "--max-instances", min=1, metavar="N",
    help="instances per function [default: --concurrency]")]
KeepAliveOpt = Annotated[float, typer.Option(
    "--keep-alive", min=0.0, metavar="SECONDS", help="idle seconds before an instance stops")]
StoreOpt = Annotated[str, typer.Option(
    "--store", metavar="URL|DIR", help="fsspec URL or folder of the store")]
StoreOptions = Annotated[list[str] | None, typer.Option(
    "--store-option", metavar="KEY=VALUE",
    help="passed to fsspec for the store (repeatable)")]
BackendOpt = Annotated[Literal[tuple(BACKENDS)], typer.Option(  # type: ignore[valid-type]
    "--backend",
    help="local: this machine's Lambda-like runtime; lithops: AWS Lambda and other clouds")]
BackendOptions = Annotated[list[str] | None, typer.Option(
    "--backend-option", metavar="KEY=VALUE", help="for the backend (repeatable)")]


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


def start_backend(name: str, options: list[str] | None, **local: Any) -> Any:
    """A backend by name (`--backend`) with its `--backend-option` pairs, started: an
    unknown option, or Lithops not installed, is one line and exit status 2. `local`:
    settings of the local backend (max_instances, keep_alive_s) that are not options."""
    from ..backends import make_backend

    return guarded(lambda: make_backend(name, parse_options(options), **local))


def say(text: str, err: bool = False) -> None:
    """Plain text (paths, reasons): no markup, so a '[' in a file name is printed as is."""
    (err_console if err else console).print(text, markup=False, highlight=False)


def say_error(message: str) -> None:
    """`error: <message>` on stderr, as one line (no markup: paths keep their brackets)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message))


def fail(message: str, code: int = 2) -> NoReturn:
    """Inside a command: say the error and end the command with `code`."""
    say_error(message)
    raise typer.Exit(code)


def guarded(fn: Callable[[], T]) -> T:
    """Run `fn`; a user mistake becomes `error: …` and exit status 2."""
    try:
        return fn()
    except USER_ERRORS as exc:
        if DEBUG:
            raise
        fail(str(exc))
    raise AssertionError("unreachable")


QuantizeOpt = Annotated[str | None, typer.Option(
    "--quantize", help="int8: static QDQ int8 stages calibrated on the job's images")]
WeightsOpt = Annotated[str | None, typer.Option(
    "--weights", help="float16: store weights as float16 (computed in float32)")]
CalibrationOpt = Annotated[int, typer.Option(
    "--calibration-images", metavar="N",
    help="images of the records that calibrate --quantize int8")]
OutputOpt = Annotated[str | None, typer.Option(
    "--output", metavar="predictions|embeddings",
    help="what the last stage stores: top-5 rows, or every image's vector "
         "(embeddings/<record>.npy) beside its row [default: predictions]")]
TensorOpt = Annotated[str | None, typer.Option(
    "--tensor", metavar="NAME",
    help="the tensor --output embeddings stores (see partition MODEL --list) "
         "[default: the model's output]")]


def check_precision(quantize: str | None, weights: str | None, calibration: int) -> None:
    from ..model.quantize import check_settings

    guarded(lambda: check_settings(quantize, weights, calibration))
