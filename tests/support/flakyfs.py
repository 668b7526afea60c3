"""Fault injection for tests and drills: a filesystem that fails a share of requests, as
real stores do.

`flaky://<path>` is a local folder whose reads and writes raise TransientStoreError with
probability `fail_rate` (store option, default 0.05). Failures happen per request, never
half-way through a rename, so what fails is the request, not the data: exactly what an
object store's 5xx looks like.

It is test code, so it is not registered by the package. `register()` registers it in this
process; `environment()` is what a process needs for its children (local function
instances) to register it too: this folder on PYTHONPATH, whose `sitecustomize.py` calls
`register()` at interpreter start.
"""

from __future__ import annotations

import os
import random
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from serveless.store import TransientStoreError
from serveless.store.layout import temporary

SUPPORT = os.path.dirname(os.path.abspath(__file__))


class FlakyFileSystem(LocalFileSystem):
    protocol = ("flaky",)
    root_marker = "/"

    def __init__(self, fail_rate: float = 0.05, seed: int | None = None, **kwargs: Any):
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(**kwargs)
        if not 0 <= fail_rate < 1:
            raise ValueError("fail_rate must be in [0, 1)")
        self.fail_rate = fail_rate
        # Each process draws its own failures, but a seed makes a run repeatable.
        self._rng = random.Random(None if seed is None else seed + os.getpid())
        self.failures = 0

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://"):]
        return LocalFileSystem._strip_protocol(path)

    def _maybe_fail(self, op: str, path: Any) -> None:
        if self._rng.random() < self.fail_rate:
            self.failures += 1
            raise TransientStoreError(f"injected transient failure: {op} {path}")

    def cat_file(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("get", path)
        return super().cat_file(path, *args, **kwargs)

    def pipe_file(self, path: Any, value: bytes, *args: Any, **kwargs: Any) -> None:
        self._maybe_fail("put", path)
        path = self._strip_protocol(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = temporary(path)
        with open(tmp, "wb") as f:
            f.write(value)
        os.replace(tmp, path)

    def put_file(self, lpath: Any, rpath: Any, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("put", rpath)
        # write beside, then rename: a failed or killed upload never leaves a torn object
        rpath = self._strip_protocol(rpath)
        os.makedirs(os.path.dirname(rpath), exist_ok=True)
        tmp = temporary(rpath)
        super().put_file(lpath, tmp, *args, **kwargs)
        os.replace(tmp, rpath)

    def _open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("open", path)
        return super()._open(path, mode, *args, **kwargs)

    def info(self, path: Any, **kwargs: Any) -> Any:
        self._maybe_fail("head", path)
        return super().info(path, **kwargs)


def register() -> None:
    """Make `flaky://` URLs open this filesystem in this process."""
    import fsspec

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def environment() -> dict[str, str]:
    """Environment variables under which child processes register `flaky://` as well."""
    paths = [SUPPORT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
