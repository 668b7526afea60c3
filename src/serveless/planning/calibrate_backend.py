"""Calibration measured inside a function call on a backend (`serveless calibrate --backend
local|lithops [--memory MB]`), and where each figure of a calibration came from.

The platform a user plans for is rarely the machine they calibrate on: a laptop, a CI
runner and a Lambda function differ by several times in speed per core. So the measuring
runs where the job will: the driver uploads the blocks it cut and the sample images under
the store's calibration prefix (store/layout.py `CalibrationLayout`), invokes a
calibration call (`protocol.CalibrationEvent`) through the backend like any stage, and
builds the same calibration from its JSON answer. The uploads are deleted when the calls
are over, whatever happened.

What is measured where, and why:

- At `--memory` (default 1769 MB, 1 vCPU): everything the calibration on this machine
  measures at 1 vCPU (blocks at 1 thread, memory, decode, the function's code around the
  model), fresh processes importing what a function imports (its start and base memory),
  and the store's bandwidth from inside the function (a Lambda function reaches S3 in its
  Region, not over the user's line). A calibration's figures are per 1 vCPU; where the
  platform enforces a CPU share and the memory buys less than 1 vCPU, the CPU figures are
  brought to 1 vCPU with the planner's own law (time ∝ 1 / vCPUs below one), and the
  factor is recorded (`scaled_to_1_vcpu`). At 1 vCPU or more, one thread runs as at one.
- The speed-up at 2 vCPUs needs 2 vCPUs: a second call at 3538 MB (in the first call
  when `--memory` already buys 2). Where that call fails (an account that allows less
  memory: new AWS accounts may be held to 3008 MB), the speed-up is taken as 1 (no gain
  past 1 vCPU, which never makes a plan promise speed it will not see), said on the
  terminal and in the file.
- The platform's start: the cold call's init as the backend reports it, where it reports
  one (the local backend: process start, imports and `platform_init_ms`; the function
  loads no model, so that is the platform's part alone); else (Lithops reports no init
  of its own) the fresh processes timed in the function, and Lithops' submit-to-start
  time of the cold call is recorded beside it.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cost import MB_PER_VCPU, check_memory, vcpus
from ..errors import CalibrationError
from ..runtime.protocol import (
    OUT_OF_MEMORY,
    TIMEOUT,
    CalibrationAnswer,
    CalibrationEvent,
)
from ..store.layout import DATA_SUFFIX, CalibrationLayout

SPEEDUP_MEMORY_MB = 2 * MB_PER_VCPU  # 3538 MB: 2 vCPUs
PHASE1_CPU_FIELDS = ("decode_ms_per_image", "stage0_first_call_ms", "record_ms_per_image",
                     "write_ms_per_mb", "read_ms_per_mb", "predictions_ms_per_image",
                     "whole_load_ms")
BLOCK_CPU_FIELDS = ("ms_per_image_b1", "ms_per_image", "load_ms", "first_run_ms")
_SECRET = re.compile(r"secret|token|password|passwd|credential|access_key|key_id|session",
                     re.IGNORECASE)


@dataclass
class Measured:
    """What a calibration measured, wherever it ran: the first line of a fresh process
    (`ready`: start_ms, rss_mb), phase 1 at 1 vCPU, phase 2 at 2 vCPUs, the starts timed,
    the store's bandwidth (None: to be timed from the driver), and where it all ran."""

    ready: dict[str, Any]
    phase1: dict[str, Any]
    phase2: dict[str, Any]
    starts: list[float]
    cpu_control: str
    measured_on: dict[str, Any]
    store: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # said on the terminal too


def recorded_options(options: dict[str, Any]) -> dict[str, Any]:
    """Backend options as a calibration file records them: a value whose name may be a
    secret (a Lithops `aws.secret_access_key=...`) is left out, its name kept."""
    return {k: ("(not recorded: may be a secret)" if _SECRET.search(k) else v)
            for k, v in options.items()}


def measure_on_backend(backend: Any, store: Any, cfg: dict[str, Any], memory_mb: int,
                       options: dict[str, Any], say: Any) -> Measured:
    """Upload `cfg`'s blocks and images, run the calibration calls on `backend` at
    `memory_mb` (and at 3538 MB for the speed-up), delete the uploads; the figures."""
    from ..backends import FunctionSpec

    try:
        check_memory(memory_mb)
    except ValueError as exc:
        raise CalibrationError(f"--memory: {exc}") from exc
    problem = getattr(backend, "store_problem", lambda url: None)(store.url)
    if problem:
        raise CalibrationError(problem)
    layout = CalibrationLayout(uuid.uuid4().hex[:16])
    try:
        blocks, images = _upload(store, layout, cfg)
        event = {"store": store.spec(), "blocks": blocks, "images": images,
                 "size": list(cfg["size"]), "min_s": cfg["min_s"],
                 "bandwidth_key": layout.bandwidth_probe}
        both = vcpus(memory_mb) >= 2.0
        v = vcpus(memory_mb)
        say(f"calibration call on the {backend.name} backend at {memory_mb} MB ({v:.2f} vCPU"
            f"{'s' if v != 1 else ''}): starts, load, compute, memory per block; decode; "
            "store" + ("; compute at 2 threads" if both else ""))
        first, res1 = _call(backend, FunctionSpec(0, memory_mb, "", store.spec()), CalibrationEvent(
            **event, memory_mb=memory_mb,
            measure=["start", "blocks", "store", *(["speedup"] if both else [])]))
        notes: list[str] = []
        speedup_mb: int | None = memory_mb if both else SPEEDUP_MEMORY_MB
        second = first
        if not both:
            say(f"calibration call at {SPEEDUP_MEMORY_MB} MB (2 vCPUs): compute per block")
            try:
                second, _ = _call(backend, FunctionSpec(0, SPEEDUP_MEMORY_MB, "", store.spec()),
                                  CalibrationEvent(**event, memory_mb=SPEEDUP_MEMORY_MB,
                                                   measure=["speedup"]))
            except CalibrationError as exc:
                speedup_mb = None
                notes.append(f"warning: no speed-up past 1 vCPU was measured ({exc}); "
                             "taken as 1 (no gain), which plans never beyond 1 vCPU for speed")
    finally:
        store.delete(layout.prefix)
    assert first.phase1 is not None
    desc = backend.describe()
    enforced = str(desc.get("cpu_share", "")).startswith("exact")
    scale = min(vcpus(memory_mb), 1.0) if enforced else 1.0
    phase2 = (second.phase2 if speedup_mb is not None and second.phase2 is not None else
              {"ms_per_image_2": [b["ms_per_image"] * scale for b in first.phase1["blocks"]]})
    starts = [float(s["start_ms"]) for s in first.starts]
    rss = sorted(float(s["rss_mb"]) for s in first.starts)
    platform = res1.extra.get("lithops", {}) if isinstance(res1.extra, dict) else {}
    submit_to_start = None
    if platform.get("worker_start_tstamp") and platform.get("host_submit_tstamp"):
        submit_to_start = 1000 * (float(platform["worker_start_tstamp"])
                                  - float(platform["host_submit_tstamp"]))
    reported_init = res1.cold and res1.init_ms > 0
    start_ms = res1.init_ms if reported_init else sorted(starts)[len(starts) // 2]
    where = f"{backend.name} backend at {memory_mb} MB"
    options_note = ", ".join(f"{k}={v}" for k, v in recorded_options(options).items())
    cpu_control = (f"the {backend.name} backend's CPU share ({desc.get('cpu_share')}); "
                   "onnxruntime intra-op threads 1, then 2"
                   + (f" at {speedup_mb} MB" if speedup_mb else " (not measured)"))
    measured_on = {
        "where": "backend", "backend": backend.name,
        "backend_options": recorded_options(options),
        "lithops_backend": desc.get("lithops_backend"),
        "memory_mb": memory_mb, "vcpus": round(vcpus(memory_mb), 3),
        "speedup_memory_mb": speedup_mb,
        "cpu_model": first.function.get("cpu_model"),
        "cpu_count": first.function.get("cpu_count"),
        "cpu_quota": first.function.get("cpu_quota"),
        "function": first.function, "cpu_control": cpu_control,
        "cpu_share_enforced": enforced, "scaled_to_1_vcpu": scale,
        "cold": res1.cold, "platform_init_ms": res1.init_ms if reported_init else None,
        "submit_to_start_ms": submit_to_start,
        "figures": {
            "blocks, decode, load, memory, function paths":
                f"a calibration call on the {where}"
                + (f", scaled to 1 vCPU (x{scale:.3g})" if scale != 1.0 else ""),
            "speedup_2vcpu": (f"a calibration call at {speedup_mb} MB" if speedup_mb else
                              "not measured: taken as 1"),
            "start_ms": (f"the cold call's init as the {backend.name} backend reported it"
                         if reported_init else
                         f"fresh processes importing the function's modules inside the "
                         f"function (median of {len(starts)})"),
            "runtime_mb": "fresh processes inside the function",
            "store": "one write and one read of 32 MB from inside the function",
        },
        "seconds": first.seconds + (second.seconds if second is not first else 0.0),
    }
    say(f"measured in {where}" + (f" ({options_note})" if options_note else "")
        + f": CPU {first.function.get('cpu_model')}, quota {first.function.get('cpu_quota')}")
    return Measured(
        ready={"start_ms": start_ms, "rss_mb": rss[len(rss) // 2] if rss else 0.0},
        phase1=_scaled(first.phase1, scale), phase2=phase2, starts=starts,
        cpu_control=cpu_control, measured_on=measured_on, store=first.store, notes=notes)


def _upload(store: Any, layout: CalibrationLayout,
            cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The blocks (graph and weights) and the sample images, under the run's prefix."""
    blocks = []
    for k, b in enumerate(cfg["blocks"]):
        store.put_file(b["path"], layout.block(k))
        data = Path(b["path"] + DATA_SUFFIX)
        if data.is_file():
            store.put_file(str(data), layout.block_data(k))
        blocks.append({"key": layout.block(k),
                       "data": layout.block_data(k) if data.is_file() else None,
                       "input_shape": b["input_shape"]})
    images = []
    for i, path in enumerate(cfg["images"]):
        store.put_bytes(layout.image(i), Path(path).read_bytes())
        images.append(layout.image(i))
    return blocks, images


def _call(backend: Any, fn: Any, event: CalibrationEvent) -> tuple[CalibrationAnswer, Any]:
    """One calibration call; its answer, or a CalibrationError a user can act on."""
    res = backend.invoke(fn, event.to_dict())
    where = f"the calibration call on the {backend.name} backend at {fn.memory_mb} MB"
    if res.error is not None:
        err = res.error
        if err.type == OUT_OF_MEMORY:
            raise CalibrationError(f"{where} ran out of memory ({err.message}): raise --memory "
                                   "(the call loads every block of the model at once)")
        hint = ("; on AWS Lambda a function out of memory is reported as a timeout: raise "
                "--memory" if err.type == TIMEOUT and backend.name == "lithops" else "")
        raise CalibrationError(f"{where} failed: {err.type}: {err.message}{hint}")
    try:
        return CalibrationAnswer.from_dict(res.metrics), res
    except (ValueError, TypeError) as exc:
        raise CalibrationError(f"{where}: {exc}") from exc


def _scaled(p1: dict[str, Any], scale: float) -> dict[str, Any]:
    """Phase 1's CPU figures at a share of `scale` vCPU, brought to 1 vCPU (x scale)."""
    if scale == 1.0:
        return p1
    out = dict(p1)
    for key in PHASE1_CPU_FIELDS:
        if isinstance(out.get(key), (int, float)):
            out[key] = out[key] * scale
    out["blocks"] = [{**b, **{k: b[k] * scale for k in BLOCK_CPU_FIELDS if k in b}}
                     for b in p1["blocks"]]
    return out


def measured_on_line(cal: dict[str, Any]) -> str:
    """Where a calibration was measured, in one line for a terminal (plan, simulate,
    calibrate print it): a backend and its memory, or this machine; an older file says
    only its machine."""
    m = cal.get("measured_on")
    if not isinstance(m, dict):
        cores = (cal.get("machine") or {}).get("cores")
        return (f"calibration measured on the machine that ran `calibrate` ({cores} cores; "
                "where and on which CPU is not recorded: an older calibration)")
    cpu = f"CPU {m.get('cpu_model') or '?'}"
    if m.get("where") != "backend":
        return (f"calibration measured on this machine's calibrate process (1 and 2 vCPUs "
                f"by {'cgroup CPU quota' if m.get('cpu_share_enforced') else 'threads only'}"
                f"), {cpu}, {m.get('cpu_count')} cores")
    opts = ", ".join(f"{k}={v}" for k, v in (m.get("backend_options") or {}).items())
    engine = f" ({m['lithops_backend']})" if m.get("lithops_backend") else ""
    speed = (f"speed-up at {m['speedup_memory_mb']} MB" if m.get("speedup_memory_mb")
             else "no speed-up measured")
    return (f"calibration measured in a function on the {m.get('backend')} backend{engine}"
            f"{' [' + opts + ']' if opts else ''} at {m.get('memory_mb')} MB "
            f"({m.get('vcpus')} vCPU; {speed}), {cpu}, CPU quota "
            f"{m.get('cpu_quota') if m.get('cpu_quota') is not None else 'none seen'}")
