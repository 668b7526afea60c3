"""What every backend is: it runs invocations of stage functions and returns each one's
result and billing record.

A backend carries the protocol (runtime/protocol.py) and adds what only the platform
knows: whether the call was a cold start, its init and billed duration, its peak memory
as the platform measured it, and which instance served it. Its own failures (an instance
that died, a call that timed out, a refused call) are reported with the protocol's error
kinds, so the driver treats every backend alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..runtime.protocol import InvocationError


@dataclass
class FunctionSpec:
    """One deployed function: the stage it serves and its memory size. A `model_key` of ""
    is a calibration function's (`serveless calibrate --backend`): it serves no stage."""

    stage: int
    memory_mb: int
    model_key: str
    store: dict[str, Any]
    threads: int = 1


@dataclass
class InvocationResult:
    """One invocation as the platform saw it. `metrics` is what the function answered (the
    protocol's Metrics as JSON; a calibration call's `CalibrationAnswer`; a call target of a
    Lithops drill may answer other data), `error` why it failed (given as an
    InvocationError or its JSON form)."""

    metrics: dict[str, Any] | None
    error: InvocationError | None
    cold: bool
    init_ms: float
    duration_ms: float
    peak_mb: float | None
    instance: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.error, dict):  # as it crossed a process boundary
            self.error = InvocationError.from_dict(self.error)

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
