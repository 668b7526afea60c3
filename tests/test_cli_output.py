"""What the CLI writes to a pipe is never wrapped, whatever COLUMNS says (issue 15).

A user who sends stderr to a log or a CI system must be able to grep a record's path
and copy a failed image's name: both come out whole, on one line, with their reason.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_classifier

from serveless.cli.common import CliConsole
from serveless.data.records import Example, write_record
from serveless.data.samples import synthetic_photo
from serveless.model.graph import save_model

LONG_NAME = "a-photo-whose-name-is-long-enough-to-be-cut-by-any-terminal-" + "x" * 60 + ".jpg"


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    synthetic_photo(seed, (64, 48)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def long_job(tmp_path_factory) -> Path:
    """A folder over 200 characters deep: a model, a good record with one truncated
    JPEG of a long name, and a record with a flipped bit."""
    base = tmp_path_factory.mktemp("cli")
    for part in ("d" * 60, "e" * 60, "f" * 60, "g" * 30):
        base = base / part
    assert len(str(base)) > 200
    recs = base / "recs"
    recs.mkdir(parents=True)
    save_model(tiny_classifier(), base / "tiny.onnx")
    good = [Example(_jpeg(i), f"img{i}.jpg", 0) for i in range(4)]
    truncated = _jpeg(9)[:300]
    with open(recs / "00000.tfrecord", "wb") as f:
        write_record(f, [*good[:2], Example(truncated, LONG_NAME, 0), *good[2:]])
    buf = io.BytesIO()
    write_record(buf, good)
    data = bytearray(buf.getvalue())
    data[len(data) // 2] ^= 0x40  # inside some image's bytes: a data CRC mismatch
    bad = base / "bad"  # refused before anything runs (issue 11): a run of its own
    bad.mkdir()
    (bad / "00001.tfrecord").write_bytes(bytes(data))
    return base


@pytest.mark.e2e
@pytest.mark.parametrize("columns", [None, "40", "300"])
def test_piped_errors_are_whole_lines(long_job: Path, tmp_path: Path, columns: str | None):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    store = long_job / f"store-{columns}"

    def run(folder: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "serveless.cli", "run", "--store", str(store), "--job", folder,
             "--records", str(long_job / folder), "--model", str(long_job / "tiny.onnx"),
             "--concurrency", "1"],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)

    bad = run("bad")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    record = re.compile(re.escape(str(long_job)) + r"\S*/00001\.tfrecord\b.*\bbyte \d+")
    assert any(record.search(line) for line in bad.stderr.splitlines()), bad.stderr
    proc = run("recs")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    image = [line for line in lines if LONG_NAME in line]
    assert image and re.search(r"\b(truncat|broken|image file)", image[0], re.I), proc.stderr
    # the summary table keeps every column on one header line, and the total one line
    assert any(all(h in line for h in ("stage", "peak MB", "GB-s", "S3 ops", "total"))
               for line in proc.stdout.splitlines()), proc.stdout
    assert any(re.search(r"^total .* GB-s; .* per 1M images", line)
               for line in proc.stdout.splitlines()), proc.stdout


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_terminal_keeps_long_paths_whole(monkeypatch):
    """At a 40-column terminal a path too long for it stands alone on its line, whole; the
    words after it wrap (issue 24: not cut mid-name, not folded mid-word)."""
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("TERM", "xterm-256color")  # .ci/run says TERM=dumb: rich then uses 80
    path = "/" + "/".join(["folder-name"] * 12) + "/00001.tfrecord"
    out = _Terminal()
    term = CliConsole(file=out, force_terminal=True)
    assert term.width == 40  # a person at a terminal still gets tables fitted to it
    term.print(f"{path}: byte 120: data CRC mismatch", markup=False, highlight=False)
    assert out.getvalue().splitlines() == [f"{path}:", "byte 120: data CRC mismatch"]


@pytest.mark.parametrize("columns", [None, "40"])
def test_pipe_width_ignores_columns(monkeypatch, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    out = _Pipe()
    pipe = CliConsole(file=out)
    assert pipe.width >= 1000
    line = "x" * 600
    pipe.print(line)
    assert out.getvalue() == line + "\n"
