"""Stage models stored once per model and cuts, content-addressed, shared by jobs.

A job's fixed cost before its first invocation is partitioning the model, checking the
chained stages against it, and uploading the stages (AlexNet: about 5 s, 10 s and 244 MB).
None of that depends on the job, only on the model's bytes and the cuts, so the stages
live under `<store>/models/<digest>/` and a job with the same model and cuts finds them
there: nothing is partitioned, checked or uploaded again.

A set is complete when its manifest (written last) is there and every file it lists has
its size, and on a local store its SHA-256 as well (reading it back is cheap there; on an
object store each file was written by one atomic PUT, so its size is the check). A set
that fails the check is rebuilt in place.

A set missing from the store is first looked for in this machine's cache of checked sets
(stagecache.py): found whole, it is only uploaded, with no partition and no check.
The model's hash is the SHA-256 of the file it was read from when there is one
(filehash.py), else of its deterministic serialisation; the two agree for the built-in
AlexNet, whose cached file is that serialisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import StoreError
from ..store import ModelLayout, Store
from ..store.layout import DATA_SUFFIX, stage_file
from . import stagecache

log = logging.getLogger(__name__)

# Bump when the way stages are cut or saved changes (their bytes would differ).
STAGE_FORMAT = "split+external-data/1"
MANIFEST_VERSION = 1


@dataclass
class StageModels:
    """Where a job's stage models are, and whether this preparation reused them."""

    layout: ModelLayout
    stages: int
    reused: bool
    size: int  # bytes of all stage files

    @property
    def prefix(self) -> str:
        return self.layout.prefix


def model_sha256(model: onnx.ModelProto) -> str:
    """SHA-256 of the model's deterministic serialisation (graph and weights)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def stage_digest(model_hash: str, cuts: Sequence[str], extra: dict[str, Any] | None = None) -> str:
    """The content address of a set of stages: model bytes, cuts, stage format, and `extra`
    (anything else that changes the stage files, e.g. quantization and its calibration)."""
    key = {"model_sha256": model_hash, "cuts": list(cuts), "stage_format": STAGE_FORMAT,
           "extra": extra or {}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def ensure_stage_models(
    store: Store,
    model: onnx.ModelProto,
    cuts: Sequence[str],
    make_stages: Callable[[onnx.ModelProto, list[str]], list[onnx.ModelProto]],
    extra: dict[str, Any] | None = None,
    say: Callable[[str], None] | None = None,
    label: str = "the model",
    *,
    model_hash: str | None = None,
    expect: str | None = None,
    machine_cache: bool = True,
) -> StageModels:
    """The stage models of (model, cuts) in the store: reused when complete, else copied
    from this machine's cache of checked sets (`machine_cache`), else made with
    `make_stages` (which partitions and checks equivalence) and uploaded. `say` tells a
    person which (`label` names the model and cuts).

    `model_hash` is the SHA-256 of the file the model was read from (None: hash the
    model). `expect` is the prefix a resumed job already uses: when the file's hash does
    not give it, the model's serialisation (how jobs before file hashing were addressed)
    is tried too."""
    model_hash = model_hash or model_sha256(model)
    layout = ModelLayout(stage_digest(model_hash, cuts, extra))
    if expect and expect != layout.prefix:
        legacy = model_sha256(model)
        if ModelLayout(stage_digest(legacy, cuts, extra)).prefix == expect:
            model_hash, layout = legacy, ModelLayout(stage_digest(legacy, cuts, extra))
    manifest = read_manifest(store, layout)
    if manifest is not None:
        problem = verify(store, layout, manifest, deep=store.local)
        if problem is None:
            log.info("stage models %s reused: no partition, no upload", layout.prefix)
            if say:
                say(f"stage models of {label} found in the store ({layout.prefix}): no "
                    "partition, no upload")
            return StageModels(layout, int(manifest["stages"]), reused=True,
                               size=_total(manifest["files"]))
        log.warning("stage models %s are damaged (%s); rebuilding them", layout.prefix, problem)
        if say:
            say(f"stage models in {layout.prefix} are damaged ({problem}): rebuilding them")
    manifest = {"version": MANIFEST_VERSION, "digest": layout.digest, "model_sha256": model_hash,
                "cuts": list(cuts), "stage_format": STAGE_FORMAT, "extra": extra or {}}
    files = _upload_cached(store, layout, say) if machine_cache else None
    if files is None:
        if say:
            say(f"partitioning {label} and checking the chained stages against it…")
        stages = make_stages(model, list(cuts))
        with stagecache.staging() as folder:
            files = _save_stages(folder, stages)
            manifest.update(stages=len(stages), files=files)
            cached = stagecache.publish(folder, manifest) if machine_cache else None
            _upload_files(store, layout, cached or folder, files)
        log.info("stage models %s partitioned, checked and uploaded", layout.prefix)
    else:
        log.info("stage models %s copied from this machine's cache: no partition", layout.prefix)
    manifest.update(stages=sum(1 for n in files if n.endswith(".onnx")), files=files,
                    created=round(time.time(), 3))
    store.put_bytes(layout.manifest, json.dumps(manifest, indent=2).encode())
    return StageModels(layout, int(manifest["stages"]), reused=False, size=_total(files))


def _upload_cached(store: Store, layout: ModelLayout,
                   say: Callable[[str], None] | None) -> dict[str, dict[str, Any]] | None:
    """Upload the set from this machine's cache, each file hashed on its way into the
    store; its files (name -> size, sha256), or None when absent or damaged (deleted)."""
    found = stagecache.lookup(layout.digest)
    if found is None:
        return None
    folder, cached = found
    if say:
        say(f"stage models found in this machine's cache ({folder}): uploading them, "
            "no partition")
    files: dict[str, dict[str, Any]] = cached["files"]
    try:
        for name in _upload_order(files):
            with store.writer(f"{layout.prefix}/{name}") as out:
                stagecache.copy_verified(folder / name, files[name], out)
    except stagecache.CacheDamaged as exc:
        log.warning("cached stage models %s are damaged (%s): deleting them", folder, exc)
        if say:
            say(f"cached stage models in {folder} are damaged ({exc}): rebuilding them")
        stagecache.discard(layout.digest)
        return None
    return files


def _upload_order(files: dict[str, Any]) -> list[str]:
    """Weights before the graph that names them."""
    return sorted(files, key=lambda n: (not n.endswith(DATA_SUFFIX), n))


def _total(files: dict[str, dict[str, Any]]) -> int:
    return sum(int(f.get("size") or 0) for f in files.values())


def read_manifest(store: Store, layout: ModelLayout) -> dict[str, Any] | None:
    """The manifest, or None when absent or unreadable (the set is then rebuilt)."""
    try:
        data = json.loads(store.get_bytes(layout.manifest))
    except (StoreError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("digest") != layout.digest:
        return None
    if not isinstance(data.get("files"), dict) or not isinstance(data.get("stages"), int):
        return None
    return data


def verify(store: Store, layout: ModelLayout, manifest: dict[str, Any],
           deep: bool) -> str | None:
    """None when every file of the manifest is there whole; else what is wrong."""
    files = manifest["files"]
    for k in range(manifest["stages"]):
        if stage_file(k) not in files:
            return f"stage {k} missing from the manifest"
    for name, want in files.items():
        key = f"{layout.prefix}/{name}"
        try:
            size = store.size(key)
        except StoreError:
            return f"{name} missing"
        if size != want.get("size"):
            return f"{name} has {size} bytes, the manifest says {want.get('size')}"
        if deep and _sha256(store, key) != want.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def _sha256(store: Store, key: str) -> str:
    with store.open_read(key) as f:
        return _stream_sha256(f)


def _stream_sha256(f: Any) -> str:
    sha = hashlib.sha256()
    while chunk := f.read(1 << 22):
        sha.update(chunk)
    return sha.hexdigest()


def _save_stages(folder: Path, stages: list[onnx.ModelProto]) -> dict[str, dict[str, Any]]:
    """Each stage as a graph plus its weights as external data, so that onnxruntime maps
    the weights instead of copying them out of a parsed protobuf: a lower peak at load
    (AlexNet's classifier: about 360 MB instead of 420 MB). Returns name -> size, sha256."""
    files: dict[str, dict[str, Any]] = {}
    for k, stage in enumerate(stages):
        name = stage_file(k)
        path = os.path.join(folder, name)
        onnx.save_model(stage, path, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=name + DATA_SUFFIX,
                        size_threshold=1024)
        for suffix in (DATA_SUFFIX, ""):
            if os.path.exists(path + suffix):
                files[name + suffix] = {"size": os.path.getsize(path + suffix),
                                        "sha256": _file_sha256(path + suffix)}
    return files


def _upload_files(store: Store, layout: ModelLayout, folder: Path,
                  files: dict[str, dict[str, Any]]) -> None:
    for name in _upload_order(files):
        store.put_file(folder / name, f"{layout.prefix}/{name}")


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return _stream_sha256(f)
