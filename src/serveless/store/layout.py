"""Every key a job writes, and every rule for the names in the store, in one place.

```
<store>/models/<digest>/stage-<k>.onnx[.data], manifest.json   shared stage models
<store>/<job>/job.json, driver.json, lease                   what was asked; who runs it
<store>/<job>/log/<run>-<n>.jsonl                             the invocation log, in segments
<store>/<job>/records/<r>.tfrecord | <r>.tar                  input records (shards as they are)
<store>/<job>/stage-<k>/<r>.npy[.zst]; stage-0/<r>.meta.json  intermediates
<store>/<job>/predictions/<r>.jsonl; scores/<r>.npy           outputs
<store>/<job>/labels.json                                     class names of the labels
<store>/calibration/<model>.json                              `serveless calibrate`
<store>/calibration/.run-<id>/block-<k>.onnx[.data], images/  a calibration call's inputs
```

Names are rules as much as keys: a job name must stay inside its folder and must not be a
folder the store keeps for itself (`models`); an object being written lives, beside its
key, under a temporary name (`.serveless-tmp-<id>`) that no name from outside can take
(names of files that start with '.' are hidden and never read, job names start with a
letter or digit), that listings skip and that a driver's start removes; its length does not
grow with the key's, so a long record name cannot overflow the file system's limit through
it. Keeping the keys and the rules together is what lets a reader check that a job touches
only what it wrote (several defects came from the same rule written twice, once
differently: a record named `x.tmp-1.tfrecord` was taken for a leftover and deleted).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

MODELS_PREFIX = "models"  # <store>/models/<digest>/: stage models shared by jobs
CALIBRATION_PREFIX = "calibration"  # <store>/calibration/<model>.json
RECORD_SUFFIX = ".tfrecord"
SHARD_SUFFIX = ".tar"  # a WebDataset shard in a job, gzipped or not (told apart by content)
RECORD_SUFFIXES = {"tfrecord": RECORD_SUFFIX, "webdataset": SHARD_SUFFIX}
"""A record's suffix in a job, by its format (data/formats.py). A user's shard may end in
`.tar.gz` or `.tgz` too; its record keeps `.tar`, since the reader tells gzip by content."""
_USER_SUFFIXES = {"tfrecord": (RECORD_SUFFIX,), "webdataset": (".tar.gz", ".tgz", SHARD_SUFFIX)}
LABELS_FILE = "labels.json"  # class names, index = label: beside packed records, in a job
DATA_SUFFIX = ".data"  # a stage's weights, stored beside its graph as ONNX external data
TEMP_PREFIX = ".serveless-tmp-"  # <folder>/.serveless-tmp-<id>: an object being written
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def validate_job_name(job: str) -> str:
    """Refuse names that could escape the job folder (path separators, '..')."""
    if not isinstance(job, str) or not _JOB_NAME.fullmatch(job) or ".." in job:
        raise ValueError(
            f"invalid job name {job!r}: use letters, digits, '_', '-', '.', no path separators "
            "and no '..'"
        )
    if job == MODELS_PREFIX:
        raise ValueError(f"invalid job name {job!r}: the store keeps shared stage models there")
    return job


def temporary(path: str) -> str:
    """The name an object (or a local file) is written under, in the same folder, before it
    is renamed to `path`."""
    folder, _, _ = path.rpartition("/")
    name = f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    return f"{folder}/{name}" if folder else name


def is_temporary(name: str) -> bool:
    """Whether a key's last part names an object still being written (or left by a writer
    that was killed): listings skip it, a driver's start removes it."""
    return name.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)


SIDECAR_DIR = ".serveless-meta"  # <top>/.serveless-meta/<rest of the key>: its metadata


def sidecar_key(key: str) -> str:
    """Where a store without object metadata keeps an object's: in one hidden folder under
    the key's first part (the job's folder), mirroring the rest of the key. Not beside the
    object: a user's `predictions/*.jsonl` (pathlib's glob matches hidden files, and so
    did the demo test's) must find predictions only."""
    top, _, rest = key.strip("/").partition("/")
    return f"{top}/{SIDECAR_DIR}/{rest}" if rest else f"{SIDECAR_DIR}/{top}"


def is_internal(name: str) -> bool:
    """Whether a key (or any folder on its way) is the store's own bookkeeping (a temporary
    object, a check probe, objects' metadata): never a job's object, and never a user's."""
    return any(part.startswith((TEMP_PREFIX, ".serveless-check-", SIDECAR_DIR))
               for part in name.split("/"))


def probe_key() -> str:
    """A tiny object `Store.check` writes, reads back and deletes."""
    return f".serveless-check-{uuid.uuid4().hex}"


def record_suffix(fmt: str = "tfrecord") -> str:
    """The suffix of a record of format `fmt` in a job (`.tfrecord`, `.tar`)."""
    try:
        return RECORD_SUFFIXES[fmt]
    except KeyError:
        raise ValueError(f"unknown record format {fmt!r} (known: "
                         f"{', '.join(RECORD_SUFFIXES)})") from None


def record_file(name: str, fmt: str = "tfrecord") -> str:
    """A record's file name: `<name>.tfrecord`, or `<name>.tar` for a WebDataset shard."""
    return f"{name}{record_suffix(fmt)}"


MAX_NAME_BYTES = 200
"""The longest record name kept as it is, in UTF-8 bytes: its longest object name,
`<name>.meta.json`, then stays within the 255 bytes most file systems allow."""


def record_name(path: str, fmt: str = "tfrecord") -> str:
    """A record's name from its key or file name: the last part without its format's
    suffix (`.tfrecord`; `.tar`, `.tar.gz` or `.tgz` for a shard, one of them), made
    safe for every key it names: a name that starts with '.' (hidden, like a temporary
    object) gets a '_' in front, and one over MAX_NAME_BYTES keeps its start and gains 16
    hex digits of its SHA-256, so two long names stay two names. Idempotent: a key made
    from a safe name gives the same name back."""
    name = Path(path).name
    for suffix in _USER_SUFFIXES.get(fmt) or (record_suffix(fmt),):
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    if not name or name.startswith("."):
        name = "_" + name
    data = name.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(data).hexdigest()[:16]
    head = data[:MAX_NAME_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}-{digest}"


def record_key(prefix: str, name: str, fmt: str = "tfrecord") -> str:
    """`<prefix>/<name>.tfrecord` (`.tar` for a shard; the file name under an empty prefix)."""
    base = prefix.strip("/")
    return f"{base}/{record_file(name, fmt)}" if base else record_file(name, fmt)


def stage_file(k: int) -> str:
    """Stage k's graph: `stage-<k>.onnx` (its weights beside it, + DATA_SUFFIX)."""
    return f"stage-{k}.onnx"


def stage_key(prefix: str, k: int) -> str:
    """Stage k's graph under a set of stage models (`models/<digest>`, `<job>/model`)."""
    return f"{prefix}/{stage_file(k)}"


def calibration_key(model: str, quantize: str | None = None) -> str:
    """Where `calibrate` keeps a model's calibration in the store by default."""
    name = Path(str(model)).name.removesuffix(".onnx")
    return f"{CALIBRATION_PREFIX}/{name}{'-' + quantize if quantize else ''}.json"


def bandwidth_probe_key() -> str:
    """The object `calibrate` times one write and one read of."""
    return f"{CALIBRATION_PREFIX}/.probe-{os.getpid()}"


class CalibrationLayout:
    """The inputs of one calibration measured in a function (`calibrate --backend`): the
    model's blocks and the sample images, uploaded by the driver for the call to read, and
    the object the call times the store with. They live in a hidden folder of
    `calibration/` (no calibration file is named with a '.'), one per run, which the driver
    deletes whole when the call is over."""

    def __init__(self, run: str):
        if not re.fullmatch(r"[0-9a-f]{8,32}", run):
            raise ValueError(f"a calibration run id is hex, got {run!r}")
        self.prefix = f"{CALIBRATION_PREFIX}/.run-{run}"

    def block(self, k: int) -> str:
        """Block k's graph; its weights beside it as `<key>.data` (the name the graph's
        external data refers to, so a function downloads both into one folder)."""
        return f"{self.prefix}/block-{k}.onnx"

    def block_data(self, k: int) -> str:
        return self.block(k) + DATA_SUFFIX

    def image(self, i: int) -> str:
        return f"{self.prefix}/images/img-{i}"

    @property
    def bandwidth_probe(self) -> str:
        """The object the function writes and reads to time the store."""
        return f"{self.prefix}/bandwidth-probe"


class JobLayout:
    """Object keys of one job, as laid out in DESIGN.md."""

    def __init__(self, job: str):
        self.job = validate_job_name(job)

    def key(self, *parts: str) -> str:
        return "/".join((self.job, *parts))

    @property
    def spec(self) -> str:
        return self.key("job.json")

    @property
    def log_prefix(self) -> str:
        """The invocation log: append-only segments, one object per flush of one run."""
        return self.key("log")

    def log_segment(self, run: str, seq: int) -> str:
        """A run's seq-th segment: `log/<run>-<seq>.jsonl` (names sort in time)."""
        return f"{self.log_prefix}/{run}-{seq:06d}.jsonl"

    def log_run(self, run: str) -> str:
        """A finished run's segments as one object: `log/<run>.jsonl`."""
        return f"{self.log_prefix}/{run}.jsonl"

    @property
    def legacy_log(self) -> str:
        """The one-file log of jobs from before segments (read, never written)."""
        return self.key("invocations.jsonl")

    @property
    def driver(self) -> str:
        """The driver's own store requests for this job, by kind, over all its runs."""
        return self.key("driver.json")

    @property
    def plan(self) -> str:
        """The plan a job was run from (`run --plan`), for its report: prediction vs run."""
        return self.key("plan.json")

    @property
    def lease(self) -> str:
        """Which driver runs the job now (host, pid, since, renewed): driver/lease.py."""
        return self.key("lease")

    @property
    def labels(self) -> str:
        """The class names of the job's labels (from the input's labels.json or folders)."""
        return self.key(LABELS_FILE)

    def stage_model(self, k: int) -> str:
        """Stage k's graph in jobs from before stage models were shared (<job>/model/)."""
        return stage_key(self.key("model"), k)

    @property
    def records_prefix(self) -> str:
        return self.key("records")

    def record(self, name: str, fmt: str = "tfrecord") -> str:
        """A record of the job: `records/<name>.tfrecord`, or `.tar` for a shard."""
        return record_key(self.records_prefix, name, fmt)

    def stage_prefix(self, k: int) -> str:
        return self.key(f"stage-{k}")

    def stage_output(self, k: int, record: str, suffix: str = ".npy") -> str:
        return f"{self.stage_prefix(k)}/{record}{suffix}"

    def record_meta(self, record: str) -> str:
        """Filenames, labels and per-image errors found by stage 0, read by the last stage."""
        return f"{self.stage_prefix(0)}/{record}.meta.json"

    @property
    def predictions_prefix(self) -> str:
        return self.key("predictions")

    def predictions(self, record: str) -> str:
        return f"{self.predictions_prefix}/{record}.jsonl"

    def scores(self, record: str) -> str:
        """Every image's whole score row (run --save-scores)."""
        return self.key("scores", f"{record}.npy")

    @property
    def embeddings_prefix(self) -> str:
        return self.key("embeddings")

    def embeddings(self, record: str) -> str:
        """Every image's vector of a `run --output embeddings` job, row i = image i: written
        before the record's predictions object, which marks the record done."""
        return f"{self.embeddings_prefix}/{record}.npy"


class ModelLayout:
    """Object keys of one set of stage models, content-addressed: models/<digest>/.

    The digest covers the model's bytes, the cuts and whatever else changes the stages, so
    jobs of the same model and cuts share one copy (partitioned, checked and uploaded once).
    """

    def __init__(self, digest: str):
        if not _DIGEST.match(digest):
            raise ValueError(f"invalid stage-model digest {digest!r}: 64 lowercase hex digits")
        self.digest = digest
        self.prefix = f"{MODELS_PREFIX}/{digest}"

    def stage(self, k: int) -> str:
        return stage_key(self.prefix, k)

    @property
    def manifest(self) -> str:
        """Written last: the files, sizes and SHA-256 of a complete set."""
        return f"{self.prefix}/manifest.json"
