"""`serveless run` and `serveless demo`: lay a job out, run it on a backend, print what it
cost. The store and the backend are checked before anything is written, and a job whose
setup fails or is interrupted leaves the store as it found it: what this run wrote is
removed, and nothing else."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import USER_ERRORS, JobError, StoreError
from ..store import DEFAULT_STORE, JobLayout, Store, validate_job_name
from ..store.layout import RECORD_SUFFIX
from . import common
from .app import app
from .common import (
    KEEP_ALIVE_S,
    ArchOpt,
    BackendOpt,
    BackendOptions,
    CalibrationOpt,
    ConcurrencyOpt,
    CutsOpt,
    JobOpt,
    KeepAliveOpt,
    MaxInstancesOpt,
    MemoryOpt,
    MicroBatchOpt,
    ModelOpt,
    OutputOpt,
    PresetOpt,
    QuantizeOpt,
    RetriesOpt,
    StoreOpt,
    StoreOptions,
    TensorOpt,
    WeightsOpt,
    check_precision,
    console,
    err_console,
    fail,
    guarded,
    open_store,
    parse_options,
    say,
    start_backend,
)


def _start(store_url: str, store_option: list[str] | None, backend_name: str,
           backend_option: list[str] | None, concurrency: int, max_instances: int | None,
           keep_alive: float) -> tuple[Store, Any]:
    """The store, probed for writing, and the backend, with its dependencies: both checked
    before a job writes anything, so a mistake here leaves the store as it was."""
    st = open_store(store_url, store_option)
    guarded(st.check)
    backend = start_backend(backend_name, backend_option,
                            max_instances=max_instances or concurrency, keep_alive_s=keep_alive)
    return st, backend


def _prepare(st: Store, backend: Any, job: str, make: Any) -> Any:
    """Lay the job out; if that fails (or is interrupted), remove what this run wrote, and
    nothing else: an object that was in the job's folder before stays, whoever wrote it."""
    layout = JobLayout(job)
    before = set(guarded(lambda: st.find(layout.job)))
    with st.journal() as written:
        try:
            return make()
        except BaseException as exc:
            backend.close()
            _remove_written(st, written, before)
            if isinstance(exc, KeyboardInterrupt):
                fail("interrupted before the job started; nothing was kept", 130)
            if isinstance(exc, USER_ERRORS) and not common.DEBUG:
                fail(str(exc))
            raise


def _remove_written(st: Store, written: list[str], before: set[str]) -> None:
    """Delete the objects a failed setup wrote (newest first) that were not there before;
    a failure here leaves an object behind, it never hides why the setup failed."""
    for key in reversed(dict.fromkeys(written)):
        if key not in before:
            with contextlib.suppress(OSError, StoreError):
                st.delete(key)


def _local_folders(st: Store, prefix: str) -> set[str] | None:
    """The folders under a local store's prefix (None on an object store, which has none):
    a failed setup removes the empty ones it made, and no folder that was there before."""
    root = st.local_path(prefix)
    if root is None:
        return None
    return {os.path.normpath(d) for d, _, _ in os.walk(root)}


def _remove_new_folders(st: Store, prefix: str, before: set[str] | None) -> None:
    """Remove the folders a failed setup made under a local store's prefix once they are
    empty, deepest first, so the store looks as it did (an object store has no folders)."""
    root = st.local_path(prefix)
    if root is None or before is None:
        return
    made = [os.path.normpath(d) for d, _, _ in os.walk(root, topdown=False)]
    for folder in made:
        if folder not in before:
            with contextlib.suppress(OSError):  # not empty: something not ours is in it
                os.rmdir(folder)


def _execute(store: Store, spec: Any, backend: Any, arch: str, progress: bool = True,
             keep_intermediates: bool = True, lease: Any = None) -> Any:
    from ..driver.scheduler import run_job
    from ..report.summary import job_notes, print_summary

    try:
        result = run_job(store, spec, backend, concurrency=spec.concurrency,
                         retries=spec.retries, progress=progress,
                         keep_intermediates=keep_intermediates,
                         say=lambda m: say(m, err=True), lease=lease)
    except KeyboardInterrupt:
        backend.close()  # stop every instance before saying anything
        fail("interrupted; run the same command again to resume", 130)
    except USER_ERRORS as exc:
        if common.DEBUG:
            raise
        fail(str(exc))
    finally:
        backend.close()
    from ..data.images import describe_transform, make_transform

    notes = [f"CPU share: {result.backend['cpu_share']}"]
    for stage, mem in sorted(result.raised.items()):
        notes.append(f"[yellow]stage {stage} ran out of memory; raised to {mem} MB[/yellow]")
    notes += job_notes(store, spec.job, spec.quantize, spec.model)
    transform = dict(spec.transform or make_transform())
    transform["resize"] = transform.get("resize") or spec.preprocess.get("resize")
    notes.append(describe_transform(transform, spec.input_hw))
    what = (f"output: embeddings of {spec.tensor or 'the model output'}"
            if spec.output == "embeddings" else f"scores: {spec.scores}")
    notes.append(what + (
        f"; the model's fixed batch size {spec.fixed_batch} could not be made dynamic: "
        f"served in micro-batches of {spec.fixed_batch}" if spec.fixed_batch else ""))
    print_summary(result.rows, result.wall_s, arch, console, notes,
                  driver=result.driver_requests,
                  run_images=result.images_run)
    layout = JobLayout(spec.job)
    say(f"{'rows' if spec.output == 'embeddings' else 'predictions'}: "
        f"{store.path(layout.predictions_prefix)}/*.jsonl")
    if spec.output == "embeddings":
        say(f"embeddings: {store.path(layout.embeddings_prefix)}/*.npy "
            f"({spec.format.get('dtype', 'float32')}, a row per image)")
    say(f"invocation log: {store.path(layout.log_prefix)}/")
    console.print(
        f"served {result.images - result.image_errors} images; failed images "
        f"{result.image_errors}; failed records {len(result.failed_records)}; retried "
        f"invocations {result.retried}; OOM raises {len(result.raised)}")
    if result.failed_records:
        err_console.print(f"[bold red]{len(result.failed_records)} records failed:[/bold red]")
        for rec, why in sorted(result.failed_records.items()):
            say(f"  {rec}: {why}", err=True)
    if result.image_errors:
        _print_failed_images(result.rows)
    return result


def _print_failed_images(rows: list[dict[str, Any]]) -> None:
    """The first failed images and why, from the log (the last stage lists them): no
    prediction object is read again."""
    from ..report.summary import failed_image_lines

    for line in failed_image_lines(rows):
        say(line, err=True)


@app.command()
def run(
    job: JobOpt = None,
    records: Annotated[str | None, typer.Option(
        "--input", "--records", metavar="DIR|GLOB|URL",
        help="records or images (told apart by content): a folder, a glob or an fsspec URL")]
    = None,
    per_record: Annotated[int, typer.Option(
        "--per-record", min=1, metavar="N", help="images per record when --input holds images")]
    = 1000,
    label_key: Annotated[str | None, typer.Option(
        "--label-key", metavar="KEY",
        help="the key of a WebDataset sample's .json that holds its label (.cls, if there, "
             "comes first) [default: label, then cls]")] = None,
    image_column: Annotated[str | None, typer.Option(
        "--image-column", metavar="NAME",
        help="a Parquet table's image column [default: its one binary or {bytes, path} "
             "column]")] = None,
    label_column: Annotated[str | None, typer.Option(
        "--label-column", metavar="NAME",
        help="a Parquet table's integer label column [default: its ClassLabel, else 'label'], "
             "or a manifest's (integers or class names) [default: 'label' if there]")]
    = None,
    id_column: Annotated[str | None, typer.Option(
        "--id-column", metavar="NAME",
        help="a table's or manifest's id column, the rows' id [default: the row's index]")]
    = None,
    url_column: Annotated[str | None, typer.Option(
        "--url-column", metavar="NAME",
        help="a manifest's (CSV or JSONL) column of image URLs or paths [default: its one "
             "column named url, uri, path, key, s3_uri or image_url]")] = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    cuts: CutsOpt = None,
    memory: MemoryOpt = None,
    concurrency: ConcurrencyOpt = None,
    micro_batch: MicroBatchOpt = None,
    retries: RetriesOpt = None,
    preprocess: Annotated[str | None, typer.Option(
        metavar="NAME", help="imagenet, inception ([-1, 1]) or raw ([0, 1]) [default: imagenet]")]
    = None,
    resize: Annotated[int | None, typer.Option(
        metavar="N", help="shorter side before the center crop [default: crop × 256/224]")]
    = None,
    crop: Annotated[str | None, typer.Option(metavar="H,W", help="the model's input size")]
    = None,
    mean: Annotated[str | None, typer.Option(metavar="R,G,B", help="mean of [0, 1] pixels")]
    = None,
    std: Annotated[str | None, typer.Option(metavar="R,G,B", help="std of [0, 1] pixels")]
    = None,
    softmax: Annotated[str | None, typer.Option(
        metavar="auto|always|never",
        help="softmax before top-k: auto = when the model does not end in one [default: auto]")]
    = None,
    save_scores: Annotated[bool | None, typer.Option(
        "--save-scores/--no-save-scores", show_default=False,
        help="keep every image's whole score vector, for export --with-scores [default: no]")]
    = None,
    output: OutputOpt = None,
    tensor: TensorOpt = None,
    float16: Annotated[bool | None, typer.Option(
        "--float16/--no-float16", show_default=False,
        help="store intermediates and embeddings as float16 [default: float32]")] = None,
    compress: Annotated[bool | None, typer.Option(
        "--compress/--no-compress", show_default=False,
        help="zstd-compress intermediates [default: no]")] = None,
    keep_intermediates: Annotated[bool, typer.Option(
        "--keep-intermediates/--no-keep-intermediates", show_default=False,
        help="keep stage outputs after a record's predictions are written [default: keep]")]
    = True,
    arch: ArchOpt = "x86_64",
    max_instances: MaxInstancesOpt = None,
    keep_alive: KeepAliveOpt = KEEP_ALIVE_S,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    backend: BackendOpt = "local",
    backend_option: BackendOptions = None,
    quantize: QuantizeOpt = None,
    weights: WeightsOpt = None,
    calibration_images: CalibrationOpt = 64,
    plan: Annotated[Path | None, typer.Option(
        "--plan", metavar="PLAN.json",
        help="run a plan from 'serveless plan': its model, cuts, memory, micro-batch, "
             "concurrency and images per record (refused before anything runs if a stage "
             "would not fit)")] = None,
) -> None:
    """Run a job: every record through every stage. Run it again with the same --job to
    resume; options left out are taken from the job, and only --memory, --concurrency and
    --retries may change."""
    from ..data.sources import scan_inputs
    from ..data.tensors import TensorFormat
    from ..driver.prepare import prepare_job
    from ..driver.spec import DEFAULT_CONCURRENCY

    source, repacked = records, None  # a plan may repack the records in a temporary folder
    if plan is not None:
        repacked = tempfile.mkdtemp(prefix="serveless-plan-")
        try:
            model, cuts, memory, micro_batch, concurrency, records, planned = _apply_plan(
                plan, records, repacked)
        except BaseException:
            shutil.rmtree(repacked, ignore_errors=True)
            raise
        planned_q, out = planned.get("quantize"), planned.get("output") or {}
        asked_out = {"quantize": (quantize, planned_q or "fp32"),
                     "output": (output, out.get("kind", "predictions")),
                     "tensor": (tensor, out.get("tensor", "")),
                     "float16": (float16, out.get("dtype") == "float16" if out else None)}
        for name, (given, wanted) in asked_out.items():
            if given is not None and wanted is not None and given != wanted:
                shutil.rmtree(repacked, ignore_errors=True)
                fail(f"--{name} {given} differs from the plan's ({wanted or 'none'}): leave "
                     "it out to run the plan as made")
        quantize, per_record = planned_q, int(planned["images_per_record"])
        if out:  # the plan priced an embeddings job: run that one
            output, tensor, float16 = out["kind"], out.get("tensor", ""), out.get(
                "dtype") == "float16"
    if job is None and records is None:
        fail("give --input DIR to start a job (or --job NAME to resume one)")
    check_precision(quantize, weights, calibration_images)
    if job is not None:
        guarded(lambda: validate_job_name(job))
    transform = guarded(lambda: _transform(preprocess, resize, crop, mean, std))
    if records is not None:  # before a job is named or anything written
        found = guarded(lambda: scan_inputs(records, parse_options(store_option)))
        if found.manifest is not None:  # its columns and lines, before the lease is taken
            from ..data.manifest import check_manifest

            guarded(lambda: check_manifest(found.manifest, found.manifest_kind, url_column,
                                           id_column, label_column))
    st, runner = _start(store, store_option, backend, backend_option,
                        concurrency or DEFAULT_CONCURRENCY, max_instances, keep_alive)
    if job is None:
        job = new_job_name(st, source or "job")
        say(f"job {job}", err=True)
    folders = _local_folders(st, JobLayout(job).job)  # before the lease makes the folder
    lease = _take_lease(st, runner, job)
    spec = None
    fmt = None
    if float16 is not None or compress is not None:
        fmt = TensorFormat("float16" if float16 else "float32", bool(compress))
    def make() -> Any:
        made = prepare_job(
            st, job, model, cuts, preset, memory, micro_batch, records, fmt,
            concurrency=concurrency, retries=retries, say=lambda m: say(m, err=True),
            quantize=quantize, weights=weights, calibration_images=calibration_images,
            per_record=per_record, input_options=parse_options(store_option),
            transform=transform, softmax=softmax, save_scores=save_scores,
            label_key=label_key, output=output, tensor=tensor,
            columns={"image": image_column, "label": label_column, "id": id_column,
                     "url": url_column},
            fetch_progress=sys.stderr.isatty())
        if plan is not None:  # the prediction beside the measurement, in its report
            st.put_bytes(JobLayout(job).plan, plan.read_bytes())
        return made

    try:
        try:
            spec = _prepare(st, runner, job, make)
        finally:
            if repacked:  # the job holds its own copy of the records now
                shutil.rmtree(repacked, ignore_errors=True)
        result = _execute(st, spec, runner, arch, keep_intermediates=keep_intermediates,
                          lease=lease)
    finally:
        lease.release()
        if spec is None:  # the setup failed: the folders it made go with what it wrote
            _remove_new_folders(st, JobLayout(job).job, folders)
    if not result.ok:
        raise typer.Exit(1)


def _take_lease(st: Store, backend: Any, job: str) -> Any:
    """The job's lease, taken before anything is written; a job another driver runs is one
    line and exit status 2."""
    from ..driver.lease import JobLease

    try:
        return JobLease(st, job, say=lambda m: say(m, err=True)).acquire()
    except (JobError, StoreError) as exc:
        backend.close()
        if common.DEBUG:
            raise
        fail(str(exc))


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _transform(preset: str | None, resize: int | None, crop: str | None, mean: str | None,
               std: str | None) -> dict[str, Any] | None:
    """--preprocess and its explicit overrides as recorded in job.json; None if none given
    (a new job then gets ImageNet's, a resumed one keeps its own)."""
    from ..data.images import make_transform
    from ..driver.spec import parse_ints

    if preset is None and resize is None and crop is None and mean is None and std is None:
        return None
    out: dict[str, Any] = make_transform(preset or "imagenet", resize, _floats(mean, "--mean"),
                                         _floats(std, "--std"))
    if crop is not None:
        hw = parse_ints(crop, "--crop")
        out["crop"] = hw * 2 if len(hw) == 1 else hw
    return out


JOB_NAME_BASE = 100  # + '-YYYYMMDD-n' stays within a job name's 128 characters


def new_job_name(store: Store, records: str) -> str:
    """'<records folder>-<date>-<n>': readable, and new in this store."""
    import re

    folder = Path(records.rstrip("/")).expanduser()
    while any(ch in folder.name for ch in "*?[") and folder.parent != folder:
        folder = folder.parent  # a glob: name the job after the folder it searches
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name.removesuffix(RECORD_SUFFIX))
    # a job name has at most 128 characters: room for the date and a number after the base
    base = base[:JOB_NAME_BASE].strip("-.")
    stem = f"{base or 'job'}-{time.strftime('%Y%m%d')}"
    n = 1
    while store.exists(JobLayout(f"{stem}-{n}").job):
        n += 1
    return f"{stem}-{n}"


@app.command()
def demo(
    images: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="number of images (alexnet: sample photos, default 2000; "
        "digits: held-out images, default all 450)")] = None,
    model: Annotated[str, typer.Option(help="alexnet (sample photos) or digits (trained)")]
    = "alexnet",
    per_record: Annotated[int, typer.Option(
        "--per-record", min=1, metavar="N", help="images per record")] = 500,
    memory: MemoryOpt = None,
    concurrency: ConcurrencyOpt = None,
    micro_batch: MicroBatchOpt = None,
    arch: ArchOpt = "x86_64",
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    backend: BackendOpt = "local",
    backend_option: BackendOptions = None,
    quantize: QuantizeOpt = None,
    weights: WeightsOpt = None,
    calibration_images: CalibrationOpt = 64,
) -> None:
    """The paper's experiment in small: sample photos, AlexNet in 4 stages, local functions.

    With --model digits: the trained digits CNN on its held-out images, with accuracy.
    """
    from ..data import sources
    from ..data.samples import make_sample_images
    from ..driver.prepare import prepare_job
    from ..driver.spec import DEFAULT_CONCURRENCY
    from ..model.presets import DEMO_CUTS

    model = model.lower()
    if model not in DEMO_CUTS:
        fail(f"--model must be one of {', '.join(sorted(DEMO_CUTS))}, got {model!r}")
    check_precision(quantize, weights, calibration_images)
    st, runner = _start(store, store_option, backend, backend_option,
                        concurrency or DEFAULT_CONCURRENCY, None, KEEP_ALIVE_S)
    layout = JobLayout("demo")
    # the demo always starts fresh, but clears only a job: never a folder of other data
    is_job = st.exists(layout.spec)
    if not is_job and [k for k in guarded(lambda: st.find(layout.job)) if k != layout.lease]:
        runner.close()
        fail(f"{st.url.rstrip('/')}/demo holds objects but no job.json: it is not a demo job "
             "and is left alone; give the demo another --store")
    folders = _local_folders(st, layout.job)
    lease = _take_lease(st, runner, "demo")
    spec = None
    if is_job:
        for key in st.find(layout.job):
            if key != layout.lease:
                st.delete(key)

    def make() -> Any:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="serveless-demo-") as tmp:
            if model == "digits":
                count = _write_digits(Path(tmp), images)
                say(f"wrote {count} held-out digits (32×32 JPEGs in class folders)…")
            else:
                count = 2000 if images is None else images
                say(f"generating {count} sample photos (about 500×375, ~100 KB each)…")
                make_sample_images(tmp, count)
            names = sources.pack(tmp, st, layout.records_prefix, per_record)
        say(f"packed {len(names)} records of up to {per_record} images "
            f"({time.perf_counter() - t0:.1f} s)")
        return prepare_job(st, "demo", model, cuts=DEMO_CUTS[model], memory=memory,
                           micro_batch=micro_batch, concurrency=concurrency,
                           say=lambda m: say(m), quantize=quantize, weights=weights,
                           calibration_images=calibration_images, records_placed=True)

    try:
        spec = _prepare(st, runner, "demo", make)
        result = _execute(st, spec, runner, arch, progress=sys.stderr.isatty(), lease=lease)
    finally:
        lease.release()
        if spec is None:
            _remove_new_folders(st, layout.job, folders)
    if not result.ok:
        raise typer.Exit(1)


def _write_digits(dest: Path, limit: int | None) -> int:
    """The digits model's held-out images as JPEGs in class folders 0..9 (labels 0..9)."""
    from ..model.digits import CLASSES, heldout_examples
    from ..model.loading import load_model

    load_model("digits")  # train (or load) first, so the timing line reads apart from it
    examples = heldout_examples(limit=limit)
    for c in range(CLASSES):  # every class folder, even empty: pack's labels stay 0..9
        (dest / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (data, label) in enumerate(examples):
        (dest / str(label) / f"digit_{i:04d}.jpg").write_bytes(data)
    return len(examples)


def _apply_plan(path: Path, records: str | None,
                tmp: str) -> tuple[str, str, str, int, int, str | None, dict[str, Any]]:
    """`run --plan`: the plan checked (refused before any invocation if a stage would not
    fit), and its settings as run's options, with the plan itself (its quantize and
    output); records repacked to the plan's size in `tmp` (the caller removes it)."""
    from ..planning.plan import check_plan, load_plan

    p = guarded(lambda: load_plan(path))
    guarded(lambda: check_plan(p))
    if records is not None:
        records = guarded(lambda: _repack(records, int(p["images_per_record"]), tmp))
    return (p["model"], ",".join(p["cuts"]), ",".join(map(str, p["memory"])),
            int(p["micro_batch"]), int(p["concurrency"]), records, p)


def _repack(records: str, per_record: int, tmp: str) -> str:
    """The records as they are when they already hold `per_record` images (the last may be
    short); else the same images repacked into records of `per_record`. An input of
    images, tables or a manifest is returned as it is: run packs it at the plan's size."""
    from ..data.sources import repack, scan_inputs

    if not guarded(lambda: scan_inputs(records)).records:
        return records

    dest = Path(tmp) / "records"
    count = repack(records, per_record, dest)
    if count is None:
        return records
    console.print(f"repacked {count} images into records of {per_record} (the plan's size)",
                  markup=False, highlight=False)
    return str(dest)
