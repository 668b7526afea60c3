"""Workloads shared by the benchmarks: sample photos packed into records, cached on disk."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from serveless.images import make_sample_images
from serveless.records import pack_folder
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
        pack_folder(img_dir, Store(str(rec_dir)), "", per_record)
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
