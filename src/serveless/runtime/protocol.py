"""The protocol between the driver and a function, typed once: what an invocation asks
(`Event`), what it answers (`Metrics`), how it failed (`InvocationError` and its kinds),
and what the platform tells the function (`MODEL_CACHE_ENV`).

Both sides import this module and nothing else of each other: the driver builds an `Event`
and reads `Metrics`; the function parses the `Event`, raises, and answers `Metrics`; a
backend carries both as JSON (`to_dict`/`parse`, `from_dict`) across a process, a socket or
a cloud call, and reports its own failures with the same kinds. Events are validated where
they arrive, because they cross a process boundary.

Error kinds decide what the driver does next, so they are constants here, never string
literals elsewhere:

- `OUT_OF_MEMORY`: the instance exceeded its memory (an OOM kill, a MemoryError, or
  onnxruntime failing to allocate). Retried, and the stage's memory raised 1.5× once.
- `TOO_MANY_REQUESTS`: the platform refused the call (Lambda's 429): it never ran and is not
  billed. The driver backs off and asks again without spending a retry.
- `INSTANCE_DIED`, `TIMEOUT`, `BAD_REPLY` and the backends' own failures: retried.
- The names in `DETERMINISTIC` (a malformed record or tensor, a graph onnxruntime refuses,
  an invalid event): the same on every attempt, so marked `final` and never retried.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..data.predictions import OUTPUTS, SCORES
from ..store.layout import RECORD_SUFFIXES

OUT_OF_MEMORY = "OutOfMemory"
TOO_MANY_REQUESTS = "TooManyRequests"  # Lambda's 429: refused, never ran, not billed
INSTANCE_DIED = "InstanceDied"
TIMEOUT = "Timeout"
BAD_REPLY = "BadReply"  # an instance answered something that is not a result
LITHOPS_ERROR = "LithopsError"  # Lithops reported a failure with no exception of ours
LITHOPS_BACKEND_DIED = "LithopsBackendDied"  # the Lithops sidecar process is gone

DETERMINISTIC = {
    "RecordError": "the record is malformed",
    "TensorFormatError": "the stage input is malformed",
    "ValueError": "the event or an input is invalid",
    "PredictionCountError": "the stage output does not match the record",
    "InvalidArgument": "onnxruntime refused the input (shape or type)",
    "InvalidGraph": "onnxruntime refused the stage graph",
    "InvalidProtobuf": "the stage graph is not a valid ONNX file",
    "NotImplemented": "onnxruntime cannot run an operator of the stage",
}
"""Failures that come out the same on every attempt: the input, the graph or the event is
wrong. Retrying them costs an invocation each and cannot succeed."""

MODEL_CACHE_ENV = "SERVELESS_MODEL_CACHE"
"""Where the platform lets a function keep stage files between calls (a folder, or "0" for
none): a Lambda container's /tmp, a local backend's private folder."""

MAX_PIXELS = 100_000_000
"""The largest image stage 0 decodes (data.images.MAX_PIXELS, repeated here so that stages
past 0, whose cold starts are billed, do not import Pillow and protobuf: about 40 ms)."""


@dataclass
class Event:
    """What an invocation asks for: one stage of one job on one record."""

    store: dict[str, Any]
    job: str
    stage: int
    stages: int
    record: str
    memory_mb: int = 1769
    micro_batch: int = 32
    threads: int = 1
    format: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = MAX_PIXELS
    size: list[int] = field(default_factory=lambda: [224, 224])  # the model's input H, W
    preprocess: dict[str, Any] = field(default_factory=dict)  # model.graph.preprocessing()
    model: str = ""  # the stage model's key; "" = <job>/model/stage-<k>.onnx (older jobs)
    transform: dict[str, Any] = field(default_factory=dict)  # images.make_transform(); {}: ImageNet
    scores: str = "probs"  # what the model outputs: probs, softmax(logits) (applied here), logits
    classes: bool = False  # the job has <job>/labels.json: rows get class_name
    save_scores: bool = False  # also write every image's whole score row (run --save-scores)
    call: str = ""  # this invocation's id: stored with its output, so resume can recover it
    record_format: str = "tfrecord"  # the record's format (data/formats.py): tfrecord, webdataset
    label_key: str = ""  # a shard's .json key holding the label (run --label-key); "": label, cls
    output: str = "predictions"  # the last stage's: predictions, or embeddings (+ their rows)

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-safe data, for a backend to carry."""
        return asdict(self)

    @classmethod
    def parse(cls, event: dict[str, Any]) -> Event:
        """An event as it arrived, checked field by field (ValueError names what is wrong)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(event) - known
        if unknown:
            raise ValueError(f"unknown event fields: {', '.join(sorted(unknown))}")
        ev = cls(**event)
        if not 0 <= ev.stage < ev.stages:
            raise ValueError(f"stage {ev.stage} outside 0..{ev.stages - 1}")
        if ev.micro_batch < 1 or ev.threads < 1:
            raise ValueError("micro_batch and threads must be >= 1")
        if len(ev.size) != 2 or min(ev.size) < 1:
            raise ValueError(f"size must be [H, W], got {ev.size!r}")
        resize = ev.preprocess.get("resize")
        if set(ev.preprocess) - {"resize"} or not (
                resize is None or (isinstance(resize, int) and resize >= 1)):
            raise ValueError(f"preprocess must be {{'resize': int >= 1}}, got {ev.preprocess!r}")
        if ev.record_format not in RECORD_SUFFIXES:
            raise ValueError(f"record_format must be one of {tuple(RECORD_SUFFIXES)}, got "
                             f"{ev.record_format!r}")
        if ev.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {ev.output!r}")
        if ev.scores not in SCORES:
            raise ValueError(f"scores must be one of {SCORES}, got {ev.scores!r}")
        return ev


@dataclass
class Metrics:
    """What a served invocation answers: what it did, in what time and memory, with which
    store requests. Every field defaults to what the driver logs for a call that answered
    none (a failed one)."""

    stage: int = -1
    record: str = ""
    images: int | None = None
    image_errors: int = 0
    cold: bool = False
    model_source: str | None = None  # memory | disk | store: where the stage came from
    handler_init_ms: float = 0.0  # the model load this call made (0 when warm)
    duration_ms: float = 0.0  # the call less its init
    read_ms: float | None = None
    compute_ms: float | None = None
    write_ms: float | None = None
    cpu_ms: float | None = None  # CPU of all the process's threads while serving
    bytes_in: int = 0
    bytes_out: int = 0
    gets: int = 0
    heads: int = 0
    puts: int = 0
    peak_mb: float | None = None  # what a memory cap is held to (runtime/memory.py)
    peak_rss_mb: float | None = None
    peak_cgroup_mb: float | None = None
    peak_working_set_mb: float | None = None  # the sampled charge less file cache
    output: dict[str, Any] | None = None  # the object written: key, size, crc32c
    failed_images: list[list[str]] | None = None  # the last stage's, up to 10: [name, why]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.failed_images is None:
            del out["failed_images"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Metrics:
        """Metrics as they arrived; fields it does not know are ignored (a newer function)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


CALL_METADATA = "serveless-call"
"""The metadata key under which a function stores its call with its output object."""
_CALL_FIELDS = ("images", "image_errors", "cold", "model_source", "handler_init_ms",
                "duration_ms", "read_ms", "compute_ms", "write_ms", "cpu_ms", "bytes_in",
                "bytes_out", "gets", "heads", "puts", "peak_mb", "peak_rss_mb",
                "peak_cgroup_mb", "peak_working_set_mb")


def call_metadata(ev: Event, metrics: Metrics, started: float) -> dict[str, str]:
    """The call that wrote an output, stored with it (S3 user metadata, 2 KB at most: the
    numbers only; the stage, record and key follow from where the object is)."""
    record = {"v": 1, "call": ev.call, "started": round(started, 3), "memory_mb": ev.memory_mb,
              **{k: getattr(metrics, k) for k in _CALL_FIELDS}}
    return {CALL_METADATA: json.dumps(record, separators=(",", ":"))}


def parse_call_metadata(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The call stored with an output, or None when it has none (or not ours)."""
    try:
        record = json.loads(metadata.get(CALL_METADATA, ""))
    except (json.JSONDecodeError, TypeError):
        return None
    ok = (isinstance(record, dict) and record.get("v") == 1
          and isinstance(record.get("started"), (int, float))
          and isinstance(record.get("memory_mb"), int)
          and isinstance(record.get("duration_ms"), (int, float))
          and isinstance(record.get("handler_init_ms"), (int, float)))
    return record if ok else None


@dataclass
class InvocationError:
    """Why an invocation failed: its kind (an exception's name or one of the constants
    above), a message naming the stage and record where known, and whether it is final."""

    type: str
    message: str
    final: bool = False
    why: str | None = None  # why a final error is final

    @property
    def retryable(self) -> bool:
        """Deterministic failures are not retried; everything else (deaths, OOM, throttling,
        store errors) is."""
        return not self.final and self.type not in DETERMINISTIC

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.final:
            out["final"] = True
            out["why"] = self.why
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InvocationError:
        return cls(str(data.get("type")), str(data.get("message")), bool(data.get("final")),
                   data.get("why"))


def error_of(exc: BaseException) -> InvocationError:
    """An exception as an invocation error: a Python MemoryError (or onnxruntime failing to
    allocate) is OutOfMemory, as an OOM kill would be; deterministic failures are marked
    final, with why, so the driver does not retry them."""
    name, text = type(exc).__name__, str(exc)
    if isinstance(exc, MemoryError) or (
            name in {"RuntimeException", "Fail"} and "alloc" in text.lower()):
        return InvocationError(OUT_OF_MEMORY, f"{name} in the function: {text or 'out of memory'}")
    if name in DETERMINISTIC:
        return InvocationError(name, text, True, f"deterministic: {DETERMINISTIC[name]}; a "
                                                 "retry would fail the same way")
    return InvocationError(name, text)
