"""What a (re)started job finds in the store: which stage each record has done, and the
temporary objects writers killed mid-write left behind.

A record resumes after the deepest stage whose output its log row names and the store
holds whole: the size and CRC32C its writer recorded (SHA-256 in logs written before). A
stage-0 output also needs the record's meta (names, labels, errors). So a driver killed at
any point reruns at most the invocations that were in flight.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import StoreError
from ..store import JobLayout, Store
from .spec import JobSpec


def remove_stale_temporaries(store: Store, layout: JobLayout) -> None:
    """Temporary objects under the job (store.layout.is_temporary) are what writers killed
    mid-write left (a driver runs its job alone, so none is being written now): remove them,
    never fail for it."""
    with contextlib.suppress(OSError, StoreError):
        for key in store.stale_temporaries(layout.job):
            with contextlib.suppress(OSError, StoreError):
                store.delete(key)


def completed_stages(store: Store, layout: JobLayout, spec: JobSpec,
                      rows: list[dict[str, Any]]) -> dict[str, int]:
    """The deepest stage per record whose output is in the store and whole, for resume."""
    recorded: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("error") is None and r.get("output"):
            recorded[(r["record"], r["stage"])] = r["output"]
    done: dict[str, int] = {}
    for record in spec.records:
        for stage in range(spec.stages - 1, -1, -1):
            out = recorded.get((record, stage))
            if out and whole(store, out) and (
                stage != 0 or stage == spec.stages - 1 or store.exists(layout.record_meta(record))
            ):
                done[record] = stage
                break
    return done


def whole(store: Store, out: dict[str, Any]) -> bool:
    """The object is there with the size and checksum its writer recorded (CRC32C; SHA-256
    in logs written before)."""
    import hashlib

    import google_crc32c

    key = out["key"]
    try:
        if store.size(key) != out["size"]:
            return False
        crc, sha = 0, hashlib.sha256()
        with store.open_read(key) as f:
            while chunk := f.read(1 << 22):
                if "crc32c" in out:
                    crc = google_crc32c.extend(crc, chunk)
                else:
                    sha.update(chunk)
        if "crc32c" in out:
            return f"{crc:08x}" == out["crc32c"]
        return sha.hexdigest() == out["sha256"]
    except (StoreError, OSError):
        return False
