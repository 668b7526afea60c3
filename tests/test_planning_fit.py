"""`serveless fit`: the platform a job ran on, from its log against the calibration.

The recorded job (tests/data) was run on this machine right after its calibration, so its
fit must find this machine: a CPU factor near 1. A platform made from it by hand (every
call twice as slow, every cold start 500 ms longer, a store with a known latency and
bandwidth) must be fitted exactly as it was made. Then the profile must reach plan and
simulate: their figures are the fitted ones, and they say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serveless.cli import app
from serveless.errors import PlanError
from serveless.planning.fit import fit_platform, load_profile, target_overrides
from serveless.planning.stagemodel import stage_models

DATA = Path(__file__).resolve().parent / "data"
SPEC = {"job": "replay", "model": "alexnet", "cuts": ["pool5"], "micro_batch": 25}
runner = CliRunner()


@pytest.fixture(scope="module")
def cal() -> dict:
    return json.loads((DATA / "replay-calibration.json").read_text())


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(x) for x in (DATA / "replay-invocations.jsonl").read_text().splitlines()]


def test_the_recorded_job_is_fitted_as_the_machine_it_was_calibrated_on(cal, rows):
    p = fit_platform(rows, SPEC, cal, "/tmp/store")
    f = p["figures"]
    assert p["calls"] == 8 and f["cpu_factor"]["calls"] == 8
    assert 0.85 <= f["cpu_factor"]["value"] <= 1.15  # the replay's simulation: 0.94 of wall
    cold = [r for r in rows if r["cold"]]
    assert f["platform_init_ms"]["calls"] == len(cold) == 2
    assert 0 < f["platform_init_ms"]["value"] < max(r["init_ms"] for r in cold)
    assert f["warm_reuse"]["value"] == 6 / 8 and f["warm_reuse"]["calls_per_instance"] == 4
    assert set(p["cpu_factor_by_stage"]) == {"stage 0, 1 vCPU", "stage 1, 1 vCPU"}
    assert p["local_store"] is True
    # a folder's reads are CPU work: its bandwidth is not a figure for the simulator
    assert set(target_overrides(p)) == {"cpu_factor", "platform_init_ms"}


def test_a_slower_platform_with_a_longer_start_is_fitted_as_it_was_made(cal, rows):
    base = fit_platform(rows, SPEC, cal, "/tmp/store")
    factor = base["figures"]["cpu_factor"]["value"]
    stages = stage_models(cal, SPEC["cuts"], SPEC["micro_batch"])
    slow = []
    for r in rows:  # every call twice as slow; a cold start: its load too, and 500 ms more
        load = float(stages[r["stage"]].load_ms(r["vcpus"], factor))
        slow.append({**r, "duration_ms": 2 * r["duration_ms"],
                     "init_ms": r["init_ms"] + load + 500 if r["cold"] else r["init_ms"]})
    p = fit_platform(slow, SPEC, cal, "/tmp/store")
    assert p["figures"]["cpu_factor"]["value"] == pytest.approx(factor / 2, rel=1e-9)
    assert p["figures"]["platform_init_ms"]["value"] == pytest.approx(
        base["figures"]["platform_init_ms"]["value"] + 500, abs=1e-6)


def test_store_latency_and_bandwidth_are_told_apart_by_requests_and_bytes(cal, rows):
    made = []
    for n, r in enumerate(rows):  # 25 ms a request, 200 MB/s, over calls of varied shape
        gets, mb = 1 + n % 4, 2.0 + 5 * n
        puts, out_mb = 1 + n % 3, 1.0 + 3 * (n % 5)
        made.append({**r, "gets": gets, "heads": 0, "bytes_in": int(mb * 2**20),
                     "read_ms": gets * 25 + mb / 200 * 1000, "puts": puts,
                     "bytes_out": int(out_mb * 2**20),
                     "write_ms": puts * 25 + out_mb / 100 * 1000,
                     "duration_ms": r["duration_ms"] + gets * 25 + mb / 200 * 1000
                     + puts * 25 + out_mb / 100 * 1000})
    p = fit_platform(made, SPEC, cal, "s3://bucket/jobs")
    f = p["figures"]
    assert f["read_mb_s"]["value"] == pytest.approx(200, rel=1e-3)
    assert f["write_mb_s"]["value"] == pytest.approx(100, rel=1e-3)
    assert f["request_ms"]["value"] == pytest.approx(25, rel=1e-3)
    assert f["read_mb_s"]["residual"] < 1e-6
    over = target_overrides(p)
    assert over["bandwidth_mb_s"] == pytest.approx(100, rel=1e-3)  # the slower side
    assert over["request_ms"] == pytest.approx(25, rel=1e-3)
    # on an object store the reads and writes are the simulator's own terms: left out of
    # the CPU side, so the factor is that of the calls before the store time was added
    assert f["cpu_factor"]["value"] == pytest.approx(
        fit_platform(rows, SPEC, cal, "/tmp/store")["figures"]["cpu_factor"]["value"],
        rel=1e-9)


def test_a_job_that_does_not_match_the_calibration_is_refused(cal, rows, tmp_path,
                                                              monkeypatch):
    with pytest.raises(PlanError, match="calibration is of model 'alexnet'"):
        fit_platform(rows, {**SPEC, "model": "digits"}, cal, "/tmp/store")
    with pytest.raises(PlanError, match="cuts do not match"):
        fit_platform(rows, {**SPEC, "cuts": ["nope"]}, cal, "/tmp/store")
    # one model file named two ways: as typed in the job's folder, and resolved (calibrate)
    (tmp_path / "m.onnx").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    resolved = {**cal, "model": str(tmp_path / "m.onnx")}
    assert fit_platform(rows, {**SPEC, "model": "m.onnx"}, resolved, "/tmp/store")["calls"] == 8
    with pytest.raises(PlanError, match="the job ran 'n.onnx'"):
        fit_platform(rows, {**SPEC, "model": "n.onnx"}, resolved, "/tmp/store")
    with pytest.raises(PlanError, match="no successful call"):
        fit_platform([{**r, "error": "OutOfMemory"} for r in rows], SPEC, cal, "/tmp/store")


def test_fit_writes_a_profile_that_plan_and_simulate_use_and_name(recorded_job, cal, tmp_path):
    store, job, rows = recorded_job
    store.put_bytes("calibration/alexnet.json", json.dumps(cal).encode())
    prof = tmp_path / "p.json"
    res = runner.invoke(app, ["fit", job, "--store", store.url, "--out", str(prof)])
    assert res.exit_code == 0, res.output
    profile = load_profile(prof)
    factor = profile["figures"]["cpu_factor"]["value"]
    assert "cpu_factor" in res.output and f"{factor:.3g}" in res.output
    plan = tmp_path / "plan.json"
    res = runner.invoke(app, ["plan", "alexnet", "--images", "1000", "--deadline", "3600",
                              "--store", store.url, "--out", str(plan), "--profile",
                              str(prof), "--memory-step", "256"])
    assert res.exit_code == 0, res.output
    assert f"from platform profile {prof}" in " ".join(res.output.split())
    res = runner.invoke(app, ["simulate", "--plan", str(plan), "--profile", str(prof),
                              "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["target"]["cpu_factor"] == pytest.approx(factor)
    assert out["target"]["platform_init_ms"] == pytest.approx(
        profile["figures"]["platform_init_ms"]["value"])
    assert out["figures"]["cpu_factor"]["kind"] == "fitted"
    assert str(prof) in out["figures"]["cpu_factor"]["source"]
    assert out["figures"]["bandwidth_mb_s"]["kind"] == "a guess"  # a folder: not fitted
    without = json.loads(runner.invoke(app, ["simulate", "--plan", str(plan), "--json"]).output)
    assert without["figures"]["cpu_factor"]["kind"] == "a guess"
    assert without["wall_s"] != out["wall_s"]
    res = runner.invoke(app, ["simulate", "--plan", str(plan), "--profile", str(prof),
                              "--cpu-factor", "2"])
    assert res.exit_code != 0 and "not both" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "something else"}))
    res = runner.invoke(app, ["simulate", "--plan", str(plan), "--profile", str(bad)])
    assert res.exit_code != 0 and "not a serveless platform profile" in res.output
