"""The paper's experiments (Fig. 3, 4, 5 and Tables 1-2) for any model and any images.

Each experiment lays out ordinary jobs in the store, runs them with the ordinary driver and
backend, and derives every number it reports from the jobs' invocation logs, never from
timers of its own (the one exception is the single-process baseline, which has no log and
keeps its timings in baseline.json). So a figure can always be checked against, or redrawn
from, what the store holds. Each experiment writes a PNG, a markdown file that reads on its
own (what was run, on what machine, with which versions, how each number is derived) and a
JSON file with the same numbers for other tools (memory-compare reads profile.json).

Jobs are created fresh (a job of the same name is deleted first): these are measurements,
and resuming would mix numbers from two runs.
"""

from __future__ import annotations

from .baseline import (
    baseline_from,
    baseline_markdown,
    baseline_session,
    run_baseline,
    time_whole_model,
)
from .common import (
    HEADROOM,
    MEMORY_STEPS,
    PROFILE_MEMORY_MB,
    Setup,
    job_cost,
    load_pool,
    model_label,
    pack_records,
    recommend_memory,
    record_times,
    stage_stats,
)
from .memory import (
    memory_compare_from_logs,
    memory_compare_markdown,
    read_profile,
    run_memory_compare,
)
from .profile import (
    profile_from_logs,
    profile_markdown,
    run_profile,
)
from .sweep import (
    run_sweep,
    sweep_from_logs,
    sweep_markdown,
)

__all__ = [
    "HEADROOM",
    "MEMORY_STEPS",
    "PROFILE_MEMORY_MB",
    "Setup",
    "baseline_from",
    "baseline_markdown",
    "baseline_session",
    "job_cost",
    "load_pool",
    "memory_compare_from_logs",
    "memory_compare_markdown",
    "model_label",
    "pack_records",
    "profile_from_logs",
    "profile_markdown",
    "read_profile",
    "recommend_memory",
    "record_times",
    "run_baseline",
    "run_memory_compare",
    "run_profile",
    "run_sweep",
    "stage_stats",
    "sweep_from_logs",
    "sweep_markdown",
    "time_whole_model",
]
