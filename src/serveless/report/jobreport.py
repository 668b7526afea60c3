"""`serveless report JOB… --out DIR` (report.md, its PNGs and report.html) and `--html FILE`
(the page alone): what each job was, how it went per stage, and pictures of both.

Everything comes from the store (job.json, the log, driver.json, the predictions' labels,
plan.json of a job run from a plan), so a report can be written long after the run, from
any machine that reaches the store. The report is markdown (what a code host shows); the
HTML page is rendered from the same markdown with the figures inline as SVG
(report/html.py), so the two never say different things.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..data.tensors import TensorFormat
from ..driver.log import load_driver_requests, load_log
from ..driver.spec import JobSpec
from ..errors import JobError
from ..store import JobLayout, Store
from .machine import machine_info, machine_markdown
from .summary import job_notes, log_wall_s, summarize, summary_markdown
from .tables import markdown_table


@dataclass
class Report:
    """A report's markdown and the figures it names (file name -> figure)."""

    title: str
    markdown: str
    figures: dict[str, Figure] = field(default_factory=dict)


def job_report(store: Store, jobs: Sequence[str], arch: str = "x86_64") -> Report:
    """The report of `jobs` (their sections in order, then the machine)."""
    title = f"serveless report: {', '.join(jobs)}"
    report = Report(title, "")
    parts = [f"# {title}", ""]
    for job in jobs:
        parts += _job_section(store, job, arch, report.figures)
    parts.append(machine_markdown(machine_info()))
    parts.append("(machine of the report's writer; jobs on the local backend ran on it too)\n")
    report.markdown = "\n".join(parts)
    return report


def write_job_report(store: Store, jobs: Sequence[str], out: Path | None = None,
                     html_file: Path | None = None, arch: str = "x86_64") -> list[Path]:
    """The report made once and written as asked: `out`/report.md with its PNGs and
    `out`/report.html beside it (the same in one file), and/or the page alone at
    `html_file`. Returns the files written, report.md first."""
    from .html import html_page
    from .plots import save_figure

    report = job_report(store, jobs, arch)
    page = html_page(report.title, report.markdown, report.figures)
    written = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in report.figures.items():
            save_figure(fig, out / name)
        (out / "report.md").write_text(report.markdown)
        (out / "report.html").write_text(page)
        written += [out / "report.md", out / "report.html"]
    if html_file is not None:
        html_file.parent.mkdir(parents=True, exist_ok=True)
        html_file.write_text(page)
        written.append(html_file)
    return written


def _job_section(store: Store, job: str, arch: str, figures: dict[str, Figure]) -> list[str]:
    from .plots import costs_figure, stages_figure, timeline_figure

    spec = JobSpec.load(store, job)
    rows = load_log(store, job)
    if not rows:
        raise JobError(f"job {job!r} in {store.url} has no invocation log yet")
    driver = load_driver_requests(store, job)
    s = summarize(rows, arch, driver)
    span = log_wall_s(rows)
    stats = {st.stage: st for st in s["stages"]}
    ks = sorted(stats)
    per_m = 1e6 / s["images"] if s["images"] else 0.0
    figures[f"{job}-stages.png"] = stages_figure(
        ks, [stats[k].mean_duration_ms / 1000 for k in ks],
        [stats[k].mean_init_ms / 1000 for k in ks], [stats[k].peak_mb for k in ks],
        [max(stats[k].memory_mb) for k in ks], f"{job}: per-stage duration and peak memory")
    figures[f"{job}-costs.png"] = costs_figure(
        ks, [stats[k].compute * per_m for k in ks], [stats[k].requests * per_m for k in ks],
        [stats[k].store_ops * per_m for k in ks],
        f"{job}: cost per stage ({s['arch']}, modeled)")
    figures[f"{job}-timeline.png"] = timeline_figure(rows, f"{job}: invocations over time")
    failed_calls = sum(1 for r in rows if r.get("error"))
    notes = job_notes(store, job, spec.quantize, spec.model)
    return [
        f"## Job `{job}`",
        "",
        markdown_table(["job.json", "value"], [
            ["model", f"`{spec.model}`"],
            ["cuts", ", ".join(spec.cuts) or "(none: one stage)"],
            ["stages", spec.stages],
            ["memory MB per stage", "/".join(map(str, spec.memory))],
            ["micro-batch", spec.micro_batch],
            ["intermediate format", TensorFormat.from_dict(spec.format).describe()],
            ["records", len(spec.records)],
            ["precision", spec.precision],
            ["serveless version of the job", spec.version],
            ["store", f"`{store.url}`"],
        ], right=set()),
        f"{s['images']} images; {len(rows)} invocations ({failed_calls} failed); first start "
        f"to last end {span:.2f} s" + (f" = {s['images'] / span:.2f} images/s" if span else "")
        + ".",
        "",
        summary_markdown(rows, arch, driver),
        *[f"- {line}" for line in notes],
        "",
        f"![{job}: per-stage duration and peak memory]({job}-stages.png)",
        "",
        f"![{job}: cost per stage, USD per 1M images]({job}-costs.png)",
        "",
        f"![{job}: invocations over time]({job}-timeline.png)",
        "",
        *_plan_section(store, job, s, span, stats),
    ]


def _plan_section(store: Store, job: str, s: dict[str, Any], span: float,
                  stats: dict[int, Any]) -> list[str]:
    """For a job run from a plan: the planner's prediction beside what the job measured."""
    key = JobLayout(job).plan
    if not store.exists(key):
        return []
    try:
        plan = json.loads(store.get_bytes(key))
        predicted = plan["predicted"]
        images = int(plan["images"])
        wall = float(predicted["wall_s"])
        per_million = float(predicted["per_million"])
        peaks = [float(p) for p in predicted.get("peak_mb", [])]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"The job's plan ({key}) could not be read: {exc}.", ""]

    def ratio(measured: float, planned: float) -> str:
        return f"{measured / planned:.3f}" if planned else "-"

    rows = []
    if images == s["images"] and span:
        rows.append(["wall s", f"{wall:.2f}", f"{span:.2f}", ratio(span, wall)])
    if span and wall:
        rows.append(["images/s", f"{images / wall:.2f}", f"{s['images'] / span:.2f}",
                     ratio(s["images"] / span, images / wall)])
    rows.append(["$ per 1M images", f"{per_million:.3f}", f"{s['per_million']:.3f}",
                 ratio(s["per_million"], per_million)])
    for k, peak in enumerate(peaks):
        if k in stats:
            rows.append([f"peak MB, stage {k}", f"{peak:.0f}", f"{stats[k].peak_mb:.0f}",
                         ratio(stats[k].peak_mb, peak)])
    scope = ("" if images == s["images"] else
             f" The plan was made for {images:,} images and the job served {s['images']:,}: "
             "rates and costs per image compare, wall times do not.")
    return [
        "### The plan against the measurement",
        "",
        f"Planned: {predicted.get('label', 'planner model (simulated)')}, from the plan "
        f"stored with the job ({key}). Measured: this job's log.{scope}",
        "",
        markdown_table(["", "planned (simulated)", "measured", "measured / planned"], rows),
    ]
