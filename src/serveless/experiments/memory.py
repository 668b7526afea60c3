"""Tables 1 and 2: memMax everywhere against the profiled memMin."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cost import PRICES_AS_OF
from ..data.records import Example
from ..errors import JobError
from ..report.machine import machine_info, machine_markdown
from ..report.summary import log_wall_s
from ..report.tables import markdown_table
from ..runtime.protocol import OUT_OF_MEMORY
from .common import (
    PROFILE_MEMORY_MB,
    Setup,
    fmt,
    job_cost,
    model_label,
    pack_records,
    stage_stats,
    write_json,
)
from .profile import paper_mem_min


def run_memory_compare(setup: Setup, sizes: list[int], pool: Sequence[Example], out: Path,
                       mem_min: list[int], mem_max: int = PROFILE_MEMORY_MB,
                       concurrency: int = 1, arch: str = "x86_64",
                       job_prefix: str = "memcmp") -> dict[str, Any]:
    """Tables 1-2: the same images at memMax everywhere and at memMin, per record size."""
    if len(mem_min) != setup.stages:
        raise JobError(f"memMin has {len(mem_min)} sizes for {setup.stages} stages")
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    configs = {"memMax": [mem_max] * setup.stages, "memMin": list(mem_min)}
    logs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    # The same images at every size where the pool allows (a multiple of every size), so
    # the sizes differ only in how the images are grouped.
    common = math.lcm(*sizes)
    if len(pool) >= common:
        pool = pool[:len(pool) // common * common]
    with tempfile.TemporaryDirectory(prefix="serveless-memcmp-") as tmp:
        for size in sizes:
            count = len(pool) // size
            if count < 1:
                raise JobError(f"{len(pool)} images do not fill one record of {size}")
            folder = Path(tmp) / f"size-{size}"
            pack_records(pool, size, count, folder, f"n{size:05d}")
            for name, memory in configs.items():
                spec = setup.prepare(f"{job_prefix}-{name.lower()}-{size}", memory, folder)
                logs[(name, size)] = setup.run(spec, concurrency=concurrency)
    result = memory_compare_from_logs(logs, configs, arch)
    result.update({"kind": "serveless-memory-compare", "model": setup.model, "cuts": setup.cuts,
                   "sizes": sizes, "concurrency": concurrency, "arch": arch,
                   "store": setup.store.url, "machine": info,
                   "paper_mem_min": paper_mem_min(setup)})
    md = memory_compare_markdown(result, setup.backends_seen)
    write_json(out / "memory-compare.json", result)
    (out / "memory-compare.md").write_text(md)
    from ..report.plots import plot_memory_compare

    t2 = result["table2"]
    plot_memory_compare(list(configs), sizes,
                        {(r["config"], r["images_per_record"]): r["wall_s"] for r in t2},
                        {(r["config"], r["images_per_record"]): r["per_million"] for r in t2},
                        out / "memory-compare.png",
                        f"{model_label(setup.model)}: memMax ({mem_max} MB everywhere) vs memMin "
                        f"({'/'.join(map(str, mem_min))} MB), concurrency {concurrency}")
    return result


def memory_compare_from_logs(logs: dict[tuple[str, int], list[dict[str, Any]]],
                             configs: dict[str, list[int]], arch: str) -> dict[str, Any]:
    table1 = []
    for name, memory in configs.items():
        rows = [r for (cfg, _), rs in logs.items() if cfg == name for r in rs]
        stats = stage_stats(rows)
        table1.append({
            "config": name, "memory_mb": memory,
            "used_mb": [stats.get(k, {}).get("memory_mb", []) for k in range(len(memory))],
            "peak_mb": [stats.get(k, {}).get("peak_mb") for k in range(len(memory))],
        })
    table2 = []
    for (name, size), rows in logs.items():
        cost = job_cost(rows, arch)
        table2.append({
            "config": name, "images_per_record": size,
            "records": len({r["record"] for r in rows}), "images": cost["images"],
            "wall_s": log_wall_s(rows), "gb_s": cost["gb_s"], "cost": cost["cost"],
            "per_million": cost["per_million"],
            "oom": sum(1 for r in rows if (r.get("error") or {}).get("type") == OUT_OF_MEMORY),
        })
    return {"table1": table1, "table2": table2}


def memory_compare_markdown(m: dict[str, Any], backends: Sequence[dict[str, Any]] = ()) -> str:
    stages = len(m["table1"][0]["memory_mb"])
    head = ["configuration"] + [f"stage {k} MB" for k in range(stages)]
    t1 = [[r["config"]] + [
        str(mb) + ("" if r["used_mb"][k] in ([], [mb]) else
                   f" (ran at {'/'.join(map(str, r['used_mb'][k]))} after OOM)")
        for k, mb in enumerate(r["memory_mb"])] for r in m["table1"]]
    if m.get("paper_mem_min"):
        t1.append(["paper memMin (2019)"] + [str(v) for v in m["paper_mem_min"]])
    peaks = [[r["config"]] + [fmt(p, 1) for p in r["peak_mb"]] for r in m["table1"]]
    t2 = [[r["config"], r["images_per_record"], r["records"], r["images"], fmt(r["wall_s"], 3),
           fmt(r["gb_s"], 4), f"{r['cost']:.8f}", fmt(r["per_million"], 2), r["oom"]]
          for r in m["table2"]]
    return "\n".join([
        f"# memMax vs memMin: {m['model']} (Tables 1 and 2)",
        "",
        f"Images in records of {', '.join(map(str, m['sizes']))} (the same images at every "
        "size when their number is a multiple of every size), run with every "
        "stage at memMax and with each stage at its memMin (the profiled recommendation), "
        f"concurrency {m['concurrency']}, each job on a fresh backend. Jobs in `{m['store']}`.",
        "",
        "![memory-compare](memory-compare.png)",
        "",
        "## Table 1: memory per stage",
        "",
        markdown_table(head, t1),
        "Measured peak MB per stage (largest `peak_mb` over the configuration's successful "
        "invocations, all sizes):",
        "",
        markdown_table(head, peaks),
        "## Table 2: time and cost",
        "",
        "wall s = first invocation start to last invocation end in the job's log; GB-s and "
        f"cost from every invocation's billed ms and memory, AWS Lambda {m['arch']} prices as "
        f"of {PRICES_AS_OF}; OOM = invocations killed for exceeding their memory (retried "
        "with 1.5× memory).",
        "",
        markdown_table(["configuration", "images per record", "records", "images", "wall s",
                        "GB-s", "cost USD", "USD per 1M images", "OOM"], t2),
        machine_markdown(m["machine"], backends),
    ])


def read_profile(path: str | Path) -> dict[str, Any]:
    """A profile.json written by `serveless profile`, checked to be one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise JobError(f"cannot read profile {path}: {exc}") from exc
    if data.get("kind") != "serveless-profile" or "recommended_mb" not in data:
        raise JobError(f"{path} is not a profile.json written by `serveless profile`")
    return data
