"""The driver: prepare a job in the store, then run every record's chain of stages.

Top-down: `prepare_job` partitions the model and lays the job out in the store (job.json,
stage models, records); `run_job` schedules invocations, deepest ready stage first, at
most `concurrency` in flight, retries failures, and logs one line per invocation.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

from . import __version__
from .backends import Backend, FunctionSpec, InvocationResult
from .cost import MAX_MEMORY_MB, billed_ms, check_memory, vcpus
from .data.tensors import TensorFormat
from .errors import JobError, StoreError
from .runtime.protocol import OUT_OF_MEMORY, TOO_MANY_REQUESTS, Event, InvocationError, Metrics
from .store import JobLayout, Store
from .store.layout import RECORD_SUFFIX, record_name, stage_key

DEFAULT_MEMORY_MB = 1769
DEFAULT_MICRO_BATCH = 32
DEFAULT_CONCURRENCY = 2
DEFAULT_RETRIES = 3
DEFAULT_MODEL = "alexnet"
# What a resumed job may change: how it runs, not what it computes. Everything else in
# job.json must match (outputs in the store were made with it); `records` may grow.
MAY_CHANGE_ON_RESUME = ("memory", "concurrency", "retries")
# named, added to, or derived (from the model, from the stage store, or from labels found
# with the inputs)
NOT_ASKED = ("job", "records", "version", "input_hw", "preprocess", "quantize", "models",
             "classes", "fixed_batch")
OOM_RAISE = 1.5
MAX_THROTTLES = 200  # per invocation, before the record fails as throttled


@dataclass
class JobSpec:
    """job.json: what was asked, so a job can be resumed or reported from the store alone."""

    job: str
    model: str
    cuts: list[str]
    memory: list[int]
    micro_batch: int = DEFAULT_MICRO_BATCH
    format: dict[str, Any] = field(default_factory=lambda: TensorFormat().to_dict())
    records: list[str] = field(default_factory=list)
    input_hw: list[int] = field(default_factory=lambda: [224, 224])
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = DEFAULT_RETRIES
    preprocess: dict[str, Any] = field(default_factory=dict)  # what the model declares
    precision: str = "fp32"  # or "int8", "fp16-weights" (serveless.model.quantize.mode_name)
    quantize: dict[str, Any] = field(default_factory=dict)  # quantize.prepare's info
    models: str = ""  # models/<digest>: the shared stage models; "" = <job>/model/ (older jobs)
    transform: dict[str, Any] = field(default_factory=dict)  # images.make_transform(); {}: ImageNet
    scores: str = "probs"  # probs | softmax(logits) | logits (see function.SCORES)
    classes: bool = False  # <job>/labels.json holds the class names of the labels
    fixed_batch: int | None = None  # the model's batch size when it could not be made dynamic
    save_scores: bool = False  # the last stage also writes <job>/scores/<r>.npy
    version: str = __version__

    @property
    def stages(self) -> int:
        return len(self.cuts) + 1

    def stage_model_key(self, k: int) -> str:
        """Where stage k's graph is (its weights beside it, + .data)."""
        if self.models:
            return stage_key(self.models, k)
        return JobLayout(self.job).stage_model(k)

    def save(self, store: Store) -> None:
        store.put_bytes(JobLayout(self.job).spec, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, store: Store, job: str) -> JobSpec:
        layout = JobLayout(job)
        try:
            data = json.loads(store.get_bytes(layout.spec))
        except StoreError as exc:
            raise JobError(f"no job {job!r} in {store.url} (missing {layout.spec})") from exc
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def parse_ints(text: str | Sequence[int], what: str) -> list[int]:
    """'100,250,500' -> [100, 250, 500]; every value must be a positive integer."""
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise JobError(f"{what} must be comma-separated integers, got {text!r}") from exc
    else:
        values = [int(v) for v in text]
    if not values or any(v < 1 for v in values):
        raise JobError(f"{what} must be one or more integers >= 1, got {text!r}")
    return values


def parse_memory(memory: str | list[int] | None, stages: int) -> list[int]:
    """'2048,1280,1024,768' (one per stage) or one value for all stages."""
    values = [DEFAULT_MEMORY_MB] if memory in (None, "") else parse_ints(memory, "--memory")
    if len(values) == 1:
        values = values * stages
    if len(values) != stages:
        raise JobError(f"--memory gives {len(values)} sizes for {stages} stages")
    try:
        return [check_memory(v) for v in values]
    except ValueError as exc:
        raise JobError(str(exc)) from exc


def resolve_scores(model: Any, softmax: str) -> str:
    """--softmax auto|always|never -> what rows say their scores are (function.SCORES)."""
    from .model.graph import output_is_distribution

    if softmax not in ("auto", "always", "never"):
        raise JobError(f"--softmax must be auto, always or never, got {softmax!r}")
    probs = output_is_distribution(model)
    if softmax == "always" or (softmax == "auto" and not probs):
        return "softmax(logits)"
    return "probs" if probs else "logits"


def prepare_job(
    store: Store,
    job: str,
    model: str | None = None,
    cuts: str | list[str] | None = None,
    preset: str | None = None,
    memory: str | list[int] | None = None,
    micro_batch: int | None = None,
    records: str | None = None,
    fmt: TensorFormat | None = None,
    concurrency: int | None = None,
    retries: int | None = None,
    say: Callable[[str], None] | None = None,
    quantize: str | None = None,
    weights: str | None = None,
    calibration_images: int = 64,
    *,
    per_record: int = 1000,
    input_options: dict[str, Any] | None = None,
    transform: dict[str, Any] | None = None,
    softmax: str | None = None,
    save_scores: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> JobSpec:
    """Validate everything, partition the model, and lay the job out in the store.

    An argument left as None means "as the job already has it" (a resume), or the default
    for a new job; one that is given and differs from job.json is refused, except those in
    MAY_CHANGE_ON_RESUME, which are changed and said. Nothing is written before every
    check has passed.

    With `quantize` ('int8') or `weights` ('float16') the stages are reduced in precision
    (serveless.model.quantize), calibrated on the job's own records, and their fidelity to the
    fp32 model is recorded in job.json.

    The stage models are shared by every job of the same model and cuts in this store
    (`stagestore.py`): the first job partitions, checks and uploads them, later ones reuse
    them.

    `records` (run --input) is a folder, glob or URL of records or of plain images, told
    apart by content (sources.py); images are packed into the job's own records of
    `per_record`. Every record's framing is checked before anything is written.
    """
    from .data.images import make_transform
    from .data.sources import (
        check_records,
        copy_record,
        labels_json,
        pack_images,
        read_labels,
        scan_inputs,
    )
    from .errors import SourceError
    from .model import quantize as q
    from .model.graph import input_hw, make_batch_dynamic, preprocessing
    from .model.loading import load_model_hashed
    from .model.partition import partition, resolve_cuts
    from .model.stagestore import ensure_stage_models

    say = say or _quiet
    layout = JobLayout(job)
    if micro_batch is not None and micro_batch < 1:
        raise JobError("--micro-batch must be >= 1")
    q.check_settings(quantize, weights, calibration_images)
    requests_before = store.requests.copy()
    store.check()
    old = JobSpec.load(store, job) if store.exists(layout.spec) else None
    model = model or (old.model if old else DEFAULT_MODEL)
    loaded, file_sha = load_model_hashed(model)
    onnx_model, fixed_batch = make_batch_dynamic(loaded)
    # the file's hash names the model only as it was read (not one made batch-dynamic)
    model_hash = file_sha if onnx_model is loaded else None
    expect = old.models if old is not None else None
    if cuts is None and preset is None and old is not None:
        cut_list = list(old.cuts)  # not asked again: as before, whatever named them then
    else:
        cut_list = resolve_cuts(model, cuts, preset)
    memory_list = None if memory in (None, "") else parse_memory(memory, len(cut_list) + 1)
    hw = list(input_hw(onnx_model))
    transform = dict(transform) if transform is not None else None
    crop = transform.pop("crop", None) if transform is not None else None
    if crop is not None and list(crop) != hw:
        raise JobError(f"--crop {crop[0]},{crop[1]} differs from the model's input "
                       f"{hw[0]}x{hw[1]}; the crop is the model's input size")
    default_transform = make_transform()
    if old is not None and not old.transform:
        old.transform = default_transform  # a job from before --preprocess: ImageNet's
    if softmax is None and old is not None:
        scores = old.scores
    else:
        scores = resolve_scores(onnx_model, softmax or "auto")
    asked = JobSpec(
        job=job, model=model, cuts=cut_list,
        memory=memory_list or (old.memory if old and len(old.memory) == len(cut_list) + 1
                               else parse_memory(None, len(cut_list) + 1)),
        micro_batch=_given(micro_batch, old, "micro_batch", DEFAULT_MICRO_BATCH),
        format=fmt.to_dict() if fmt else (old.format if old else TensorFormat().to_dict()),
        input_hw=list(input_hw(onnx_model)),
        concurrency=_given(concurrency, old, "concurrency", DEFAULT_CONCURRENCY),
        retries=_given(retries, old, "retries", DEFAULT_RETRIES),
        preprocess=preprocessing(onnx_model),
        precision=_given(q.mode_name(quantize, weights), old, "precision", "fp32"),
        transform=_given(transform, old, "transform", default_transform),
        scores=scores, fixed_batch=fixed_batch,
        save_scores=_given(save_scores, old, "save_scores", False),
    )
    if old is not None:
        check_resumable(old, asked)
        for what in MAY_CHANGE_ON_RESUME:
            before, now = getattr(old, what), getattr(asked, what)
            if before != now:
                say(f"resuming with {_flag(what, now)} (was {_flag(what, before)})")
    try:
        inputs = scan_inputs(records, input_options) if records else None
        counts = check_records(inputs.records) if inputs else {}
    except SourceError as exc:
        raise JobError(str(exc)) from exc
    if inputs and inputs.skipped:
        say(f"skipped {len(inputs.skipped)} files of {records} (neither records nor images):")
        for name, reason in inputs.skipped:
            say(f"  {name}: {reason}")
    existing = {record_name(k) for k in store.list(layout.records_prefix, RECORD_SUFFIX)}

    def same(key: str, size: int, md5: Callable[[], str]) -> bool:
        """A record already in the job: fine if it has the same bytes (size, then MD5: a
        changed record of the same size too), refused if not."""
        name = record_name(key)
        if name not in existing:
            return False
        if store.size(key) != size or store.content_md5(key) != md5():
            raise JobError(f"job {job!r} already has a different record {name!r}; "
                           "use a new --job name")
        return True

    new = []
    if inputs:
        new = [f for f in inputs.records
               if not same(layout.record(f.record_name), f.size, f.md5)]
    if not counts and not (inputs and inputs.images) and not existing:
        raise JobError(f"job {job!r} has no records: pass --input")
    where = f"at {','.join(cut_list)}" if cut_list else "as one stage (no cuts)"
    label = f"{model} {where}"
    record_mb = sum(f.size for f in new) / 1e6
    names = set(existing)
    classes: list[str] | None = None

    def upload_inputs() -> None:
        """The job's records: the user's copied (every CRC checked), or their images packed."""
        nonlocal names, classes
        if inputs and inputs.records:
            for f in new:
                copy_record(f, store, layout.record(f.record_name))
            names |= set(counts)
            if inputs.labels_file is not None:
                classes = read_labels(inputs.labels_file.read(), inputs.labels_file.shown)
        elif inputs and inputs.images:
            say(f"packing {len(inputs.images)} images into records of {per_record}…")
            names |= set(pack_images(inputs.images, store, layout.records_prefix, per_record,
                                     progress=progress, exists=same))
            classes = inputs.classes or None

    if asked.precision == "fp32":
        # shared by jobs of the same model and cuts: partitioned (which checks equivalence
        # before anything is written) and uploaded once per store
        models = ensure_stage_models(store, onnx_model, cut_list, partition, say=say,
                                     label=label, model_hash=model_hash, expect=expect)
    else:  # calibration reads the job's records: upload them first
        if new:
            say(f"uploading {len(new)} records ({record_mb:,.1f} MB)…")
        upload_inputs()
        new = []
        asked.records = sorted(names)

        def fp32_stages() -> list[Any]:  # only when no cached reduced-precision set fits
            say(f"partitioning {label} and checking the chained stages against it…")
            return partition(onnx_model, cut_list)

        stages, asked.quantize = _reduce_precision(store, layout, old, asked, onnx_model,
                                                   fp32_stages, calibration_images, say,
                                                   model_hash)
        # stored like fp32 stages, content-addressed by their calibrated cache key too
        models = ensure_stage_models(
            store, onnx_model, cut_list, lambda *_: stages,
            extra={"precision": asked.precision, "cache": asked.quantize.get("cache")},
            model_hash=model_hash, expect=expect, machine_cache=False)
    if old is not None and old.models and old.models != models.prefix:
        raise JobError(f"job {job!r} was made with other stage models ({old.models}): the "
                       f"model {model} changed since; use a new --job")
    say(f"{'reused' if models.reused else 'uploaded'} {models.stages} stage models "
        f"({models.size / 1e6:,.1f} MB)"
        + (f"; uploading {len(new)} records ({record_mb:,.1f} MB)…" if new else ""))
    if asked.precision == "fp32":
        upload_inputs()
    if classes is not None:
        store.put_bytes(layout.labels, labels_json(classes))
    asked.classes = classes is not None or bool(old and old.classes)
    asked.records = sorted(names)
    asked.models = models.prefix
    asked.save(store)
    save_driver_requests(store, layout, requests_before)
    return asked


def _reduce_precision(store: Store, layout: JobLayout, old: JobSpec | None, asked: JobSpec,
                      onnx_model: Any, stages: Callable[[], list[Any]],
                      calibration_images: int, say: Callable[[str], None],
                      model_hash: str | None = None) -> tuple[list[Any], dict[str, Any]]:
    """int8 or float16-weight stages: a resumed job keeps the ones its outputs came from.
    `stages` makes the fp32 stages, called only when no cached set fits."""
    from .model import quantize as q

    if old is not None:
        reused = q.load_cached(store, old.quantize, len(asked.cuts) + 1)
        if reused is not None:
            return reused, old.quantize
    say(f"{asked.precision} stages: calibrating and measuring fidelity on the job's images…"
        if asked.precision == "int8" else f"{asked.precision} stages…")
    openers = [(n, lambda n=n: store.open_read(layout.record(n))) for n in asked.records]
    quantize = asked.precision if asked.precision in q.QUANTIZE_MODES else None
    weights = "float16" if asked.precision == "fp16-weights" else None
    return q.prepare(store, onnx_model, asked.cuts, stages, openers, quantize, weights,
                     asked.input_hw, asked.preprocess, calibration_images,
                     model_hash=model_hash)


def _quiet(_: str) -> None:
    pass


def _given(value: Any, old: JobSpec | None, name: str, default: Any) -> Any:
    if value is not None:
        return value
    return getattr(old, name) if old is not None else default


def _flag(name: str, value: Any) -> str:
    """The command-line flag that asks for `value` of job.json's field `name`."""
    if name == "cuts":
        return f"--cuts {','.join(value)}" if value else "no --cuts (the whole model)"
    if name == "precision":
        return {"int8": "--quantize int8", "fp16-weights": "--weights float16"}.get(
            value, "no --quantize or --weights (fp32)")
    if name == "transform":
        nums = ",".join
        return (f"--preprocess {value['name']}" if value.get("name") != "custom" else
                f"--resize {value.get('resize')} --mean {nums(map(str, value['mean']))} "
                f"--std {nums(map(str, value['std']))}")
    if name == "scores":
        return f"--softmax giving {value}"
    if name == "save_scores":
        return "--save-scores" if value else "--no-save-scores"
    if name == "format":
        fmt = TensorFormat.from_dict(value)
        return " ".join([f"--{'' if fmt.dtype == 'float16' else 'no-'}float16",
                         f"--{'' if fmt.compress else 'no-'}compress"])
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"--{name.replace('_', '-')} {value}"


def check_resumable(old: JobSpec, asked: JobSpec) -> None:
    """Outputs already in the store were made with the old settings: refuse to mix.

    Compared field by field on what they resolve to (cuts named by --preset equal the
    same cuts named by --cuts), so every setting a job records is checked, new ones too.
    """
    skip = set(MAY_CHANGE_ON_RESUME) | set(NOT_ASKED)
    for name in old.__dataclass_fields__:
        before, now = getattr(old, name), getattr(asked, name)
        if name not in skip and before != now:
            raise JobError(
                f"job {old.job!r} was started with {_flag(name, before)}, not "
                f"{_flag(name, now)}: resume it with {_flag(name, before)} (or leave the "
                "option out), or give a new --job")


# -- the invocation log -----------------------------------------------------------------------


class InvocationLog:
    """<job>/invocations.jsonl, written as each invocation ends so a killed driver loses none.

    Local folders get a true append; object stores cannot append, so there the whole log
    is rewritten, at most every `flush_every_s` and at the end.
    """

    def __init__(self, store: Store, layout: JobLayout, flush_every_s: float = 2.0):
        self.store = store
        self.key = layout.log
        self.rows: list[dict[str, Any]] = load_log(store, layout.job)
        self._lock = threading.Lock()
        self._flushed = time.monotonic()
        self._dirty = False
        self.flush_every_s = flush_every_s
        self._append_path = store.local_path(self.key)
        if self._append_path:
            os.makedirs(os.path.dirname(self._append_path), exist_ok=True)
            # rewrite once: drops a torn last line left by a killed driver
            self.store.put_bytes(self.key, self._serialized())

    def _serialized(self) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in self.rows).encode()

    def append(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.rows.append(row)
            if self._append_path:
                with open(self._append_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                return
            self._dirty = True
            due = time.monotonic() - self._flushed > self.flush_every_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            data = self._serialized()
            self._flushed = time.monotonic()
            self._dirty = False
        self.store.put_bytes(self.key, data)


def load_driver_requests(store: Store, job: str) -> dict[str, int]:
    """The driver's store requests for a job, by kind ({} for jobs from before they were
    counted)."""
    key = JobLayout(job).driver
    try:
        data = json.loads(store.get_bytes(key)) if store.exists(key) else {}
    except (StoreError, json.JSONDecodeError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_driver_requests(store: Store, layout: JobLayout, before: Any) -> dict[str, int]:
    """Add the requests this store object made since `before` (and the write of this
    record itself) to the job's driver.json; returns the job's totals."""
    old = load_driver_requests(store, layout.job)
    store.requests["put"] += 1  # the write just below
    total = dict(old)
    for kind, n in (store.requests - before).items():
        total[kind] = total.get(kind, 0) + n
    store.put_bytes(layout.driver, json.dumps(total, sort_keys=True).encode())
    store.requests["put"] -= 1  # counted once, by the put_bytes above
    return total


def load_log(store: Store, job: str) -> list[dict[str, Any]]:
    key = JobLayout(job).log
    if not store.exists(key):
        return []
    rows = []
    for line in store.get_bytes(key).decode().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed driver; that invocation reruns
    return rows


# -- running ------------------------------------------------------------------------------------


@dataclass(order=True)
class _Task:
    priority: tuple[int, int, float]
    record: str = field(compare=False)
    stage: int = field(compare=False)
    attempt: int = field(compare=False, default=0)
    not_before: float = field(compare=False, default=0.0)
    throttles: int = field(compare=False, default=0)


@dataclass
class JobResult:
    spec: JobSpec
    rows: list[dict[str, Any]]
    wall_s: float
    images: int
    failed_records: dict[str, str]
    image_errors: int
    memory: list[int]
    raised: dict[int, int]
    backend: dict[str, Any]
    retried: int = 0
    images_run: int = 0
    throttled: int = 0
    driver_requests: dict[str, int] = field(default_factory=dict)  # the job's, all runs

    @property
    def ok(self) -> bool:
        return not self.failed_records and not self.image_errors


def run_job(
    store: Store,
    spec: JobSpec,
    backend: Backend,
    concurrency: int = 2,
    retries: int = 3,
    progress: bool = True,
    rng: random.Random | None = None,
    keep_intermediates: bool = True,
    say: Callable[[str], None] | None = None,
) -> JobResult:
    """Serve every record through every stage; returns what happened, never loses a record.

    Intermediate outputs stay in the store (as in the paper, and for inspection) unless
    `keep_intermediates` is False: then a record's are deleted once its predictions are
    written, so a large job does not leave ~0.35 MB per image behind.
    """
    if concurrency < 1:
        raise JobError("--concurrency must be >= 1")
    requests_before = store.requests.copy()
    store.check()
    problem = getattr(backend, "store_problem", lambda url: None)(store.url)
    if problem:
        raise JobError(problem)
    layout = JobLayout(spec.job)
    fmt = TensorFormat.from_dict(spec.format)
    _remove_stale_temporaries(store, layout)
    log = InvocationLog(store, layout)
    rng = rng or random.Random()
    memory = list(spec.memory)
    raised: dict[int, int] = {}
    done_stage = _completed_stages(store, layout, spec, log.rows)
    order = {r: i for i, r in enumerate(spec.records)}
    heap: list[_Task] = []
    for record in spec.records:
        nxt = done_stage.get(record, -1) + 1
        if nxt < spec.stages:
            heapq.heappush(heap, _Task((-nxt, order[record], 0.0), record, nxt))
    total = len(spec.records)
    finished = total - len(heap)
    if finished and say:
        say(f"resuming: {finished} of {total} records done")
    failed: dict[str, str] = {}
    retried = 0
    throttled = 0
    driver_requests: dict[str, int] = {}
    images_run = 0  # images served by this run (a resumed job has others before)
    t0 = time.perf_counter()
    bar = _Progress(total, finished, enabled=progress)

    # the cores a function runs on: this machine's for local engines, None on a cloud,
    # where each function has the vCPUs of its memory size whatever the driver has
    cores = getattr(backend, "function_cores", lambda: os.cpu_count())()
    ephemeral_mb = backend.describe().get("ephemeral_mb")  # configured /tmp, when billed

    def fn_for(stage: int) -> FunctionSpec:
        mem = memory[stage]
        return FunctionSpec(stage=stage, memory_mb=mem, model_key=spec.stage_model_key(stage),
                            store=store.spec(), threads=_threads(mem, cores))

    def invoke(task: _Task, fn: FunctionSpec) -> tuple[InvocationResult, float]:
        started = time.time()
        event = Event(store=store.spec(), job=spec.job, stage=task.stage, stages=spec.stages,
                      record=task.record, memory_mb=fn.memory_mb, micro_batch=spec.micro_batch,
                      threads=fn.threads, format=fmt.to_dict(), size=spec.input_hw,
                      preprocess=spec.preprocess, model=fn.model_key, transform=spec.transform,
                      scores=spec.scores, classes=spec.classes, save_scores=spec.save_scores)
        return backend.invoke(fn, event.to_dict()), started

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="serveless-invoke")
    inflight: dict[Future[tuple[InvocationResult, float]], tuple[_Task, FunctionSpec]] = {}
    try:
        while heap or inflight:
            now = time.monotonic()
            deferred = []
            while heap and len(inflight) < concurrency:
                task = heapq.heappop(heap)
                if task.not_before > now:
                    deferred.append(task)
                    continue
                fn = fn_for(task.stage)
                inflight[pool.submit(invoke, task, fn)] = (task, fn)
            for task in deferred:
                heapq.heappush(heap, task)
            if not inflight:
                time.sleep(min(0.5, max(0.01, min(t.not_before for t in heap) - now)))
                continue
            done, _ = wait(inflight, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                task, fn = inflight.pop(fut)
                try:
                    result, started = fut.result()
                except Exception as exc:  # the backend itself failed (fds, spawn): retry
                    result, started = InvocationResult(
                        None, InvocationError(type(exc).__name__, str(exc)), False, 0.0,
                        0.0, None), time.time()
                row = _log_row(task, fn, result, started)
                if ephemeral_mb:
                    row["ephemeral_mb"] = int(ephemeral_mb)
                log.append(row)
                err = result.error
                if err is not None and err.type == TOO_MANY_REQUESTS \
                        and task.throttles < MAX_THROTTLES:
                    # backpressure: back off and ask again; not a failure, no retry spent
                    throttled += 1
                    delay = min(10.0, 0.05 * 2**min(task.throttles, 8)) * (0.5 + rng.random())
                    heapq.heappush(heap, _Task(task.priority, task.record, task.stage,
                                               task.attempt, time.monotonic() + delay,
                                               task.throttles + 1))
                    continue
                if err is None:
                    if task.stage == spec.stages - 1:
                        if not keep_intermediates:
                            _drop_intermediates(store, layout, spec, task.record, fmt)
                        finished += 1
                        images_run += int(Metrics.from_dict(result.metrics).images or 0)
                        bar.advance(images_run)
                    else:
                        nxt = task.stage + 1
                        heapq.heappush(heap, _Task((-nxt, order[task.record], 0.0),
                                                   task.record, nxt))
                    continue
                if (err.type == OUT_OF_MEMORY and fn.memory_mb == memory[task.stage]
                        and memory[task.stage] < MAX_MEMORY_MB):  # once per size, not per call
                    memory[task.stage] = min(MAX_MEMORY_MB, int(memory[task.stage] * OOM_RAISE))
                    raised[task.stage] = memory[task.stage]
                    spec.memory = list(memory)  # a resumed job starts from the raised size
                    spec.save(store)
                if task.attempt < retries and err.retryable:
                    retried += 1
                    delay = min(30.0, 0.2 * 2**task.attempt) * (0.5 + rng.random())
                    heapq.heappush(heap, _Task(task.priority, task.record, task.stage,
                                               task.attempt + 1, time.monotonic() + delay,
                                               task.throttles))
                else:
                    why = (f" (not retried: {err.why or 'deterministic'})"
                           if not err.retryable else f" (after {task.attempt + 1} attempts)")
                    failed[task.record] = f"stage {task.stage}: {err.type}: {err.message}{why}"
                    finished += 1
                    bar.advance(images_run)
    except BaseException:
        backend.close()  # stop every instance now; Ctrl-C leaves no process behind
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        log.flush()
        bar.close()
        with contextlib.suppress(OSError, StoreError):
            driver_requests = save_driver_requests(store, layout, requests_before)
    final = _final_rows(log.rows, spec)
    return JobResult(
        spec=spec, rows=log.rows, wall_s=time.perf_counter() - t0,
        images=sum(int(r.get("images") or 0) for r in final), images_run=images_run,
        failed_records=failed,
        image_errors=sum(int(r.get("image_errors") or 0) for r in final),
        memory=memory, raised=raised, backend=backend.describe(), retried=retried,
        throttled=throttled, driver_requests=driver_requests,
    )


def _remove_stale_temporaries(store: Store, layout: JobLayout) -> None:
    """`*.tmp-*` objects under the job are what writers killed mid-write left (a driver
    runs its job alone, so none is being written now): remove them, never fail for it."""
    with contextlib.suppress(OSError, StoreError):
        for key in store.stale_temporaries(layout.job):
            with contextlib.suppress(OSError, StoreError):
                store.delete(key)


def _drop_intermediates(store: Store, layout: JobLayout, spec: JobSpec, record: str,
                        fmt: TensorFormat) -> None:
    """Clean-up only: a failure here leaves an object behind, it never fails the job."""
    keys = [layout.stage_output(k, record, fmt.suffix) for k in range(spec.stages - 1)]
    for key in [*keys, layout.record_meta(record)]:
        with contextlib.suppress(OSError, StoreError):
            store.delete(key)


def _threads(memory_mb: int, cores: int | None = None) -> int:
    """onnxruntime intra-op threads = the function's vCPUs, rounded up, at most the cores
    of the machine the function runs on (None: a cloud function, its vCPUs alone)."""
    n = math.ceil(vcpus(memory_mb))
    return max(1, min(n, cores) if cores else n)


def _log_row(task: _Task, fn: FunctionSpec, res: InvocationResult,
             started: float) -> dict[str, Any]:
    m = Metrics.from_dict(res.metrics)
    duration = float(res.duration_ms)  # the backend's (platform overhead included), billed
    return {
        "stage": task.stage,
        "record": task.record,
        "attempt": task.attempt,
        "started": round(started, 3),
        "memory_mb": fn.memory_mb,
        "vcpus": round(vcpus(fn.memory_mb), 3),
        "cold": res.cold,
        "model_source": m.model_source,  # memory | disk | store
        "init_ms": round(res.init_ms, 3),
        "duration_ms": round(duration, 3),
        "billed_ms": billed_ms(duration, res.init_ms),
        "peak_mb": res.peak_mb,  # what a memory cap is held to (memory.py)
        "peak_rss_mb": m.peak_rss_mb,
        "peak_cgroup_mb": m.peak_cgroup_mb,
        "peak_working_set_mb": m.peak_working_set_mb,
        "images": m.images,
        "image_errors": m.image_errors,
        "read_ms": m.read_ms,
        "compute_ms": m.compute_ms,
        "write_ms": m.write_ms,
        "cpu_ms": m.cpu_ms,
        "bytes_in": m.bytes_in,
        "bytes_out": m.bytes_out,
        "gets": m.gets,
        "heads": m.heads,
        "puts": m.puts,
        "output": m.output,
        **({"failed_images": m.failed_images} if m.failed_images is not None else {}),
        "instance": res.instance,
        "error": res.error.to_dict() if res.error is not None else None,
        "throttled": res.error is not None and res.error.type == TOO_MANY_REQUESTS,  # not billed
    }


def _final_rows(rows: list[dict[str, Any]], spec: JobSpec) -> list[dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["stage"] == spec.stages - 1 and r.get("error") is None:
            last[r["record"]] = r
    return list(last.values())


def _completed_stages(store: Store, layout: JobLayout, spec: JobSpec,
                      rows: list[dict[str, Any]]) -> dict[str, int]:
    """The deepest stage per record whose output is in the store and whole, for resume."""
    recorded: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("error") is None and r.get("output"):
            recorded[(r["record"], r["stage"])] = r["output"]
    done: dict[str, int] = {}
    for record in spec.records:
        for stage in range(spec.stages - 1, -1, -1):
            out = recorded.get((record, stage))
            if out and _whole(store, out) and (
                stage != 0 or stage == spec.stages - 1 or store.exists(layout.record_meta(record))
            ):
                done[record] = stage
                break
    return done


def _whole(store: Store, out: dict[str, Any]) -> bool:
    """The object is there with the size and checksum its writer recorded (CRC32C; SHA-256
    in logs written before)."""
    import hashlib

    import google_crc32c

    key = out["key"]
    try:
        if store.size(key) != out["size"]:
            return False
        crc, sha = 0, hashlib.sha256()
        with store.open_read(key) as f:
            while chunk := f.read(1 << 22):
                if "crc32c" in out:
                    crc = google_crc32c.extend(crc, chunk)
                else:
                    sha.update(chunk)
        if "crc32c" in out:
            return f"{crc:08x}" == out["crc32c"]
        return sha.hexdigest() == out["sha256"]
    except (StoreError, OSError):
        return False


class _Progress:
    """Records done / total, images/s and ETA on a rich progress bar."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("records"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), transient=False,
        )
        self.task = self.progress.add_task("run", total=total, completed=done, rate="")
        self.progress.start()

    def advance(self, images: int) -> None:
        if not self.enabled:
            return
        rate = images / max(1e-9, time.perf_counter() - self.t0)
        self.progress.update(self.task, advance=1, rate=f"{rate:.1f} images/s")

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
