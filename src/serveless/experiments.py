"""The paper's experiments (Fig. 3, 4, 5 and Tables 1-2) for any model and any images.

Each experiment lays out ordinary jobs in the store, runs them with the ordinary driver and
backend, and derives every number it reports from the jobs' invocation logs, never from
timers of its own (the one exception is the single-process baseline, which has no log and
keeps its timings in baseline.json). So a figure can always be checked against, or redrawn
from, what the store holds. Each experiment writes a PNG, a markdown file that reads on its
own (what was run, on what machine, with which versions, how each number is derived) and a
JSON file with the same numbers for other tools (memory-compare reads profile.json).

Jobs are created fresh (a job of the same name is deleted first): these are measurements,
and resuming would mix numbers from two runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cost import MAX_MEMORY_MB, MIN_MEMORY_MB, PRICES_AS_OF, bill, vcpus
from .pipeline import JobError, JobResult, JobSpec, load_log, parse_memory, prepare_job, run_job
from .records import Example, iter_record, scan_images, write_record
from .report import markdown_table, summarize, summary_markdown
from .store import JobLayout, Store
from .tensors import TensorFormat

PROFILE_MEMORY_MB = 3008
"""Profiling memory: the paper's memMax. Fixed so every size gets the same CPU share."""
MEMORY_STEPS = (1, 64)
"""Lambda's memory granularity today (1 MB) and in 2019 (64 MB)."""
HEADROOM = 1.1
PAPER_MEM_MIN = {"alexnet": [2048, 1280, 1024, 768]}
"""The paper's memMin for its four AlexNet stages at 1000 images per record."""

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
    from .pipeline import find_records

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
        from .images import make_sample_images

        count = images if images is not None else minimum
        folder = workdir / "sample-images"
        say(f"generating {count} sample photos (about 500×375, ~100 KB each)…")
        make_sample_images(folder, count)
        pool = [Example(p.read_bytes(), p.relative_to(folder).as_posix(), label)
                for p, label in scan_images(folder)]
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
        path = dest / f"{prefix}-{i:03d}.tfrecord"
        with open(path, "wb") as f:
            write_record(f, (pool[(i * size + j) % len(pool)] for j in range(size)))
        paths.append(path)
    return paths


def pack_split(pool: Sequence[Example], per_record: int, dest: Path, prefix: str) -> list[Path]:
    """The whole pool in records of `per_record` (the last one may be short), like `pack`."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, len(pool), per_record)):
        path = dest / f"{prefix}-{i:05d}.tfrecord"
        with open(path, "wb") as f:
            write_record(f, pool[start:start + per_record])
        paths.append(path)
    return paths


# -- running jobs ------------------------------------------------------------------------------


@dataclass
class Setup:
    """What all jobs of an experiment share: store, model and cuts, how they are run.

    The model is partitioned (and checked against the whole model) once, for the first
    job; later jobs copy its stage models, which for AlexNet saves seconds per job.
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
        # Everything under model/ (graphs and their external weight files, whatever the
        # layout), so the copy stays complete if prepare_job stores more.
        src_prefix = JobLayout(self._template).key("model")
        for key in self.store.list(src_prefix):
            self._copy(key, layout.key("model", key.rsplit("/", 1)[-1]))
        names = []
        for path in sorted(records_dir.glob("*.tfrecord")):
            name = path.name.removesuffix(".tfrecord")
            self.store.put_file(path, layout.record(name))
            names.append(name)
        if not names:
            raise JobError(f"no records in {records_dir}")
        spec = JobSpec(job=job, model=self.model, cuts=list(self.cuts), memory=memory,
                       micro_batch=self.micro_batch, format=self.fmt.to_dict(), records=names)
        spec.save(self.store)
        return spec

    def _copy(self, src: str, dest: str) -> None:
        try:
            self.store.fs.copy(self.store.path(src), self.store.path(dest))
        except (NotImplementedError, OSError):
            self.store.put_bytes(dest, self.store.get_bytes(src))

    def run(self, spec: JobSpec, concurrency: int) -> list[dict[str, Any]]:
        """Run the job to the end on a fresh backend; return its invocation log."""
        from .backends import make_backend

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


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("error") is None]


def stage_stats(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per stage: max peak MB and mean duration s over successful invocations."""
    by_stage: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_stage[int(r["stage"])].append(r)
    out = {}
    for k, rs in sorted(by_stage.items()):
        ok = _ok(rs)
        peaks = [float(r["peak_mb"]) for r in ok if r.get("peak_mb") is not None]
        out[k] = {
            "invocations": len(ok),
            "failed": len(rs) - len(ok),
            "peak_mb": max(peaks) if peaks else None,
            "duration_s": statistics.fmean(r["duration_ms"] for r in ok) / 1000 if ok else None,
            "memory_mb": sorted({int(r["memory_mb"]) for r in rs}),
        }
    return out


def log_span_s(rows: list[dict[str, Any]]) -> float:
    """First invocation start to last invocation end, as the log records them."""
    if not rows:
        return 0.0
    start = min(r["started"] for r in rows)
    end = max(r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in rows)
    return end - start


def record_times(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per record: images, the sum of its stages' durations, and its end-to-end span."""
    by_record: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_record[r["record"]].append(r)
    out = {}
    for record, rs in sorted(by_record.items()):
        ok = _ok(rs)
        images = next((int(r.get("images") or 0) for r in ok if r["stage"] == 0), 0)
        out[record] = {
            "images": images,
            "stages_s": sum(r["duration_ms"] for r in ok) / 1000,
            "span_s": log_span_s(rs),
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


# -- the machine -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load and library versions: what a reader needs to compare runs."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("serveless", "onnxruntime", "onnxruntime-gpu", "numpy", "onnx", "matplotlib",
                 "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb,
            "platform": platform.platform(), "load_avg": load, "versions": versions,
            "argv": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "at": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def machine_markdown(info: dict[str, Any], backends: Sequence[dict[str, Any]] = ()) -> str:
    v = ", ".join(f"{k} {val}" for k, val in info["versions"].items())
    lines = [
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores (os.cpu_count()), "
        f"{info['ram_gb']} GB RAM",
        f"- OS: {info['platform']}",
        f"- load average (1, 5, 15 min) at the start: {info['load_avg']}",
        f"- versions: {v}",
        f"- written {info['at']} by: `{info['argv']}`",
    ]
    for b in {json.dumps(b, sort_keys=True): b for b in backends}.values():
        lines.append(f"- backend: {b.get('backend')}, limits {b.get('limits', '-')}, "
                     f"CPU share {b.get('cpu_share', '-')}")
    return "\n".join(lines) + "\n"


def model_label(model: str) -> str:
    """A built-in name as is, a model file by its file name (titles, not full paths)."""
    return Path(model).name if model.lower().endswith(".onnx") else model


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _f(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# -- Fig. 3: profile ---------------------------------------------------------------------------


def run_profile(setup: Setup, sizes: list[int], pool: Sequence[Example], out: Path,
                step: int = 1, repeat: int = 1, job_prefix: str = "profile",
                memory_mb: int | list[int] = PROFILE_MEMORY_MB) -> dict[str, Any]:
    """Fig. 3: every stage on records of each size, one invocation at a time, at `memory_mb`
    (one size for all stages, or one per stage).

    One job per size, each on a fresh backend, so no size inherits another's warm
    instance (and its grown allocator arenas). Concurrency 1: nothing competes for the
    cores, and a fixed memory gives every size the same CPU share.
    """
    recommend_memory(1.0, step)  # validate the step before minutes of work
    memory = memory_mb if isinstance(memory_mb, list) else [memory_mb] * setup.stages
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    logs: dict[int, list[dict[str, Any]]] = {}
    jobs = []
    with tempfile.TemporaryDirectory(prefix="serveless-profile-") as tmp:
        for size in sizes:
            folder = Path(tmp) / f"size-{size}"
            pack_records(pool, size, repeat, folder, f"n{size:05d}")
            job = f"{job_prefix}-{size}"
            spec = setup.prepare(job, memory, folder)
            logs[size] = setup.run(spec, concurrency=1)
            jobs.append(job)
    result = profile_from_logs(logs, setup.stages, step)
    result.update({
        "kind": "serveless-profile", "model": setup.model, "cuts": setup.cuts,
        "memory_mb_profiled": memory, "micro_batch": setup.micro_batch, "repeat": repeat,
        "jobs": jobs, "store": setup.store.url, "machine": info,
    })
    paper = _paper_mem_min(setup)
    _write_json(out / "profile.json", result)
    from .plots import plot_profile

    plot_profile(
        sizes, [[st["sizes"][str(s)]["peak_mb"] for s in sizes] for st in result["stages"]],
        [[st["sizes"][str(s)]["duration_s"] for s in sizes] for st in result["stages"]],
        result["recommended_mb"], out / "profile.png", f"{model_label(setup.model)}: profile",
        memory)
    (out / "profile.md").write_text(profile_markdown(result, paper, setup.backends_seen))
    return result


def _memory_text(memory: int | list[int]) -> str:
    """'every stage at 3008 MB (1.70 vCPU share)' or each stage's size and share."""
    sizes = memory if isinstance(memory, list) else [memory]
    if len(set(sizes)) == 1:
        return f"every stage at {sizes[0]} MB ({vcpus(sizes[0]):.2f} vCPU share)"
    return "stages at " + " / ".join(f"{mb} MB ({vcpus(mb):.2f} vCPU)" for mb in sizes)


def profile_from_logs(logs: dict[int, list[dict[str, Any]]], stages: int,
                      step: int) -> dict[str, Any]:
    """Peak and duration per stage and size, and each stage's recommended memory."""
    per_size = {size: stage_stats(rows) for size, rows in logs.items()}
    out_stages = []
    for k in range(stages):
        cells = {}
        for size, stats in per_size.items():
            st = stats.get(k, {"invocations": 0, "failed": 0, "peak_mb": None,
                               "duration_s": None})
            cells[str(size)] = {key: st[key] for key in
                                ("invocations", "failed", "peak_mb", "duration_s")}
        peaks = [c["peak_mb"] for c in cells.values() if c["peak_mb"] is not None]
        peak = max(peaks) if peaks else None
        rec = recommend_memory(peak, step) if peak is not None else PROFILE_MEMORY_MB
        out_stages.append({"stage": k, "sizes": cells, "peak_mb": peak, "recommended_mb": rec})
    return {"sizes": sorted(logs), "step": step, "stages": out_stages,
            "recommended_mb": [s["recommended_mb"] for s in out_stages]}


def _paper_mem_min(setup: Setup) -> list[int] | None:
    from .models import PAPER_PRESET

    key = setup.model.lower()
    if key in PAPER_MEM_MIN and list(setup.cuts) == PAPER_PRESET.get(key):
        return PAPER_MEM_MIN[key]
    return None


def profile_markdown(p: dict[str, Any], paper: list[int] | None,
                     backends: Sequence[dict[str, Any]] = ()) -> str:
    sizes = p["sizes"]
    rows = []
    for st in p["stages"]:
        for s in sizes:
            c = st["sizes"][str(s)]
            rows.append([st["stage"], s, c["invocations"], _f(c["peak_mb"], 1),
                         _f(c["duration_s"], 3)])
    measured = markdown_table(
        ["stage", "images per record", "invocations", "peak MB", "duration s"], rows)
    head = ["stage", "max peak MB", f"peak × {HEADROOM}", f"recommended MB ({p['step']} MB steps)"]
    rec_rows = []
    for st in p["stages"]:
        peak = st["peak_mb"]
        row = [st["stage"], _f(peak, 1), _f(None if peak is None else peak * HEADROOM, 1),
               st["recommended_mb"]]
        if paper:
            row.append(paper[st["stage"]])
        rec_rows.append(row)
    if paper:
        head.append("paper memMin MB (2019, 1000 per record)")
    cuts = ", ".join(p["cuts"]) or "(none: one stage)"
    over = [st["stage"] for st in p["stages"] if st["recommended_mb"] > MAX_MEMORY_MB]
    return "\n".join([
        f"# Profile of {p['model']} (Fig. 3)",
        "",
        f"Model `{p['model']}` cut at {cuts} into {len(p['stages'])} stages; micro-batch "
        f"{p['micro_batch']}; {p['repeat']} record(s) per size; "
        f"{_memory_text(p['memory_mb_profiled'])}, one invocation at a time. Jobs in "
        f"`{p['store']}`: {', '.join(p['jobs'])}.",
        "",
        "![profile](profile.png)",
        "",
        "## Measured (from each job's invocations.jsonl)",
        "",
        "peak MB = the largest `peak_mb` (VmHWM of the function instance, reset per "
        "invocation) over the stage's successful invocations at that size; duration s = the "
        "mean `duration_ms` of those invocations / 1000 (warm work, cold-start init excluded).",
        "",
        measured,
        "## Recommended memory",
        "",
        f"The smallest setting >= max peak × {HEADROOM} over all sizes, in {p['step']} MB steps, "
        f"never below {MIN_MEMORY_MB} MB (Lambda's maximum is {MAX_MEMORY_MB} MB"
        + (f"; stages {over} exceed it" if over else "") + ").",
        "",
        markdown_table(head, rec_rows),
        f"`--memory {','.join(map(str, p['recommended_mb']))}`",
        "",
        machine_markdown(p["machine"], backends),
    ])


# -- Fig. 4: baseline --------------------------------------------------------------------------


def baseline_session(model_bytes: bytes, threads: int) -> tuple[Any, str, str]:
    """An onnxruntime session on the GPU when onnxruntime-gpu sees one, else on the CPU.

    Returns (session, provider used, why): the report must say which one ran, since a GPU
    changes the comparison entirely (the paper's Fig. 4 is against one GPU).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    available = ort.get_available_providers()
    why = "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    if "CUDAExecutionProvider" in available:
        try:
            sess = ort.InferenceSession(
                model_bytes, opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if sess.get_providers()[0] == "CUDAExecutionProvider":
                return sess, "CUDAExecutionProvider", "onnxruntime-gpu found a GPU"
            why = "CUDAExecutionProvider is installed but no GPU is usable"
        except Exception as exc:  # a broken CUDA install must not stop the CPU baseline
            why = f"CUDAExecutionProvider failed: {exc}"
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess, "CPUExecutionProvider", why


def time_whole_model(model: str, paths: Sequence[Path], micro_batch: int,
                     threads: int) -> dict[str, Any]:
    """The plain single-process script: read, decode and run each record, timed per record.

    Same preprocessing (serveless.images.preprocess) and micro-batch as stage 0, the whole
    model in one session, decoding and inference one after the other on this thread.
    """
    from .images import preprocess
    from .models import input_hw, load_model

    t0 = time.perf_counter()
    onnx_model = load_model(model)
    size, _ = input_hw(onnx_model)
    sess, provider, why = baseline_session(onnx_model.SerializeToString(), threads)
    del onnx_model
    load_s = time.perf_counter() - t0
    name = sess.get_inputs()[0].name
    per_record = []
    for path in paths:
        t = time.perf_counter()
        n = 0
        batch: list[np.ndarray] = []
        with open(path, "rb") as f:
            for ex in iter_record(f, str(path)):  # type: ignore[arg-type]
                try:
                    batch.append(preprocess(ex.encoded, size))
                except ValueError:
                    batch.append(np.zeros((3, size, size), np.float32))
                n += 1
                if len(batch) == micro_batch:
                    _top5(sess, name, batch)
                    batch = []
        if batch:
            _top5(sess, name, batch)
        per_record.append({"record": path.name.removesuffix(".tfrecord"), "images": n,
                           "seconds": time.perf_counter() - t})
    return {"provider": provider, "provider_note": why, "threads": threads,
            "load_s": load_s, "records": per_record}


def _top5(sess: Any, name: str, batch: list[np.ndarray]) -> np.ndarray:
    """Run one micro-batch and rank it, as the last stage does for its predictions."""
    (probs,) = sess.run(None, {name: np.stack(batch)})
    return np.argsort(-probs.reshape(len(probs), -1), axis=1)[:, :5]


def run_baseline(setup: Setup, sizes: list[int], pool: Sequence[Example], out: Path,
                 memory: list[int], repeat: int = 1, threads: int | None = None,
                 job: str = "baseline-pipeline") -> dict[str, Any]:
    """Fig. 4: time per record, the serverless pipeline against one process, per size.

    The pipeline runs first, at concurrency 1 (one record's chain at a time, as the single
    process does), then the single process on the same record files, so the two never
    compete for the cores.
    """
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="serveless-baseline-") as tmp:
        folder = Path(tmp) / "records"
        paths = []
        for size in sizes:
            paths += pack_records(pool, size, repeat, folder, f"n{size:05d}")
        spec = setup.prepare(job, memory, folder)
        rows = setup.run(spec, concurrency=1)
        setup.say(f"running the whole model in one process ({threads} threads)…")
        base = time_whole_model(setup.model, paths, setup.micro_batch, threads)
    result = baseline_from(rows, base, sizes)
    result.update({"kind": "serveless-baseline", "model": setup.model, "cuts": setup.cuts,
                   "memory": spec.memory, "micro_batch": setup.micro_batch, "repeat": repeat,
                   "job": job, "store": setup.store.url, "machine": info, "baseline": base})
    _write_json(out / "baseline.json", result)
    from .plots import plot_baseline

    label = f"one process, {base['provider'].removesuffix('ExecutionProvider')}"
    if base["provider"] == "CPUExecutionProvider":
        label += f" ({threads} threads)"
    rs = result["sizes"]
    plot_baseline(sizes, [r["serverless_s"] for r in rs], [r["serverless_span_s"] for r in rs],
                  [r["baseline_s"] for r in rs], out / "baseline.png",
                  f"{model_label(setup.model)}: serverless pipeline vs one process, per record",
                  label)
    (out / "baseline.md").write_text(baseline_markdown(result, setup.backends_seen))
    return result


def baseline_from(rows: list[dict[str, Any]], base: dict[str, Any],
                  sizes: list[int]) -> dict[str, Any]:
    """Mean time per record of each size, the pipeline's from its log."""
    times = record_times(rows)
    out = []
    for size in sizes:
        sls = [t for t in times.values() if t["images"] == size]
        one = [r["seconds"] for r in base["records"] if r["images"] == size]
        entry = {
            "images_per_record": size,
            "records": len(sls),
            "serverless_s": statistics.fmean(t["stages_s"] for t in sls) if sls else 0.0,
            "serverless_span_s": statistics.fmean(t["span_s"] for t in sls) if sls else 0.0,
            "baseline_s": statistics.fmean(one) if one else 0.0,
        }
        entry["ratio"] = (entry["serverless_s"] / entry["baseline_s"]
                          if entry["baseline_s"] else None)
        out.append(entry)
    return {"sizes": out}


def baseline_markdown(b: dict[str, Any], backends: Sequence[dict[str, Any]] = ()) -> str:
    base = b["baseline"]
    rows = [[r["images_per_record"], r["records"], _f(r["serverless_s"], 3),
             _f(r["serverless_span_s"], 3), _f(r["baseline_s"], 3), _f(r["ratio"], 2),
             _f(r["images_per_record"] / r["baseline_s"] if r["baseline_s"] else None, 1)]
            for r in b["sizes"]]
    table = markdown_table(
        ["images per record", "records", "serverless s (sum of stages)",
         "serverless s (end to end)", "one process s", "serverless / one process",
         "one process images/s"], rows)
    return "\n".join([
        f"# Serverless pipeline vs one process: {b['model']} (Fig. 4)",
        "",
        f"The same record files through the pipeline (job `{b['job']}` in `{b['store']}`, "
        f"{len(b['cuts']) + 1} stages at {'/'.join(map(str, b['memory']))} MB, concurrency 1, "
        f"micro-batch {b['micro_batch']}) and through the whole model in one process "
        "(read, decode with serveless.images.preprocess, run; one after the other).",
        "",
        f"**One process ran on {base['provider']}** with {base['threads']} intra-op threads "
        f"({base['provider_note']}); loading the model took {base['load_s']:.2f} s, "
        "not counted per record.",
        "",
        "![baseline](baseline.png)",
        "",
        markdown_table(["column", "what it measures"], [
            ["sum of stages", "the record's stage invocations' `duration_ms` summed (from the "
             "log): what the functions worked"],
            ["end to end", "first invocation start to last invocation end of the record "
             "(from the log): adds cold starts and hand-offs"],
            ["one process", "wall time of the record in the single process (baseline.json)"],
        ], right=set()),
        table,
        "Values are means over the records of each size.",
        "",
        machine_markdown(b["machine"], backends),
    ])


# -- Fig. 5: sweep -----------------------------------------------------------------------------


def run_sweep(setup: Setup, concurrency: list[int], records_dir: Path, out: Path,
              memory: list[int], arch: str = "x86_64",
              job_prefix: str = "sweep") -> dict[str, Any]:
    """Fig. 5: the same job at each concurrency; wall time and modeled cost from each log."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    logs = {}
    spec = None
    for c in concurrency:
        spec = setup.prepare(f"{job_prefix}-c{c}", memory, records_dir)
        logs[c] = setup.run(spec, concurrency=c)
    assert spec is not None
    result = sweep_from_logs(logs, spec.memory, arch)
    result.update({"kind": "serveless-sweep", "model": setup.model, "cuts": setup.cuts,
                   "memory": spec.memory, "records": len(spec.records),
                   "jobs": [f"{job_prefix}-c{c}" for c in concurrency],
                   "store": setup.store.url, "machine": info, "arch": arch})
    _write_json(out / "sweep.json", result)
    from .plots import plot_sweep

    pts = result["points"]
    plot_sweep([p["concurrency"] for p in pts], [p["wall_s"] for p in pts],
               [p["cost"] for p in pts], [p["oversubscribed"] for p in pts], result["cores"],
               result["vcpus_per_function"], out / "sweep.png",
               f"{model_label(setup.model)}: {pts[0]['images']} images in "
               f"{result['records']} records, time and cost against concurrency")
    (out / "sweep.md").write_text(sweep_markdown(result, setup.backends_seen))
    return result


def sweep_from_logs(logs: dict[int, list[dict[str, Any]]], memory: list[int],
                    arch: str) -> dict[str, Any]:
    """Per concurrency: log span, GB-s, cost; oversubscribed when c × vCPU > cores."""
    cores = os.cpu_count() or 1
    share = max(vcpus(m) for m in memory)
    points = []
    for c, rows in logs.items():
        cost = job_cost(rows, arch)
        wall = log_span_s(rows)
        points.append({
            "concurrency": c, "wall_s": wall, "images": cost["images"],
            "images_per_s": cost["images"] / wall if wall else 0.0,
            "gb_s": cost["gb_s"], "cost": cost["cost"], "per_million": cost["per_million"],
            "cold_starts": sum(1 for r in rows if r.get("cold")),
            "cpu_demand": c * share, "oversubscribed": c * share > cores,
        })
    return {"points": points, "cores": cores, "vcpus_per_function": share}


def sweep_markdown(s: dict[str, Any], backends: Sequence[dict[str, Any]] = ()) -> str:
    rows = [[p["concurrency"], _f(p["wall_s"], 3), _f(p["images_per_s"], 2), _f(p["gb_s"], 4),
             f"{p['cost']:.8f}", _f(p["per_million"], 2), p["cold_starts"],
             _f(p["cpu_demand"], 2), "**yes**" if p["oversubscribed"] else "no"]
            for p in s["points"]]
    table = markdown_table(
        ["concurrency", "wall s", "images/s", "GB-s", "cost USD", "USD per 1M images",
         "cold starts", "vCPU demand", f"oversubscribed (> {s['cores']} cores)"], rows)
    over = [p["concurrency"] for p in s["points"] if p["oversubscribed"]]
    note = (f"At concurrency {', '.join(map(str, over))} the functions ask for more CPU "
            f"(concurrency × {s['vcpus_per_function']:.2f} vCPU) than this machine's "
            f"{s['cores']} cores: they share cores rather than run in parallel, so time there "
            "shows this machine's limit, not the platform's (hollow markers, shaded region)."
            if over else "No point asks for more CPU than this machine's cores.")
    return "\n".join([
        f"# Time and cost against concurrency: {s['model']} (Fig. 5)",
        "",
        f"The same {s['records']} records at each concurrency (jobs "
        f"{', '.join(s['jobs'])} in `{s['store']}`), stages at "
        f"{'/'.join(map(str, s['memory']))} MB, each job on a fresh backend (cold starts "
        "included).",
        "",
        "![sweep](sweep.png)",
        "",
        "wall s = first invocation start to last invocation end in the job's log; GB-s and "
        f"cost = billed ms × memory of every invocation, priced as AWS Lambda {s['arch']} "
        f"plus requests and S3 requests (prices as of {PRICES_AS_OF}).",
        "",
        table,
        note,
        "",
        machine_markdown(s["machine"], backends),
    ])


# -- Tables 1 and 2: memory-compare ------------------------------------------------------------


def run_memory_compare(setup: Setup, sizes: list[int], pool: Sequence[Example], out: Path,
                       mem_min: list[int], mem_max: int = PROFILE_MEMORY_MB,
                       concurrency: int = 1, arch: str = "x86_64",
                       job_prefix: str = "memcmp") -> dict[str, Any]:
    """Tables 1-2: the same images at memMax everywhere and at memMin, per record size."""
    if len(mem_min) != setup.stages:
        raise JobError(f"memMin has {len(mem_min)} sizes for {setup.stages} stages")
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    configs = {"memMax": [mem_max] * setup.stages, "memMin": list(mem_min)}
    logs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    # The same images at every size where the pool allows (a multiple of every size), so
    # the sizes differ only in how the images are grouped.
    common = math.lcm(*sizes)
    if len(pool) >= common:
        pool = pool[:len(pool) // common * common]
    with tempfile.TemporaryDirectory(prefix="serveless-memcmp-") as tmp:
        for size in sizes:
            count = len(pool) // size
            if count < 1:
                raise JobError(f"{len(pool)} images do not fill one record of {size}")
            folder = Path(tmp) / f"size-{size}"
            pack_records(pool, size, count, folder, f"n{size:05d}")
            for name, memory in configs.items():
                spec = setup.prepare(f"{job_prefix}-{name.lower()}-{size}", memory, folder)
                logs[(name, size)] = setup.run(spec, concurrency=concurrency)
    result = memory_compare_from_logs(logs, configs, arch)
    result.update({"kind": "serveless-memory-compare", "model": setup.model, "cuts": setup.cuts,
                   "sizes": sizes, "concurrency": concurrency, "arch": arch,
                   "store": setup.store.url, "machine": info,
                   "paper_mem_min": _paper_mem_min(setup)})
    md = memory_compare_markdown(result, setup.backends_seen)
    _write_json(out / "memory-compare.json", result)
    (out / "memory-compare.md").write_text(md)
    from .plots import plot_memory_compare

    t2 = result["table2"]
    plot_memory_compare(list(configs), sizes,
                        {(r["config"], r["images_per_record"]): r["wall_s"] for r in t2},
                        {(r["config"], r["images_per_record"]): r["per_million"] for r in t2},
                        out / "memory-compare.png",
                        f"{model_label(setup.model)}: memMax ({mem_max} MB everywhere) vs memMin "
                        f"({'/'.join(map(str, mem_min))} MB), concurrency {concurrency}")
    return result


def memory_compare_from_logs(logs: dict[tuple[str, int], list[dict[str, Any]]],
                             configs: dict[str, list[int]], arch: str) -> dict[str, Any]:
    table1 = []
    for name, memory in configs.items():
        rows = [r for (cfg, _), rs in logs.items() if cfg == name for r in rs]
        stats = stage_stats(rows)
        table1.append({
            "config": name, "memory_mb": memory,
            "used_mb": [stats.get(k, {}).get("memory_mb", []) for k in range(len(memory))],
            "peak_mb": [stats.get(k, {}).get("peak_mb") for k in range(len(memory))],
        })
    table2 = []
    for (name, size), rows in logs.items():
        cost = job_cost(rows, arch)
        table2.append({
            "config": name, "images_per_record": size,
            "records": len({r["record"] for r in rows}), "images": cost["images"],
            "wall_s": log_span_s(rows), "gb_s": cost["gb_s"], "cost": cost["cost"],
            "per_million": cost["per_million"],
            "oom": sum(1 for r in rows if (r.get("error") or {}).get("type") == "OutOfMemory"),
        })
    return {"table1": table1, "table2": table2}


def memory_compare_markdown(m: dict[str, Any], backends: Sequence[dict[str, Any]] = ()) -> str:
    stages = len(m["table1"][0]["memory_mb"])
    head = ["configuration"] + [f"stage {k} MB" for k in range(stages)]
    t1 = [[r["config"]] + [
        str(mb) + ("" if r["used_mb"][k] in ([], [mb]) else
                   f" (ran at {'/'.join(map(str, r['used_mb'][k]))} after OOM)")
        for k, mb in enumerate(r["memory_mb"])] for r in m["table1"]]
    if m.get("paper_mem_min"):
        t1.append(["paper memMin (2019)"] + [str(v) for v in m["paper_mem_min"]])
    peaks = [[r["config"]] + [_f(p, 1) for p in r["peak_mb"]] for r in m["table1"]]
    t2 = [[r["config"], r["images_per_record"], r["records"], r["images"], _f(r["wall_s"], 3),
           _f(r["gb_s"], 4), f"{r['cost']:.8f}", _f(r["per_million"], 2), r["oom"]]
          for r in m["table2"]]
    return "\n".join([
        f"# memMax vs memMin: {m['model']} (Tables 1 and 2)",
        "",
        f"Images in records of {', '.join(map(str, m['sizes']))} (the same images at every "
        "size when their number is a multiple of every size), run with every "
        "stage at memMax and with each stage at its memMin (the profiled recommendation), "
        f"concurrency {m['concurrency']}, each job on a fresh backend. Jobs in `{m['store']}`.",
        "",
        "![memory-compare](memory-compare.png)",
        "",
        "## Table 1: memory per stage",
        "",
        markdown_table(head, t1),
        "Measured peak MB per stage (largest `peak_mb` over the configuration's successful "
        "invocations, all sizes):",
        "",
        markdown_table(head, peaks),
        "## Table 2: time and cost",
        "",
        "wall s = first invocation start to last invocation end in the job's log; GB-s and "
        f"cost from every invocation's billed ms and memory, AWS Lambda {m['arch']} prices as "
        f"of {PRICES_AS_OF}; OOM = invocations killed for exceeding their memory (retried "
        "with 1.5× memory).",
        "",
        markdown_table(["configuration", "images per record", "records", "images", "wall s",
                        "GB-s", "cost USD", "USD per 1M images", "OOM"], t2),
        machine_markdown(m["machine"], backends),
    ])


def read_profile(path: str | Path) -> dict[str, Any]:
    """A profile.json written by `serveless profile`, checked to be one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise JobError(f"cannot read profile {path}: {exc}") from exc
    if data.get("kind") != "serveless-profile" or "recommended_mb" not in data:
        raise JobError(f"{path} is not a profile.json written by `serveless profile`")
    return data


# -- report of jobs ----------------------------------------------------------------------------


def write_job_report(store: Store, jobs: Sequence[str], out: Path,
                     arch: str = "x86_64") -> Path:
    """DIR/report.md: what each job was, how it went per stage, and pictures of both.

    Everything comes from the store (job.json and invocations.jsonl), so a report can be
    written long after the run, from any machine that reaches the store.
    """
    from .plots import plot_stages, plot_timeline

    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    parts = [f"# serveless report: {', '.join(jobs)}", ""]
    for job in jobs:
        spec = JobSpec.load(store, job)
        rows = load_log(store, job)
        if not rows:
            raise JobError(f"job {job!r} in {store.url} has no invocation log yet")
        s = summarize(rows, arch)
        span = log_span_s(rows)
        stats = {st.stage: st for st in s["stages"]}
        ks = sorted(stats)
        stages_png = plot_stages(
            ks, [stats[k].mean_duration_ms / 1000 for k in ks],
            [stats[k].mean_init_ms / 1000 for k in ks], [stats[k].peak_mb for k in ks],
            [max(stats[k].memory_mb) for k in ks], out / f"{job}-stages.png",
            f"{job}: per-stage duration and peak memory")
        timeline_png = plot_timeline(rows, out / f"{job}-timeline.png",
                                     f"{job}: invocations over time")
        billing = bill(rows, arch)["total"]
        parts += [
            f"## Job `{job}`",
            "",
            markdown_table(["job.json", "value"], [
                ["model", f"`{spec.model}`"],
                ["cuts", ", ".join(spec.cuts) or "(none: one stage)"],
                ["stages", spec.stages],
                ["memory MB per stage", "/".join(map(str, spec.memory))],
                ["micro-batch", spec.micro_batch],
                ["intermediate format", json.dumps(spec.format)],
                ["records", len(spec.records)],
                ["serveless version of the job", spec.version],
                ["store", f"`{store.url}`"],
            ], right=set()),
            f"{s['images']} images; {billing.invocations} invocations "
            f"({sum(1 for r in rows if r.get('error'))} failed); "
            f"first start to last end {span:.2f} s"
            + (f" = {s['images'] / span:.2f} images/s" if span else "") + ".",
            "",
            summary_markdown(rows, arch),
            f"![{job} per stage]({stages_png.name})",
            "",
            f"![{job} timeline]({timeline_png.name})",
            "",
        ]
    parts.append(machine_markdown(info))
    parts.append("(machine of the report's writer; jobs on the local backend ran on it too)\n")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
