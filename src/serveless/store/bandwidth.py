"""The store's bandwidth, as one process sees it: one write and one read of a large object,
and the latency of a small request.

Both sides measure it, so it lives with the store: the calibration on this machine times
the store from the driver (calibrate.py), and a calibration call on a backend
(runtime/calibration.py) times it from inside the function, which is where a job's reads
and writes are made (a function on Lambda reaches S3 in its Region, not the user's line).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..errors import StoreError


def measure_bandwidth(store: Any, key: str, mb: int = 32) -> dict[str, Any]:
    """MB/s of one write and one read of an `mb` MB object at `key`, and the ms of a small
    request (a PUT and a GET of one byte, halved); the object is deleted after."""
    data = np.random.default_rng(0).bytes(mb << 20)
    t0 = time.perf_counter()
    store.put_bytes(key, data)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = store.get_bytes(key)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.put_bytes(key, b"x")
    store.get_bytes(key)
    small_ms = (time.perf_counter() - t0) * 1000 / 2
    store.delete(key)
    if len(got) != len(data):
        raise StoreError("the store returned a different object than was written")
    return {"write_mb_s": mb / max(write_s, 1e-6), "read_mb_s": mb / max(read_s, 1e-6),
            "request_ms": small_ms, "url": store.url}
