"""Plan files: what to run, what the planner predicts, and the calibration it rests on, so
that `simulate` and `run --plan` need nothing else; checked before anything runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..cost import MAX_MEMORY_MB, MIN_MEMORY_MB, vcpus
from ..errors import PlanError
from .search import Candidate
from .simulate import Target
from .stagemodel import stage_models

PLAN_KIND = "serveless-plan"


def make_plan(cal: dict[str, Any], cand: Candidate, images: int, target: Target, arch: str,
              request: dict[str, Any]) -> dict[str, Any]:
    """plan.json: what to run, what the planner predicts, and the calibration it rests on."""
    stages = stage_models(cal, cand.cuts, cand.micro_batch)
    return {
        "kind": PLAN_KIND, "version": 1, "model": cal["model"], "images": images,
        "cuts": cand.cuts, "memory": cand.memory, "images_per_record": cand.per_record,
        "micro_batch": cand.micro_batch, "concurrency": cand.concurrency, "arch": arch,
        "quantize": cal.get("quantize"), "output": cal.get("output"),
        "target": target.to_dict(), "request": request,
        "predicted": {"label": "planner model (simulated)", "wall_s": cand.wall_s,
                      "cost": cand.cost, "per_million": cand.cost / images * 1e6,
                      "peak_mb": [round(s.peak_mb(), 1) for s in stages]},
        "calibration": cal,
    }


def load_plan(path: str | Path) -> dict[str, Any]:
    from ..errors import CalibrationError
    from .calibrate import validate

    p = Path(path)
    if not p.is_file():
        raise PlanError(f"no plan file at {p}")
    try:
        plan = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{p} is not JSON: {exc}") from exc
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND:
        raise PlanError(f"{p} is not a serveless plan (expected kind {PLAN_KIND!r})")
    for key, typ in (("cuts", list), ("memory", list), ("images_per_record", int),
                     ("micro_batch", int), ("concurrency", int), ("images", int),
                     ("model", str), ("calibration", dict)):
        if not isinstance(plan.get(key), typ):
            raise PlanError(f"{p}: field {key!r} missing or of the wrong type")
    try:
        validate(plan["calibration"], f"{p} (its calibration)")
    except CalibrationError as exc:
        raise PlanError(str(exc)) from exc
    out = plan.get("output")
    if out is not None and not (isinstance(out, dict) and out.get("kind") == "embeddings"
                                and isinstance(out.get("tensor", ""), str)
                                and out.get("dtype") in ("float32", "float16")):
        raise PlanError(f"{p}: field 'output' must be an embeddings job's kind, tensor and "
                        "dtype, or absent")
    if plan.get("quantize") != plan["calibration"].get("quantize"):
        raise PlanError(f"{p}: its quantize {plan.get('quantize')!r} is not its calibration's "
                        f"{plan['calibration'].get('quantize')!r}")
    if len(plan["memory"]) != len(plan["cuts"]) + 1:
        raise PlanError(f"{p}: {len(plan['memory'])} memory sizes for "
                        f"{len(plan['cuts']) + 1} stages")
    return plan


def check_plan(plan: dict[str, Any]) -> None:
    """Refuse, before anything runs, a plan whose stage would not fit: predicted peak over
    its memory, an invocation over the function timeout, or a model over /tmp."""
    from ..errors import CalibrationError

    cal = plan["calibration"]
    try:
        stages = stage_models(cal, list(plan["cuts"]), int(plan["micro_batch"]))
    except CalibrationError as exc:
        raise PlanError(str(exc)) from exc
    target = Target(**plan.get("target", {})) if plan.get("target") else Target()
    problems = []
    for k, (s, mem) in enumerate(zip(stages, plan["memory"], strict=True)):
        if not MIN_MEMORY_MB <= int(mem) <= MAX_MEMORY_MB:
            problems.append(f"stage {k}: memory {mem} MB outside {MIN_MEMORY_MB}-"
                            f"{MAX_MEMORY_MB} MB")
            continue
        need = s.memory_needed()
        if mem < need:
            problems.append(f"stage {k}: predicted peak {s.peak_mb():.0f} MB (+25% headroom = "
                            f"{need} MB) exceeds its memory {mem} MB")
        v = target.share(int(mem))
        r = int(plan["images_per_record"])
        secs = (s.ms_per_record(r, v, target.cpu_factor, math.ceil(vcpus(int(mem))))
                + float(s.load_ms(v, target.cpu_factor)) + target.start_ms(v)) / 1000
        if secs > target.timeout_s:
            problems.append(f"stage {k}: a record of {r} images takes a predicted {secs:.0f} s, "
                            f"over the {target.timeout_s:.0f} s timeout")
        if s.model_bytes > target.tmp_mb * 2**20:
            problems.append(f"stage {k}: model files {s.model_bytes / 2**20:.0f} MB exceed "
                            f"/tmp of {target.tmp_mb} MB")
    if problems:
        raise PlanError("plan refused before any invocation: " + "; ".join(problems))


def plot_pareto(front: list[tuple[float, float]], marks: dict[str, tuple[float, float]],
                images: int, path: str | Path, title: str) -> Path:
    """Cost against predicted wall time: the Pareto front and the named plans."""
    from matplotlib.figure import Figure

    from ..report.plots import save_figure

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    if front:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, [y / images * 1e6 for y in ys], where="post", color="#444",
                label="Pareto front, its convex-hull plans (planner model, chosen record size "
                "and micro-batch)")
    for (name, (x, y)), mk in zip(marks.items(), "o^sDv", strict=False):
        ax.plot([x], [y / images * 1e6], mk, markersize=8, label=f"{name} (simulated)")
    ax.set_xscale("log")
    ax.set_xlabel("predicted wall time (s)")
    ax.set_ylabel("predicted USD per 1M images")
    ax.set_title(f"simulated: {title}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
