"""Fig. 3: peak memory and duration per stage against images per record, and memMin."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cost import MAX_MEMORY_MB, MIN_MEMORY_MB, vcpus
from ..data.records import Example
from ..model.presets import PAPER_MEM_MIN
from ..report.machine import machine_info, machine_markdown
from ..report.tables import markdown_table
from .common import (
    HEADROOM,
    PROFILE_MEMORY_MB,
    Setup,
    fmt,
    model_label,
    pack_records,
    recommend_memory,
    stage_stats,
    write_json,
)


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
    paper = paper_mem_min(setup)
    write_json(out / "profile.json", result)
    from ..report.plots import plot_profile

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


def paper_mem_min(setup: Setup) -> list[int] | None:
    from ..model.presets import PAPER_PRESET

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
            rows.append([st["stage"], s, c["invocations"], fmt(c["peak_mb"], 1),
                         fmt(c["duration_s"], 3)])
    measured = markdown_table(
        ["stage", "images per record", "invocations", "peak MB", "duration s"], rows)
    head = ["stage", "max peak MB", f"peak × {HEADROOM}", f"recommended MB ({p['step']} MB steps)"]
    rec_rows = []
    for st in p["stages"]:
        peak = st["peak_mb"]
        row = [st["stage"], fmt(peak, 1), fmt(None if peak is None else peak * HEADROOM, 1),
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
        + (f"; stages {', '.join(map(str, over))} exceed it" if over else "") + ").",
        "",
        markdown_table(head, rec_rows),
        f"`--memory {','.join(map(str, p['recommended_mb']))}`",
        "",
        machine_markdown(p["machine"], backends),
    ])
