"""The platform a job ran on, fitted from its own invocation log: a platform profile.

A plan is only as good as the figures it assumes for the platform: `plan --target lambda`
takes Lambda's CPU to be this machine's (`--cpu-factor 1.0`), its runtime start to be
800 ms and a function's S3 throughput 80 MB/s. A laptop, a CI runner and a Lambda function
differ by several times in speed per core, and nobody measured the factor for the user.
But every job measures its platform already: each log row holds a call's duration, its
init, its reads and writes with their bytes and requests, whether it was cold, and which
instance ran it. So a small job run on the platform, set against the calibration of the
model (what each call should have taken on the calibrating machine), gives the figures the
planner needs, each with how many calls it rests on and how well one number explains them:

- **cpu_quota**: the CPU share an instance gets over the vCPUs its memory buys, from the
  calls its quota held back. A platform can differ from this machine in two ways that
  give the same time at 1 vCPU and different times above it: slower cores (every share
  runs at that speed, and a 1.7 vCPU instance keeps its Amdahl speed-up over 1 vCPU), or a
  smaller quota (a 1.7 vCPU instance runs as the calibration's 0.85 vCPU child, with no
  speed-up to have: the local backend's `cpu_scale`, measured on 2026-12-04, where the
  speed reading overestimated a 3008 MB stage by 19% in cost). A job run at one memory
  size below 1 vCPU cannot tell them apart by its durations: the calibration's time at a
  share below 1 is the time at 1 over the share, whatever divides it. Its CPU time can:
  a call that used less than QUOTA_BOUND of a core over its duration (`cpu_ms`, all the
  process's threads while serving) was held by its quota, and its CPU over duration ×
  its memory's vCPUs is the quota scale (0.5 under `cpu_scale=0.5`; 1.0 on Lambda below
  1769 MB, whose share is its memory's). A call that used a whole core or more (a 1769
  MB call on a quota of 1 or more) only says the quota is not below its use, and leaves
  the scale at 1 where no call was held: the speed factor then explains the job. Logs
  without `cpu_ms` are fitted as a speed alone, as before.
- **cpu_factor**, per stage and vCPU share and overall: the calibration's prediction of a
  call's time at its share under the fitted quota (`StageModel.ms_per_record` with the
  memory's threads, plus a cold instance's first-run work) over the measured one, as the
  ratio of their totals: the speed of a core, > 1 faster, as `Target.cpu_factor` means
  it (p10 and p90 are of the calls' own ratios). On a store that is not
  a local folder the time spent reading and writing (`read_ms`, `write_ms`) is left out
  of the measured side, since the simulator adds the transfer on its own.
- **platform_init_ms** and **init_fixed_ms**: a cold start's init minus the model load
  the calibration predicts at its share and the fitted speed is what the platform spends
  before our code runs. Part of it is the process start, CPU work that a smaller share
  slows (the local backend starts an instance in its cgroup), part of it is not (Lambda's
  own environment setup; the local backend's `platform_init_ms`, a wait). The
  calibration measured the process start at 1 vCPU (`start_ms`): at the call's share and
  speed that is the CPU part, and the rest of each cold start the fixed part,
  `init_fixed_ms`. `platform_init_ms` is the whole at a full vCPU. (Scaling the whole
  by the share, as before, made a 512 MB stage's cold starts 1.4 s too long in
  bench_fit: 9% of its cost.) Two cold starts at two shares could fit both parts
  without the calibration, but a job has few cold starts and each is noisy.
- **read and write bandwidth, request latency**: a least-squares fit of each call's
  `read_ms` (`write_ms`) against its requests and bytes (`ms = requests × latency +
  bytes / bandwidth`); where the calls do not tell the two apart, the median throughput.
- **warm reuse**: the share of calls served by an instance that was already warm.

`plan --profile` and `simulate --profile` put these figures in place of the assumed ones
(`target_overrides`), and say so in what they print.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError, PlanError
from .stagemodel import stage_models

PROFILE_KIND = "serveless-platform-profile"
PROFILE_VERSION = 2

LONG_CALL_MS = 1000.0
MIN_LONG_CALLS = 3
"""A CPU quota is granted per period (Linux's CFS: 100 ms), each with a fresh budget, so a
call of a few periods runs partly unthrottled: bench_fit's job A on 2026-12-04 under
cpu_scale=0.5 had FC calls of ~100 ms at 1769 MB that used 0.86-0.93 of a core, and
conv calls of 2.5-3 s that used 0.506-0.517 of their 0.5; the short ones lifted the
fitted quota to 0.532, and the long one-stage jobs planned from it came out 6-10% cheap.
So the quota and the CPU speed are fitted from calls of 10 periods or more, where a job
has at least 3."""
QUOTA_BOUND = 0.95
"""A call whose CPU over its duration is under this many cores was held by its quota: a
busy process with a thread of its own uses a whole core otherwise (the recorded job at
1769 MB on this machine, unscaled: 1.00-1.01)."""


def _figure(values: list[float], unit: str, predicted: list[float] | None = None,
            weights: list[float] | None = None, mean: bool = False) -> dict[str, Any]:
    """One fitted figure: the median of per-call values (weighted where given; `mean`: their
    weighted mean), the 10th and 90th percentiles, the calls it rests on, and its residual:
    the root mean square of the relative error it leaves on the calls (0.05 = one number
    explains them to 5%)."""
    if not values:
        return {"value": None, "unit": unit, "calls": 0, "p10": None, "p90": None,
                "residual": None}
    arr = np.asarray(values, dtype=float)
    if mean:
        value = float(np.average(arr, weights=weights))
    elif weights is not None:
        order = np.argsort(arr)
        w = np.asarray(weights, dtype=float)[order]
        cum = np.cumsum(w) / w.sum()
        value = float(arr[order][np.searchsorted(cum, 0.5)])
    else:
        value = float(np.median(arr))
    residual = float(np.sqrt(np.mean(((arr - value) / value) ** 2))) if value else None
    return {"value": value, "unit": unit, "calls": len(values),
            "p10": float(np.percentile(arr, 10)), "p90": float(np.percentile(arr, 90)),
            "residual": residual}


def _latency_and_bandwidth(calls: list[tuple[float, float, float]]) -> tuple[
        dict[str, Any], dict[str, Any]]:
    """(request latency ms, bandwidth MB/s) from (requests, bytes, ms) per call: least
    squares of ms = requests × latency + bytes / bandwidth when the calls vary enough in
    both to tell them apart; else the median throughput, latency unknown."""
    calls = [(r, b, ms) for r, b, ms in calls if ms > 0 and b > 0]
    if not calls:
        return _figure([], "ms"), _figure([], "MB/s")
    reqs = np.array([c[0] for c in calls], dtype=float)
    mbs = np.array([c[1] / 2**20 for c in calls], dtype=float)
    ms = np.array([c[2] for c in calls], dtype=float)
    a = np.column_stack([reqs, mbs])
    if len(calls) >= 3 and np.linalg.matrix_rank(a) == 2 and np.linalg.cond(a) < 1e6:
        (lat, ms_per_mb), *_ = np.linalg.lstsq(a, ms, rcond=None)
        if lat >= 0 and ms_per_mb > 0:
            fitted = a @ np.array([lat, ms_per_mb])
            residual = float(np.sqrt(np.mean(((ms - fitted) / ms) ** 2)))
            common = {"calls": len(calls), "p10": None, "p90": None, "residual": residual,
                      "method": "least squares over calls"}
            return ({"value": float(lat), "unit": "ms", **common},
                    {"value": float(1000.0 / ms_per_mb), "unit": "MB/s", **common})
    bw = _figure([float(m / (t / 1000.0)) for m, t in zip(mbs, ms, strict=True)], "MB/s")
    bw["method"] = "median throughput (the calls do not separate latency from bandwidth)"
    return _figure([], "ms"), bw


def _model_name(model: Any) -> str:
    """A model as calibrate names it: a file by its absolute path (job.json keeps the path
    as typed, `tiny.onnx`; a calibration the resolved one), a built-in by its name."""
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.is_file() else str(model)


def long_calls(durations: list[float]) -> list[bool]:
    """Which calls are long enough to be held by a CPU quota (LONG_CALL_MS), when at least
    MIN_LONG_CALLS are; else all (a small job's calls, whatever their length)."""
    long = [ms >= LONG_CALL_MS for ms in durations]
    return long if sum(long) >= MIN_LONG_CALLS else [True] * len(durations)


def _cpu_quota(calls: list[tuple[Any, float, float]]) -> dict[str, Any]:
    """The quota scale from (cpu_ms, measured ms, the memory's vCPUs) per call: over the
    calls held by their quota (under QUOTA_BOUND cores, and long: `long_calls`), their CPU
    over their durations × vCPUs, summed (a ratio of totals, as `fit_platform`'s speed);
    1.0, resting on no call, where none was."""
    keep = long_calls([ms for _, ms, _ in calls])
    held = [(float(cpu) / (ms * v), ms * v) for (cpu, ms, v), k in zip(calls, keep, strict=True)
            if k and cpu is not None and ms > 0 and v > 0 and float(cpu) / ms < QUOTA_BOUND]
    fig = _figure([h[0] for h in held], "x (the CPU share / the memory's vCPUs)",
                  weights=[h[1] for h in held], mean=True)
    if fig["value"] is None:
        fig["value"] = 1.0
        fig["method"] = "no call was held by its quota: the memory's share, as assumed"
    else:
        fig["method"] = f"calls under {QUOTA_BOUND} of a core: CPU / (duration x vCPUs)"
    return fig


def fit_platform(rows: list[dict[str, Any]], spec: dict[str, Any], cal: dict[str, Any],
                 store_url: str) -> dict[str, Any]:
    """The platform profile of a job from its log rows, its job.json, the calibration of
    its model and the URL of the store it ran on (see the module's docstring)."""
    cuts = list(spec.get("cuts") or [])
    micro_batch = int(spec.get("micro_batch") or 32)
    if spec.get("model") and cal.get("model") and _model_name(spec["model"]) != _model_name(
            cal["model"]):
        raise PlanError(f"the calibration is of model {cal['model']!r}, the job ran "
                        f"{spec['model']!r}: calibrate the job's model")
    try:
        stages = stage_models(cal, cuts, micro_batch)
    except CalibrationError as exc:
        raise PlanError(f"the job's cuts do not match the calibration: {exc}") from exc
    local_store = "://" not in store_url or store_url.startswith("file://")
    ok = [r for r in rows if r.get("error") is None and not r.get("throttled")
          and int(r.get("images") or 0) > 0 and 0 <= int(r.get("stage", -1)) < len(stages)]
    if not ok:
        raise PlanError("the job's log holds no successful call to fit a platform from")

    def measured_ms(r: dict[str, Any]) -> float:
        ms = float(r["duration_ms"])
        if not local_store:
            ms -= float(r.get("read_ms") or 0.0) + float(r.get("write_ms") or 0.0)
        return ms

    quota = _cpu_quota([(r.get("cpu_ms"), measured_ms(r), float(r.get("vcpus") or 1.0))
                        for r in ok])
    q = float(quota["value"])
    factors: dict[str, list[float]] = defaultdict(list)
    weights: dict[str, list[float]] = defaultdict(list)
    # under a quota, short calls ran partly unthrottled (LONG_CALL_MS): not the speed's
    timed = long_calls([measured_ms(r) for r in ok]) if q < QUOTA_BOUND else [True] * len(ok)
    for r, counted in zip(ok, timed, strict=True):
        k, v = int(r["stage"]), float(r.get("vcpus") or 1.0)
        share = v * q
        predicted = stages[k].ms_per_record(int(r["images"]), share, 1.0, math.ceil(v))
        if r.get("cold"):
            predicted += stages[k].first_call_ms() / min(share, 1.0)
        measured = measured_ms(r)
        if measured <= 0 or predicted <= 0:
            continue
        for key in ("all", f"stage {k}, {v:g} vCPU"):
            if key == "all" and not counted:
                continue
            factors[key].append(predicted / measured)
            weights[key].append(measured)
    if not factors["all"]:
        raise PlanError("no call of the job has a measurable duration")
    # the ratio of the totals (predicted over measured ms): a job's wall and cost are sums
    # over its calls, and the median of a small job's few calls, each ±5-7% (bench_fit's
    # job A on 2026-12-04, 4 calls per stage), sat 4% above their total
    cpu = _figure(factors["all"], "x (the calibrating machine's time / the platform's)",
                  weights=weights["all"], mean=True)
    factor = float(cpu["value"])
    by_share = {key: _figure(vals, "x", weights=weights[key], mean=True)
                for key, vals in sorted(factors.items()) if key != "all"}

    start = float(cal.get("start_ms") or 0.0) / factor  # the process start at 1 vCPU here
    fixed = []
    for r in ok:
        if r.get("cold") and float(r.get("init_ms") or 0.0) > 0:
            k, share = int(r["stage"]), float(r.get("vcpus") or 1.0) * q
            fixed.append(float(r["init_ms"]) - float(stages[k].load_ms(share, factor))
                         - start / min(share, 1.0))
    init = _figure([x + start for x in fixed], "ms (at a full vCPU)")
    init_fixed = _figure(fixed, "ms")
    init_fixed["cpu_part_ms"] = start  # the calibration's process start at the speed

    reads = [(float(r.get("gets") or 0) + float(r.get("heads") or 0),
              float(r.get("bytes_in") or 0), float(r.get("read_ms") or 0)) for r in ok]
    writes = [(float(r.get("puts") or 0), float(r.get("bytes_out") or 0),
               float(r.get("write_ms") or 0)) for r in ok]
    read_latency, read_bw = _latency_and_bandwidth(reads)
    write_latency, write_bw = _latency_and_bandwidth(writes)
    fitted = [f for f in (read_latency, write_latency) if f["value"] is not None]
    request = {**fitted[0], "value": statistics.mean(f["value"] for f in fitted)} \
        if fitted else _figure([], "ms")

    per_instance: dict[str, int] = defaultdict(int)
    for r in ok:
        per_instance[str(r.get("instance", ""))] += 1
    warm = sum(1 for r in ok if not r.get("cold"))
    return {
        "kind": PROFILE_KIND, "version": PROFILE_VERSION,
        "job": spec.get("job"), "model": spec.get("model"), "store": store_url,
        "calibration": {"model": cal.get("model"), "measured": cal.get("measured")},
        "calls": len(ok),
        "figures": {
            "cpu_factor": cpu,
            "cpu_quota": quota,
            "platform_init_ms": init,
            "init_fixed_ms": init_fixed,
            "read_mb_s": read_bw,
            "write_mb_s": write_bw,
            "request_ms": request,
            "warm_reuse": {"value": warm / len(ok), "unit": "share of calls", "calls": len(ok),
                           "p10": None, "p90": None, "residual": None,
                           "calls_per_instance": statistics.mean(per_instance.values())},
        },
        "cpu_factor_by_stage": by_share,
        # which of the two explains more of how the platform differs from this machine
        "cpu_scaling": "quota" if abs(math.log(q)) > abs(math.log(factor)) else "speed",
        "local_store": local_store,
    }


def validate_profile(profile: Any, source: str = "profile") -> dict[str, Any]:
    """Check what `target_overrides` reads; PlanError names what is wrong."""
    if not isinstance(profile, dict) or profile.get("kind") != PROFILE_KIND:
        raise PlanError(f"{source} is not a serveless platform profile (expected kind "
                        f"{PROFILE_KIND!r}; `serveless fit JOB` writes one)")
    figures = profile.get("figures")
    if not isinstance(figures, dict):
        raise PlanError(f"{source}: field 'figures' missing")
    for name, fig in figures.items():
        value = fig.get("value") if isinstance(fig, dict) else "bad"
        if value is not None and (not isinstance(value, (int, float)) or isinstance(
                value, bool) or not math.isfinite(value)):
            raise PlanError(f"{source}: figure {name!r} has no numeric value")
    cpu = (figures.get("cpu_factor") or {}).get("value")
    if not isinstance(cpu, (int, float)) or cpu <= 0:
        raise PlanError(f"{source}: cpu_factor must be a number > 0")
    return profile


def load_profile(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"no platform profile at {p}; `serveless fit JOB --out {p}` writes one")
    try:
        return validate_profile(json.loads(p.read_text()), str(p))
    except json.JSONDecodeError as exc:
        raise PlanError(f"{p} is not JSON: {exc}") from exc


def target_overrides(profile: dict[str, Any]) -> dict[str, float]:
    """The Target settings a profile replaces: the CPU factor, the quota scale where some
    call was held by its quota, the platform init (split into the process start, which
    a target whose start is CPU-bound scales by the share, and `init_fixed_ms`), the store
    bandwidth (the slower of read and write) and the request latency, where fitted. A
    figure the job could not measure (no cold start, say) keeps the assumed value; a
    version 1 profile (one init, one speed factor) is read as it was written."""
    f = profile["figures"]
    out: dict[str, float] = {"cpu_factor": float(f["cpu_factor"]["value"])}
    quota = f.get("cpu_quota") or {}
    if quota.get("value") is not None and quota.get("calls"):
        out["cpu_quota"] = float(quota["value"])
    init = (f.get("platform_init_ms") or {}).get("value")
    fixed = (f.get("init_fixed_ms") or {}).get("value")
    if init is not None and fixed is not None:
        out["init_fixed_ms"] = max(0.0, float(fixed))
        out["platform_init_ms"] = max(0.0, float(init) - out["init_fixed_ms"])
    elif init is not None:
        out["platform_init_ms"] = max(0.0, float(init))
    if not profile.get("local_store"):  # a folder's reads are CPU work, not a bandwidth
        bws = [(f.get(k) or {}).get("value") for k in ("read_mb_s", "write_mb_s")]
        bws = [float(b) for b in bws if b]
        if bws:
            out["bandwidth_mb_s"] = min(bws)
        req = (f.get("request_ms") or {}).get("value")
        if req is not None:
            out["request_ms"] = max(0.0, float(req))
    return out
