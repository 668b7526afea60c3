"""Loading a function's stage: kept in memory while the instance is warm, else from the
instance's disk cache, else from the store.

A warm instance serves its stage from memory (`model_source` "memory"). Where calls do not
share a process (Lithops runs each call in a fresh one) the disk cache, a Lambda
container's /tmp kept while the container is warm, saves the download ("disk"); entries are
named by the objects' content hashes (S3 ETags, one HEAD each), so a changed stage is never
served stale. Otherwise the stage is read from the store ("store"), graph and weights
streamed to disk, never whole in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import StoreError
from ..model.sessions import open_stage
from ..store import Store
from ..store.layout import DATA_SUFFIX
from .memory import ChargeSampler, own_cgroup
from .protocol import MODEL_CACHE_ENV

_SESSIONS: dict[tuple[str, str, int], Any] = {}
_init_load: Any = None  # the last load from disk or store, until a call has reported it


@dataclass
class Loaded:
    session: Any
    init_ms: float
    bytes: int  # read from the store
    gets: int | None  # GET requests (None: a local folder, no requests)
    heads: int
    source: str  # "memory": kept from an earlier call; "disk": the function's local cache;
    # "store": read from the store
    charge_peak_mb: float | None = None  # the init's unreclaimable charge (memory.py)


def reported(loaded: Loaded) -> Loaded:
    """The load a call reports: the instance's init if no call has reported it yet (the
    local backend loads the stage before the first event), else the call's own."""
    global _init_load
    load, _init_load = (_init_load or loaded), None
    return load


def load_stage(store: Store, model_key: str, threads: int) -> Loaded:
    """The session from memory (same process), else from the local disk cache, else the
    store. Where calls do not share a process (Lithops runs each call in a fresh one),
    the disk cache (/tmp on Lambda, kept while the container is warm) saves the download:
    its entries are named by the objects' content hashes (S3 ETags, one HEAD each), so a
    changed stage is never served stale."""
    cache_key = (store.url, model_key, threads)
    if cache_key in _SESSIONS:
        return Loaded(_SESSIONS[cache_key], 0.0, 0, 0, 0, "memory")
    t0 = time.perf_counter()
    own_cgroup()  # found during the init, not after the call's output is written
    with ChargeSampler() as sampler:
        session, size, gets, heads, source = _open_session(store, model_key, threads)
    _SESSIONS.clear()  # an instance serves one stage; drop any other
    _SESSIONS[cache_key] = session
    global _init_load
    _init_load = Loaded(session, (time.perf_counter() - t0) * 1000, size,
                         gets if store.s3 else None, heads, source, sampler.peak_mb)
    return _init_load


def _open_session(store: Store, model_key: str,
                  threads: int) -> tuple[Any, int, int | None, int, str]:
    """(session, bytes read, GETs, HEADs, where the model came from)."""
    local = store.local_path(model_key)
    heads = 0
    if local is not None:
        if not os.path.exists(local):
            raise StoreError(f"missing object {store.url}/{model_key}")
        size = os.path.getsize(local) + _size_or_zero(local + DATA_SUFFIX)
        gets: int | None = None
        source = "store"
        session = open_stage(local, threads)
    else:
        name = model_key.rsplit("/", 1)[-1]
        cache = _cache_folder(store, model_key) if _cache_root() else None
        if cache is not None:
            folder, heads = cache
            path = os.path.join(folder, name)
            if os.path.exists(path):
                size, gets, source = 0, 0, "disk"
            else:
                os.makedirs(folder, exist_ok=True)
                size, gets = _fetch_stage(store, model_key, path, into_place=True)
                source = "store"
            session = open_stage(path, threads)
        else:  # no cache: a private folder, gone once the session holds the weights
            with tempfile.TemporaryDirectory(prefix="serveless-model-") as tmp:
                path = os.path.join(tmp, name)
                size, gets = _fetch_stage(store, model_key, path, into_place=False)
                source = "store"
                session = open_stage(path, threads)
    return session, size, gets, heads, source


def _cache_root() -> str | None:
    root = os.environ.get(MODEL_CACHE_ENV, "")
    if root == "0":
        return None
    return root or os.path.join(tempfile.gettempdir(), "serveless-models")


def _cache_folder(store: Store, model_key: str) -> tuple[str, int] | None:
    """(the cache folder for this stage's current content, HEADs made), or None where the
    store gives no content hash without reading the object (stores other than S3)."""
    if not store.s3:
        return None
    tags = [store.etag(model_key), store.etag(model_key + DATA_SUFFIX)]
    if tags[0] is None:
        raise StoreError(f"missing object {store.url}/{model_key}")
    digest = hashlib.sha256(json.dumps([model_key, *tags]).encode()).hexdigest()[:32]
    return os.path.join(str(_cache_root()), digest), 2


def _fetch_stage(store: Store, model_key: str, path: str, into_place: bool) -> tuple[int, int]:
    """Download a stage's graph and weights to `path` (+ .data): (bytes, GETs). With
    `into_place`, each file is written under a temporary name and renamed, weights first,
    so a concurrent call sees either no graph or a complete stage."""
    size = requests = 0
    for suffix in (DATA_SUFFIX, ""):
        requests += 1  # one GET per file (a missing one is a GET answered 404)
        dest = path + suffix
        part = f"{dest}.part-{os.getpid()}-{threading.get_ident()}" if into_place else dest
        try:  # streamed, never whole in memory; transient errors are retried
            store.get_file(model_key + suffix, part)
        except StoreError:
            if not suffix:
                raise
            continue  # a stage without external weights (all small)
        size += os.path.getsize(part)
        if into_place:
            os.replace(part, dest)
    return size, requests


def _size_or_zero(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0
