"""A whole job through the driver on the local backend: every image gets exactly one row,
equal to the whole model; one log line per invocation, each instance cold once then warm;
the store laid out as designed; a one-stage job; intermediates dropped once a record is
done, inputs never."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from helpers import rows_of, whole_model_probs

from serveless.backends.local import LocalBackend
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.store import JobLayout, Store

pytestmark = pytest.mark.e2e


def test_every_image_has_one_row_equal_to_the_whole_model(paper_job, records_dir, alexnet):
    store, spec, result = paper_job
    assert spec.stages == 4 and result.ok
    rows = rows_of(store, "e2e")
    keys = [(r["record"], r["index"]) for r in rows]
    assert len(keys) == 60 and len(set(keys)) == 60
    assert sorted(r["record"] for r in rows).count("00002") == 10  # the short last record
    expected = whole_model_probs(alexnet, records_dir)
    assert set(expected) == set(keys)
    worst = 0.0
    for r in rows:
        probs = expected[(r["record"], r["index"])]
        assert r["error"] is None and r["label"] in (0, 1, 2)
        assert r["filename"].endswith(".jpg")
        worst = max(worst, float(np.max(np.abs(probs[r["top5"]] - np.array(r["probs"])))))
        top = np.sort(probs)[::-1][:5]
        np.testing.assert_allclose(np.array(r["probs"]), top, atol=1e-4)
    assert worst <= 1e-4


def test_invocation_log_has_one_line_per_invocation(paper_job):
    store, spec, result = paper_job
    log = load_log(store, "e2e")
    assert len(log) == 3 * 4  # records x stages, no failures
    assert {(r["record"], r["stage"]) for r in log} == {
        (rec, k) for rec in ("00000", "00001", "00002") for k in range(4)}
    for r in log:
        assert r["error"] is None
        assert r["billed_ms"] == math.ceil(r["duration_ms"]) + math.ceil(r["init_ms"])
        assert r["peak_mb"] > 50 and r["bytes_in"] > 0 and r["bytes_out"] > 0
        # the call's own CPU (all its threads), not the instance's since its start
        assert 0 < r["cpu_ms"] <= r["duration_ms"] * (os.cpu_count() or 1) + 20
    # the first invocation of each instance is cold and reports init; later ones are warm
    by_instance: dict[str, list[dict]] = {}
    for r in sorted(log, key=lambda r: r["started"]):
        by_instance.setdefault(r["instance"], []).append(r)
    for calls in by_instance.values():
        assert calls[0]["cold"] and calls[0]["init_ms"] > 0
        assert all(not c["cold"] and c["init_ms"] == 0 for c in calls[1:])
    assert any(len(c) > 1 for c in by_instance.values())  # instances were reused


def test_store_layout_matches_design(paper_job):
    store, spec, _ = paper_job
    lay = JobLayout("e2e")
    assert store.exists(lay.spec)
    assert spec.models.startswith("models/")  # shared by jobs of the same model and cuts
    for k in range(4):
        assert store.exists(spec.stage_model_key(k))
        assert spec.stage_model_key(k).startswith(spec.models + "/")
    for rec in spec.records:
        assert store.exists(lay.record(rec)) and store.exists(lay.predictions(rec))
        for k in range(3):
            assert store.exists(lay.stage_output(k, rec))


def test_single_stage_job(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "one", "alexnet", records=str(records_dir), memory="3008")
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=1, progress=False)
    assert result.ok and spec.stages == 1
    assert len(rows_of(store, "one")) == 60


def test_intermediates_can_be_dropped_once_a_record_is_done(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "drop", "alexnet", preset="paper", records=str(records_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False,
                         keep_intermediates=False)
    assert result.ok and len(rows_of(store, "drop")) == 60
    lay = JobLayout("drop")
    for k in range(3):
        assert store.list(lay.key(f"stage-{k}")) == []
    assert all(store.exists(lay.record(r)) for r in spec.records)  # inputs are never dropped
