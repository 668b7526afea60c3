"""The performance model the planner and the simulator share (planning/stagemodel.py and
the planner's vectorised planning/jobmodel.py, kept equal): speedup with vCPUs, a stage's
blocks and memory, the function's work around the model, batch time, a record's last
micro-batch; the planner's job model against the simulation, partial records included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from plankit import synthetic_calibration

from serveless.planning.simulate import Target
from serveless.planning.stagemodel import StageModel, speedup, stage_ranges

DATA = Path(__file__).parent / "data"


def test_speedup_is_proportional_below_one_vcpu_and_matches_the_measured_two():
    assert float(speedup(0.5, 1.6)) == pytest.approx(0.5)
    assert float(speedup(2.0, 1.6)) == pytest.approx(1.6)
    assert 1.6 < float(speedup(4.0, 1.6)) < 4.0


def test_stage_model_adds_blocks_and_grows_memory_with_micro_batch():
    cal = synthetic_calibration()
    assert stage_ranges(cal, ["b1"]) == [(0, 1), (2, 3)]
    small, big = StageModel(cal, 0, 1, 1), StageModel(cal, 0, 1, 32)
    assert big.peak_mb() > small.peak_mb()
    assert big.bytes_out_per_image == 150_000 and big.bytes_in_per_image == 100_000
    # micro-batch 32 amortises the per-call part: faster per image than batch 1
    assert float(big.ms_per_image(1.0)) < float(small.ms_per_image(1.0))


def test_stage_time_adds_the_function_work_around_the_model():
    """Input side (decode + record parsing, or the tensor read), the model, and the output
    side (tensor write, or predictions), from the calibration's measured paths."""
    cal = synthetic_calibration()
    s0, s1 = StageModel(cal, 0, 1, 16), StageModel(cal, 2, 3, 16)
    assert s0.input_ms_per_image() == pytest.approx(5.0 + 0.3)
    assert s0.output_ms_per_image() == pytest.approx(2.0 * 150_000 / 2**20)
    assert s1.input_ms_per_image() == pytest.approx(0.5 * 150_000 / 2**20)
    assert s1.output_ms_per_image() == pytest.approx(0.1)
    assert s0.first_call_ms() == pytest.approx(40.0 + 3.0 + 4.0)
    assert s1.first_call_ms() == pytest.approx(5.0 + 6.0)  # no decoders to import
    # up to 1 vCPU all of it shares the quota: the CPU work over the vCPUs
    cpu = (sum(s0._ms_at_batch(b) for b in s0.blocks) + s0.input_ms_per_image()
           + s0.output_ms_per_image())  # CPU work per image at 1 vCPU
    for v in (0.25, 0.6, 1.0):
        assert float(s0.ms_per_image(v)) == pytest.approx(cpu / v)
    # above, the input thread overlaps the model: never slower than the CPU work over v,
    # nor than the model plus the output side on the calling thread
    model = sum(s0._ms_at_batch(b) / float(speedup(2.0, b["speedup_2vcpu"]))
                for b in s0.blocks)
    assert float(s0.ms_per_image(2.0)) == pytest.approx(max(
        s0.input_ms_per_image(), model + s0.output_ms_per_image(),
        cpu / 2.0))
    # an older calibration without the measured paths: the model (and decode) alone
    old = {k: v for k, v in cal.items() if k not in ("record_ms_per_image", "write_ms_per_mb",
                                                    "read_ms_per_mb", "stage0_first_call_ms",
                                                    "predictions_ms_per_image")}
    assert StageModel(old, 2, 3, 16).input_ms_per_image() == 0.0
    assert StageModel(old, 0, 1, 16).first_call_ms() == pytest.approx(7.0)


def test_batch_time_follows_1_over_b_up_to_the_calibration_batch_and_no_further():
    """Between batch 1 and the calibration batch a block's time per image is a per-image
    part plus a per-call part over B; past it the 1/B law broke (a fully connected layer's
    weight reads overlap its arithmetic), so the calibration batch's figure holds."""
    cal = synthetic_calibration()  # block 0: 18 ms per image at batch 1, 12 at 16
    blk = cal["blocks"][0]

    def at(b: int, c: dict = cal) -> float:
        return StageModel(c, 0, 0, b)._ms_at_batch(blk)

    per_call = (18.0 - 12.0) / (1 - 1 / 16)
    assert at(1) == pytest.approx(18.0) and at(16) == pytest.approx(12.0)
    assert at(4) == pytest.approx(18.0 - per_call + per_call / 4)
    assert at(32) == pytest.approx(12.0) and at(64) == pytest.approx(12.0)
    # a calibration from before the batch was recorded was made at 16
    old = {k: v for k, v in cal.items() if k != "calibration_batch"}
    assert at(8, old) == pytest.approx(at(8)) and at(32, old) == pytest.approx(12.0)
    at32 = {**cal, "calibration_batch": 32}
    assert at(16, at32) > 12.0 and at(32, at32) == pytest.approx(12.0)


@pytest.mark.parametrize("target", ["lambda", "local"])
def test_planner_grid_times_equal_the_stage_model(target):
    """The planner's vectorised times (every stage × every memory at once) are the stage
    model's, which the simulator uses: one model, two implementations kept equal."""
    from serveless.planning.jobmodel import Model

    cal = synthetic_calibration()
    model = Model(cal, Target.make(target, cal), "x86_64", 97, 1000)
    for b in (1, 16):
        grid = model.ms_per_image(b)
        for (i, j), s in model.index.items():
            want = StageModel(cal, i, j, b).ms_per_image(model.v)
            np.testing.assert_allclose(grid[s], want, rtol=1e-12)
    for r in (100, 96, 7):
        grid = model.record_ms(r, 16)
        for (i, j), s in model.index.items():
            sm = StageModel(cal, i, j, 16)
            want = [sm.ms_per_record(r, float(v)) for v in model.v[::37]]
            np.testing.assert_allclose(grid[s][::37], want, rtol=1e-12)


def test_a_records_last_smaller_micro_batch_pays_a_whole_per_call_part():
    cal = synthetic_calibration()
    sm = StageModel(cal, 2, 3, 16)  # 4 + 2 ms per image at 16, 1.5 × that at batch 1
    at16, at4 = float(sm.ms_per_image(1.0)), float(StageModel(cal, 2, 3, 4).ms_per_image(1.0))
    assert at4 > at16
    assert sm.ms_per_record(96, 1.0) == pytest.approx(96 * at16)
    assert sm.ms_per_record(100, 1.0) == pytest.approx(96 * at16 + 4 * at4)
    assert sm.ms_per_record(100, 1.0) > 100 * at16


def _shapes(paper: list[str], last: str) -> list[tuple]:
    """(name, cuts, memory, images per record, concurrency, images): the 600-image job of
    issue 22, bench_simulator's six configurations (full records), and partial last
    records or fewer records than the concurrency."""
    return [
        ("600 images, records of 500, C=1", [last], [1769, 1769], 500, 1, 600),
        ("1 stage, 1769 MB, 100/rec, C=1", [], [1769], 100, 1, 400),
        ("1 stage, 3008 MB, 1000/rec, C=1", [], [3008], 1000, 1, 2000),
        ("2 stages, 1024 MB, 250/rec, C=2", [last], [1024, 1024], 250, 2, 1000),
        ("2 stages, 3008/768 MB, 500/rec, C=2", [last], [3008, 768], 500, 2, 1000),
        ("4 stages, memMin, 250/rec, C=2", paper, [2048, 1280, 1024, 768], 250, 2, 1000),
        ("4 stages, 512 MB + 768, 100/rec, C=1", paper, [512, 512, 512, 768], 100, 1, 400),
        ("4 records at C=8, the last of 50", [last], [1769, 1769], 100, 8, 350),
        ("one record smaller than a record", [last], [1769, 1769], 500, 4, 120),
        ("1050 images, records of 500, C=2", [last], [1769, 1769], 500, 2, 1050),
        ("600 images, records of 500, C=2, 4 stages", paper, [1024] * 4, 500, 2, 600),
        ("1600 images, records of 500, C=4, 4 stages", paper, [1024] * 4, 500, 4, 1600),
    ]


@pytest.mark.parametrize("target", ["local", "lambda"])
@pytest.mark.parametrize("which", ["synthetic", "alexnet"])
def test_the_planner_model_agrees_with_the_simulation_within_15_percent(target, which):
    """Issue 22: the planner priced a partial last record as a full one and let it share
    the cores all the way (the 600-image job in records of 500 at C=1: 21.4 s planned,
    13.3 s simulated, 13.7 s run). Both are deterministic given a calibration: the
    synthetic one and the AlexNet one recorded in tests/data. Wall and cost within 15%."""
    from plan_reference import predict

    from serveless.planning.calibrate import validate
    from serveless.planning.search import Candidate
    from serveless.planning.simulate import simulate

    if which == "synthetic":
        cal, paper, last = synthetic_calibration(), ["b0", "b1", "b2"], "b2"
    else:
        cal = validate(json.loads((DATA / "replay-calibration.json").read_text()))
        paper, last = ["pool1", "pool2", "pool5"], "pool5"
    tgt = Target.make(target, cal)
    seen = []
    for name, cuts, memory, per_record, conc, images in _shapes(paper, last):
        batch = min(32, per_record)
        wall, cost = predict(cal, Candidate(cuts, memory, per_record, batch, conc, 0.0, 0.0),
                             images, tgt, "x86_64")
        sim = simulate({"cuts": cuts, "memory": memory, "images_per_record": per_record,
                        "micro_batch": batch, "concurrency": conc, "images": images},
                       cal, tgt, keep_rows=False)
        seen.append(f"{name}: planned {wall:.2f} s ${cost:.6f}, simulated {sim.wall_s:.2f} s "
                    f"${sim.functions_cost:.6f}")
        assert wall == pytest.approx(sim.wall_s, rel=0.15), seen[-1]
        assert cost == pytest.approx(sim.functions_cost, rel=0.15), seen[-1]
    print("\n".join(seen))
    if target == "local":  # a partial record shares the cores for its share of the time
        small = {"cuts": [last], "memory": [1769, 1769], "images_per_record": 100,
                 "micro_batch": 32, "concurrency": 8, "images": 350}
        wall, _ = predict(cal, Candidate([last], [1769, 1769], 100, 32, 8, 0.0, 0.0), 350,
                          Target.make("local", cal, cores=2.0), "x86_64")
        sim = simulate(small, cal, Target.make("local", cal, cores=2.0), keep_rows=False)
        assert wall == pytest.approx(sim.wall_s, rel=0.05)
    # The gap left: two full records and a small one in one wave. The small one's chain
    # warms an instance per stage for one of them; the other's cold starts delay it until
    # it too may find one free, which the additive model cannot see. It errs long, not
    # short (AlexNet on Lambda: 25.8 s planned, 21.8 s simulated).
    plan = {"cuts": paper, "memory": [1024] * 4, "images_per_record": 500,
            "micro_batch": 32, "concurrency": 3, "images": 1050}
    wall, _ = predict(cal, Candidate(paper, [1024] * 4, 500, 32, 3, 0.0, 0.0), 1050, tgt,
                      "x86_64")
    sim = simulate(plan, cal, tgt, keep_rows=False)
    assert sim.wall_s * 0.99 <= wall <= sim.wall_s * 1.2
