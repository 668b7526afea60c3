"""Commands that reproduce the paper's experiments: profile, baseline, sweep, memory-compare,
and the writer behind `report --out`.

The commands only parse options and print; the work is in `serveless.experiments`, so the
experiments can also be run from Python.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from ..store import DEFAULT_STORE
from .app import app
from .common import (
    ArchOpt,
    BackendOpt,
    BackendOptions,
    CutsOpt,
    MemoryOpt,
    MicroBatchOpt,
    ModelOpt,
    PresetOpt,
    StoreOpt,
    StoreOptions,
    console,
    err_console,
    fail,
    guarded,
    open_store,
    parse_options,
)

PANEL = "The paper's experiments"
RecordsOpt = Annotated[str | None, typer.Option(
    help="folder or glob of .tfrecord files to take the images from (else sample photos)")]
JobPrefixOpt = Annotated[str | None, typer.Option(
    "--job-prefix", help="prefix of the job names (jobs of that name are replaced)")]


def _out(out: Path | None, name: str) -> Path:
    return out if out is not None else Path("serveless-experiments") / name


def _setup(store: str, store_option: list[str] | None, model: str | None, cuts: str | None,
           preset: str | None, micro_batch: int | None, backend: str,
           backend_option: list[str] | None) -> Any:
    from ..driver.spec import DEFAULT_MICRO_BATCH, DEFAULT_MODEL
    from ..experiments import Setup
    from ..model.partition import resolve_cuts

    model = model or DEFAULT_MODEL
    st = open_store(store, store_option)
    guarded(st.check)
    cut_list = guarded(lambda: resolve_cuts(model, cuts, preset))
    return Setup(store=st, model=model, cuts=cut_list,
                 micro_batch=micro_batch or DEFAULT_MICRO_BATCH,
                 backend=backend, backend_options=parse_options(backend_option),
                 progress=sys.stderr.isatty(), say=lambda m: err_console.print(m, markup=False))


def _sizes(text: str, what: str) -> list[int]:
    from ..driver.spec import parse_ints

    return guarded(lambda: parse_ints(text, what))


def _show(md_path: Path, *paths: Path) -> None:
    """Print the report (its tables fitted to the terminal; the markdown itself, raw, to a
    pipe, where it stays copy-pastable) and where its files are."""
    from ..report.document import print_markdown

    if console.piped:
        typer.echo(md_path.read_text())
    else:
        print_markdown(console, md_path.read_text(), md_path.parent)
    for p in (md_path, *paths):
        console.print(f"wrote {p}", markup=False, highlight=False)


@app.command("profile", rich_help_panel=PANEL,
             short_help="Fig. 3: peak memory and time per stage vs images per record; memMin")
def profile(
    model: ModelOpt = None,
    cuts: CutsOpt = None,
    preset: PresetOpt = None,
    per_record: Annotated[str, typer.Option(
        "--per-record", help="record sizes to profile, e.g. 100,250,500,1000")]
    = "100,250,500,1000",
    records: RecordsOpt = None,
    images: Annotated[int | None, typer.Option(
        help="images to take (from --records) or generate; default: the largest size")] = None,
    repeat: Annotated[int, typer.Option(help="records per size")] = 1,
    step: Annotated[int, typer.Option(help="memory granularity: 1 (today) or 64 MB (2019)")]
    = 1,
    memory: MemoryOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    backend: BackendOpt = "local",
    backend_option: BackendOptions = None,
    micro_batch: MicroBatchOpt = None,
    job_prefix: JobPrefixOpt = None,
    out: Annotated[Path | None, typer.Option(help="folder for profile.png/.md/.json")] = None,
) -> None:
    """Fig. 3: peak memory and duration per stage against images per record; recommends memory."""
    from ..driver.spec import parse_memory
    from ..experiments import load_pool, run_profile

    sizes = _sizes(per_record, "--per-record")
    if repeat < 1:
        fail("--repeat must be >= 1")
    if step not in (1, 64):
        fail("--step must be 1 or 64")
    setup = _setup(store, store_option, model, cuts, preset, micro_batch, backend, backend_option)
    mem = guarded(lambda: parse_memory(memory, setup.stages))
    folder = _out(out, "profile")

    def go() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="serveless-pool-") as tmp:
            pool = load_pool(records, images, max(sizes), Path(tmp), setup.say)
            return run_profile(setup, sizes, pool, folder, step=step, repeat=repeat,
                               job_prefix=job_prefix or "profile", memory_mb=mem)

    result = guarded(go)
    _show(folder / "profile.md", folder / "profile.png", folder / "profile.json")
    console.print("recommended memory per stage: --memory "
                  + ",".join(map(str, result["recommended_mb"])), highlight=False)


@app.command("baseline", rich_help_panel=PANEL,
             short_help="Fig. 4: time per record, pipeline vs the whole model in one process")
def baseline(
    model: ModelOpt = None,
    cuts: CutsOpt = None,
    preset: PresetOpt = None,
    per_record: Annotated[str, typer.Option(
        "--per-record", help="record sizes, e.g. 100,250,500,1000")] = "100,250,500,1000",
    records: RecordsOpt = None,
    images: Annotated[int | None, typer.Option(
        help="images to take (from --records) or generate; default: the largest size")] = None,
    repeat: Annotated[int, typer.Option(help="records per size")] = 1,
    memory: MemoryOpt = None,
    threads: Annotated[int | None, typer.Option(
        help="onnxruntime threads of the single process (default: all cores)")] = None,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    backend: BackendOpt = "local",
    backend_option: BackendOptions = None,
    micro_batch: MicroBatchOpt = None,
    job: Annotated[str, typer.Option(help="job name of the pipeline run (replaced)")]
    = "baseline-pipeline",
    out: Annotated[Path | None, typer.Option(help="folder for baseline.png/.md/.json")] = None,
) -> None:
    """Fig. 4: time per record, serverless pipeline vs the whole model in one process."""
    from ..driver.spec import parse_memory
    from ..experiments import load_pool, run_baseline

    sizes = _sizes(per_record, "--per-record")
    if repeat < 1:
        fail("--repeat must be >= 1")
    setup = _setup(store, store_option, model, cuts, preset, micro_batch, backend, backend_option)
    mem = guarded(lambda: parse_memory(memory, setup.stages))
    folder = _out(out, "baseline")

    def go() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="serveless-pool-") as tmp:
            pool = load_pool(records, images, max(sizes), Path(tmp), setup.say)
            return run_baseline(setup, sizes, pool, folder, mem, repeat=repeat, threads=threads,
                                job=job)

    guarded(go)
    _show(folder / "baseline.md", folder / "baseline.png", folder / "baseline.json")


@app.command("sweep", rich_help_panel=PANEL,
             short_help="Fig. 5: wall time and cost of the same job at each concurrency")
def sweep(
    concurrency: Annotated[str, typer.Option(help="concurrency levels, e.g. 1,2,4,8")]
    = "1,2,4,8",
    model: ModelOpt = None,
    cuts: CutsOpt = None,
    preset: PresetOpt = None,
    records: RecordsOpt = None,
    images: Annotated[int | None, typer.Option(
        help="images to take or generate; default: --per-record × the largest concurrency")]
    = None,
    per_record: Annotated[int | None, typer.Option(
        "--per-record", help="images per record (default: --records as they are, else 100)")]
    = None,
    memory: MemoryOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    backend: BackendOpt = "local",
    backend_option: BackendOptions = None,
    micro_batch: MicroBatchOpt = None,
    arch: ArchOpt = "x86_64",
    job_prefix: JobPrefixOpt = None,
    out: Annotated[Path | None, typer.Option(help="folder for sweep.png/.md/.json")] = None,
    simulate: Annotated[bool, typer.Option(
        "--simulate", help="simulate instead of running (see `serveless simulate`)")] = False,
    target: Annotated[str, typer.Option(help="with --simulate: lambda or local")] = "lambda",
    calibration: Annotated[Path | None, typer.Option(
        help="with --simulate: calibration JSON (default: the store's)")] = None,
    measured: Annotated[Path | None, typer.Option(
        help="with --simulate: a measured sweep.json to draw beside [default: "
             "serveless-experiments/sweep/sweep.json where it exists]")] = None,
    paper_points: Annotated[Path | None, typer.Option(
        "--paper-points", help="with --simulate: JSON list of the paper's reported "
        "{concurrency, wall_s, per_million} to draw as references")] = None,
) -> None:
    """Fig. 5: the same job at each concurrency; wall time and modeled cost."""
    from ..driver.spec import parse_memory
    from ..experiments import load_pool, run_sweep

    levels = _sizes(concurrency, "--concurrency")
    if per_record is not None and per_record < 1:
        fail("--per-record must be >= 1")
    if simulate:  # the simulated Fig. 5 lives with the planner (cli/plan.py)
        from ..driver.spec import DEFAULT_MICRO_BATCH
        from ..model.partition import resolve_cuts
        from .plan import sweep_simulated

        name = model or "alexnet"
        cut_list = guarded(lambda: resolve_cuts(name, cuts, preset))
        mem = guarded(lambda: parse_memory(memory, len(cut_list) + 1))
        folder = _out(out, "sweep-simulated")
        sweep_simulated(name, cut_list, mem, images or 100_000, per_record or 1000,
                        micro_batch or DEFAULT_MICRO_BATCH, levels, target, arch, folder,
                        calibration, store, store_option, measured=measured,
                        paper_points=paper_points)
        _show(folder / "sweep.md", folder / "sweep.png", folder / "sweep.json")
        return
    setup = _setup(store, store_option, model, cuts, preset, micro_batch, backend, backend_option)
    mem = guarded(lambda: parse_memory(memory, setup.stages))
    folder = _out(out, "sweep")

    def go() -> dict[str, Any]:
        from ..data.sources import write_records
        from ..store import Store

        with tempfile.TemporaryDirectory(prefix="serveless-sweep-") as tmp:
            if records and per_record is None and images is None:
                from ..data.sources import find_records

                src = Path(tmp) / "records"
                src.mkdir()
                for f in find_records(records):  # a folder of just these, for prepare
                    (src / Path(f).name).symlink_to(Path(f).resolve())
            else:
                size = per_record or 100
                count = images if images is not None else size * max(levels)
                pool = load_pool(records, count, 1, Path(tmp), setup.say)
                src = Path(tmp) / "records"
                write_records(pool, Store(str(src)), "", size, "r-")
            return run_sweep(setup, levels, src, folder, mem, arch,
                             job_prefix=job_prefix or "sweep")

    guarded(go)
    _show(folder / "sweep.md", folder / "sweep.png", folder / "sweep.json")


@app.command("memory-compare", rich_help_panel=PANEL,
             short_help="Tables 1-2: memMax everywhere vs the profiled memMin")
def memory_compare(
    per_record: Annotated[str, typer.Option(
        "--per-record", help="record sizes, e.g. 1000,500")] = "1000,500",
    profile_json: Annotated[Path | None, typer.Option(
        "--profile", help="profile.json giving memMin (else the sizes are profiled first)")]
    = None,
    model: Annotated[str | None, typer.Option(
        help="built-in name or .onnx path (default: the profile's, else alexnet)")] = None,
    cuts: CutsOpt = None,
    preset: PresetOpt = None,
    records: RecordsOpt = None,
    images: Annotated[int | None, typer.Option(
        help="images to take (from --records) or generate; default: the largest size")] = None,
    mem_max: Annotated[int, typer.Option("--mem-max", help="memMax of every stage (MB)")]
    = 3008,
    step: Annotated[int, typer.Option(help="memory steps when profiling here: 1 or 64 MB")] = 1,
    concurrency: Annotated[int, typer.Option(help="invocations in flight")] = 1,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    backend: BackendOpt = "local",
    backend_option: BackendOptions = None,
    micro_batch: MicroBatchOpt = None,
    arch: ArchOpt = "x86_64",
    job_prefix: JobPrefixOpt = None,
    out: Annotated[Path | None, typer.Option(help="folder for memory-compare.md/.json/.png")]
    = None,
) -> None:
    """Tables 1-2: memMax everywhere vs the profiled memMin; memory, time and cost."""
    from ..experiments import load_pool, read_profile, run_memory_compare, run_profile
    from ..model.partition import resolve_cuts

    sizes = _sizes(per_record, "--per-record")
    if concurrency < 1:
        fail("--concurrency must be >= 1")
    prof = guarded(lambda: read_profile(profile_json)) if profile_json else None
    if prof is not None:
        if model is not None and model != prof["model"]:
            fail(f"--model {model} differs from the profile's model {prof['model']}")
        asked = guarded(lambda: resolve_cuts(prof["model"], cuts, preset))
        if (cuts or preset) and asked != prof["cuts"]:
            fail(f"the cuts {asked} differ from the profile's {prof['cuts']}")
        model, cuts, preset = prof["model"], ",".join(prof["cuts"]), None
    setup = _setup(store, store_option, model or "alexnet", cuts, preset, micro_batch, backend,
                   backend_option)
    folder = _out(out, "memory-compare")

    def go() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="serveless-pool-") as tmp:
            pool = load_pool(records, images, max(sizes), Path(tmp), setup.say)
            if prof is None:
                setup.say("no --profile: profiling the same sizes first")
                p = run_profile(setup, sizes, pool, folder / "profile", step=step,
                                job_prefix=f"{job_prefix or 'memcmp'}-profile",
                                memory_mb=mem_max)
            else:
                p = prof
            return run_memory_compare(setup, sizes, pool, folder, p["recommended_mb"],
                                      mem_max=mem_max, concurrency=concurrency, arch=arch,
                                      job_prefix=job_prefix or "memcmp")

    guarded(go)
    _show(folder / "memory-compare.md", folder / "memory-compare.png",
          folder / "memory-compare.json")
