"""Fault injection: a filesystem that fails a share of requests, as real stores do.

`flaky://<path>` is a local folder whose reads and writes raise TransientStoreError with
probability `fail_rate` (store option, default 0.05). Used by the resilience tests and
usable for drills: `serveless run --store flaky:///tmp/s --store-option fail_rate=0.1`.
Failures happen per request, never half-way through a rename, so what fails is the
request, not the data: exactly what an object store's 5xx looks like.
"""

from __future__ import annotations

import os
import random
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from .store import TransientStoreError


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
        tmp = f"{path}.tmp-upload-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(value)
        os.replace(tmp, path)

    def put_file(self, lpath: Any, rpath: Any, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("put", rpath)
        # write beside, then rename: a failed or killed upload never leaves a torn object
        rpath = self._strip_protocol(rpath)
        os.makedirs(os.path.dirname(rpath), exist_ok=True)
        tmp = f"{rpath}.tmp-upload-{os.getpid()}"
        super().put_file(lpath, tmp, *args, **kwargs)
        os.replace(tmp, rpath)

    def _open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("open", path)
        return super()._open(path, mode, *args, **kwargs)

    def info(self, path: Any, **kwargs: Any) -> Any:
        self._maybe_fail("head", path)
        return super().info(path, **kwargs)
