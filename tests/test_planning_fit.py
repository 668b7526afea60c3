"""`serveless fit`: the platform a job ran on, from its log against the calibration.

The recorded job (tests/data) was run on this machine right after its calibration, so its
fit must find this machine: a CPU factor near 1, no quota other than the memory's. A
platform made from it by hand (every call twice as slow, every cold start 500 ms longer,
a store with a known latency and bandwidth) must be fitted exactly as it was made; so
must a platform that halves every instance's CPU quota (the local backend's cpu_scale),
which a speed factor fitted at 1 vCPU gets wrong at 3008 MB, and whose fixed part of the
init must not be scaled by a 512 MB instance's share. Then the profile must reach plan and
simulate: their figures are the fitted ones, and they say so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serveless.cli import app
from serveless.cost import vcpus
from serveless.errors import PlanError
from serveless.planning.fit import fit_platform, load_profile, target_overrides
from serveless.planning.simulate import Target, simulate
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
    # every call used a whole core: none was held by a quota, the memory's share stands
    assert f["cpu_quota"]["value"] == 1.0 and f["cpu_quota"]["calls"] == 0
    assert p["cpu_scaling"] == "speed"
    # the init is the calibration's process start and a small rest (no platform here)
    assert f["init_fixed_ms"]["cpu_part_ms"] == pytest.approx(
        cal["start_ms"] / f["cpu_factor"]["value"])
    assert abs(f["init_fixed_ms"]["value"]) < 100
    # a folder's reads are CPU work: its bandwidth is not a figure for the simulator
    over = target_overrides(p)
    assert set(over) == {"cpu_factor", "platform_init_ms", "init_fixed_ms"}
    assert over["platform_init_ms"] + over["init_fixed_ms"] == pytest.approx(
        f["platform_init_ms"]["value"])


def test_a_slower_platform_with_a_longer_start_is_fitted_as_it_was_made(cal, rows):
    base = fit_platform(rows, SPEC, cal, "/tmp/store")
    factor = base["figures"]["cpu_factor"]["value"]
    stages = stage_models(cal, SPEC["cuts"], SPEC["micro_batch"])
    start = cal["start_ms"] / factor
    slow = []
    for r in rows:  # cores twice as slow: every call's time and CPU doubled; a cold start:
        # its process start and load too, and 500 ms more
        load = float(stages[r["stage"]].load_ms(r["vcpus"], factor))
        slow.append({**r, "duration_ms": 2 * r["duration_ms"], "cpu_ms": 2 * r["cpu_ms"],
                     "init_ms": r["init_ms"] + start + load + 500 if r["cold"]
                     else r["init_ms"]})
    p = fit_platform(slow, SPEC, cal, "/tmp/store")
    f, b = p["figures"], base["figures"]
    assert f["cpu_factor"]["value"] == pytest.approx(factor / 2, rel=1e-9)
    assert f["cpu_quota"]["calls"] == 0 and p["cpu_scaling"] == "speed"
    assert f["init_fixed_ms"]["value"] == pytest.approx(b["init_fixed_ms"]["value"] + 500,
                                                        abs=1e-6)
    assert f["platform_init_ms"]["value"] == pytest.approx(
        b["platform_init_ms"]["value"] + start + 500, abs=1e-6)
    assert target_overrides(p)["platform_init_ms"] == pytest.approx(2 * start)


QUOTA, FIXED_MS = 0.5, 500.0


def quota_platform(cal: dict, memories: list[int], cpu: bool = True) -> list[dict]:
    """The log of a job on a platform that gives every instance QUOTA times the CPU its
    memory buys, at this machine's speed per core (the local backend's cpu_scale), and
    waits FIXED_MS more on every cold start: 3 records of 25 images per memory size, each
    call as long as the calibration's child at that share with the memory's threads (±3%
    of noise), using all of its quota. `cpu`: False for a log without CPU figures."""
    stages = stage_models(cal, SPEC["cuts"], SPEC["micro_batch"])
    out = []
    for m in memories:
        v = vcpus(m)
        share = v * QUOTA
        for rec in range(3):
            for k, st in enumerate(stages):
                cold = rec == 0
                ms = st.ms_per_record(25, share, 1.0, math.ceil(v))
                ms = (ms + (st.first_call_ms() / min(share, 1.0) if cold else 0.0)) * (
                    1 + 0.03 * math.sin(7 * len(out) + 1))
                init = (cal["start_ms"] / min(share, 1.0) + float(st.load_ms(share))
                        + FIXED_MS) if cold else 0.0
                out.append({"stage": k, "record": f"{m}-{rec}", "memory_mb": m,
                            "vcpus": round(v, 3), "cold": cold, "init_ms": init,
                            "duration_ms": ms, "cpu_ms": ms * share if cpu else None,
                            "images": 25, "read_ms": 0.0, "write_ms": 0.0,
                            "instance": f"stage{k}-{m}", "error": None})
    return out


def simulated_call_ms(cal: dict, over: dict, memory: int) -> tuple[float, float]:
    """(compute ms of stage 0's warm calls of 25 images, their mean, and init ms of its
    first cold start) at `memory` for both stages, as simulate predicts them on a 2-core
    local target with a profile's overrides, 6 records at C=2: two instances in flight."""
    plan = {"cuts": SPEC["cuts"], "memory": [memory, memory], "images_per_record": 25,
            "micro_batch": SPEC["micro_batch"], "concurrency": 2, "images": 150}
    rows = simulate(plan, cal, Target.make("local", cal, cores=2.0, **over)).rows
    warm = [r["compute_ms"] for r in rows if r["stage"] == 0 and not r["cold"]]
    cold = next(r for r in rows if r["stage"] == 0 and r["cold"])
    return sum(warm) / len(warm), cold["init_ms"]


def test_a_platform_that_halves_the_cpu_quota_is_fitted_as_a_quota(cal):
    """Calls at 1769 and 3008 MB whose CPU over duration × vCPUs is 0.5: the profile says
    quota, and the time at 3008 MB (0.85 vCPU of quota, 2 threads) is the calibration's at
    0.85, not its Amdahl time at 1.7 slowed by half; two such instances in flight use 1.7
    of 2 cores, not 3.4 (read as a speed, they shared the cores: bench_fit's 3008/768 MB
    configuration at C=2 simulated 19% over its measured cost on 2026-12-04)."""
    st = stage_models(cal, SPEC["cuts"], SPEC["micro_batch"])[0]
    truth = st.ms_per_record(25, vcpus(3008) * QUOTA, 1.0, 2)
    for memories in ([1769, 3008], [1769]):  # two shares, or one (the CPU tells)
        p = fit_platform(quota_platform(cal, memories), SPEC, cal, "/tmp/store")
        f = p["figures"]
        assert p["cpu_scaling"] == "quota", memories
        assert f["cpu_quota"]["value"] == pytest.approx(QUOTA, rel=1e-3)  # vcpus rounded
        assert f["cpu_quota"]["calls"] == 6 * len(memories)
        assert f["cpu_factor"]["value"] == pytest.approx(1.0, abs=0.04)
        over = target_overrides(p)
        assert over["cpu_quota"] == pytest.approx(QUOTA, rel=1e-3)
        ms, _ = simulated_call_ms(cal, over, 3008)
        assert ms == pytest.approx(truth, rel=0.04), memories
    # the same job at 1769 MB read as a speed (a log without CPU figures, as before):
    # right at 1769 MB, and 3008 MB's time off by the speed-up the quota never gives
    p = fit_platform(quota_platform(cal, [1769], cpu=False), SPEC, cal, "/tmp/store")
    assert p["cpu_scaling"] == "speed" and "cpu_quota" not in target_overrides(p)
    assert p["figures"]["cpu_factor"]["value"] == pytest.approx(QUOTA, rel=0.04)
    ms, _ = simulated_call_ms(cal, target_overrides(p), 3008)
    assert ms / truth > 1.3


def test_short_calls_that_ran_between_throttles_do_not_lift_the_quota(cal):
    """A quota is granted per 100 ms period: a call of one or two periods runs partly
    unthrottled (bench_fit's FC calls of ~100 ms used 0.86-0.93 of a core under a quota
    of 0.5). With long calls in the job, the quota and speed are theirs."""
    stage0 = stage_models(cal, SPEC["cuts"], SPEC["micro_batch"])[0]
    rows = []
    for r in quota_platform(cal, [1769]):
        if r["stage"] == 0:  # 75 images: calls of 2-3 s, held by the quota all along
            ms = stage0.ms_per_record(75, QUOTA, 1.0, 1) + (
                stage0.first_call_ms() / QUOTA if r["cold"] else 0.0)
            rows.append({**r, "images": 75, "duration_ms": ms, "cpu_ms": ms * QUOTA})
        else:  # ~75 ms each, using 0.9 of a core
            rows.append({**r, "cpu_ms": 0.9 * r["duration_ms"]})
    assert min(r["duration_ms"] for r in rows if r["stage"] == 0) > 1000
    f = fit_platform(rows, SPEC, cal, "/tmp/store")["figures"]
    assert f["cpu_quota"]["value"] == pytest.approx(QUOTA, rel=0.01)
    assert f["cpu_quota"]["calls"] == 3
    assert f["cpu_factor"]["value"] == pytest.approx(1.0, abs=0.05)


def test_the_fixed_part_of_a_cold_start_is_not_scaled_by_a_small_share(cal):
    """Cold starts at 1769 MB under half the quota with FIXED_MS of platform setup: a 512
    MB instance (0.14 vCPU of quota) starts in the calibration's process start and model
    load at its share plus FIXED_MS, not in the whole init at 1769 MB scaled by its share."""
    p = fit_platform(quota_platform(cal, [1769]), SPEC, cal, "/tmp/store")
    f = p["figures"]
    assert f["init_fixed_ms"]["value"] == pytest.approx(FIXED_MS, rel=0.05)
    over = target_overrides(p)
    share = vcpus(512) * QUOTA
    st = stage_models(cal, SPEC["cuts"], SPEC["micro_batch"])[0]
    truth = cal["start_ms"] / share + float(st.load_ms(share)) + FIXED_MS
    _, init = simulated_call_ms(cal, over, 512)
    assert init == pytest.approx(truth, rel=0.05)
    # the whole init at 1769 MB, scaled as one by the share (a version 1 profile), is far
    whole = f["platform_init_ms"]["value"] / QUOTA  # at 1769 MB: share 0.5
    assert whole / min(share, 1.0) + float(st.load_ms(share)) > 1.3 * truth


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
    assert out["target"]["platform_init_ms"] + out["target"]["init_fixed_ms"] == \
        pytest.approx(profile["figures"]["platform_init_ms"]["value"])
    assert out["figures"]["init_fixed_ms"]["kind"] == "fitted"
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
