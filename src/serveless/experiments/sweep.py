"""Fig. 5: the same job at each concurrency; wall time and modeled cost."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cost import PRICES_AS_OF, vcpus
from ..report.machine import machine_info, machine_markdown
from ..report.summary import log_wall_s
from ..report.tables import markdown_table
from .common import Setup, fmt, job_cost, model_label, write_json


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
    write_json(out / "sweep.json", result)
    from ..report.plots import plot_sweep

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
        wall = log_wall_s(rows)
        points.append({
            "concurrency": c, "wall_s": wall, "images": cost["images"],
            "images_per_s": cost["images"] / wall if wall else 0.0,
            "gb_s": cost["gb_s"], "cost": cost["cost"], "per_million": cost["per_million"],
            "cold_starts": sum(1 for r in rows if r.get("cold")),
            "cpu_demand": c * share, "oversubscribed": c * share > cores,
        })
    return {"points": points, "cores": cores, "vcpus_per_function": share}


def sweep_markdown(s: dict[str, Any], backends: Sequence[dict[str, Any]] = ()) -> str:
    rows = [[p["concurrency"], fmt(p["wall_s"], 3), fmt(p["images_per_s"], 2), fmt(p["gb_s"], 4),
             f"{p['cost']:.8f}", fmt(p["per_million"], 2), p["cold_starts"],
             fmt(p["cpu_demand"], 2), "**yes**" if p["oversubscribed"] else "no"]
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
