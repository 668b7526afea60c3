"""The machine a measurement ran on, as every report states it: CPU model, cores, RAM, load,
platform and library versions, and the command that wrote it. Figures from two machines
(or two loads of one shared machine) are not comparable without it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load and library versions: what a reader needs to compare runs."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("serveless", "onnxruntime", "onnxruntime-gpu", "numpy", "onnx", "matplotlib",
                 "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb,
            "platform": platform.platform(), "load_avg": load, "versions": versions,
            "argv": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "at": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def machine_markdown(info: dict[str, Any], backends: Sequence[dict[str, Any]] = ()) -> str:
    v = ", ".join(f"{k} {val}" for k, val in info["versions"].items())
    lines = [
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores (os.cpu_count()), "
        f"{info['ram_gb']} GB RAM",
        f"- OS: {info['platform']}",
        "- load average (1, 5, 15 min) at the start: "
        + (", ".join(f"{x:.2f}" for x in info["load_avg"]) if info.get("load_avg")
           else "unknown"),
        f"- versions: {v}",
        f"- written {info['at']} by: `{info['argv']}`",
    ]
    for b in {json.dumps(b, sort_keys=True): b for b in backends}.values():
        lines.append(f"- backend: {b.get('backend')}, limits {b.get('limits', '-')}, "
                     f"CPU share {b.get('cpu_share', '-')}")
    return "\n".join(lines) + "\n"
