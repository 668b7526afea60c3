"""Figures of jobs and of the paper's experiments, drawn from plain numbers (no store, no
logs).

Every `plot_*` function takes the numbers it draws and a path, and writes one PNG; the
`*_figure` ones return the figure, which a report writes as PNG beside its markdown or as
inline SVG in its HTML page (`svg_of`). They use
matplotlib's object API (`Figure`) rather than pyplot, so no GUI backend is ever
selected and no global figure state leaks between calls: the commands run on servers
and in tests, without a screen, possibly several at once in one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

DPI = 110
MEMORY_COLOR = "#4C72B0"
TIME_COLOR = "#DD8452"
COST_COLOR = "#55A868"
RECOMMEND_COLOR = "#C44E52"
STAGE_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860",
                "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def stage_color(k: int) -> str:
    return STAGE_COLORS[k % len(STAGE_COLORS)]


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def svg_of(fig: Figure, prefix: str = "f") -> str:
    """The figure as an inline `<svg>` element: no XML prolog, no metadata, a viewBox so it
    scales with the page (text drawn as paths: no font is needed to read it). Its ids are
    the same for the same figure (a fixed hash salt: a report written twice is the same
    file) and start with `prefix`, so several figures on one page never share an id."""
    import io
    import re

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "serveless"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\bid="', f'id="{prefix}-', svg)
    return re.sub(r'(url\(#|href="#)', lambda m: f"{m.group(1)}{prefix}-", svg)


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns for n panels: side by side up to 3, then two columns or more."""
    if n <= 3:
        return 1, n
    cols = 2 if n == 4 else 3
    return math.ceil(n / cols), cols


def plot_profile(
    sizes: Sequence[int],
    peak_mb: Sequence[Sequence[float | None]],
    duration_s: Sequence[Sequence[float | None]],
    recommended_mb: Sequence[int],
    path: str | Path,
    title: str,
    memory_mb: int | list[int],
) -> Path:
    """Fig. 3: one panel per stage, bars = peak memory (left), line = duration (right).

    `peak_mb[k][i]` and `duration_s[k][i]` are stage k at `sizes[i]` images per record
    (None where no invocation succeeded). The recommended memory is drawn as a dashed line
    so the reader sees the margin over the measured peaks.
    """
    n = len(peak_mb)
    rows, cols = _grid(n)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    x = list(range(len(sizes)))
    top_mb = max([v for row in peak_mb for v in row if v is not None] + list(recommended_mb)
                 + [1.0])
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= n:
            ax.set_visible(False)
            continue
        peaks = [v if v is not None else 0.0 for v in peak_mb[k]]
        ax.bar(x, peaks, width=0.6, color=MEMORY_COLOR, alpha=0.85)
        ax.axhline(recommended_mb[k], color=RECOMMEND_COLOR, linestyle="--", linewidth=1.2)
        ax.set_xlim(-0.6, x[-1] + 0.6)
        ax.set_ylim(0, top_mb * 1.15)
        ax.set_xticks(x, [str(s) for s in sizes])
        ax.set_xlabel("images per record")
        ax.set_ylabel("peak memory (MB)", color=MEMORY_COLOR)
        ax.tick_params(axis="y", colors=MEMORY_COLOR)
        ax.set_title(f"stage {k}: recommended {recommended_mb[k]} MB")
        ax.grid(axis="y", alpha=0.3)
        tx = ax.twinx()
        pts = [(xi, v) for xi, v in zip(x, duration_s[k], strict=True) if v is not None]
        tx.plot([p[0] for p in pts], [p[1] for p in pts], color=TIME_COLOR, marker="o",
                linewidth=2)
        # Each panel its own time scale: the point is how a stage's time grows with the
        # record size; stages differ by orders of magnitude.
        tx.set_ylim(0, max([p[1] for p in pts] + [1e-3]) * 1.15)
        # Values inside the bars (above them they would collide with the recommended line,
        # only 10% higher), drawn on the twin axes so the duration line cannot cover them.
        for xi, v in zip(x, peak_mb[k], strict=True):
            tx.annotate("failed" if v is None else f"{v:.0f} MB", (xi, v or 0.0),
                        xycoords=ax.transData, ha="center", va="top", fontsize=8,
                        xytext=(0, -4), textcoords="offset points",
                        color="white" if v else "black",
                        bbox={"boxstyle": "round,pad=0.15", "fc": MEMORY_COLOR, "ec": "none"}
                        if v else None)
        tx.set_ylabel("duration (s)", color=TIME_COLOR)
        tx.tick_params(axis="y", colors=TIME_COLOR)
    mem = memory_mb if isinstance(memory_mb, int) else "/".join(map(str, memory_mb))
    fig.suptitle(f"{title}\nper-stage peak memory and duration, stages at {mem} MB, "
                 "one invocation at a time", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles=[
        Patch(color=MEMORY_COLOR, alpha=0.85, label="peak memory (MB, left axis)"),
        Line2D([], [], color=TIME_COLOR, marker="o", linewidth=2,
               label="duration per invocation (s, right axis)"),
        Line2D([], [], color=RECOMMEND_COLOR, linestyle="--",
               label="recommended memory (peak × 1.1, rounded up)"),
    ], loc="lower center", ncol=3, fontsize=9, frameon=False)
    return save_figure(fig, path)


def plot_baseline(
    sizes: Sequence[int],
    serverless_s: Sequence[float],
    serverless_span_s: Sequence[float],
    baseline_s: Sequence[float],
    path: str | Path,
    title: str,
    baseline_label: str,
) -> Path:
    """Fig. 4: time per record, serverless pipeline next to one process, per record size.

    Two serverless bars because they answer different questions: the sum of the stages'
    durations is what the functions spent (and are billed for), the end-to-end span adds
    cold starts and the driver's hand-offs between stages, which a user waits for.
    """
    fig = Figure(figsize=(8.5, 5))
    ax = fig.subplots()
    x = list(range(len(sizes)))
    width = 0.27
    groups = [
        (serverless_s, "serverless: sum of stage durations", MEMORY_COLOR, -width),
        (serverless_span_s, "serverless: end to end (incl. cold starts)", "#8DA9D4", 0.0),
        (baseline_s, baseline_label, TIME_COLOR, width),
    ]
    for values, label, color, off in groups:
        bars = ax.bar([xi + off for xi in x], values, width=width, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xticks(x, [str(s) for s in sizes])
    ax.set_xlabel("images per record")
    ax.set_ylabel("time per record (s)")
    ax.set_title(title)
    ymax = max(list(serverless_s) + list(serverless_span_s) + list(baseline_s) + [1e-3])
    ax.set_ylim(0, ymax * 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9,
              frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sweep(
    concurrency: Sequence[int],
    wall_s: Sequence[float],
    cost: Sequence[float],
    oversubscribed: Sequence[bool],
    cores: int,
    vcpus_per_function: float,
    path: str | Path,
    title: str,
) -> Path:
    """Fig. 5: wall time and modeled cost against concurrency, on two y axes.

    Points where concurrency x vCPU share exceeds this machine's cores are hollow and the
    region is shaded: there the functions share cores instead of running in parallel, so
    a flat or rising time is this machine's limit, not the platform's behaviour. The
    dotted line is ideal scaling from the first point, what enough cores would approach.
    """
    fig = Figure(figsize=(8.5, 5))
    ax = fig.subplots()
    xs = list(concurrency)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(c) for c in xs])
    ax.minorticks_off()
    ax.plot(xs, wall_s, color=MEMORY_COLOR, linewidth=2, zorder=2)
    for x, y, over in zip(xs, wall_s, oversubscribed, strict=True):
        ax.plot([x], [y], marker="o", markersize=9, color=MEMORY_COLOR, zorder=3,
                markerfacecolor="white" if over else MEMORY_COLOR, markeredgewidth=2)
    ideal = [wall_s[0] * xs[0] / c for c in xs]
    ax.plot(xs, ideal, color=MEMORY_COLOR, linestyle=":", linewidth=1.2, zorder=1)
    ax.set_xlabel("concurrent invocations (chains in flight)")
    ax.set_ylabel("wall time (s)", color=MEMORY_COLOR)
    ax.tick_params(axis="y", colors=MEMORY_COLOR)
    ax.set_ylim(0, max(list(wall_s) + [1e-3]) * 1.25)
    ax.grid(alpha=0.3)
    tx = ax.twinx()
    tx.plot(xs, cost, color=COST_COLOR, linewidth=2, linestyle="--", zorder=2)
    for x, y, over in zip(xs, cost, oversubscribed, strict=True):
        tx.plot([x], [y], marker="s", markersize=8, color=COST_COLOR, zorder=3,
                markerfacecolor="white" if over else COST_COLOR, markeredgewidth=2)
    tx.set_ylabel("modeled cost (USD)", color=COST_COLOR)
    tx.tick_params(axis="y", colors=COST_COLOR)
    tx.set_ylim(0, max(list(cost) + [1e-9]) * 1.25)
    tx.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    handles: list[Any] = [
        Line2D([], [], color=MEMORY_COLOR, marker="o", linewidth=2, label="wall time (s)"),
        Line2D([], [], color=COST_COLOR, marker="s", linestyle="--", linewidth=2,
               label="modeled cost (USD)"),
        Line2D([], [], color=MEMORY_COLOR, linestyle=":", label="ideal scaling T(first)/c"),
    ]
    if any(oversubscribed):
        first = next(i for i, o in enumerate(oversubscribed) if o)
        left = math.sqrt(xs[first - 1] * xs[first]) if first > 0 else xs[0] / 1.4
        ax.axvspan(left, xs[-1] * 1.4, color="grey", alpha=0.15, zorder=0)
        ax.text(left * 1.03, 0.97, f"oversubscribed: > {cores} cores",
                transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=9,
                color="dimgrey")
        handles.append(Patch(color="grey", alpha=0.3, label=(
            f"oversubscribed: > {cores} cores (c × {vcpus_per_function:.2f} vCPU); "
            "hollow markers")))
    ax.set_xlim(xs[0] / 1.4, xs[-1] * 1.4)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
              fontsize=9, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def stages_figure(
    stages: Sequence[int],
    mean_duration_s: Sequence[float],
    mean_init_s: Sequence[float],
    peak_mb: Sequence[float],
    memory_mb: Sequence[int],
    title: str,
) -> Figure:
    """Per-stage mean duration (with mean cold-start init) and peak memory against the cap."""
    fig = Figure(figsize=(9, 4))
    ax_t, ax_m = fig.subplots(1, 2)
    x = list(range(len(stages)))
    labels = [f"stage {k}" for k in stages]
    colors = [stage_color(k) for k in stages]
    ax_t.bar(x, mean_duration_s, color=colors, label="mean duration (warm work)")
    ax_t.bar(x, mean_init_s, bottom=mean_duration_s, color="white", edgecolor="black",
             hatch="//", label="mean cold-start init (of cold calls)")
    ax_t.set_xticks(x, labels)
    ax_t.set_ylabel("time per invocation (s)")
    ax_t.set_title("duration per invocation")
    ax_t.grid(axis="y", alpha=0.3)
    ax_t.set_ylim(0, max([d + i for d, i in zip(mean_duration_s, mean_init_s, strict=True)]
                         + [1e-3]) * 1.3)
    ax_t.legend(fontsize=8, loc="upper right")
    ax_m.bar(x, peak_mb, color=colors)
    ax_m.scatter(x, memory_mb, marker="_", s=900, color="black", linewidths=2, zorder=3)
    top = max(list(memory_mb) + list(peak_mb) + [1.0]) * 1.3
    # Peak inside its bar, cap above its marker: the two are often close (that is the point
    # of sizing memory), and labels above both would overlap.
    for xi, peak, mb in zip(x, peak_mb, memory_mb, strict=True):
        inside = peak > 0.12 * top
        ax_m.annotate(f"peak {peak:.0f}", (xi, peak), ha="center",
                      va="top" if inside else "bottom", fontsize=8,
                      color="white" if inside else "black",
                      xytext=(0, -3 if inside else 3), textcoords="offset points")
        ax_m.annotate(f"cap {mb}", (xi, mb), ha="center", va="bottom", fontsize=8,
                      xytext=(0, 3), textcoords="offset points")
    ax_m.set_xticks(x, labels)
    ax_m.set_ylabel("memory (MB)")
    ax_m.set_ylim(0, top)
    ax_m.set_title("peak memory per stage")
    ax_m.grid(axis="y", alpha=0.3)
    ax_m.legend(handles=[Patch(color="grey", label="peak memory (max over invocations)"),
                         Line2D([], [], color="black", linewidth=2, label="memory size (cap)")],
                fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def costs_figure(stages: Sequence[int], compute: Sequence[float], requests: Sequence[float],
                 store_ops: Sequence[float], title: str) -> Figure:
    """Per-stage cost per 1M images, stacked by what is billed: compute (GB-s), requests,
    and the stage's S3 requests, so the stage worth resizing stands out."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    x = list(range(len(stages)))
    bottom = [0.0] * len(x)
    for values, label, color in ((compute, "compute (GB-s)", COST_COLOR),
                                 (requests, "requests", TIME_COLOR),
                                 (store_ops, "S3 requests", MEMORY_COLOR)):
        ax.bar(x, values, bottom=bottom, color=color, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for xi, total in zip(x, bottom, strict=True):
        ax.annotate(f"${total:.3f}", (xi, total), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x, [f"stage {k}" for k in stages])
    ax.set_ylabel("USD per 1M images (modeled)")
    ax.set_ylim(0, max(bottom + [1e-6]) * 1.35)  # room for the legend's one row above bars
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    return fig


def plot_timeline(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    return save_figure(timeline_figure(rows, title), path)


def timeline_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """Gantt chart of invocations: one lane per function instance, colored by stage.

    Built from the log's `started` and init/duration ms, so it shows where instances
    waited, where cold starts went, and how stages overlapped.
    """
    t0 = min(r["started"] for r in rows)
    lanes: dict[str, int] = {}
    ordered = sorted(rows, key=lambda r: (int(r["stage"]), r["started"]))
    for r in ordered:
        lanes.setdefault(r.get("instance") or f"stage{r['stage']}", len(lanes))
    fig = Figure(figsize=(10, max(3.4, 0.45 * len(lanes) + 1.6)))
    ax = fig.subplots()
    for r in rows:
        y = lanes[r.get("instance") or f"stage{r['stage']}"]
        start = r["started"] - t0
        init = (r.get("init_ms") or 0.0) / 1000
        dur = (r.get("duration_ms") or 0.0) / 1000
        color = stage_color(int(r["stage"]))
        if init:
            ax.broken_barh([(start, init)], (y - 0.35, 0.7), facecolors="white",
                           edgecolors=color, hatch="//")
        ax.broken_barh([(start + init, dur)], (y - 0.35, 0.7), facecolors=color,
                       edgecolors="black" if r.get("error") else color,
                       linewidth=2 if r.get("error") else 0.5)
    ax.set_yticks(list(lanes.values()), [_lane_label(name) for name in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("time since the first invocation (s)")
    ax.set_ylabel("function instance")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    stages = sorted({int(r["stage"]) for r in rows})
    handles: list[Any] = [Patch(color=stage_color(k), label=f"stage {k}") for k in stages]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                         label="cold start (init)"))
    if any(r.get("error") for r in rows):
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2,
                             label="failed invocation"))
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def _lane_label(instance: str) -> str:
    """'stage2-3008mb-7' -> 'stage 2 · 3008 MB · #7' (the local backend's instance ids)."""
    parts = instance.split("-")
    if len(parts) == 3 and parts[0].startswith("stage") and parts[1].endswith("mb"):
        return f"{parts[0].replace('stage', 'stage ')} · {parts[1][:-2]} MB · #{parts[2]}"
    return instance


def plot_memory_compare(
    configs: Sequence[str],
    sizes: Sequence[int],
    wall_s: dict[tuple[str, int], float],
    cost_per_million: dict[tuple[str, int], float],
    path: str | Path,
    title: str,
) -> Path:
    """Tables 1-2 as a picture: time and cost per million images, per configuration and size."""
    fig = Figure(figsize=(10, 4.2))
    ax_t, ax_c = fig.subplots(1, 2)
    x = list(range(len(sizes)))
    width = 0.8 / max(1, len(configs))
    for i, cfg in enumerate(configs):
        off = (i - (len(configs) - 1) / 2) * width
        color = STAGE_COLORS[i % len(STAGE_COLORS)]
        b1 = ax_t.bar([xi + off for xi in x], [wall_s[(cfg, s)] for s in sizes], width,
                      label=cfg, color=color)
        ax_t.bar_label(b1, fmt="%.1f", fontsize=8, padding=2)
        b2 = ax_c.bar([xi + off for xi in x], [cost_per_million[(cfg, s)] for s in sizes], width,
                      label=cfg, color=color)
        ax_c.bar_label(b2, fmt="%.2f", fontsize=8, padding=2)
    for ax, ylabel, sub in ((ax_t, "job wall time (s)", "time"),
                            (ax_c, "modeled cost per 1M images (USD)", "cost")):
        ax.set_xticks(x, [str(s) for s in sizes])
        ax.set_xlabel("images per record")
        ax.set_ylabel(ylabel)
        ax.set_title(sub)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(configs), fontsize=9,
               frameon=False)
    return save_figure(fig, path)
