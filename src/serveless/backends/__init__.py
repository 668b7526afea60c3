"""Backends run invocations of stage functions and return each one's result and billing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class FunctionSpec:
    """One deployed function: the stage it serves and its memory size."""

    stage: int
    memory_mb: int
    model_key: str
    store: dict[str, Any]
    threads: int = 1


@dataclass
class InvocationResult:
    metrics: dict[str, Any] | None
    error: dict[str, str] | None
    cold: bool
    init_ms: float
    duration_ms: float
    peak_mb: float | None
    instance: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


class Backend(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """What to say in the run summary about how faithful this backend is."""
        ...

    def invoke(self, fn: FunctionSpec, event: dict[str, Any]) -> InvocationResult:
        """Run one invocation to completion; thread-safe, blocking."""
        ...

    def close(self) -> None: ...


def make_backend(name: str, options: dict[str, Any] | None = None, **local: Any) -> Backend:
    """A backend by name: 'local' (the embedded Lambda-like runtime) or 'lithops'."""
    options = dict(options or {})
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(**local, **options)
    if name == "lithops":
        try:
            from .lithops import LithopsBackend
        except ImportError as exc:
            raise ValueError(f"the lithops backend needs `pip install lithops` ({exc})") from exc
        return LithopsBackend(options)
    raise ValueError(f"unknown backend {name!r}; available: local, lithops")
