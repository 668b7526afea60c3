"""What a (re)started job finds in the store: which stage each record has done, the calls
its log lost, and the temporary objects writers killed mid-write left behind.

A record resumes after the deepest stage whose output the store holds (and, for stage 0,
the record's meta: names, labels, errors). Every key comes from the record's name and the
stage through the layout (store/layout.py), never from what a log row says: a row edited to
point at `../../dev/zero` points at nothing here. What the store holds is found with one
listing per stage folder and no object is read: objects are written whole or not at all,
so one that is there is whole. An output the log accounts for (a successful row of the
same record and stage with the same size) costs nothing more; one it does not (its call
ended in the seconds before a driver was killed, after the log's last flush) is vouched for
by the call the function stored with it (one HEAD), and that call is put back in the log,
so no kept work is redone and every billed call is counted. An object with no such call
(not ours, or from before calls were stored) is not trusted: its stage runs again.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..cost import billed_ms, vcpus
from ..data.tensors import TensorFormat
from ..errors import StoreError
from ..runtime.protocol import parse_call_metadata
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
                     rows: list[dict[str, Any]]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """(the deepest stage done per record, the log rows of calls the log lost that wrote
    an output still in the store)."""
    last = spec.stages - 1
    suffix = TensorFormat.from_dict(spec.format).suffix
    keys = {stage: {r: _output_key(layout, spec, r, stage, suffix) for r in spec.records}
            for stage in range(spec.stages)}
    listed: dict[int, dict[str, int]] = {}
    metas: set[str] = set()
    for stage in range(spec.stages):
        prefix = layout.predictions_prefix if stage == last else layout.stage_prefix(stage)
        sizes = store.sizes(prefix) if any(keys[stage].values()) else {}
        listed[stage] = {r: sizes[k] for r, k in keys[stage].items() if k in sizes}
        if stage == 0 and last > 0:
            metas = {r for r in spec.records if layout.record_meta(r) in sizes}
    logged = {(r["record"], r["stage"]): r["output"].get("size") for r in rows
              if r.get("error") is None and isinstance(r.get("output"), dict)}
    done: dict[str, int] = {}
    recovered: list[dict[str, Any]] = []
    for record in spec.records:
        for stage in range(last, -1, -1):
            size = listed[stage].get(record)
            if size is None:
                continue
            key = keys[stage][record]
            if logged.get((record, stage)) != size:
                row = _recover(store, key, stage, record, size)
                if row is None:
                    continue  # not an output this job can vouch for: its stage runs again
                recovered.append(row)
            if record not in done and (stage != 0 or last == 0 or record in metas):
                done[record] = stage
    return done, recovered


def _output_key(layout: JobLayout, spec: JobSpec, record: str, stage: int, suffix: str) -> str:
    if stage == spec.stages - 1:
        return layout.predictions(record)
    return layout.stage_output(stage, record, suffix)


def _recover(store: Store, key: str, stage: int, record: str,
             size: int) -> dict[str, Any] | None:
    """The log row of the call that wrote `key`, from the call stored with it; None if it
    has none, or one that does not match the object."""
    try:
        found = store.head(key)
    except (OSError, StoreError):
        return None
    call = parse_call_metadata(found[1]) if found else None
    if found is None or call is None or found[0] != size:
        return None
    init, duration = float(call["handler_init_ms"]), float(call["duration_ms"])
    memory = int(call["memory_mb"])
    row = {"stage": stage, "record": record, "attempt": 0, "call": str(call.get("call", "")),
           "started": float(call["started"]), "memory_mb": memory,
           "vcpus": round(vcpus(memory), 3), "cold": bool(call.get("cold")),
           "model_source": call.get("model_source"), "init_ms": round(init, 3),
           "duration_ms": round(duration, 3), "billed_ms": billed_ms(duration, init)}
    for name in ("peak_mb", "peak_rss_mb", "peak_cgroup_mb", "peak_working_set_mb", "images",
                 "image_errors", "read_ms", "compute_ms", "write_ms", "cpu_ms", "threads",
                 "bytes_in", "bytes_out", "gets", "heads", "puts"):
        row[name] = call.get(name)
    row.update({"output": {"key": key, "size": size,
                           "crc32c": found[1].get("serveless-crc32c", "")},
                "instance": "", "error": None, "throttled": False,
                # rebuilt after the driver that ran it lost its row: the function's own
                # figures (its duration, not the platform's billed one)
                "recovered": True})
    return row
