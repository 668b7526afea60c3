"""The object store: any fsspec URL, atomic writes, and the job layout of DESIGN.md.

Every object is written whole or not at all (temp file + rename on local disks, a single
PUT on object stores), so a re-run stage never leaves a torn object behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec

T = TypeVar("T")
DEFAULT_STORE = "./serveless-store"
# Fault injection for resilience tests and drills: flaky://<path> fails a share of requests.
fsspec.register_implementation("flaky", "serveless.faults.FlakyFileSystem", clobber=True)
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class StoreError(Exception):
    """The store cannot be reached or an object is missing."""


class TransientStoreError(OSError):
    """A store request failed in a way that may succeed when tried again."""


STORE_RETRIES = 5


def _retrying(op: Callable[[], T], what: str) -> T:
    """Object stores fail transiently (throttling, resets): retry with backoff and jitter.

    Missing objects and permission errors are final and raised at once.
    """
    for attempt in range(STORE_RETRIES + 1):
        try:
            return op()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError:
            if attempt == STORE_RETRIES:
                raise
            time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError(what)  # unreachable


def validate_job_name(job: str) -> str:
    """Refuse names that could escape the job folder (path separators, '..')."""
    if not _JOB_NAME.match(job) or ".." in job:
        raise ValueError(
            f"invalid job name {job!r}: use letters, digits, '_', '-', '.', no path separators "
            "and no '..'"
        )
    return job


class Store:
    """A folder-like view of an fsspec URL. Keys are '/'-separated paths below the root."""

    def __init__(self, url: str = DEFAULT_STORE, options: dict[str, Any] | None = None):
        self.url = url
        self.options = dict(options or {})
        if "://" not in url:
            url = Path(url).expanduser().resolve().as_uri()
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **self.options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open store {self.url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def spec(self) -> dict[str, Any]:
        """What a function needs to open the same store elsewhere (JSON-safe)."""
        return {"url": self.url, "options": self.options}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Store:
        return cls(spec["url"], spec.get("options"))

    def path(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str) -> bool:
        return _retrying(lambda: bool(self.fs.exists(self.path(key))), key)

    def size(self, key: str) -> int:
        try:
            return _retrying(lambda: int(self.fs.size(self.path(key))), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            return _retrying(lambda: self.fs.cat_file(self.path(key)), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def open_read(self, key: str) -> IO[bytes]:
        try:
            return _retrying(lambda: self.fs.open(self.path(key), "rb"), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def local_path(self, key: str) -> str | None:
        """The file's path on this machine when the store is a local folder, else None."""
        return self.path(key) if self.local else None

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.local:
            with self.writer(key) as f:
                f.write(data)
        else:
            _retrying(lambda: self.fs.pipe_file(self.path(key), data), key)

    def put_file(self, local: str | os.PathLike[str], key: str) -> None:
        """Upload a finished local file as one object, atomically."""
        dest = self.path(key)
        if self.local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            with open(local, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.replace(tmp, dest)
        else:
            _retrying(lambda: self.fs.put_file(os.fspath(local), dest), key)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        """A file to write an object into; the object appears only if the block succeeds."""
        dest = self.path(key)
        if self.local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    yield f
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fd, tmp = tempfile.mkstemp(prefix="serveless-")
            try:
                with os.fdopen(fd, "wb") as f:
                    yield f
                _retrying(lambda: self.fs.put_file(tmp, dest), key)
            finally:
                os.unlink(tmp)

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Keys directly under a prefix ending in suffix, sorted; [] if the prefix is absent."""
        base = self.path(prefix)
        try:
            entries = _retrying(lambda: self.fs.ls(base, detail=False), prefix)
        except FileNotFoundError:
            return []
        keys = []
        for entry in entries:
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(suffix) and ".tmp-" not in name:
                keys.append(f"{prefix.strip('/')}/{name}")
        return sorted(keys)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key), recursive=True)


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


class JobLayout:
    """Object keys of one job, as laid out in DESIGN.md."""

    def __init__(self, job: str):
        self.job = validate_job_name(job)

    def key(self, *parts: str) -> str:
        return "/".join((self.job, *parts))

    @property
    def spec(self) -> str:
        return self.key("job.json")

    @property
    def log(self) -> str:
        return self.key("invocations.jsonl")

    def stage_model(self, k: int) -> str:
        return self.key("model", f"stage-{k}.onnx")

    @property
    def records_prefix(self) -> str:
        return self.key("records")

    def record(self, name: str) -> str:
        return self.key("records", f"{name}.tfrecord")

    def stage_output(self, k: int, record: str, suffix: str = ".npy") -> str:
        return self.key(f"stage-{k}", f"{record}{suffix}")

    def record_meta(self, record: str) -> str:
        """Filenames, labels and per-image errors found by stage 0, read by the last stage."""
        return self.key("stage-0", f"{record}.meta.json")

    def predictions(self, record: str) -> str:
        return self.key("predictions", f"{record}.jsonl")
