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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from .function import DATA_SUFFIX  # a stage's weights beside its graph
from .store import ModelLayout, Store, StoreError

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
) -> StageModels:
    """The stage models of (model, cuts) in the store: reused when complete, else made
    with `make_stages` (which partitions and checks equivalence) and uploaded. `say`
    tells a person which (`label` names the model and cuts)."""
    model_hash = model_sha256(model)
    layout = ModelLayout(stage_digest(model_hash, cuts, extra))
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
    if say:
        say(f"partitioning {label} and checking the chained stages against it…")
    stages = make_stages(model, list(cuts))
    files = _upload_stages(store, layout, stages)
    manifest = {"version": MANIFEST_VERSION, "digest": layout.digest, "model_sha256": model_hash,
                "cuts": list(cuts), "stage_format": STAGE_FORMAT, "extra": extra or {},
                "stages": len(stages), "files": files, "created": round(time.time(), 3)}
    store.put_bytes(layout.manifest, json.dumps(manifest, indent=2).encode())
    log.info("stage models %s partitioned, checked and uploaded", layout.prefix)
    return StageModels(layout, len(stages), reused=False, size=_total(files))


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
        if f"stage-{k}.onnx" not in files:
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
    sha = hashlib.sha256()
    with store.open_read(key) as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def _upload_stages(store: Store, layout: ModelLayout,
                   stages: list[onnx.ModelProto]) -> dict[str, dict[str, Any]]:
    """Each stage as a graph plus its weights as external data, so that onnxruntime maps
    the weights instead of copying them out of a parsed protobuf: a lower peak at load
    (AlexNet's classifier: about 360 MB instead of 420 MB). Returns name -> size, sha256."""
    files: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="serveless-stages-") as tmp:
        for k, stage in enumerate(stages):
            key = layout.stage(k)
            name = key.rsplit("/", 1)[-1]
            path = os.path.join(tmp, name)
            onnx.save_model(stage, path, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=name + DATA_SUFFIX,
                            size_threshold=1024)
            for suffix in (DATA_SUFFIX, ""):  # weights first, the graph that names them last
                if os.path.exists(path + suffix):
                    store.put_file(path + suffix, key + suffix)
                    files[name + suffix] = {"size": os.path.getsize(path + suffix),
                                            "sha256": _file_sha256(path + suffix)}
    return files


def _file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()
