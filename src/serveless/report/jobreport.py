"""`serveless report JOB… --out DIR`: report.md with tables, plots, machine and versions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..cost import bill
from ..driver.log import load_driver_requests, load_log
from ..driver.spec import JobSpec
from ..errors import JobError
from ..store import Store
from .machine import machine_info, machine_markdown
from .summary import job_notes, log_wall_s, summarize, summary_markdown
from .tables import markdown_table


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
        span = log_wall_s(rows)
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
                ["precision", spec.precision],
                ["serveless version of the job", spec.version],
                ["store", f"`{store.url}`"],
            ], right=set()),
            f"{s['images']} images; {billing.invocations} invocations "
            f"({sum(1 for r in rows if r.get('error'))} failed); "
            f"first start to last end {span:.2f} s"
            + (f" = {s['images'] / span:.2f} images/s" if span else "") + ".",
            "",
            summary_markdown(rows, arch, load_driver_requests(store, job)),
            *[f"- {line}" for line in job_notes(store, job, spec.quantize, spec.model)],
            "",
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
