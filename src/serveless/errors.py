"""The errors a user can cause, in one place: what the command line turns into one line
(`error: …`) and exit status 2, never a traceback.

Each names the concept it guards (a job, a model, a cut, a record, a store, …), so a
message reads as an answer to what the user asked. They are defined here rather than beside
the code that raises them because they cross every boundary of the system: the function
raises `RecordError` and `TensorFormatError`, the driver reports them by name
(`runtime.protocol.DETERMINISTIC` decides from the name that a retry cannot help), and the
command line catches them all with `USER_ERRORS`. Internal signals that never reach a user
(a refused JPEG fast path, a damaged cache entry, a transient store failure that is retried)
stay private to their modules.
"""

from __future__ import annotations

from typing import Any


class JobError(ValueError):
    """The job cannot start: bad arguments, model, records or store."""


class ModelError(ValueError):
    """A model cannot be loaded or does not look like an image classifier we can serve."""


class PartitionError(ValueError):
    """The requested cuts cannot split this model, or the stages do not reproduce it."""


class QuantizeError(ValueError):
    """The quantization settings or the calibration images are not usable."""


class StoreError(Exception):
    """The store cannot be reached or an object is missing."""


class SourceError(ValueError):
    """The input cannot be used: nothing there, or a mix we do not guess about."""


class RecordError(Exception):
    """A record's bytes are malformed; the only exception the reader raises for bad data."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"{path}: byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Default pickling would call __init__ with the message only; errors cross
        # process boundaries in the function runtime, so keep them picklable.
        return (type(self), (self.path, self.offset, self.reason))


class TensorFormatError(ValueError):
    """An intermediate object is not a float .npy array we wrote."""


class PredictionCountError(RuntimeError):
    """The last stage produced a different number of rows than the record has images."""


class ExportError(ValueError):
    """The job cannot be exported as asked (no predictions, no saved scores, no pyarrow)."""


class CalibrationError(ValueError):
    """The calibration file is missing, malformed, or was made for another model."""


class PlanError(ValueError):
    """No plan meets the request, or a plan file is wrong or unsafe to run."""


class SimulationError(ValueError):
    """The plan or the target cannot be simulated (bad values)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    JobError, ModelError, PartitionError, StoreError, RecordError, ValueError,
    FileNotFoundError)
"""What a command reports as `error: <message>` with exit status 2 (every ValueError
subclass above is one; StoreError and RecordError are not ValueErrors, so they are named)."""
