"""The simulator (planning/simulate.py): it replays a recorded local job within tolerance,
shows Lambda's concurrency ramp, fails and bills timeouts, shares the cores between local
invocations in flight, runs local cold starts under the instance's CPU share, and counts
the driver's own store requests as a job's driver.json does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import run_cli
from plankit import synthetic_calibration

from serveless.cost import S3_PUT, bill, store_request_cost
from serveless.driver.log import load_driver_requests, load_log
from serveless.driver.requestmodel import driver_requests, log_segments
from serveless.planning.calibrate import validate
from serveless.planning.simulate import SIMULATED, Target, simulate
from serveless.planning.stagemodel import StageModel
from serveless.store import Store

DATA = Path(__file__).parent / "data"


def test_simulator_replays_a_recorded_local_job_within_tolerance():
    """tests/data: a measured local job (bench/record_replay.py) and the calibration made
    just before it on the same machine."""
    cal = validate(json.loads((DATA / "replay-calibration.json").read_text()))
    assert cal["write_ms_per_mb"] > 0 and cal["blocks"][0]["first_run_ms"] > 0  # timed paths
    rows = [json.loads(x) for x in (DATA / "replay-invocations.jsonl").read_text().splitlines()]
    ends = [r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in rows]
    measured_wall = max(ends) - min(r["started"] for r in rows)
    measured_cost = bill(rows)["total"].total
    plan = {"cuts": ["pool5"], "memory": [1769, 1769], "images_per_record": 25,
            "micro_batch": 25, "concurrency": 1, "images": 100}
    sim = simulate(plan, cal, Target.make("local", cal))
    assert sim.images == 100 and len(sim.rows) == len(rows)
    assert sum(r["cold"] for r in sim.rows) == sum(r["cold"] for r in rows) == 2
    assert sim.wall_s == pytest.approx(measured_wall, rel=0.15)
    # the functions' part; the driver's is its own field, checked against a job below
    assert sim.functions_cost == pytest.approx(measured_cost, rel=0.05)
    assert all(r["label"] == SIMULATED for r in sim.rows)


def test_log_segments_one_per_flush_period_with_calls_and_more_past_max_rows():
    assert log_segments([]) == 0
    assert log_segments([0.1, 1.9, 2.0, 2.5, 9.0]) == 3  # periods 0, 1 and 4
    assert log_segments([1.0] * 4001) == 3  # woken early at 2,000 rows waiting


def test_the_simulated_cost_includes_the_driver_requests_and_says_so():
    """A new job on S3: its records, stage models, job.json, log and the lease's renewals
    are the driver's; the JSON keeps them apart and the cost includes them."""
    cal = synthetic_calibration()
    plan = {"cuts": [], "memory": [2048], "images_per_record": 100, "micro_batch": 16,
            "concurrency": 1, "images": 1000}
    sim = simulate(plan, cal, Target.make("lambda"))
    out = sim.summary()
    d = out["driver_requests"]
    assert d["put"] >= 10 + 2 + int(sim.wall_s // 15)  # records, model files, renewals
    assert d["get"] >= 3 and d["delete"] >= 2  # the store probed twice (an object store)
    assert out["driver_store_ops"] == pytest.approx(store_request_cost(d))
    functions = sum(s["cost"] for s in out["per_stage"])
    assert out["cost"] == pytest.approx(functions + out["driver_store_ops"])
    reused = simulate(plan, cal, Target.make("lambda"), models_uploaded=False).summary()
    assert reused["driver_requests"]["put"] < d["put"]
    folder = {**cal, "store": {**cal["store"], "url": "/tmp/a-folder"}}
    local = simulate(plan, folder, Target.make("local", folder)).summary()["driver_requests"]
    assert local["get"] == d["get"] - 2  # a folder is not probed: no probe read twice


@pytest.mark.e2e
def test_simulated_driver_requests_match_what_a_small_local_job_counts(tmp_path, image_dir):
    """A job as a user runs it (60 images in class folders, records of 25, cut at pool5,
    C=1) and its simulation from the recorded calibration of that shape: every kind of
    request the driver makes counted alike. HEAD, LIST and GET do not depend on timing
    and must be equal. PUT and DELETE include the log's segments, one per 2 s period in
    which a call ended (and a join, and deletes, from two on), so they may differ by the
    periods between the simulated and the measured wall, plus one for where the edges
    fall, plus the join: here the job took 2.3-2.6 s and the simulation 1.8 s, 2 PUTs
    apart. Fed the job's own call ends and wall, the model must give driver.json exactly
    (+-1 PUT: the writer's period drifts by the time each flush takes)."""
    store = tmp_path / "store"
    proc = run_cli("run", "--input", str(image_dir), "--store", str(store), "--job", "j",
                   "--per-record", "25", "--cuts", "pool5", "--memory", "1769,1769",
                   "--concurrency", "1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    st = Store(str(store))
    measured = load_driver_requests(st, "j")
    assert st.exists("j/labels.json")
    rows = load_log(st, "j")
    t0 = min(r["started"] for r in rows)
    ends = [r["started"] - t0 + (r["init_ms"] + r["duration_ms"]) / 1000 for r in rows]
    cal = validate(json.loads((DATA / "replay-calibration.json").read_text()))
    files = len([k for k in st.find("models") if "/stage-" in k])
    modeled = driver_requests(records=3, stages=2, model_files=files, call_ends_s=ends,
                              wall_s=max(ends), object_store=False, labels=True)
    for kind in ("head", "list", "get"):
        assert modeled.get(kind, 0) == measured.get(kind, 0), (kind, modeled, measured)
    for kind in ("put", "delete"):
        assert abs(modeled.get(kind, 0) - measured.get(kind, 0)) <= 1, (modeled, measured)
    plan = {"cuts": ["pool5"], "memory": [1769, 1769], "images_per_record": 25,
            "micro_batch": 25, "concurrency": 1, "images": 60}
    sim = simulate(plan, cal, Target.make("local", cal), labels=True).summary()
    simulated = sim["driver_requests"]
    print(f"driver.json {measured}; simulated {simulated}; wall {max(ends):.2f} s, "
          f"simulated {sim['wall_s']:.2f} s")
    for kind in ("head", "list", "get"):
        assert simulated.get(kind, 0) == measured.get(kind, 0), (kind, simulated, measured)
    slack = math.ceil(abs(sim["wall_s"] - max(ends)) / 2) + 2
    for kind in ("put", "delete"):
        assert abs(simulated.get(kind, 0) - measured.get(kind, 0)) <= slack, (simulated, measured)
    assert sim["driver_store_ops"] == pytest.approx(store_request_cost(measured),
                                                    abs=slack * S3_PUT)


def test_lambda_ramp_shows_in_a_5000_way_job():
    cal = synthetic_calibration()
    plan = {"cuts": [], "memory": [2048], "images_per_record": 100, "micro_batch": 16,
            "concurrency": 5000, "images": 500_000}
    ramped = simulate(plan, cal, Target.make("lambda", concurrency_limit=10_000),
                      keep_rows=False)
    free = simulate(plan, cal, Target.make("lambda", concurrency_limit=10_000,
                                           ramp_per_10s=None), keep_rows=False)
    assert free.throttles == 0 and ramped.throttles > 0
    # 5,000 environments need 4 more 10 s steps after the first 1,000
    assert ramped.wall_s >= free.wall_s + 20 and ramped.wall_s > 3 * free.wall_s
    assert ramped.images == free.images == 500_000
    # the default account limit (1,000 at a time) holds it back too
    capped = simulate(plan, cal, Target.make("lambda"), keep_rows=False)
    assert capped.wall_s > free.wall_s + 20 and capped.throttles > 0


def test_timeout_fails_records_and_is_billed_at_900_s():
    cal = synthetic_calibration()
    plan = {"cuts": [], "memory": [128], "images_per_record": 5000, "micro_batch": 1,
            "concurrency": 2, "images": 5000}
    sim = simulate(plan, cal, Target.make("lambda"), retries=1)
    assert sim.timeouts == 2 and sim.failed_records == 1 and sim.images == 0
    assert all(r["init_ms"] + r["duration_ms"] == pytest.approx(900_000) for r in sim.rows)
    # locally too, with the cores shared: the call ends at the timeout, billed up to it
    local = simulate({**plan, "memory": [3008], "images": 10_000}, cal,
                     Target.make("local", cal, cores=2.0, timeout_s=5.0), retries=1)
    assert local.timeouts == 4 and local.failed_records == 2 and local.images == 0
    assert all(r["init_ms"] + r["duration_ms"] == pytest.approx(5000) for r in local.rows)
    assert local.wall_s == pytest.approx(10.0 + 0.2, abs=0.01)  # a try, the backoff, a try


def test_local_simulation_shares_the_cores_between_invocations_in_flight():
    """Two 3008 MB (1.7 vCPU) invocations on 2 cores: both run at 2/3.4 of their share for
    as long as both handlers run (processor sharing), not one at full speed and the
    other slowed; alone, one runs at its full share. Their cold starts run on one thread
    each, 1 vCPU of the 2 cores: not slowed."""
    cal = synthetic_calibration()
    tgt = Target.make("local", cal, cores=2.0)
    plan = {"cuts": [], "memory": [3008], "images_per_record": 100, "micro_batch": 16,
            "concurrency": 2, "images": 200}
    pair = simulate(plan, cal, tgt).rows
    alone = simulate({**plan, "concurrency": 1, "images": 100}, cal, tgt).rows[0]
    assert len(pair) == 2 and pair[0]["started"] == pair[1]["started"] == 0.0
    a, b = ((r["init_ms"], r["duration_ms"]) for r in pair)
    assert a == pytest.approx(b, abs=2e-3)  # symmetric: same work, same share
    slow = 2 * 3008 / 1769 / 2
    assert a[0] == pytest.approx(alone["init_ms"], rel=1e-6)
    assert a[1] == pytest.approx(alone["duration_ms"] * slow, rel=1e-6)
    # within the cores (2 × 0.58 vCPU at 1024 MB) nothing is slowed
    small = simulate({**plan, "memory": [1024]}, cal, tgt).rows
    one = simulate({**plan, "memory": [1024], "concurrency": 1, "images": 100}, cal, tgt).rows
    assert small[0]["duration_ms"] == pytest.approx(one[0]["duration_ms"], rel=1e-9)


def test_local_cold_start_runs_under_the_instance_cpu_share():
    """Locally the process start (calibrated at 1 vCPU) runs in the instance's cgroup, so
    at 512 MB it takes 1769/512 as long; Lambda's platform init is an assumption, unscaled."""
    cal = synthetic_calibration()
    plan = {"cuts": [], "memory": [512], "images_per_record": 100, "micro_batch": 16,
            "concurrency": 1, "images": 100}
    load = float(StageModel(cal, 0, 3, 16).load_ms(512 / 1769))
    local = simulate(plan, cal, Target.make("local", cal)).rows[0]
    assert local["init_ms"] == pytest.approx(cal["start_ms"] * 1769 / 512 + load, rel=1e-6)
    lam = simulate(plan, cal, Target.make("lambda", bandwidth_mb_s=1e9, request_ms=0.0)).rows[0]
    assert lam["init_ms"] == pytest.approx(800.0 + load, rel=1e-6)


def test_a_short_call_does_not_wait_for_a_longer_calls_later_write():
    """S3's request rate is per second per prefix: two calls started together write in
    their own seconds. (The rate was a queue of the next free instant, booked as calls
    started: the 50-image call's write waited 1.5 s for the 100-image call's.)"""
    cal = synthetic_calibration()
    plan = {"cuts": ["b2"], "memory": [1769, 1769], "images_per_record": 100,
            "micro_batch": 32, "concurrency": 2, "images": 150}
    rows = simulate(plan, cal, Target.make("lambda")).rows
    short, long_ = (next(r for r in rows if r["stage"] == 0 and r["images"] == n)
                    for n in (50, 100))
    assert short["write_ms"] < long_["write_ms"]
    # a handful of requests a second is far below S3's limits: nobody waits at all
    tgt = Target.make("lambda")
    free = simulate(plan, cal, Target.make("lambda", s3_get_per_s=None, s3_put_per_s=None))
    assert [r["duration_ms"] for r in free.rows] == [r["duration_ms"] for r in rows]
    assert tgt.s3_put_per_s == 3500.0


def test_every_assumed_lambda_figure_names_its_source_or_says_it_is_a_guess():
    """figures.py covers every Lambda figure of Target (not the ones that describe this
    machine or the driver), each from AWS's documentation with its page, or a guess."""
    from dataclasses import fields

    from serveless.planning.figures import LAMBDA_FIGURES, figure_sources

    this_machine = {"name", "cores", "start_cpu_bound", "store_in_cpu", "object_store",
                    "throttle_backoff_max_s", "profile"}  # profile: where fitted ones came from
    assert {f.name for f in fields(Target)} - this_machine == set(LAMBDA_FIGURES)
    for name, (kind, what) in LAMBDA_FIGURES.items():
        assert kind in ("AWS documentation", "a guess"), name
        assert kind == "a guess" or "docs.aws.amazon.com" in what, name
    assert figure_sources(Target.make("local", synthetic_calibration())) == {}
    lam = figure_sources(Target.make("lambda", bandwidth_mb_s=40.0))
    assert lam["bandwidth_mb_s"]["kind"] == "set for this run"
    assert lam["timeout_s"] == {"value": 900.0, "kind": "AWS documentation",
                                "source": LAMBDA_FIGURES["timeout_s"][1]}
