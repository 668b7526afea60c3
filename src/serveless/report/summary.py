"""Summaries of a job, computed from its invocation log alone: per stage (invocations, cold
starts, duration, init, peak memory, GB-s and cost), the total bill with the driver's own
store requests apart, accuracy from the predictions, and the failed images.

The log holds every billed call (driver/log.py), so a summary can be printed again, or
checked, long after the run and from any machine that reaches the store.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from ..cost import PRICES_AS_OF, bill, gb_seconds, store_request_cost
from ..data.predictions import accuracy
from .tables import Table, markdown_table, print_table


@dataclass
class StageSummary:
    stage: int
    invocations: int
    errors: int
    cold: int
    mean_duration_ms: float
    mean_init_ms: float
    peak_mb: float
    memory_mb: list[int]
    gb_s: float
    cost: float
    compute: float
    requests: float
    store_ops: float


def summarize(rows: list[dict[str, Any]], arch: str = "x86_64",
              driver: dict[str, int] | None = None) -> dict[str, Any]:
    """Per-stage and total figures, recomputable from the log rows and the driver's own
    store requests (driver.json), which are billed apart from the functions'."""
    by_stage: dict[int, list[dict[str, Any]]] = defaultdict(list)
    throttled = sum(1 for r in rows if r.get("throttled"))
    for r in rows:
        if not r.get("throttled"):  # refused by the platform: no invocation, no bill
            by_stage[int(r["stage"])].append(r)
    bills = bill(rows, arch)
    stages = []
    for k in sorted(by_stage):
        rs = by_stage[k]
        ok = [r for r in rs if r.get("error") is None]
        colds = [r for r in rs if r.get("cold")]
        b = bills[k]
        stages.append(StageSummary(
            stage=k,
            invocations=len(rs),
            errors=len(rs) - len(ok),
            cold=len(colds),
            mean_duration_ms=sum(r["duration_ms"] for r in ok) / len(ok) if ok else 0.0,
            mean_init_ms=sum(r["init_ms"] for r in colds) / len(colds) if colds else 0.0,
            peak_mb=max((r.get("peak_mb") or 0.0) for r in rs),
            memory_mb=sorted({int(r["memory_mb"]) for r in rs}),
            gb_s=sum(gb_seconds(r["memory_mb"], r["billed_ms"]) for r in rs),
            cost=b.total, compute=b.compute, requests=b.requests, store_ops=b.store_ops,
        ))
    last = max(by_stage) if by_stage else 0
    images = failed_images = 0
    finals = {r["record"] for r in by_stage.get(last, []) if r.get("error") is None}
    for r in by_stage.get(0, []):
        if r.get("error") is None and r["record"] in finals:
            images += int(r.get("images") or 0)
            failed_images += int(r.get("image_errors") or 0)
            finals.discard(r["record"])
    total = bills["total"]
    driver_ops = store_request_cost(driver or {})
    return {
        "stages": stages,
        "images": images,
        "failed_images": failed_images,
        "gb_s": total.gb_s,
        "cost": total.total + driver_ops,
        "compute": total.compute,
        "requests": total.requests,
        "store_ops": total.store_ops,
        "ephemeral": total.ephemeral,
        "driver_requests": dict(driver or {}),
        "driver_store_ops": driver_ops,
        "per_million": (total.total + driver_ops) / images * 1e6 if images else 0.0,
        "arch": arch,
        "throttled": throttled,
    }


def job_notes(store: Any, job: str, precision: dict[str, Any] | None = None,
              model: str | None = None) -> list[str]:
    """Summary lines beyond the log: accuracy of labelled images, precision and fidelity."""
    from ..model.quantize import summary_lines

    notes = []
    acc = accuracy(store, job)
    if acc:
        notes.append(f"accuracy on {acc['labelled']} labelled images: top-1 {acc['top1']:.2%}, "
                     f"top-5 {acc['top5']:.2%}"
                     # a new user's first job: 0% must not read as a broken pipeline
                     + (" (the built-in AlexNet's weights are untrained: this only shows "
                        "that the labels were read)" if str(model).lower() == "alexnet"
                        else ""))
    return notes + summary_lines(precision)


def log_wall_s(rows: list[dict[str, Any]]) -> float:
    """First start to last end in the log (a resumed job's span includes the pause)."""
    if not rows:
        return 0.0
    starts = [r["started"] for r in rows]
    ends = [r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in rows]
    return max(ends) - min(starts)


def summary_json(
    rows: list[dict[str, Any]],
    arch: str = "x86_64",
    spec: dict[str, Any] | None = None,
    acc: dict[str, Any] | None = None,
    driver: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`report --json`: the summary as plain JSON, every number from the log (accuracy from
    the prediction rows, `accuracy()`; precision from job.json; the driver's own store
    requests from driver.json, in the cost as in the printed summary)."""
    s = summarize(rows, arch, driver)
    wall = log_wall_s(rows)
    spec = spec or {}
    info = spec.get("quantize") or {}
    return {
        "job": spec.get("job"),
        "arch": arch,
        "images": s["images"],
        "failed_images": s["failed_images"],
        "wall_s": round(wall, 3),
        "images_per_s": round(s["images"] / wall, 3) if wall > 0 else None,
        "gb_s": s["gb_s"],
        "cost_usd": s["cost"],
        "cost_per_million": s["per_million"],
        "accuracy_top1": acc["top1"] if acc else None,
        "accuracy_top5": acc["top5"] if acc else None,
        "labelled_images": acc["labelled"] if acc else 0,
        "quantize": info.get("mode"),  # "int8", "fp16-weights", or null (fp32)
        "fidelity": info.get("fidelity"),
        "prices_as_of": PRICES_AS_OF,
        "stages": [{
            "stage": st.stage,
            "memory_mb": max(st.memory_mb),  # the size at the end (after any OOM raise)
            "memory_sizes_mb": st.memory_mb,
            "invocations": st.invocations,
            "errors": st.errors,
            "cold": st.cold,
            "mean_duration_ms": st.mean_duration_ms,
            "peak_mb": st.peak_mb,
            "gb_s": st.gb_s,
            "cost_usd": st.cost,
        } for st in s["stages"]],
    }


def print_summary(
    rows: list[dict[str, Any]],
    wall_s: float | None = None,
    arch: str = "x86_64",
    console: Console | None = None,
    notes: list[str] | None = None,
    run_images: int | None = None,
    driver: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Print the summary; `run_images` (served by this run of a resumed job) sets the rate."""
    console = console or Console()
    s = summarize(rows, arch, driver)
    head = f"[bold]{s['images']}[/bold] images"
    if wall_s and run_images is not None and run_images != s["images"]:
        head += (f" in the job; this run served {run_images} in [bold]{wall_s:.1f} s[/bold] "
                 f"= [bold]{run_images / wall_s:.1f}[/bold] images/s")
    elif wall_s:
        rate = s["images"] / wall_s
        head += f" in [bold]{wall_s:.1f} s[/bold] = [bold]{rate:.1f}[/bold] images/s"
    console.print(head)
    _print_stage_table(console, s)
    console.print(
        f"total {s['gb_s']:,.2f} GB-s; modeled AWS Lambda ({s['arch']}) cost "
        f"[bold]${s['cost']:.6f}[/bold] = compute ${s['compute']:.6f} + requests "
        f"${s['requests']:.6f} + S3 ops ${s['store_ops']:.6f} + "
        + (f"/tmp above 512 MB ${s['ephemeral']:.6f} + " if s["ephemeral"] else "")
        + "driver S3 ops "
        f"${s['driver_store_ops']:.6f}; [bold]${s['per_million']:.2f} per 1M images[/bold] "
        f"(prices as of {PRICES_AS_OF})"
    )
    if s["driver_requests"]:
        kinds = ", ".join(f"{n} {k.upper()}" for k, n in sorted(s["driver_requests"].items()))
        console.print(f"driver store requests (uploads, job.json, the log; billed apart from "
                      f"the functions'): {kinds} = ${s['driver_store_ops']:.6f}")
    if s["throttled"]:
        console.print(f"throttled: {s['throttled']} invocations refused (429) and asked again "
                      "with backoff; not billed, no retry spent")
    for note in notes or []:
        console.print(note)
    return s


STAGE_COLUMNS = ("stage", "MB", "calls", "cold", "failed", "mean ms", "init ms", "peak MB",
                 "GB-s", "compute", "requests", "S3 ops", "total")
SPLIT_AT = 8  # time and memory columns | cost columns, when one table is too wide


def stage_cells(s: dict[str, Any]) -> list[list[str]]:
    """Each stage's row of the summary table, formatted (costs in $ per 1M images)."""
    per_m = 1e6 / s["images"] if s["images"] else 0.0
    return [[
        str(st.stage), "/".join(map(str, st.memory_mb)), str(st.invocations), str(st.cold),
        str(st.errors), f"{st.mean_duration_ms:,.0f}", f"{st.mean_init_ms:,.0f}",
        f"{st.peak_mb:,.0f}", f"{st.gb_s:,.2f}", f"{st.compute * per_m:.3f}",
        f"{st.requests * per_m:.3f}", f"{st.store_ops * per_m:.3f}", f"{st.cost * per_m:.3f}",
    ] for st in s["stages"]]


def stage_table(s: dict[str, Any]) -> Table:
    """The summary's per-stage table; too wide for the console, it splits into time and
    memory, then cost (an 80-column terminal), each keeping the stage column."""
    return Table(STAGE_COLUMNS, stage_cells(s), "Per stage (costs in $ per 1M images)", left=0,
                 groups=[("Per stage: time and memory", list(range(SPLIT_AT))),
                         ("Per stage: cost ($ per 1M images)",
                          [0, *range(SPLIT_AT, len(STAGE_COLUMNS))])])


def _print_stage_table(console: Console, s: dict[str, Any]) -> None:
    print_table(console, stage_table(s))


def summary_markdown(rows: list[dict[str, Any]], arch: str = "x86_64",
                     driver: dict[str, int] | None = None) -> str:
    """The per-stage summary of `print_summary` as markdown, for reports read without a console."""
    s = summarize(rows, arch, driver)
    table = markdown_table(
        ["stage", "memory MB", "calls", "cold", "failed", "mean duration ms", "mean init ms",
         "peak MB", "GB-s", "cost USD"],
        [[st.stage, "/".join(map(str, st.memory_mb)), st.invocations, st.cold, st.errors,
          f"{st.mean_duration_ms:.1f}", f"{st.mean_init_ms:.1f}", f"{st.peak_mb:.1f}",
          f"{st.gb_s:.4f}", f"{st.cost:.8f}"] for st in s["stages"]],
    )
    return table + (
        f"\nTotal: {s['images']} images, {s['gb_s']:.4f} GB-s, modeled AWS Lambda ({s['arch']}) "
        f"cost ${s['cost']:.8f} = compute ${s['compute']:.8f} + requests ${s['requests']:.8f} "
        f"+ S3 requests ${s['store_ops']:.8f} + the driver's S3 requests "
        f"${s['driver_store_ops']:.8f}; ${s['per_million']:.2f} per 1M images "
        f"(prices as of {PRICES_AS_OF}).\n"
    ) + f"\nFailed images: {quality(rows)['failed']}.\n" + "".join(
        f"\n    {line}" for line in failed_image_lines(rows)) + (
        "\n" if failed_image_lines(rows) else "")


# -- what came out: failed images (from the last stage's log rows) ----------------------------

LISTED_FAILURES = 10


def quality(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Failed images (count, the first few with reasons), from each record's last
    successful final-stage invocation: no prediction object is read again."""
    last_stage = max((int(r["stage"]) for r in rows), default=0)
    final: dict[str, dict[str, Any]] = {}
    for r in rows:
        if int(r["stage"]) == last_stage and r.get("error") is None:
            final[r["record"]] = r
    ordered = [final[k] for k in sorted(final)]
    failed = [f for r in ordered for f in r.get("failed_images") or []]
    return {
        "failed": sum(int(r.get("image_errors") or 0) for r in ordered),
        "listed": failed[:LISTED_FAILURES],
    }


def failed_image_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The first failed images with their reasons, and how many more: plain lines."""
    q = quality(rows)
    if not q["failed"]:
        return []
    lines = [f"{q['failed']} images could not be served (their prediction rows carry the "
             "error):"]
    lines += [f"  {name}: {reason}" for name, reason in q["listed"]]
    if q["failed"] > len(q["listed"]):
        lines.append(f"  … and {q['failed'] - len(q['listed'])} more")
    return lines
