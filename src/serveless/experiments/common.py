"""What every experiment shares: the image pool, running fresh jobs, numbers from logs,
the machine it ran on."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cost import MIN_MEMORY_MB
from ..data.records import Example, iter_record, write_record
from ..data.sources import scan_inputs
from ..data.tensors import TensorFormat
from ..driver.log import load_log
from ..driver.prepare import prepare_job
from ..driver.scheduler import JobResult, run_job
from ..driver.spec import JobSpec, parse_memory
from ..errors import JobError
from ..report.summary import log_wall_s, summarize
from ..store import JobLayout, Store
from ..store.layout import RECORD_SUFFIX, record_file, record_name

PROFILE_MEMORY_MB = 3008
"""Profiling memory: the paper's memMax. Fixed so every size gets the same CPU share."""
MEMORY_STEPS = (1, 64)
"""Lambda's memory granularity today (1 MB) and in 2019 (64 MB)."""
HEADROOM = 1.1

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- inputs ----------------------------------------------------------------------------------


def load_pool(records: str | None, images: int | None, minimum: int, workdir: Path,
              say: Say = _quiet) -> list[Example]:
    """The images an experiment draws its records from, in a fixed order.

    From `records` (a folder or glob of .tfrecord files), the first `images` of them (all
    when None); otherwise `images` generated sample photos (`minimum` when None). Held in
    memory as encoded bytes (about 100 KB a photo), so records of any size can be cut from
    the same images and the sizes compare like with like.
    """
    from ..data.sources import find_records

    if records:
        pool: list[Example] = []
        for path in find_records(records):
            with open(path, "rb") as f:
                for ex in iter_record(f, path):  # type: ignore[arg-type]
                    pool.append(ex)
                    if images is not None and len(pool) >= images:
                        break
            if images is not None and len(pool) >= images:
                break
        source = f"{len(pool)} images from the records at {records}"
    else:
        from ..data.samples import make_sample_images

        count = images if images is not None else minimum
        folder = workdir / "sample-images"
        say(f"generating {count} sample photos (about 500×375, ~100 KB each)…")
        make_sample_images(folder, count)
        pool = [Example(f.read(), f.rel, label) for f, label in scan_inputs(str(folder)).images]
        source = f"{len(pool)} generated sample photos"
    if len(pool) < minimum:
        raise JobError(f"{source}: the experiment needs at least {minimum} images "
                       "(a record of the largest size)")
    return pool


def pack_records(pool: Sequence[Example], size: int, count: int, dest: Path,
                 prefix: str) -> list[Path]:
    """`count` records of exactly `size` images, consecutive in the pool, wrapping around.

    Wrapping only happens when the pool is smaller than size × count (repeats of a size);
    images repeat then, which changes neither memory nor time per image.
    """
    if len(pool) < size:
        raise JobError(f"a record of {size} images needs at least {size} images, "
                       f"the pool has {len(pool)}")
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = dest / record_file(f"{prefix}-{i:03d}")
        with open(path, "wb") as f:
            write_record(f, (pool[(i * size + j) % len(pool)] for j in range(size)))
        paths.append(path)
    return paths


# -- running jobs ------------------------------------------------------------------------------


@dataclass
class Setup:
    """What all jobs of an experiment share: store, model and cuts, how they are run.

    The model is partitioned (and checked against the whole model) once, for the first
    job; later jobs run the same shared stage models, which for AlexNet saves seconds per
    job.
    """

    store: Store
    model: str
    cuts: list[str]
    micro_batch: int = 32
    fmt: TensorFormat = field(default_factory=TensorFormat)
    backend: str = "local"
    backend_options: dict[str, Any] = field(default_factory=dict)
    retries: int = 3
    progress: bool = False
    say: Say = _quiet
    backends_seen: list[dict[str, Any]] = field(default_factory=list)
    _template: str | None = None

    @property
    def stages(self) -> int:
        return len(self.cuts) + 1

    def prepare(self, job: str, memory: list[int], records_dir: Path) -> JobSpec:
        """A fresh job over the .tfrecord files of `records_dir` with these memory sizes."""
        layout = JobLayout(job)
        self.store.delete(layout.job)
        memory = parse_memory(memory, self.stages)
        if self._template is None or not self.store.exists(JobLayout(self._template).spec):
            spec = prepare_job(self.store, job, self.model, self.cuts, None, memory,
                               self.micro_batch, str(records_dir), self.fmt)
            self._template = job
            return spec
        # The stage models are shared in the store (models/<digest>/): later jobs point at
        # the first job's, and skip loading and hashing the model again.
        template = JobSpec.load(self.store, self._template)
        names = []
        for path in sorted(records_dir.glob(f"*{RECORD_SUFFIX}")):
            name = record_name(path.name)
            self.store.put_file(path, layout.record(name))
            names.append(name)
        if not names:
            raise JobError(f"no records in {records_dir}")
        spec = JobSpec(job=job, model=self.model, cuts=list(self.cuts), memory=memory,
                       micro_batch=self.micro_batch, format=self.fmt.to_dict(), records=names,
                       input_hw=list(template.input_hw), models=template.models)
        spec.save(self.store)
        return spec

    def run(self, spec: JobSpec, concurrency: int) -> list[dict[str, Any]]:
        """Run the job to the end on a fresh backend; return its invocation log."""
        from ..backends import make_backend

        self.say(f"running {spec.job}: {len(spec.records)} records × {spec.stages} stages, "
                 f"memory {'/'.join(map(str, spec.memory))} MB, concurrency {concurrency}")
        backend = make_backend(self.backend, self.backend_options, max_instances=concurrency)
        try:
            result: JobResult = run_job(self.store, spec, backend, concurrency=concurrency,
                                        retries=self.retries, progress=self.progress)
        finally:
            backend.close()
        self.backends_seen.append(result.backend)
        if result.failed_records:
            self.say(f"[{spec.job}] {len(result.failed_records)} records failed: "
                     + "; ".join(f"{r}: {why}" for r, why in sorted(result.failed_records.items())))
        for stage, mem in sorted(result.raised.items()):
            self.say(f"[{spec.job}] stage {stage} ran out of memory; raised to {mem} MB")
        return load_log(self.store, spec.job)


# -- numbers from logs -------------------------------------------------------------------------


def ok_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("error") is None]


def stage_stats(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per stage: max peak MB and mean duration s over successful invocations."""
    by_stage: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_stage[int(r["stage"])].append(r)
    out = {}
    for k, rs in sorted(by_stage.items()):
        ok = ok_rows(rs)
        peaks = [float(r["peak_mb"]) for r in ok if r.get("peak_mb") is not None]
        out[k] = {
            "invocations": len(ok),
            "failed": len(rs) - len(ok),
            "peak_mb": max(peaks) if peaks else None,
            "duration_s": statistics.fmean(r["duration_ms"] for r in ok) / 1000 if ok else None,
            "memory_mb": sorted({int(r["memory_mb"]) for r in rs}),
        }
    return out


def record_times(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per record: images, the sum of its stages' durations, and its end-to-end span."""
    by_record: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_record[r["record"]].append(r)
    out = {}
    for record, rs in sorted(by_record.items()):
        ok = ok_rows(rs)
        images = next((int(r.get("images") or 0) for r in ok if r["stage"] == 0), 0)
        out[record] = {
            "images": images,
            "stages_s": sum(r["duration_ms"] for r in ok) / 1000,
            "span_s": log_wall_s(rs),
        }
    return out


def recommend_memory(peak_mb: float, step: int = 1) -> int:
    """The smallest memory setting >= peak × 1.1 in `step` MB steps, never below 128 MB.

    Rounded before the ceiling so that float noise (100 × 1.1 = 110.00000000000001) does
    not cost a whole step.
    """
    if step not in MEMORY_STEPS:
        raise JobError(f"--step must be one of {MEMORY_STEPS}, got {step}")
    need = round(peak_mb * HEADROOM / step, 6)
    return max(MIN_MEMORY_MB, math.ceil(need) * step)


def job_cost(rows: list[dict[str, Any]], arch: str = "x86_64") -> dict[str, float]:
    """Billed GB-s and modeled cost of a log, and the images its finished records hold."""
    s = summarize(rows, arch)
    return {"gb_s": s["gb_s"], "cost": s["cost"], "images": s["images"],
            "per_million": s["per_million"]}


def model_label(model: str) -> str:
    """A built-in name as is, a model file by its file name (titles, not full paths)."""
    return Path(model).name if model.lower().endswith(".onnx") else model


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
