"""Backends run invocations of stage functions and return each one's result and billing.

Each backend is a package with its driver side and its function side as separate
modules: `local/` (backend.py in the driver, worker.py the function instance, isolation.py
its memory cap and CPU share) and `lithops/` (backend.py in the driver, sidecar.py the
helper process that runs Lithops). Both are imported only when asked for, so a missing
optional dependency (Lithops) is a one-line hint, not an import error elsewhere.
"""

from __future__ import annotations

from typing import Any

from .base import Backend, FunctionSpec, InvocationResult

__all__ = ["Backend", "FunctionSpec", "InvocationResult", "make_backend"]


def make_backend(name: str, options: dict[str, Any] | None = None, **local: Any) -> Backend:
    """A backend by name: 'local' (the embedded Lambda-like runtime) or 'lithops'."""
    options = dict(options or {})
    if name == "local":
        from .local import LocalBackend
        from .local.backend import check_options

        check_options(options)
        return LocalBackend(**local, **options)
    if name == "lithops":
        try:
            from .lithops import LithopsBackend
        except ImportError as exc:
            raise ValueError(f"the lithops backend needs `pip install lithops` ({exc})") from exc
        return LithopsBackend(options)
    raise ValueError(f"unknown backend {name!r}; available: local, lithops")
