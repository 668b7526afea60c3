"""Commands of the planning loop: plan, simulate, fit (and `sweep --simulate`, `run
--plan`); `calibrate` is cli/calibrate.py. The work is in planning/. Everything simulated
is printed under a "simulated" heading, with where its calibration was measured."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ..report.tables import Table, print_table
from ..store import DEFAULT_STORE
from .app import app
from .common import (
    ArchOpt,
    OutputOpt,
    StoreOpt,
    StoreOptions,
    TensorOpt,
    console,
    fail,
    guarded,
    open_store,
)

PANEL = "Planning"

TargetOpt = Annotated[Literal["lambda", "local"], typer.Option(
    help="what to plan for: AWS Lambda, or this machine's local backend")]
CpuFactorOpt = Annotated[float, typer.Option(
    "--cpu-factor", help="this machine's time per image / the target's (Lambda CPUs differ)")]
PlatformInitOpt = Annotated[float | None, typer.Option(
    "--platform-init-ms", help="Lambda runtime start before the model load (default 800)")]
BandwidthOpt = Annotated[float | None, typer.Option(
    "--bandwidth", help="MB/s between one function and S3 (default 80)")]
LimitOpt = Annotated[int | None, typer.Option(
    "--concurrency-limit", help="the account's concurrent executions (default 1000)")]
QuantizeOpt = Annotated[str | None, typer.Option(
    "--quantize", metavar="int8", help="int8: the stages as `run --quantize int8` makes them")]


def _errors() -> tuple[type[BaseException], ...]:
    from ..errors import CalibrationError, PlanError, SimulationError

    return (CalibrationError, PlanError, SimulationError)


def _guard(fn: Any) -> Any:
    try:
        return guarded(fn)
    except _errors() as exc:
        fail(str(exc))


ProfileOpt = Annotated[Path | None, typer.Option(
    "--profile", metavar="FILE",
    help="platform profile from `serveless fit`: its fitted figures replace the assumed ones")]


def _target(name: str, cal: dict[str, Any], cpu_factor: float, platform_init_ms: float | None,
            bandwidth: float | None, concurrency_limit: int | None,
            profile: Path | None = None) -> Any:
    """The target, with a profile's fitted figures in place of the assumed ones; a figure
    given on the command line wins over the profile's (--cpu-factor and --profile together
    are refused: which CPU would the plan be for?)."""
    from ..planning.simulate import Target

    over: dict[str, Any] = {"cpu_factor": cpu_factor}
    if profile is not None:
        from ..planning.fit import load_profile, target_overrides

        if cpu_factor != 1.0:
            fail("give --cpu-factor or --profile, not both: the profile fits the CPU factor")
        prof = _guard(lambda: load_profile(profile))
        fitted = target_overrides(prof)
        over.update(fitted)
        over["profile"] = {"path": str(profile), "job": prof.get("job"),
                           "calls": prof.get("calls"), "figures": sorted(fitted)}
    if platform_init_ms is not None:
        over["platform_init_ms"] = platform_init_ms
    if bandwidth is not None:
        over["bandwidth_mb_s"] = bandwidth
    if concurrency_limit is not None:
        over["concurrency_limit"] = concurrency_limit
    return _guard(lambda: Target.make(name, cal, **over))


def _print_profile(tgt: Any) -> None:
    """Which platform profile the figures came from, and which figures: printed by every
    command that used one."""
    if tgt.profile:
        p = tgt.profile
        fitted = ", ".join(f"{name} {getattr(tgt, name):.3g}" for name in p["figures"])
        console.print(f"fitted figures ({fitted}) from platform profile {p['path']} (job "
                      f"{p['job']}, {p['calls']} calls); the others assumed", markup=False,
                      highlight=False)


def _print_measured_on(cal: dict[str, Any]) -> None:
    """Where the calibration a plan or simulation rests on was measured (this machine, or a
    function on a backend at some memory): the speed of every stage comes from there."""
    from ..planning.calibrate_backend import measured_on_line

    console.print(measured_on_line(cal), markup=False, highlight=False)


def _load_cal(calibration: Path | None, model: str, store: str,
              store_option: list[str] | None, quantize: str | None = None,
              check: bool = True) -> dict[str, Any]:
    """The calibration of the model at the asked precision: a file, or the store's (with
    check=False, a file of either precision)."""
    from ..planning.calibrate import load_calibration, validate
    from ..store.layout import calibration_key

    if quantize not in (None, "int8"):
        fail(f"--quantize must be int8, got {quantize!r}")
    q = f" --quantize {quantize}" if quantize else ""
    if calibration is not None:
        cal = _guard(lambda: load_calibration(calibration))
    else:
        st = open_store(store, store_option)
        key = calibration_key(model, quantize)
        if not st.exists(key):
            fail(f"no calibration for {model}{q} in {store} ({key}); run `serveless calibrate "
                  f"{model}{q}` or pass --calibration FILE")
        cal = _guard(lambda: validate(json.loads(st.get_bytes(key)), st.path(key)))
    if check and cal.get("quantize") != quantize:
        made = f"--quantize {cal['quantize']}" if cal.get("quantize") else "fp32 (no --quantize)"
        fail(f"the calibration was made {made}, not{q or ' fp32'}: calibrate with the same "
             f"--quantize as you plan with")
    return cal


SIM_COLUMNS = ("plan", "cuts", "memory MB", "per rec", "batch", "C", "wall s", "$", "$/1M",
               "cold", "throttles")
SIM_SPLIT = 6  # the plan's settings | what the simulation found, when one table is too wide


def _print_sims(rows: list[tuple[str, dict[str, Any], dict[str, Any]]], title: str) -> None:
    """Simulated plans, one row each, fitted to the terminal with every value whole."""

    cells = [[name, ",".join(plan["cuts"]) or "(whole model)",
              "/".join(map(str, plan["memory"])), str(plan["images_per_record"]),
              str(plan["micro_batch"]), str(plan["concurrency"]), f"{s['wall_s']:,.1f}",
              f"{s['cost']:.4f}", f"{s['per_million']:.3f}" if s["per_million"] else "-",
              str(s["cold_starts"]), str(s["throttles"])] for name, plan, s in rows]
    print_table(console, Table(SIM_COLUMNS, cells, title, left=3, groups=[
        (f"{title}: plans", list(range(SIM_SPLIT))),
        (f"{title}: results", [0, *range(SIM_SPLIT, len(SIM_COLUMNS))])]))


@app.command("plan", rich_help_panel=PANEL,
             short_help="Cheapest plan within a deadline, or fastest within a budget")
def plan_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="built-in name or .onnx path")],
    images: Annotated[int, typer.Option(min=1, metavar="N", help="images in the job")],
    out: Annotated[Path, typer.Option(metavar="PLAN.json", help="where to write plan.json")],
    deadline: Annotated[float | None, typer.Option(
        min=0.001, metavar="SECONDS", help="cheapest plan within this time")] = None,
    budget: Annotated[float | None, typer.Option(
        min=0.0, metavar="DOLLARS", help="fastest plan within this cost")] = None,
    target: TargetOpt = "lambda",
    arch: ArchOpt = "x86_64",
    max_concurrency: Annotated[int | None, typer.Option(
        "--max-concurrency", help="most invocations in flight")] = None,
    calibration: Annotated[Path | None, typer.Option(
        metavar="FILE", help="calibration JSON [default: the store's, from calibrate]")] = None,
    memory_step: Annotated[int, typer.Option(
        "--memory-step", help="MB between memory sizes searched")] = 1,
    quantize: QuantizeOpt = None,
    output: OutputOpt = None,
    tensor: TensorOpt = None,
    float16: Annotated[bool, typer.Option(help="embeddings stored as float16")] = False,
    cpu_factor: CpuFactorOpt = 1.0,
    profile: ProfileOpt = None,
    platform_init_ms: PlatformInitOpt = None,
    bandwidth: BandwidthOpt = None,
    concurrency_limit: LimitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
) -> None:
    """Cheapest plan within a deadline (or fastest within a budget), with presets beside it.
    With --output embeddings, the job that stores a tensor's vectors (its blocks up to
    --tensor, and the vectors' bytes written)."""
    from ..model.presets import PAPER_MEM_MAX, PAPER_MEM_MIN
    from ..planning.plan import make_plan, plot_pareto
    from ..planning.search import search
    from ..planning.simulate import simulate

    if (deadline is None) == (budget is None):
        fail("give exactly one of --deadline SECONDS or --budget DOLLARS")
    from ..planning.embeddings import for_output

    cal = _load_cal(calibration, model, store, store_option, quantize)
    cal = _guard(lambda: for_output(cal, output or "predictions", tensor or "", float16))
    tgt = _target(target, cal, cpu_factor, platform_init_ms, bandwidth, concurrency_limit,
                  profile)
    t0 = time.perf_counter()
    res = _guard(lambda: search(cal, images, tgt, arch, deadline, budget, max_concurrency,
                                memory_step))
    planner_s = time.perf_counter() - t0
    if res.best is None:
        f = res.fastest
        if deadline is not None:
            fail(f"no plan finishes {images:,} images within {deadline:g} s on {target}: the "
                  f"fastest achievable is {f.wall_s:,.1f} s (cuts "
                  f"{','.join(f.cuts) or 'none'}, memory {'/'.join(map(str, f.memory))} MB, "
                  f"C={f.concurrency}, ${f.cost:.2f})")
        fail(f"no plan fits a budget of ${budget:g}: the cheapest plan within the search "
              "costs more")
    request = {"deadline_s": deadline, "budget": budget, "memory_step": memory_step,
               "max_concurrency": max_concurrency}
    plan = make_plan(cal, res.best, images, tgt, arch, request)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan, indent=1))
    b = res.best
    rows = [("chosen", plan)]
    base = {"images_per_record": b.per_record, "micro_batch": b.micro_batch,
            "concurrency": b.concurrency, "images": images, "arch": arch}
    from ..model.presets import PAPER_PRESET

    preset = list(PAPER_PRESET.get(str(cal["model"]).lower(), []))
    if all(c in cal["boundaries"] for c in preset):
        rows.append(("memMax",
                     {**base, "cuts": preset, "memory": [PAPER_MEM_MAX] * (len(preset) + 1)}))
        if preset and str(cal["model"]).lower() in PAPER_MEM_MIN:
            rows.append(("memMin", {**base, "cuts": preset,
                                    "memory": PAPER_MEM_MIN[str(cal["model"]).lower()]}))
    f = res.fastest
    rows.append(("fastest", {**base, "cuts": f.cuts, "memory": f.memory,
                             "images_per_record": f.per_record, "micro_batch": f.micro_batch,
                             "concurrency": f.concurrency}))
    sims = [(name, p, _guard(lambda p=p: simulate(p, cal, tgt, keep_rows=False)).summary())
            for name, p in rows]
    what = quantize or "fp32"
    if output == "embeddings":
        what += f", embeddings of {tensor or 'the model output'}"
    console.print(f"chosen plan ({what}): cuts "
                  f"{','.join(b.cuts) or '(whole model)'}; memory "
                  f"{'/'.join(map(str, b.memory))} MB; {b.per_record} images per record; "
                  f"micro-batch {b.micro_batch}; concurrency {b.concurrency}", markup=False,
                  highlight=False)
    console.print(f"planner model: wall {b.wall_s:,.1f} s, ${b.cost:.4f} "
                  f"(${b.cost / images * 1e6:.3f} per 1M images, {arch}); predicted peaks "
                  f"{'/'.join(f'{p:.0f}' for p in plan['predicted']['peak_mb'])} MB",
                  markup=False, highlight=False)
    _print_sims(sims, f"simulated on {target} (CPU speed factor {tgt.cpu_factor:g}), "
                      f"{images:,} images, {arch}")
    _print_profile(tgt)
    _print_measured_on(cal)
    console.print("memMax = the paper's stages at 3008 MB each; memMin = the paper's "
                  "2048/1280/1024/768 MB; both at the chosen plan's records and concurrency",
                  markup=False, highlight=False)
    chosen = sims[0][2]
    if deadline is not None and chosen["wall_s"] > deadline:
        console.print(f"warning: the simulation of the chosen plan takes {chosen['wall_s']:,.1f} s,"
                      f" over the deadline of {deadline:g} s (the planner's model is simpler); "
                      "plan again with a shorter --deadline", markup=False, highlight=False)
    marks = {name: (s["wall_s"], s["cost"]) for name, _p, s in sims}
    png = plot_pareto(res.front, marks, images, out.with_suffix(".pareto.png"),
                      f"{cal['model']}, {images:,} images on {target} ({arch})")
    console.print(f"searched {res.configs_searched} of {res.configs} configurations exactly "
                  f"(memory step {memory_step} MB, the others pruned by bounds) in "
                  f"{res.seconds:.2f} s (+{res.front_seconds:.2f} s for the Pareto front; "
                  f"{planner_s:.2f} s in all); wrote {out} and {png}", markup=False,
                  highlight=False)


@app.command("simulate", rich_help_panel=PANEL,
             short_help="Simulate a plan's whole job on Lambda or this machine")
def simulate_cmd(
    plan: Annotated[Path, typer.Option(help="plan.json from `serveless plan`")],
    target: TargetOpt = "lambda",
    images: Annotated[int | None, typer.Option(help="override the plan's image count")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    timeline: Annotated[Path | None, typer.Option(help="timeline PNG (default beside plan)")]
    = None,
    cpu_factor: CpuFactorOpt = 1.0,
    profile: ProfileOpt = None,
    platform_init_ms: PlatformInitOpt = None,
    bandwidth: BandwidthOpt = None,
    concurrency_limit: LimitOpt = None,
) -> None:
    """Simulate a plan's whole job on Lambda or on this machine (labelled simulated)."""
    from ..planning.plan import load_plan
    from ..planning.simulate import plot_timeline, simulate, title

    p = _guard(lambda: load_plan(plan))
    cal = p["calibration"]
    tgt = _target(target, cal, cpu_factor, platform_init_ms, bandwidth, concurrency_limit,
                  profile)
    res = _guard(lambda: simulate(p, cal, tgt, images))
    summary = res.summary()
    png = timeline or plan.with_suffix(f".{target}.timeline.png")
    if res.rows:
        plot_timeline(res.rows, png, title(p, res))
    if as_json:
        print(json.dumps({**summary, "timeline": str(png)}, indent=1))
        return
    _print_sims([("plan", p, summary)], title(p, res))
    per = " · ".join(f"stage {s['stage']}: {s['invocations']} inv, {s['cold_starts']} cold, "
                     f"{s['gb_s']:,.0f} GB-s" for s in summary["per_stage"])
    console.print(f"simulated: {per}; GB-s {summary['gb_s']:,.0f}; timeouts "
                  f"{summary['timeouts']}; failed records {summary['failed_records']}; CPU "
                  f"speed factor {tgt.cpu_factor:g}; timeline {png}", markup=False,
                  highlight=False)
    kinds = ", ".join(f"{n} {k.upper()}" for k, n in summary["driver_requests"].items())
    console.print(f"simulated driver store requests (a new job: uploads, job.json, the log, "
                  f"resume checks, the lease; in $ above): {kinds} = "
                  f"${summary['driver_store_ops']:.6f}", markup=False, highlight=False)
    _print_profile(tgt)
    _print_measured_on(cal)
    if summary["figures"]:
        from ..planning.figures import figures_line

        console.print(figures_line(summary["figures"]), markup=False, highlight=False)


@app.command("fit", rich_help_panel=PANEL,
             short_help="Fit the platform a job ran on from its log: a profile for plan")
def fit_cmd(
    job: Annotated[str, typer.Argument(help="a finished (or partial) job")],
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    calibration: Annotated[Path | None, typer.Option(
        metavar="FILE", help="the model's calibration [default: the store's, from calibrate]")]
    = None,
    out: Annotated[Path | None, typer.Option(
        metavar="FILE", help="where to write the profile [default: ./JOB.profile.json]")]
    = None,
) -> None:
    """Fit the platform a job ran on (CPU speed against the calibration, platform init,
    store bandwidth and latency, warm reuse) from its invocation log; write a platform
    profile for `plan --profile` and `simulate --profile`."""
    from ..driver.log import load_log
    from ..driver.spec import JobSpec
    from ..planning.fit import fit_platform

    st = open_store(store, store_option)
    spec = guarded(lambda: JobSpec.load(st, job))
    rows = guarded(lambda: load_log(st, job))
    if not rows:
        fail(f"job {job!r} in {store} has no invocation log yet: run it first")
    quantize = "int8" if spec.precision == "int8" else None
    cal = _load_cal(calibration, spec.model, store, store_option, quantize)
    if spec.output == "embeddings":  # its calls ran the blocks up to its tensor
        from ..planning.embeddings import for_output

        cal = _guard(lambda: for_output(cal, "embeddings", spec.tensor,
                                        spec.format.get("dtype") == "float16"))
    profile = _guard(lambda: fit_platform(rows, {"job": spec.job, "model": spec.model,
                                                 "cuts": spec.cuts,
                                                 "micro_batch": spec.micro_batch},
                                          cal, st.url))
    target = out or Path(f"{job}.profile.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(profile, indent=1))

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

    def row(name: str, f: dict[str, Any], unit: str) -> list[str]:
        spread = "-" if f.get("p10") is None else f"{num(f['p10'])} to {num(f['p90'])}"
        residual = "-" if f.get("residual") is None else f"{f['residual']:.2f}"
        return [name, num(f["value"]), unit, str(f["calls"]), spread, residual]

    units = {"cpu_factor": "x", "cpu_quota": "x", "platform_init_ms": "ms",
             "init_fixed_ms": "ms", "read_mb_s": "MB/s",
             "write_mb_s": "MB/s", "request_ms": "ms", "warm_reuse": "share"}
    table = [row(name, f, units.get(name, "")) for name, f in profile["figures"].items()]
    table += [row(f"cpu_factor, {name}", f, "x")
              for name, f in profile["cpu_factor_by_stage"].items()]
    print_table(console, Table(["figure", "value", "unit", "calls", "p10 to p90", "residual"],
                               table, f"platform of job {job}, fitted from its log "
                               f"({profile['calls']} calls)", left=1))
    folder = (" The store is a local folder: its reads and writes are CPU work, so its "
              "bandwidth and latency are shown, not used." if profile["local_store"] else "")
    console.print(f"cpu_factor: the calibrating machine's time over the platform's at the "
                  f"same CPU share (> 1 is faster); cpu_quota: the CPU share over the "
                  f"memory's vCPUs (the platform differs by its "
                  f"{profile.get('cpu_scaling', 'speed')} more); init_fixed_ms: the part of "
                  f"a cold start no CPU share speeds up; residual: how far one figure is "
                  f"from the calls (0.05 = 5%)."
                  f"{folder} Wrote {target}; plan or simulate with --profile {target}",
                  markup=False, highlight=False)


PAPER_GPU_S_100K = 902.0  # the paper's GPU time for 100,000 images (issue 10)
MEASURED_SWEEP = Path("serveless-experiments") / "sweep" / "sweep.json"  # `sweep`'s default


def _reference_points(path: Path | None, what: str) -> list[dict[str, Any]]:
    """Points to draw beside the simulation: a sweep.json's "points", or a JSON list of
    {"concurrency", "wall_s"[, "per_million"]}. A bad file is a one-line error."""
    if path is None:
        return []
    if not path.is_file():
        fail(f"{what}: no file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        fail(f"{what}: {path} is not JSON: {exc}")
    pts = data.get("points") if isinstance(data, dict) else data
    if not isinstance(pts, list) or not pts:
        fail(f"{what}: {path} holds no points (a list, or an object with \"points\")")
    out = []
    for n, p in enumerate(pts):
        ok = isinstance(p, dict) and all(
            isinstance(p.get(k), (int, float)) and p[k] > 0 for k in ("concurrency", "wall_s"))
        if not ok or not isinstance(p.get("per_million", 0) or 0, (int, float)):
            fail(f"{what}: point {n} of {path} needs concurrency > 0 and wall_s > 0 (numbers)")
        out.append({k: p[k] for k in ("concurrency", "wall_s", "per_million", "images")
                    if p.get(k) is not None})
    return out


def sweep_simulated(model: str, cuts: list[str], memory: list[int], images: int,
                    per_record: int, micro_batch: int, levels: list[int], target: str,
                    arch: str, out: Path, calibration: Path | None, store: str,
                    store_option: list[str] | None, cpu_factor: float = 1.0,
                    measured: Path | None = None,
                    paper_points: Path | None = None) -> dict[str, Any]:
    """Fig. 5 simulated: wall and cost per concurrency, with reference marks drawn apart:
    the paper's GPU time (902 s per 100k images), the paper's own points when given as a
    file (this project records none), and measured local points (a sweep.json of
    `serveless sweep`; by default the one `sweep` writes, where it exists)."""
    from matplotlib.figure import Figure

    from ..planning.simulate import simulate
    from ..report.plots import save_figure as _save

    cal = _load_cal(calibration, model, store, store_option, check=False)
    precision = cal.get("quantize") or "fp32"
    limit = max(levels) if target == "lambda" else None
    tgt = _target(target, cal, cpu_factor, None, None, max(1000, limit or 0) or None)
    if measured is None and MEASURED_SWEEP.is_file():
        measured = MEASURED_SWEEP
    local_pts = _reference_points(measured, "--measured")
    paper_pts = _reference_points(paper_points, "--paper-points")
    points = []
    for c in levels:
        p = {"cuts": cuts, "memory": memory, "images_per_record": per_record,
             "micro_batch": micro_batch, "concurrency": c, "images": images, "arch": arch}
        s = _guard(lambda p=p: simulate(p, cal, tgt, keep_rows=False)).summary()
        points.append({"concurrency": c, "wall_s": s["wall_s"], "cost": s["cost"],
                       "per_million": s["per_million"], "cold_starts": s["cold_starts"],
                       "throttles": s["throttles"]})
    gpu = PAPER_GPU_S_100K * images / 100_000
    fig = Figure(figsize=(8.5, 5.2))
    ax = fig.subplots()
    xs = [p["concurrency"] for p in points]
    ax.plot(xs, [p["wall_s"] for p in points], "o-", color="C0", label="wall s (simulated)")
    ax.axhline(gpu, color="gray", linestyle="--",
               label=f"paper's GPU: 902 s per 100k images (= {gpu:,.0f} s here)")
    if paper_pts:
        ax.plot([p["concurrency"] for p in paper_pts], [p["wall_s"] for p in paper_pts], "*",
                color="black", markersize=11, label=f"paper's reported wall s ({paper_points})")
    if local_pts:
        ax.plot([p["concurrency"] for p in local_pts], [p["wall_s"] for p in local_pts], "s",
                color="C2", mfc="none", markersize=8,
                label="measured wall s on this machine (its own image count)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("wall time (s)")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["per_million"] for p in points], "^:", color="#c44",
             label="$ per 1M images (simulated)")
    paper_cost = [p for p in paper_pts if p.get("per_million")]
    if paper_cost:
        ax2.plot([p["concurrency"] for p in paper_cost], [p["per_million"] for p in paper_cost],
                 "P", color="black", markersize=9, label="paper's reported $ per 1M images")
    local_cost = [p for p in local_pts if p.get("per_million")]
    if local_cost:
        ax2.plot([p["concurrency"] for p in local_cost], [p["per_million"] for p in local_cost],
                 "D", color="#c44", mfc="none", label="measured $ per 1M images (modeled bill)")
    ax2.set_ylabel("USD per 1M images")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    ax.set_title(f"simulated on {target} (CPU speed factor {cpu_factor:g}): {images:,} images, "
                 f"{'/'.join(map(str, memory))} MB; references drawn apart", fontsize=10)
    fig.tight_layout()
    _save(fig, out / "sweep.png")
    paper_note = (f"the paper's reported points as given in {paper_points}" if paper_pts else
                  "the paper's own per-concurrency points are not recorded in this project; "
                  "pass --paper-points FILE to draw them")
    result = {"kind": "serveless-sweep-simulated", "label": "simulated", "model": model,
              "cuts": cuts, "memory": memory, "images": images, "per_record": per_record,
              "target": tgt.to_dict(), "cpu_factor": cpu_factor, "arch": arch,
              "precision": precision, "points": points, "paper_gpu_s_100k": PAPER_GPU_S_100K,
              "references": {
                  "paper_gpu_s": {"label": "reference (the paper's GPU time)", "wall_s": gpu,
                                  "per_100k_s": PAPER_GPU_S_100K},
                  "paper_points": {"label": "reference (the paper's reported points)",
                                   "source": str(paper_points) if paper_pts else None,
                                   "note": paper_note, "points": paper_pts},
                  "measured_local": {"label": "measured (local backend, this machine)",
                                     "source": str(measured) if local_pts else None,
                                     "points": local_pts}},
              "measured_local": local_pts, "legend": l1 + l2}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Time and cost against concurrency, simulated on {target} (Fig. 5)", "",
             f"{images:,} images of {model} ({precision}) in records of {per_record}, cuts "
             f"{','.join(cuts) or 'none'}, memory {'/'.join(map(str, memory))} MB, {arch}. "
             f"Simulated (calibration {cal.get('measured', '?')}, CPU speed factor "
             f"{cpu_factor:g}); not a measurement. Account concurrency limit "
             f"{tgt.concurrency_limit} (raised to the largest concurrency asked).", "",
             "![sweep](sweep.png)", "",
             "| concurrency | wall s (simulated) | $ (simulated) | $ per 1M | cold starts | "
             "throttles |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['concurrency']} | {p['wall_s']:,.1f} | {p['cost']:.4f} | "
              f"{p['per_million']:.3f} | {p['cold_starts']} | {p['throttles']} |"
              for p in points]
    lines += ["", "## References (drawn apart, never mixed into the simulated figures)", "",
              f"- the paper's GPU time: 902 s per 100,000 images (= {gpu:,.1f} s for "
              f"{images:,} images), the dashed line;",
              f"- {paper_note};",
              "- measured on this machine: " + (f"{len(local_pts)} points from {measured}"
                                                 if local_pts else "none (run `serveless "
                                                 "sweep` first, or pass --measured FILE)")
              + "."]
    for name, pts in (("paper's reported", paper_pts), ("measured (local)", local_pts)):
        if pts:
            lines += ["", f"| concurrency | wall s ({name}) | $ per 1M ({name}) | images |",
                      "|---:|---:|---:|---:|"]
            lines += [f"| {p['concurrency']} | {p['wall_s']:,.2f} | "
                      f"{p['per_million']:.3f} | {p.get('images', '-')} |"
                      if p.get("per_million") else
                      f"| {p['concurrency']} | {p['wall_s']:,.2f} | - | {p.get('images', '-')} |"
                      for p in pts]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    return result
