"""Workloads shared by the benchmarks: sample photos packed into records, cached on disk."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from serveless.data.samples import make_sample_images
from serveless.data.sources import pack
from serveless.store import Store

OUT = Path(os.environ.get("SERVELESS_BENCH_DIR", Path(__file__).resolve().parent / "out"))


def workload(images: int, per_record: int, seed: int = 0) -> tuple[Path, Path]:
    """(image folder, records folder) for `images` photos in records of `per_record`."""
    img_dir = OUT / f"images-{images}-s{seed}"
    if not (img_dir / ".done").exists():
        make_sample_images(img_dir, images, seed=seed)
        (img_dir / ".done").write_text("ok")
    rec_dir = OUT / f"records-{images}-s{seed}-per{per_record}"
    if not (rec_dir / ".done").exists():
        pack(img_dir, Store(str(rec_dir)), "", per_record)
        (rec_dir / ".done").write_text("ok")
    return img_dir, rec_dir


# The instruction sets that change onnxruntime's kernels (and so every figure) most.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def cpu() -> str:
    """The processor and its relevant flags: figures from different CPUs are not comparable."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model} [{' '.join(have) or 'no listed flags'}]"


def machine() -> str:
    import onnxruntime

    return (f"{cpu()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
            f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}")


def save(name: str, result: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def at_scale(rows: list[dict], concurrency: int, images: int = 1_000_000) -> list[dict]:
    """The invocation log of the same job at `images` images, modeled from a measured one:
    records of the same size, each stage's first `concurrency` calls cold (one per chain,
    as in a long job whose instances stay warm), the others warm. Each stage's cold and
    warm calls are its measured ones (the median by billed time); a stage measured only
    cold gets warm calls of its cold call's duration without the init. A short measured
    job has mostly cold calls (2 of 3 at 3 records and C=2), so its cost per image is not
    that of a long job: this is the cost per 1M images the log implies. Modeled, not run."""
    import copy
    import statistics

    from serveless.cost import billed_ms

    per_record = max(int(r["images"] or 0) for r in rows)
    n_rec = -(-images // per_record)
    out = []
    for k in sorted({r["stage"] for r in rows}):
        full = [r for r in rows if r["stage"] == k and r["images"] == per_record
                and r.get("error") is None]

        def median_row(rs: list[dict]) -> dict:
            ms = statistics.median_low(r["billed_ms"] for r in rs)
            return next(r for r in rs if r["billed_ms"] == ms)

        cold = median_row([r for r in full if r["cold"]])
        warms = [r for r in full if not r["cold"]]
        if warms:
            warm = median_row(warms)
        else:
            warm = {**cold, "cold": False, "init_ms": 0.0,
                    "billed_ms": billed_ms(cold["duration_ms"], 0.0)}
        for n in range(n_rec):
            row = copy.copy(cold if n < concurrency else warm)
            row["record"] = f"r{n:07d}"
            out.append(row)
    return out
