"""Checked stage sets kept on this machine, so that a new store needs no partition or check.

The stage store (stagestore.py) shares stage models between jobs of one store; a new store
(another folder, another bucket) would partition the model and check the chained stages
again (AlexNet: about 2 s) for a (model, cuts) this machine has already checked. So each
checked set is also kept in the user cache folder, `<cache>/stages/<digest>/`: the stage
files and a manifest of their sizes and SHA-256. A set appears there whole or not at all
(made in a temporary folder, manifest last, then renamed into place). Before it is used
its manifest must parse and name every stage, each file must have its size, and each file
is hashed while it is copied into the store: a file that does not match aborts that
object, the entry is deleted and the set is made afresh.

Only full-precision sets are kept: int8 and float16-weight stages are made from the job's
own calibration images after partitioning, so a cached set would save nothing there.
The folder keeps the most recently used sets up to LIMIT_BYTES (older ones are deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..store.layout import stage_file

log = logging.getLogger(__name__)

STAGE_CACHE_ENV = "SERVELESS_STAGE_CACHE"  # a folder, or "0" for none; default <cache>/stages
LIMIT_BYTES = 2 << 30  # about 8 AlexNet sets
MANIFEST = "manifest.json"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_FILE = re.compile(r"^stage-\d+\.onnx(\.data)?$")
_STALE_S = 3600  # a temporary folder this old was left by a process that died


class CacheDamaged(Exception):
    """A cached file does not match its manifest."""


def root() -> Path | None:
    """The cache folder, or None when turned off ($SERVELESS_STAGE_CACHE=0)."""
    value = os.environ.get(STAGE_CACHE_ENV, "")
    if value == "0":
        return None
    if value:
        return Path(value).expanduser()
    from ..paths import cache_dir

    return cache_dir() / "stages"


def lookup(digest: str) -> tuple[Path, dict[str, Any]] | None:
    """(folder, manifest) of the cached set `digest` when its manifest is sound and every
    file has its size; None otherwise (a bad entry is deleted). The hashes are checked as
    the files are copied (`copy_verified`)."""
    base = root()
    if base is None or not _DIGEST.match(digest):
        return None
    folder = base / digest
    if not folder.is_dir():
        return None
    problem, manifest = _check(folder, digest)
    if problem is not None:
        log.warning("cached stage models %s are damaged (%s): deleting them", folder, problem)
        discard(digest)
        return None
    with contextlib.suppress(OSError):
        os.utime(folder / MANIFEST)  # recently used: evicted last
    return folder, manifest


def _check(folder: Path, digest: str) -> tuple[str | None, dict[str, Any]]:
    """(what is wrong with the cached set, or None; its manifest as read)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest", {}
    if not isinstance(manifest, dict) or manifest.get("digest") != digest:
        return "manifest of another set", {}
    files, stages = manifest.get("files"), manifest.get("stages")
    if not isinstance(files, dict) or not isinstance(stages, int) or stages < 1:
        return "malformed manifest", manifest
    if any(stage_file(k) not in files for k in range(stages)):
        return "a stage missing from the manifest", manifest
    for name, want in files.items():
        if (not _FILE.match(name) or not isinstance(want, dict)
                or not isinstance(want.get("size"), int)
                or not _DIGEST.match(str(want.get("sha256")))):
            return f"malformed entry {name!r}", manifest
        try:
            size = (folder / name).stat().st_size
        except OSError:
            return f"{name} missing", manifest
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']}", manifest
    return None, manifest


def copy_verified(src: Path, want: dict[str, Any], write: Any) -> None:
    """Copy `src` into the writable `write` (a store writer), hashing it on the way; raise
    CacheDamaged (inside the writer, so the object is not written) when it does not match
    or cannot be read. The store's own errors pass through: they say nothing of the cache."""
    sha = hashlib.sha256()
    size = 0
    try:
        f = open(src, "rb")
    except OSError as exc:
        raise CacheDamaged(f"{src.name} cannot be read: {exc}") from exc
    with f:
        while True:
            try:
                chunk = f.read(1 << 22)
            except OSError as exc:
                raise CacheDamaged(f"{src.name} cannot be read: {exc}") from exc
            if not chunk:
                break
            sha.update(chunk)
            size += len(chunk)
            write.write(chunk)
    if size != want["size"] or sha.hexdigest() != want["sha256"]:
        raise CacheDamaged(f"{src.name} does not match its SHA-256")


def discard(digest: str) -> None:
    """Delete a cached set (renamed away first, so no reader sees half of it)."""
    base = root()
    if base is None or not _DIGEST.match(digest):
        return
    folder = base / digest
    trash = base / f".trash-{uuid.uuid4().hex}"
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def staging() -> Iterator[Path]:
    """A temporary folder to save a set into, inside the cache folder when it can be
    written (so `publish` is one rename), else anywhere; deleted on exit if not published."""
    base = root()
    folder: Path | None = None
    if base is not None:
        try:
            base.mkdir(parents=True, exist_ok=True)
            _sweep(base)
            folder = Path(tempfile.mkdtemp(dir=base, prefix=".tmp-"))
        except OSError:
            folder = None
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="serveless-stages-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(folder: Path, manifest: dict[str, Any]) -> Path | None:
    """Write the manifest into `folder` (a `staging` folder holding the checked set) and
    move it into place; returns where it is now, or None when it stays where it was (no
    cache folder, another process published the same set first, or a write failed)."""
    base = root()
    digest = str(manifest["digest"])
    if base is None or folder.parent != base or not _DIGEST.match(digest):
        return None
    try:
        with open(folder / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
        final = base / digest
        os.rename(folder, final)
    except OSError:
        return None
    _evict(base, keep=digest)
    return final


def _sweep(base: Path) -> None:
    """Delete temporary folders left by processes that died."""
    now = time.time()
    for p in base.glob(".t*-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_S:
                shutil.rmtree(p, ignore_errors=True)


def _evict(base: Path, keep: str) -> None:
    """Keep the most recently used sets within LIMIT_BYTES (`keep` always)."""
    entries = []
    for p in base.iterdir():
        if not _DIGEST.match(p.name):
            continue
        try:
            used = (p / MANIFEST).stat().st_mtime
            size = sum(f.stat().st_size for f in p.iterdir())
        except OSError:
            continue
        entries.append((p.name == keep, used, size, p.name))
    total = 0
    for is_kept, _, size, name in sorted(entries, reverse=True):
        total += size
        if total > LIMIT_BYTES and not is_kept:
            log.info("stage cache over %d bytes: deleting %s", LIMIT_BYTES, name)
            discard(name)
