"""This machine's cache of checked stage sets: a new store uploads them with no partition and
no equivalence check; a damaged or partial entry is never used, it is made again."""

from __future__ import annotations

import json

import onnx
import pytest
from helpers import rows_of

import serveless.model.partition
from serveless.backends.local import LocalBackend
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.model import stagecache
from serveless.model.stagestore import ensure_stage_models, model_sha256, stage_digest
from serveless.store import ModelLayout, Store


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "stage-cache"
    monkeypatch.setenv(stagecache.STAGE_CACHE_ENV, str(folder))
    return folder


def _files(store_root, prefix):
    folder = store_root / prefix
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"}


def _prepare(tmp_path, name, model_file, records_dir, cuts="r1"):
    store = Store(str(tmp_path / name))
    return store, prepare_job(store, "j", str(model_file), cuts=cuts, records=str(records_dir))


def test_a_new_store_uploads_the_cached_set_without_partitioning(
        tmp_path, cache, counted_partition, model_file, records_dir):
    _, first = _prepare(tmp_path, "s1", model_file, records_dir)
    assert counted_partition == [["r1"]]
    digest = first.models.rsplit("/", 1)[-1]
    entry = cache / digest
    cached = json.loads((entry / "manifest.json").read_text())
    assert cached["digest"] == digest and cached["stages"] == 2
    assert set(cached["files"]) == {"stage-0.onnx", "stage-0.onnx.data", "stage-1.onnx"}
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporaries left

    store, second = _prepare(tmp_path, "s2", model_file, records_dir)
    assert counted_partition == [["r1"]]  # a fresh store: no partition, no equivalence check
    assert second.models == first.models
    assert _files(tmp_path / "s2", second.models) == _files(tmp_path / "s1", first.models)
    stored = json.loads(store.get_bytes(ModelLayout(digest).manifest))
    assert stored["files"] == cached["files"] and stored["stages"] == 2
    with LocalBackend() as backend:  # the copied stages serve the job
        assert run_job(store, JobSpec.load(store, "j"), backend, progress=False).ok
    assert len(rows_of(store, "j")) == 60

    _prepare(tmp_path, "s3", model_file, records_dir, cuts="g")
    assert counted_partition == [["r1"], ["g"]]  # other cuts: another set


@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest", "bad-manifest",
                                    "missing-file"])
def test_a_damaged_cache_entry_is_made_again_never_used(
        tmp_path, cache, counted_partition, model_file, records_dir, damage):
    _, first = _prepare(tmp_path, "s1", model_file, records_dir)
    entry = cache / first.models.rsplit("/", 1)[-1]
    good = _files(tmp_path / "s1", first.models)
    data = entry / "stage-0.onnx.data"
    if damage == "flip":  # same size, other bytes: only the hash tells
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-7])
    elif damage == "no-manifest":  # as if cut short before the manifest
        (entry / "manifest.json").unlink()
    elif damage == "bad-manifest":
        (entry / "manifest.json").write_text('{"digest": "')
    else:
        (entry / "stage-1.onnx").unlink()

    store, second = _prepare(tmp_path, "s2", model_file, records_dir)
    assert counted_partition == [["r1"], ["r1"]]  # made again
    assert _files(tmp_path / "s2", second.models) == good  # the store got whole stages
    assert _files(cache, entry.name) == good  # and so did the cache
    with LocalBackend() as backend:
        assert run_job(store, JobSpec.load(store, "j"), backend, progress=False).ok
    _prepare(tmp_path, "s3", model_file, records_dir)
    assert counted_partition == [["r1"], ["r1"]]  # whole again: used


def test_cache_off_unwritable_or_full(tmp_path, monkeypatch, counted_partition, model_file,
                                      records_dir):
    monkeypatch.setenv(stagecache.STAGE_CACHE_ENV, "0")
    _prepare(tmp_path, "s1", model_file, records_dir)
    _prepare(tmp_path, "s2", model_file, records_dir)
    assert len(counted_partition) == 2  # off: every new store counted_partition

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(stagecache.STAGE_CACHE_ENV, str(blocker / "stages"))
    store, spec = _prepare(tmp_path, "s3", model_file, records_dir)  # cannot be written
    assert len(counted_partition) == 3 and store.exists(spec.stage_model_key(1))

    cache = tmp_path / "small"
    monkeypatch.setenv(stagecache.STAGE_CACHE_ENV, str(cache))
    monkeypatch.setattr(stagecache, "LIMIT_BYTES", 1)  # room for the newest set only
    _, a = _prepare(tmp_path, "s4", model_file, records_dir, cuts="r1")
    _, b = _prepare(tmp_path, "s5", model_file, records_dir, cuts="g")
    assert sorted(p.name for p in cache.iterdir()) == [b.models.rsplit("/", 1)[-1]]
    assert a.models != b.models


def test_reduced_precision_sets_are_not_cached(tmp_path, cache, digits_records):
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "q", "digits", cuts="pool1", records=str(digits_records),
                       quantize="int8", calibration_images=8)
    assert spec.precision == "int8" and store.exists(spec.stage_model_key(1))
    assert not cache.exists() or not list(cache.iterdir())


def test_a_resumed_job_keeps_the_address_from_the_model_serialisation(tmp_path, model_file):
    """Jobs made before file hashing were addressed by the model's serialisation: resuming
    one finds its stages under that address even where the file's hash differs."""
    model = onnx.load(model_file)
    store = Store(str(tmp_path / "store"))
    legacy = ModelLayout(stage_digest(model_sha256(model), ["r1"])).prefix
    other = "ab" * 32
    got = ensure_stage_models(store, model, ["r1"], serveless.model.partition.partition,
                              model_hash=other, expect=legacy, machine_cache=False)
    assert got.prefix == legacy
    got = ensure_stage_models(store, model, ["r1"], serveless.model.partition.partition,
                              model_hash=other, expect="models/" + "cd" * 32,
                              machine_cache=False)
    assert got.prefix == ModelLayout(stage_digest(other, ["r1"])).prefix


def test_a_store_failure_keeps_the_cached_set(tmp_path, cache, model_file, monkeypatch):
    """An upload that fails in the store says nothing of the cache: the set stays there."""
    model = onnx.load(model_file)
    part = serveless.model.partition.partition
    first = ensure_stage_models(Store(str(tmp_path / "s1")), model, ["r1"], part)
    entry = cache / first.layout.digest
    broken = Store(str(tmp_path / "s2"))

    def refuse(key):
        raise PermissionError("store refuses writes")

    monkeypatch.setattr(broken, "writer", refuse)
    with pytest.raises(PermissionError):
        ensure_stage_models(broken, model, ["r1"], part)
    assert stagecache.lookup(first.layout.digest) is not None and entry.is_dir()
