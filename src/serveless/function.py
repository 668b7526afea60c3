"""The function that serves one stage on one record: `handle(event) -> metrics`.

Any backend calls it (a local worker process, a Lithops call, a Lambda handler). It keeps
the stage's onnxruntime session for the life of the instance (warm starts), streams its
input object in micro-batches while the next block is read and decoded on a second thread,
writes its output object atomically, and returns small JSON-safe metrics; tensors only
ever go through the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import google_crc32c
import numpy as np

from .cost import vcpus
from .data.predictions import SCORES, TOP_K, prediction_row, softmax
from .data.tensors import TensorFormat, TensorReader, TensorWriter
from .errors import PredictionCountError, StoreError
from .memory import ChargeSampler, cgroup_peak_mb, enforced_peak_mb, own_cgroup
from .memory import reset_rss_peak as reset_peak
from .memory import rss_peak_mb as peak_mb
from .model.sessions import open_stage
from .store import READ_BLOCK, JobLayout, Store
from .store.layout import DATA_SUFFIX

MAX_FAILED_LISTED = 10  # failed images (filename, reason) a record's metrics carry
# images.MAX_PIXELS. images (Pillow) and records (protobuf) are imported by stage 0 alone,
# when it decodes: the other stages' cold starts, which are billed, skip their ~40 ms.
MAX_PIXELS = 100_000_000


@dataclass
class Event:
    """What an invocation asks for; validated here because events cross a process boundary."""

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
    preprocess: dict[str, Any] = field(default_factory=dict)  # models.preprocessing(): resize
    model: str = ""  # the stage model's key; "" = <job>/model/stage-<k>.onnx (older jobs)
    transform: dict[str, Any] = field(default_factory=dict)  # images.make_transform(); {}: ImageNet
    scores: str = "probs"  # what the model outputs: probs, softmax(logits) (applied here), logits
    classes: bool = False  # the job has <job>/labels.json: rows get class_name
    save_scores: bool = False  # also write every image's whole score row (run --save-scores)

    @classmethod
    def parse(cls, event: dict[str, Any]) -> Event:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(event) - known
        if unknown:
            raise ValueError(f"unknown event fields: {sorted(unknown)}")
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
        if ev.scores not in SCORES:
            raise ValueError(f"scores must be one of {SCORES}, got {ev.scores!r}")
        return ev


# -- errors as the driver sees them ---------------------------------------------------------

# Failures that come out the same on every attempt: the input, the graph or the event is
# wrong. Retrying them costs an invocation each and cannot succeed.
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


def error_of(exc: BaseException) -> dict[str, Any]:
    """An exception as an invocation error: a Python MemoryError (or onnxruntime failing to
    allocate) is OutOfMemory, as an OOM kill would be; deterministic failures are marked
    final, with why, so the driver does not retry them."""
    name, text = type(exc).__name__, str(exc)
    if isinstance(exc, MemoryError) or (
            name in {"RuntimeException", "Fail"} and "alloc" in text.lower()):
        return {"type": "OutOfMemory",
                "message": f"{name} in the function: {text or 'out of memory'}"}
    err: dict[str, Any] = {"type": name, "message": text}
    if name in DETERMINISTIC:
        err["final"] = True
        err["why"] = f"deterministic: {DETERMINISTIC[name]}; a retry would fail the same way"
    return err


# -- warm state of this instance ------------------------------------------------------------

_SESSIONS: dict[tuple[str, str, int], Any] = {}
_invocations = 0
_init_load: Any = None  # the last load from disk or store, until a call has reported it


MODEL_CACHE_ENV = "SERVELESS_MODEL_CACHE"  # a folder, or "0" for no disk cache


@dataclass
class _Loaded:
    session: Any
    init_ms: float
    bytes: int  # read from the store
    gets: int | None  # GET requests (None: a local folder, no requests)
    heads: int
    source: str  # "memory": kept from an earlier call; "disk": the function's local cache;
    # "store": read from the store
    charge_peak_mb: float | None = None  # the init's unreclaimable charge (memory.py)


def load_stage(store: Store, model_key: str, threads: int) -> tuple[Any, float, int]:
    """The stage's session, loaded once per instance: (session, init ms, bytes read)."""
    loaded = _load_stage(store, model_key, threads)
    return loaded.session, loaded.init_ms, loaded.bytes


def _load_stage(store: Store, model_key: str, threads: int) -> _Loaded:
    """The session from memory (same process), else from the local disk cache, else the
    store. Where calls do not share a process (Lithops runs each call in a fresh one),
    the disk cache (/tmp on Lambda, kept while the container is warm) saves the download:
    its entries are named by the objects' content hashes (S3 ETags, one HEAD each), so a
    changed stage is never served stale."""
    cache_key = (store.url, model_key, threads)
    if cache_key in _SESSIONS:
        return _Loaded(_SESSIONS[cache_key], 0.0, 0, 0, 0, "memory")
    t0 = time.perf_counter()
    own_cgroup()  # found during the init, not after the call's output is written
    with ChargeSampler() as sampler:
        session, size, gets, heads, source = _open_session(store, model_key, threads)
    _SESSIONS.clear()  # an instance serves one stage; drop any other
    _SESSIONS[cache_key] = session
    global _init_load
    _init_load = _Loaded(session, (time.perf_counter() - t0) * 1000, size,
                         gets if store.s3 else None, heads, source, sampler.peak_mb)
    return _init_load


def _open_session(store: Store, model_key: str,
                  threads: int) -> tuple[Any, int, int | None, int, str]:
    """(session, bytes read, GETs, HEADs, where the model came from)."""
    local = store.local_path(model_key)
    heads = 0
    if local is not None:
        if not os.path.exists(local):
            raise StoreError(f"missing object {store.url}/{model_key}")
        size = os.path.getsize(local) + _size_or_zero(local + DATA_SUFFIX)
        gets: int | None = None
        source = "store"
        session = open_stage(local, threads)
    else:
        name = model_key.rsplit("/", 1)[-1]
        cache = _cache_folder(store, model_key) if _cache_root() else None
        if cache is not None:
            folder, heads = cache
            path = os.path.join(folder, name)
            if os.path.exists(path):
                size, gets, source = 0, 0, "disk"
            else:
                os.makedirs(folder, exist_ok=True)
                size, gets = _fetch_stage(store, model_key, path, into_place=True)
                source = "store"
            session = open_stage(path, threads)
        else:  # no cache: a private folder, gone once the session holds the weights
            with tempfile.TemporaryDirectory(prefix="serveless-model-") as tmp:
                path = os.path.join(tmp, name)
                size, gets = _fetch_stage(store, model_key, path, into_place=False)
                source = "store"
                session = open_stage(path, threads)
    return session, size, gets, heads, source


def _cache_root() -> str | None:
    root = os.environ.get(MODEL_CACHE_ENV, "")
    if root == "0":
        return None
    return root or os.path.join(tempfile.gettempdir(), "serveless-models")


def _cache_folder(store: Store, model_key: str) -> tuple[str, int] | None:
    """(the cache folder for this stage's current content, HEADs made), or None where the
    store gives no content hash without reading the object (stores other than S3)."""
    if not store.s3:
        return None
    tags = [store.etag(model_key), store.etag(model_key + DATA_SUFFIX)]
    if tags[0] is None:
        raise StoreError(f"missing object {store.url}/{model_key}")
    digest = hashlib.sha256(json.dumps([model_key, *tags]).encode()).hexdigest()[:32]
    return os.path.join(str(_cache_root()), digest), 2


def _fetch_stage(store: Store, model_key: str, path: str, into_place: bool) -> tuple[int, int]:
    """Download a stage's graph and weights to `path` (+ .data): (bytes, GETs). With
    `into_place`, each file is written under a temporary name and renamed, weights first,
    so a concurrent call sees either no graph or a complete stage."""
    size = requests = 0
    for suffix in (DATA_SUFFIX, ""):
        requests += 1  # one GET per file (a missing one is a GET answered 404)
        dest = path + suffix
        part = f"{dest}.part-{os.getpid()}-{threading.get_ident()}" if into_place else dest
        try:  # streamed, never whole in memory; transient errors are retried
            store.get_file(model_key + suffix, part)
        except StoreError:
            if not suffix:
                raise
            continue  # a stage without external weights (all small)
        size += os.path.getsize(part)
        if into_place:
            os.replace(part, dest)
    return size, requests


def _size_or_zero(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


# -- the handler ----------------------------------------------------------------------------


@dataclass
class _Counters:
    read_ms: float = 0.0
    compute_ms: float = 0.0
    write_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    gets: int = 0
    heads: int = 0
    puts: int = 0

    def got(self, size: int, requests: int | None = None) -> None:
        """Bytes read with `requests` GETs: counted where the store makes real requests
        (S3), else modelled as one ranged GET per 64 MiB as an object store would serve."""
        self.bytes_in += size
        self.gets += max(1, math.ceil(size / READ_BLOCK)) if requests is None else requests

    def put(self, size: int) -> None:
        self.bytes_out += size
        self.puts += 1


def handle(event: dict[str, Any]) -> dict[str, Any]:
    """Run one stage of the model on one record; return its metrics."""
    global _invocations
    t0 = time.perf_counter()
    if _invocations:  # a cold invocation's peak includes its init (process start, model load)
        reset_peak()
    _invocations += 1
    ev = Event.parse(event)
    store = Store.from_spec(ev.store)
    layout = JobLayout(ev.job)
    fmt = TensorFormat.from_dict(ev.format)
    c = _Counters()

    global _init_load
    model_key = ev.model or layout.stage_model(ev.stage)
    loaded = _load_stage(store, model_key, ev.threads)
    session, init_ms = loaded.session, loaded.init_ms
    # The first call after an instance's init (the local backend loads the stage before
    # the first event) reports that load: where the model came from, and its requests.
    load, _init_load = (_init_load or loaded), None
    model_source = load.source
    if load.bytes:
        c.got(load.bytes, load.gets)
    c.heads += load.heads
    cpu0 = time.process_time()
    with ChargeSampler() as sampler:  # the peak the memory cap is held to (memory.py)
        n, meta, written, quality = _serve(ev, store, layout, fmt, session, c)
    errors = len(meta.get("errors", {})) if meta else 0
    rss_peak, cgroup_peak = peak_mb(), cgroup_peak_mb()
    charges = [p for p in (sampler.peak_mb, load.charge_peak_mb) if p is not None]
    peak = enforced_peak_mb(rss_peak, max(charges) if charges else None)
    duration_ms = (time.perf_counter() - t0) * 1000 - init_ms
    # CPU of all the process's threads while serving: below duration × vCPUs, the call
    # waited (on the store, or on cores shared with other instances), not on its quota.
    cpu_ms = (time.process_time() - cpu0) * 1000
    return {
        "stage": ev.stage,
        "record": ev.record,
        "images": n,
        "image_errors": errors,
        "cold": init_ms > 0,
        "model_source": model_source,
        "handler_init_ms": round(init_ms, 3),
        "duration_ms": round(duration_ms, 3),
        "read_ms": round(c.read_ms, 3),
        "compute_ms": round(c.compute_ms, 3),
        "write_ms": round(c.write_ms, 3),
        "cpu_ms": round(cpu_ms, 3),
        "bytes_in": c.bytes_in,
        "bytes_out": c.bytes_out,
        "gets": c.gets,
        "heads": c.heads,
        "puts": c.puts,
        "peak_mb": round(peak, 1),
        "peak_rss_mb": round(rss_peak, 1),
        "peak_cgroup_mb": round(cgroup_peak, 1) if cgroup_peak else None,
        # the sampled charge less file cache (None without a cgroup of its own)
        "peak_working_set_mb": round(max(charges), 1) if charges else None,
        "output": written,
        **quality,
    }


def _serve(ev: Event, store: Store, layout: JobLayout, fmt: TensorFormat, session: Any,
           c: _Counters) -> tuple[int, dict[str, Any] | None, dict[str, Any], dict[str, Any]]:
    """Read the input, run the stage, write the output: (images, record meta, written
    object, quality figures)."""
    input_name = session.get_inputs()[0].name
    last = ev.stage == ev.stages - 1

    if ev.stage == 0:
        in_key = layout.record(ev.record)
    else:
        in_key = layout.stage_output(ev.stage - 1, ev.record, fmt.suffix)

    with _Input(store, in_key, whole=ev.stage == 0) as src:
        if ev.stage == 0:
            n, blocks, meta = _image_blocks(src.file, store.path(in_key), ev, c)
        else:
            n, blocks = _tensor_blocks(src.file, fmt, ev, c)
            meta = None
        fixed = session.get_inputs()[0].shape[0]
        if ev.stage > 0 or vcpus(ev.memory_mb) > 1.0:
            blocks = _prefetch(blocks)
        outputs = _run(session, input_name, blocks, c,
                       fixed if isinstance(fixed, int) and fixed > 0 else None)
        quality: dict[str, Any] = {}
        if last:
            if meta is None:
                raw = store.get_bytes(layout.record_meta(ev.record))
                c.got(len(raw), 1 if store.s3 else None)
                meta = json.loads(raw)
            classes = None
            if ev.classes:
                raw = store.get_bytes(layout.labels)
                c.got(len(raw))
                classes = json.loads(raw)
            out_key = layout.predictions(ev.record)
            kept: list[np.ndarray] | None = [] if ev.save_scores else None
            written, quality = _write_predictions(store, out_key, ev.record, outputs, meta, c,
                                                  ev.scores, classes, kept)
            if kept is not None:
                buf = io.BytesIO()
                np.save(buf, np.concatenate(kept) if kept else np.zeros((0, 0), np.float32))
                store.put_bytes(layout.scores(ev.record), buf.getvalue())
                c.put(buf.tell())
        else:
            out_key = layout.stage_output(ev.stage, ev.record, fmt.suffix)
            written = _write_tensor(store, out_key, n, outputs, fmt, c)
            if meta is not None:  # after the tensor: its errors are known once all decoded
                data = json.dumps(meta).encode()
                store.put_bytes(layout.record_meta(ev.record), data)
                c.put(len(data))
        src.count(c)

    return n, meta, written, quality


class _Input:
    """The input object of an invocation, opened so that it is fetched once, and counted.

    A record (`whole`) is read twice, once to count its images (the output's shape needs
    the count first) and once to decode them; from an object store that would fetch it
    twice, so it is downloaded to local disk (/tmp on Lambda) with one streamed GET and
    read there. A tensor is read once, front to back, through the store's ranged reader;
    on S3 its GETs are counted from the reader's cache misses, one per fetched block.
    """

    def __init__(self, store: Store, key: str, whole: bool):
        self.store, self.key, self.whole = store, key, whole
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.file: IO[bytes]

    def __enter__(self) -> _Input:
        if self.whole and self.store.local_path(self.key) is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="serveless-input-")
            path = os.path.join(self._tmp.name, "input")
            self.store.get_file(self.key, path)  # one GET, streamed to disk
            self.file = open(path, "rb")  # noqa: SIM115 - closed in __exit__
        else:
            self.file = self.store.open_read(self.key)
        return self

    def count(self, c: _Counters) -> None:
        """Add this input's bytes and requests to the counters, once it has been read."""
        f = self.file
        size = getattr(f, "size", None)
        if size is None:
            size = os.fstat(f.fileno()).st_size
        if not self.store.s3:
            c.got(int(size))
        elif self._tmp is not None:
            c.got(int(size), 1)
        else:  # s3fs: one HEAD at open for the size, then one GET per cache miss
            c.heads += 1
            c.got(int(size), int(getattr(getattr(f, "cache", None), "miss_count", 1)))

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def _image_blocks(
    src: IO[bytes], key: str, ev: Event, c: _Counters
) -> tuple[int, Iterator[np.ndarray], dict[str, Any]]:
    """Decode a record's images micro-batch by micro-batch; broken images become zero rows.

    The images of a micro-batch are decoded on `ev.threads` threads (the function's vCPUs):
    libjpeg-turbo, Pillow's resize and numpy release the GIL, so they run in parallel.
    """
    from .data.images import preprocess
    from .data.records import count_examples, iter_record

    n = count_examples(src, key)
    src.seek(0)  # a local file (see _Input): no second fetch
    meta: dict[str, Any] = {"n": n, "filenames": [], "labels": [], "errors": {}}
    tf = ev.transform or {}
    mean, std = tf.get("mean"), tf.get("std")
    resize = tf.get("resize") or ev.preprocess.get("resize")  # asked, else the model's own

    def decode(batch: np.ndarray, row: int, data: bytes) -> dict[str, str] | None:
        try:
            preprocess(data, ev.size, resize=resize, max_pixels=ev.max_pixels, mean=mean,
                       std=std, out=batch[row])
            return None
        except ValueError as exc:
            batch[row] = 0.0
            return {"type": type(exc).__name__, "message": str(exc)}

    def fill(pool: ThreadPoolExecutor | None, first: int, encoded: list[bytes]) -> np.ndarray:
        batch = np.empty((len(encoded), 3, *ev.size), np.float32)
        rows = range(len(encoded))
        if pool is None:
            errors = [decode(batch, i, encoded[i]) for i in rows]
        else:
            errors = list(pool.map(lambda i: decode(batch, i, encoded[i]), rows))
        for i, err in enumerate(errors):
            if err is not None:
                meta["errors"][str(first + i)] = err
        return batch

    def blocks() -> Iterator[np.ndarray]:
        pool = ThreadPoolExecutor(ev.threads, "serveless-decode") if ev.threads > 1 else None
        try:
            encoded: list[bytes] = []
            first = 0
            t = time.perf_counter()
            for ex in iter_record(src, key):
                meta["filenames"].append(ex.filename)
                meta["labels"].append(ex.label)
                encoded.append(ex.encoded)
                if len(encoded) == ev.micro_batch:
                    batch = fill(pool, first, encoded)
                    first += len(encoded)
                    encoded = []
                    c.read_ms += (time.perf_counter() - t) * 1000
                    yield batch
                    t = time.perf_counter()
            batch = fill(pool, first, encoded) if encoded else None
            c.read_ms += (time.perf_counter() - t) * 1000
            if batch is not None:
                yield batch
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    return n, blocks(), meta


def _tensor_blocks(
    src: IO[bytes], fmt: TensorFormat, ev: Event, c: _Counters
) -> tuple[int, Iterator[np.ndarray]]:
    reader = TensorReader(src, fmt.compress)

    def blocks() -> Iterator[np.ndarray]:
        t = time.perf_counter()
        for block in reader.blocks(ev.micro_batch):
            c.read_ms += (time.perf_counter() - t) * 1000
            yield block
            t = time.perf_counter()

    return len(reader), blocks()


def _prefetch(blocks: Iterator[np.ndarray], depth: int = 1) -> Iterator[np.ndarray]:
    """Produce the next block on a thread while the caller computes on this one.

    Not for stage 0 at 1 vCPU or less: its record is already on local disk, so decoding is
    CPU work alone, and a second thread under the same quota cannot overlap it with the
    model; it only switches between them. Measured at 1 vCPU, AlexNet whole, 100 images:
    16.7 ms per image with the thread, 15.9 inline; at 0.58 vCPU 30.2 and 27.9."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def hand_over(item: Any) -> bool:
        """Put unless the consumer has gone (it failed or finished): never block forever."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for block in blocks:
                if not hand_over(block):
                    return
            hand_over(done)
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(exc)

    thread = threading.Thread(target=produce, daemon=True, name="serveless-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _run(
    session: Any, input_name: str, blocks: Iterator[np.ndarray], c: _Counters,
    fixed: int | None = None,
) -> Iterator[np.ndarray]:
    """Run each block; a model with a fixed batch size gets chunks of exactly that size
    (the last one zero-padded, its padding rows dropped from the output)."""
    for block in blocks:
        t = time.perf_counter()
        if fixed is None or len(block) == fixed:
            (out,) = session.run(None, {input_name: block})
        else:
            parts = []
            for start in range(0, len(block), fixed):
                chunk = block[start:start + fixed]
                rows = len(chunk)
                if rows < fixed:
                    pad = np.zeros((fixed - rows, *chunk.shape[1:]), chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                (part,) = session.run(None, {input_name: chunk})
                parts.append(part[:rows])
            out = np.concatenate(parts)
        c.compute_ms += (time.perf_counter() - t) * 1000
        yield out


class _HashingWriter:
    """Counts and checksums what is written, so resume can check an object is whole.

    CRC32C (as S3 checksums objects), not SHA-256: it catches torn and corrupted writes
    alike, and costs a tenth of the CPU, which is billed: SHA-256 of AlexNet's paper-preset
    intermediates (~350 KB per image) took 0.2-0.5 ms per image.
    """

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.size = 0
        self.crc = 0

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self.crc = google_crc32c.extend(self.crc, bytes(mv))  # it takes read-only bytes only
        self.size += len(mv)
        return self.f.write(mv)

    def hexdigest(self) -> str:
        return f"{self.crc:08x}"

    def flush(self) -> None:
        self.f.flush()


def _write_tensor(
    store: Store, key: str, n: int, outputs: Iterator[np.ndarray], fmt: TensorFormat,
    c: _Counters,
) -> dict[str, Any]:
    with store.writer(key) as f:
        hw = _HashingWriter(f)
        writer: TensorWriter | None = None
        for out in outputs:
            t = time.perf_counter()
            if writer is None:
                writer = TensorWriter(hw, n, tuple(out.shape[1:]), fmt)  # type: ignore[arg-type]
            writer.write(out)
            c.write_ms += (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        if writer is None:
            writer = TensorWriter(hw, 0, (), fmt)  # type: ignore[arg-type]
        writer.close()
    c.write_ms += (time.perf_counter() - t) * 1000
    c.put(hw.size)
    return {"key": key, "size": hw.size, "crc32c": hw.hexdigest()}


def _write_predictions(
    store: Store, key: str, record: str, outputs: Iterator[np.ndarray], meta: dict[str, Any],
    c: _Counters, scores: str = "probs", classes: list[str] | None = None,
    kept: list[np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One JSONL row per image; returns (the object written, the failed images listed up to
    MAX_FAILED_LISTED with their reasons, for the log and the summary)."""
    errors = meta.get("errors", {})
    filenames, labels = meta["filenames"], meta["labels"]
    index = 0
    failed: list[list[str]] = []
    with store.writer(key) as f:  # the object appears only if the whole block succeeds
        hw = _HashingWriter(f)
        for out in outputs:
            t = time.perf_counter()
            values = out.reshape(len(out), -1)
            if scores == "softmax(logits)":
                values = softmax(values)
            if kept is not None:
                kept.append(values.astype(np.float32))
            k = min(TOP_K, values.shape[1])
            top = np.argsort(-values, axis=1, kind="stable")[:, :k]
            lines = []
            for row in range(len(values)):
                err = errors.get(str(index))
                label = labels[index]
                if err and len(failed) < MAX_FAILED_LISTED:
                    failed.append([filenames[index], err["message"]])
                lines.append(json.dumps(prediction_row(
                    record, index, filenames[index], label,
                    None if err else top[row], None if err else values[row, top[row]], err,
                    scores, classes,
                )))
                index += 1
            hw.write(("\n".join(lines) + "\n").encode())
            c.write_ms += (time.perf_counter() - t) * 1000
        if index != meta["n"]:  # inside the writer: a short predictions object is never made
            raise PredictionCountError(
                f"record {record}: {index} predictions for {meta['n']} images")
    c.put(hw.size)
    quality = {"failed_images": failed}
    return {"key": key, "size": hw.size, "crc32c": hw.hexdigest()}, quality
