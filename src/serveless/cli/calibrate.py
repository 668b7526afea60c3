"""`serveless calibrate`: measure a model per block, for plan and simulate, on this machine
or, with `--backend`, inside a function call on that backend at `--memory` (the platform
the job will run on: Lambda through Lithops for users). The work is in
planning/calibrate.py and planning/calibrate_backend.py; this module checks the options,
starts the backend, and prints the blocks and where they were measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cost import MAX_MEMORY_MB, MB_PER_VCPU, MIN_MEMORY_MB
from ..report.tables import Table, print_table
from ..store import DEFAULT_STORE
from .app import app
from .common import (
    BACKENDS,
    BackendOptions,
    StoreOpt,
    StoreOptions,
    console,
    fail,
    guarded,
    open_store,
    parse_options,
    say,
    start_backend,
)

PANEL = "Planning"


@app.command("calibrate", rich_help_panel=PANEL,
             short_help="Measure a model per block, here or on a backend, for plan and simulate")
def calibrate_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="built-in name or .onnx path")],
    records: Annotated[str | None, typer.Option(
        help="folder or glob of .tfrecord files (your images; else sample photos)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="write the calibration JSON here (default: calibration/<model>.json in the store)")]
    = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", metavar="int8",
        help="int8: the stages as `run --quantize int8` makes them")] = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", metavar="|".join(BACKENDS),
        help="measure inside a function call on this backend (local: this machine's "
             "Lambda-like runtime; lithops: AWS Lambda and other clouds) [default: this "
             "machine, in a child process]")] = None,
    backend_option: BackendOptions = None,
    memory: Annotated[int | None, typer.Option(
        "--memory", metavar="MB", min=MIN_MEMORY_MB, max=MAX_MEMORY_MB,
        help=f"the calibration function's memory, with --backend [default: {MB_PER_VCPU}, "
             f"1 vCPU]; the speed-up is measured at {2 * MB_PER_VCPU} MB")] = None,
    keep: Annotated[str | None, typer.Option(
        "--keep", metavar="T1,T2",
        help="cuts that must stay block boundaries: an embeddings job's --tensor, or cuts "
             "you will plan with [default: the blocks are chosen by size]")] = None,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
) -> None:
    """Measure the model per block, for plan and simulate: on this machine, or with
    --backend inside a function call on that backend at --memory."""
    from ..planning.calibrate import calibrate
    from ..planning.calibrate_backend import measured_on_line
    from ..store.layout import calibration_key

    if quantize not in (None, "int8"):
        fail(f"--quantize must be int8, got {quantize!r}")
    if backend is None and (memory is not None or backend_option):
        fail("--memory and --backend-option need --backend: without it the calibration runs "
             "on this machine at 1 and 2 vCPUs (try --backend local)")
    if backend is not None and backend not in BACKENDS:
        fail(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    st = open_store(store, store_option)
    guarded(st.check)
    runner = None if backend is None else start_backend(backend, backend_option,
                                                       max_instances=1)
    try:
        cal = guarded(lambda: calibrate(
            model, st, records, say=say, quantize=quantize, backend=runner, memory_mb=memory,
            backend_options=parse_options(backend_option),
            keep=[k.strip() for k in keep.split(",") if k.strip()] if keep else None))
    finally:
        if runner is not None:
            runner.close()
    data = json.dumps(cal, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(data)
        where = str(out)
    else:
        st.put_bytes(calibration_key(model, quantize), data.encode())
        where = st.path(calibration_key(model, quantize))
    _print(cal)
    say(measured_on_line(cal))
    say(f"calibrated in {cal['seconds']:.1f} s; wrote {where}")


def _print(cal: dict[str, Any]) -> None:
    """The blocks' figures, and the whole model's at 1 vCPU."""
    whole = sum(b["ms_per_image"] for b in cal["blocks"])
    print_table(console, Table(
        ["block", "ends at", "ms/image, 1 vCPU", "× at 2 vCPUs", "weights MB", "KB out/image"],
        [[str(b["index"]), b["end"] or "(model output)", f"{b['ms_per_image']:.2f}",
          f"{b['speedup_2vcpu']:.2f}", f"{b['weights_mb']:.1f}",
          f"{b['bytes_out_per_image'] / 1024:,.1f}"] for b in cal["blocks"]],
        f"{cal['model']}: blocks between cut candidates", left=2))
    say(f"{len(cal['blocks'])} blocks; whole model {whole:.1f} ms/image at 1 vCPU "
        f"(micro-batch {cal['calibration_batch']}), decode "
        f"{cal['decode_ms_per_image']:.1f} ms/image; CPU: {cal['cpu_control']}")
