"""Shared fixtures (tests/README.md lists them): the session's private model cache, a small
image set and its records, AlexNet and the trained digits model, each built once per
session; tiny models and a finished job made by the CLI per module; a tiny model
calibrated and planned; a job recorded in tests/data, nothing run; the partition counter
and the flaky store; and the check that no function instance outlives a module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))  # test-only modules

from serveless.data.samples import make_sample_images
from serveless.data.sources import pack
from serveless.model.builtins import build_alexnet
from serveless.store import Store


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """A private model cache for the session: tests never read or fill the user's. The
    machine's cache of checked stage sets is on, in it, as on a user's machine: a job of a
    (model, cuts) the session has already checked skips the partition and the check (about
    2 s for AlexNet; 60 s of the suite). Tests that count partitions turn it off
    (`counted_partition`); test_model_stagecache.py gives it a folder of its own."""
    from serveless.paths import CACHE_ENV

    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("model-cache")
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def digits_model(model_cache):
    """The digits CNN, trained once per session (a few seconds) and cached."""
    from serveless.model.builtins import build_digits

    return build_digits(seed=0)


@pytest.fixture(scope="session")
def digits_records(tmp_path_factory, digits_model) -> Path:
    """120 held-out digits, JPEGs in class folders 0..9, in records of 40."""
    from serveless.model.digits import heldout_examples

    images = tmp_path_factory.mktemp("digits")
    for c in range(10):
        (images / str(c)).mkdir()
    for i, (data, label) in enumerate(heldout_examples(limit=120)):
        (images / str(label) / f"d{i:04d}.jpg").write_bytes(data)
    root = tmp_path_factory.mktemp("digits-records")
    pack(images, Store(str(root)), "", 40)
    return root


@pytest.fixture(scope="session")
def alexnet():
    return build_alexnet(seed=0)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_sample_images(root, 60, classes=3, seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """datakit's tiny classifier as an ONNX file, once per session: the model of the
    input-shape tests (folders, records, shards, tables, manifests)."""
    from datakit import save, tiny_classifier

    return save(tiny_classifier(), tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="session")
def folder_rows(tmp_path_factory, image_dir, tiny_model_path) -> dict[str, dict]:
    """The session's sample photos served from their folder by the tiny model: the
    reference rows, by file stem, that every other input shape of them must equal."""
    from helpers import rows_of, run_local

    from serveless.driver.prepare import prepare_job

    store = Store(str(tmp_path_factory.mktemp("folder-job")))
    run_local(store, prepare_job(store, "folder", tiny_model_path, records=str(image_dir),
                                 per_record=25))
    return {Path(r["filename"]).stem: r for r in rows_of(store, "folder")}


@pytest.fixture(scope="session")
def records_dir(tmp_path_factory, image_dir) -> Path:
    """60 images in records of 25: the last record is short."""
    root = tmp_path_factory.mktemp("records")
    pack(image_dir, Store(str(root)), "", 25)
    return root


@pytest.fixture(scope="session")
def paper_job(tmp_path_factory, records_dir):
    """(store, spec, result) of the paper preset's job over records_dir, run once on the
    local backend at concurrency 2: for tests that only read what a finished job left."""
    from serveless.backends.local import LocalBackend
    from serveless.driver.prepare import prepare_job
    from serveless.driver.scheduler import run_job

    store = Store(str(tmp_path_factory.mktemp("paper-job")))
    spec = prepare_job(store, "e2e", "alexnet", preset="paper", records=str(records_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    return store, spec, result


@pytest.fixture
def counted_partition(monkeypatch):
    """Every call of the partition (which runs the equivalence check), by its cuts. The
    session's stage cache is off (unless the test gave the cache a folder of its own, as
    test_model_stagecache.py does): what is partitioned must not depend on earlier tests."""
    import os

    import serveless.model.partition
    from serveless.model.stagecache import STAGE_CACHE_ENV

    if STAGE_CACHE_ENV not in os.environ:
        monkeypatch.setenv(STAGE_CACHE_ENV, "0")
    calls: list[list[str]] = []
    real = serveless.model.partition.partition

    def counting(model, cuts, *args, **kwargs):
        calls.append(list(cuts))
        return real(model, cuts, *args, **kwargs)

    monkeypatch.setattr(serveless.model.partition, "partition", counting)
    return calls


@pytest.fixture
def model_file(tmp_path):
    """A tiny two-stage user model (cut at "r1") saved as an ONNX file."""
    import onnx
    from helpers import tiny_conv_classifier

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_conv_classifier(), path)
    return path


@pytest.fixture
def flaky_filesystem(monkeypatch):
    """`flaky://` URLs (tests/support/flakyfs.py) open a store that fails a share of
    requests, here and in the local function instances this test starts."""
    import flakyfs

    flakyfs.register()
    for name, value in flakyfs.environment().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """helpers.tiny_classifier saved as an ONNX file: a whole job in a second or two."""
    from helpers import tiny_classifier

    from serveless.model.graph import save_model

    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    save_model(tiny_classifier(), path)
    return path


@pytest.fixture(scope="module")
def done_store(tmp_path_factory, tiny, records_dir) -> Path:
    """A store with one finished two-stage job, 'done' (run by the CLI, once per module)."""
    from typer.testing import CliRunner

    from serveless.cli import app

    store = tmp_path_factory.mktemp("store")
    res = CliRunner().invoke(app, ["run", "--job", "done", "--records", str(records_dir),
                                   "--model", str(tiny), "--cuts", "flat", "--store",
                                   str(store)])
    assert res.exit_code == 0, res.output
    return store


@pytest.fixture(scope="session")
def tiny_plan(tmp_path_factory):
    """plankit's tiny residual model calibrated and planned by the CLI (for the local
    target, 60 images): (its folder, with tiny.onnx, cal.json and plan.json; the plan)."""
    import json

    from plankit import tiny_residual_model
    from typer.testing import CliRunner

    from serveless.cli import app

    runner = CliRunner()
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_residual_model(root / "tiny.onnx")
    store = root / "store"
    res = runner.invoke(app, ["calibrate", str(model), "--out", str(root / "cal.json"),
                              "--store", str(store)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["plan", str(model), "--images", "60", "--deadline", "3600",
                              "--target", "local", "--max-concurrency", "2", "--calibration",
                              str(root / "cal.json"), "--out", str(root / "plan.json"),
                              "--memory-step", "256"])
    assert res.exit_code == 0, res.output
    return root, json.loads((root / "plan.json").read_text())

@pytest.fixture
def recorded_job(tmp_path):
    """A finished job in a fresh local store, with nothing run: job 'replay', whose log is
    that of a real local run recorded in tests/data (AlexNet cut at pool5: 4 records of 25
    images, 2 stages at 1769 MB), with its job.json and prediction rows made up to match
    (labels 0-2, seeded). Returns (store, job name, log rows)."""
    from helpers import write_recorded_job

    store = Store(str(tmp_path / "store"))
    return store, "replay", write_recorded_job(store, "replay")


@pytest.fixture(scope="module", autouse=True)
def _no_stray_processes():
    """After each module, no function instance of the local backend is left running (they
    are given up to 0.5 s to be reaped)."""
    import time

    from serveless.backends.local import instance_processes

    yield
    deadline = time.monotonic() + 0.5
    while instance_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not instance_processes(), "function instances left running"
