"""Where this process sits in the kernel's cgroups (v2, or v1 per controller).

Two sides need it: the local backend creates each function instance's cgroup as a child of
the driver's own (backends/local/isolation.py), and a function reads its own cgroup's
charge to report the memory a cap is held to (runtime/memory.py). Both ask here, from
/proc/self/cgroup and /proc/self/mountinfo (which, unlike /proc/mounts, tells a mount's
root, so a container's view of its hierarchy resolves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Mount:
    fstype: str  # "cgroup" or "cgroup2"
    root: str  # the hierarchy path mounted at `point`
    point: str
    options: set[str] = field(default_factory=set)  # v1 controllers bound to this hierarchy


def _mounts() -> list[_Mount]:
    """cgroup mounts from mountinfo, which (unlike /proc/mounts) tells the mount's root."""
    out: list[_Mount] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        out.append(
            _Mount(rfields[0], _unescape(fields[3]), _unescape(fields[4]),
                   set(rfields[2].split(",")))
        )
    return out


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _own_paths() -> tuple[str | None, dict[str, str]]:
    """Our cgroup2 path and our v1 path per controller, from /proc/self/cgroup."""
    v2: str | None = None
    v1: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        else:
            for c in controllers.split(","):
                v1[c] = path
    return v2, v1


def _resolve(mount: _Mount, path: str) -> Path | None:
    """Directory of hierarchy path `path` under `mount`, if that mount exposes it."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    d = Path(mount.point) / path[len(root):].lstrip("/")
    return d if d.is_dir() else None


def own_v2_dir() -> Path | None:
    """This process's cgroup2 folder, if one is mounted where we can see it."""
    path, _ = _own_paths()
    if path is None:
        return None
    for m in _mounts():
        if m.fstype == "cgroup2":
            d = _resolve(m, path)
            if d is not None:
                return d
    return None


def own_v1_dir(controller: str) -> Path | None:
    """This process's folder in the v1 hierarchy of `controller`, if mounted."""
    _, paths = _own_paths()
    if controller not in paths:
        return None
    for m in _mounts():
        if m.fstype == "cgroup" and controller in m.options:
            d = _resolve(m, paths[controller])
            if d is not None:
                return d
    return None


def own_dirs() -> list[Path]:
    """Every cgroup directory we may create instance cgroups under (v2 and v1)."""
    dirs = [own_v2_dir(), own_v1_dir("memory"), own_v1_dir("cpu")]
    seen: list[Path] = []
    for d in dirs:
        if d is not None and d not in seen:
            seen.append(d)
    return seen


def cpu_quota() -> float | None:
    """The CPU quota of this process's own cgroup in CPUs (quota / period: 0.5 = half a
    core), or None when it has none or it cannot be read. Only its own cgroup's: a quota
    set higher up (a container's) is not looked for."""
    try:
        d2 = own_v2_dir()
        if d2 is not None and (d2 / "cpu.max").is_file():
            quota, _, period = (d2 / "cpu.max").read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100_000)
        d1 = own_v1_dir("cpu")
        if d1 is not None and (d1 / "cpu.cfs_quota_us").is_file():
            quota_us = int((d1 / "cpu.cfs_quota_us").read_text())
            period_us = int((d1 / "cpu.cfs_period_us").read_text())
            return None if quota_us < 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None
