"""A pseudo-terminal of a given width, and the rules a screen of our output must keep.

What a person sees in an 80-column tmux is what the CLI writes to a terminal: only a real
pseudo-terminal makes rich (and CliConsole) believe it is at one. `run_on_terminal` runs a
command with its stdout (and, if asked, stderr) on a pty of `columns` columns;
`terminal_console` gives a CliConsole writing to a pty in this process, for renderers that
need no command around them. `check_screen` asserts the issue-24 rules: no line wider than
the terminal unless it is one unbreakable word standing alone, no value cut with `…`, no
Python repr, and the given strings (paths, values) whole on one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from rich.cells import cell_len

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][AB012]")
REPR = re.compile(r"\{'|\['|'\]|\bTrue\b|\bFalse\b|\bNone\b")


def _sized_pty(columns: int, rows: int = 50) -> tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, slave


def _read_all(master: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the pty
            break
        if not data:
            break
        chunks.append(data)
    return ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r\n", "\n")


def terminal_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a person's terminal: no COLUMNS or LINES to override its size, a
    TERM rich treats as a terminal (.ci/run says TERM=dumb), no colours to strip."""
    out = {k: v for k, v in (env or os.environ).items()
           if k not in ("COLUMNS", "LINES", "TERM", "FORCE_COLOR", "TTY_COMPATIBLE")}
    out.update(TERM="xterm-256color", NO_COLOR="1")
    return out


def run_on_terminal(*args: str, columns: int, stderr_too: bool = False, timeout: float = 300,
                    env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m serveless.cli ARGS` with stdin and stdout on a `columns`-wide pty (and
    stderr, with `stderr_too`; else a pipe, so no progress bar is drawn): (exit status, what
    the terminal showed, stderr when piped)."""
    master, slave = _sized_pty(columns)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serveless.cli", *args], stdin=slave, stdout=slave,
            stderr=slave if stderr_too else subprocess.PIPE, env=terminal_env(env))
    finally:
        os.close(slave)
    err: list[bytes] = []
    reader = None
    if not stderr_too:  # drained beside the pty, so neither pipe fills and blocks the child
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
        reader.start()
    try:
        screen = _read_all(master)
        proc.wait(timeout=timeout)
        if reader is not None:
            reader.join(timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, screen, b"".join(err).decode("utf-8", "replace")


@contextlib.contextmanager
def terminal_console(columns: int) -> Iterator[tuple[Any, Any]]:
    """(a CliConsole writing to a `columns`-wide pty, a function returning what it showed
    so far). The console's width is the pty's: given, as rich reads it from fds 0-2."""
    from serveless.cli.common import CliConsole

    master, slave = _sized_pty(columns)
    out = os.fdopen(slave, "w", encoding="utf-8", closefd=True)
    shown: list[bytes] = []

    def drain() -> None:  # a pty holds little: read while the console writes
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            shown.append(data)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()

    def read() -> str:
        import time

        out.flush()
        size = -1
        while size != len(shown):  # until the drain has caught up
            size = len(shown)
            time.sleep(0.05)
        return ANSI.sub("", b"".join(shown).decode("utf-8", "replace")).replace("\r\n", "\n")

    console = CliConsole(file=out, width=columns, force_terminal=True, no_color=True)
    try:
        yield console, read
    finally:
        out.close()
        thread.join(2)
        os.close(master)


def check_screen(screen: str, columns: int, whole: Iterable[str] = (),
                 prose: Iterable[str] = ()) -> None:
    """The rules of a screen (issue 24); `whole`: strings each on one line, unbroken;
    `prose`: table cells that may wrap at words: each of their words whole, in order. A cell
    without a space is a value, and must be whole on one line."""
    lines = screen.splitlines()
    for line in lines:
        if cell_len(line) > columns:
            assert " " not in line.strip(), (
                f"a line of {cell_len(line)} columns on a {columns}-column terminal:\n{line}")
    assert "…" not in screen, f"a value was cut:\n{screen}"
    bad = [line for line in lines if REPR.search(line)]
    assert not bad, "a Python repr on screen:\n" + "\n".join(bad)
    words = " ".join(screen.split())
    for cell in prose:
        cell = cell.replace("`", "").replace("**", "")
        if " " not in cell.strip():
            whole = [*whole, cell.strip()]
        else:
            assert " ".join(cell.split()) in words, (
                f"{cell!r} is not on screen, words in order, at {columns} columns:\n{screen}")
    for text in whole:
        assert any(text in line for line in lines), (
            f"{text!r} is not whole on one line at {columns} columns:\n{screen}")
