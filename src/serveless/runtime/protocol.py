"""The protocol between the driver and a function, typed once: what an invocation asks
(`Event`), what it answers (`Metrics`), how it failed (`InvocationError` and its kinds),
and what the platform tells the function (`MODEL_CACHE_ENV`). A second kind of call, the
calibration (`CalibrationEvent`, answered by a `CalibrationAnswer`), measures a model's
blocks inside a function instance (`serveless calibrate --backend`); its event says so in
its `kind`, so the one entry point every backend calls (`handler.handle`) tells them apart.

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


CALIBRATE = "calibrate"
"""The `kind` of a calibration event; a stage event has none."""
CALIBRATION_ANSWER = "serveless-calibration-answer"
CAL_BATCH = 32
"""The micro-batch a calibration times blocks at: the default micro-batch, so a stage at it
needs no extrapolation. The driver records it with the figures; the function times at it."""
CAL_MEASURES = ("start", "blocks", "speedup", "store")
"""What a calibration call may be asked to measure: `start`, fresh processes importing what a
function imports (its start and base memory); `blocks`, every block's load, time at 1 thread,
memory, bytes out, stage 0's decode and the function's own code around the model; `speedup`,
every block's time at 2 threads; `store`, the store's bandwidth from the function."""
CAL_WINDOW_S = 0.1
"""Seconds each timed sample of a calibration call repeats its run for. A CPU quota below
the threads that run (a platform's fraction of a vCPU, the local backend's `cpu_scale`)
throttles in periods (the kernel's CFS period: 100 ms): a run shorter than that mostly
falls between throttles, and a median of such runs hides the quota altogether (a tiny
model's blocks timed at 0.5 vCPU came out as fast as at 1). Averaged over two periods a
sample pays its share of the throttling. On this machine (no --backend) the quota is never
below the threads, and samples stay single runs (0)."""


@dataclass
class CalibrationEvent:
    """A calibration invocation: time and measure the blocks of a model (already cut and
    uploaded by the driver under the store's calibration prefix) inside this function
    instance, at its memory and CPU share, and answer the figures as JSON."""

    store: dict[str, Any]
    blocks: list[dict[str, Any]]  # {"key", "data" (the .onnx.data key or null), "input_shape"}
    images: list[str]  # keys of sample images: stage 0's decode is timed on them
    size: list[int]  # the model's input H, W
    memory_mb: int  # the memory this call was given (what the function is told, as Event's)
    measure: list[str]  # a subset of CAL_MEASURES
    bandwidth_key: str = ""  # the object `store` writes and reads (needed when measured)
    min_s: float = 0.25
    window_s: float = CAL_WINDOW_S
    call: str = ""
    kind: str = CALIBRATE

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-safe data, for a backend to carry."""
        return asdict(self)

    @classmethod
    def parse(cls, event: dict[str, Any]) -> CalibrationEvent:
        """A calibration event as it arrived, checked (ValueError names what is wrong)."""
        unknown = set(event) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown calibration event fields: {', '.join(sorted(unknown))}")
        ev = cls(**event)
        if ev.kind != CALIBRATE:
            raise ValueError(f"not a calibration event (kind {ev.kind!r})")
        bad = set(ev.measure) - set(CAL_MEASURES)
        if not ev.measure or bad:
            raise ValueError(f"measure must be some of {CAL_MEASURES}, got {ev.measure!r}")
        if "blocks" in ev.measure or "speedup" in ev.measure:
            for b in ev.blocks:
                if not (isinstance(b, dict) and isinstance(b.get("key"), str)
                        and isinstance(b.get("input_shape"), list)):
                    raise ValueError(f"a block must be {{key, data, input_shape}}, got {b!r}")
            if not ev.blocks:
                raise ValueError("no blocks to measure")
        if "store" in ev.measure and not ev.bandwidth_key:
            raise ValueError("measuring the store needs a bandwidth_key")
        if len(ev.size) != 2 or min(ev.size) < 1:
            raise ValueError(f"size must be [H, W], got {ev.size!r}")
        if ev.memory_mb < 1 or ev.min_s < 0 or ev.window_s < 0:
            raise ValueError("memory_mb must be >= 1, min_s and window_s >= 0")
        return ev


@dataclass
class CalibrationAnswer:
    """What a calibration call answers: the figures it measured (each part None when it was
    not asked for) and the function as it saw itself (`function`: CPU model, cores, quota,
    memory), JSON all through."""

    function: dict[str, Any]
    starts: list[dict[str, float]] = field(default_factory=list)  # {start_ms, rss_mb} each
    phase1: dict[str, Any] | None = None  # "blocks"
    phase2: dict[str, Any] | None = None  # "speedup"
    store: dict[str, Any] | None = None
    seconds: float = 0.0
    peak_mb: float | None = None  # the process's peak RSS: what the backend reports as peak
    kind: str = CALIBRATION_ANSWER

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def recognises(data: Any) -> bool:
        """Whether a function's answer is a calibration answer (not a stage's metrics)."""
        return isinstance(data, dict) and data.get("kind") == CALIBRATION_ANSWER

    @classmethod
    def from_dict(cls, data: Any) -> CalibrationAnswer:
        """An answer as it arrived, checked (ValueError names what is wrong): a function of
        an older serveless answers metrics, or nothing of this."""
        if not cls.recognises(data):
            raise ValueError("the function did not answer a calibration (an older serveless "
                             "in the function's runtime?)")
        names = {f.name for f in fields(cls)}
        ans = cls(**{k: v for k, v in data.items() if k in names})
        for name in ("phase1", "phase2", "store"):
            if getattr(ans, name) is not None and not isinstance(getattr(ans, name), dict):
                raise ValueError(f"calibration answer: {name} must be an object")
        if not isinstance(ans.function, dict) or not isinstance(ans.starts, list):
            raise ValueError("calibration answer: function must be an object, starts a list")
        return ans


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
    threads: int | None = None  # the model's threads it ran (runtime/cpu.usable_threads)
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
                "duration_ms", "read_ms", "compute_ms", "write_ms", "cpu_ms", "threads",
                "bytes_in", "bytes_out", "gets", "heads", "puts", "peak_mb", "peak_rss_mb",
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
