"""The performance model the planner and the simulator share (planning/stagemodel.py and
the planner's vectorised planning/jobmodel.py, kept equal): speedup with vCPUs, a stage's
blocks and memory, the function's work around the model, batch time, a record's last
micro-batch."""

from __future__ import annotations

import numpy as np
import pytest
from plankit import synthetic_calibration

from serveless.planning.simulate import Target
from serveless.planning.stagemodel import StageModel, speedup, stage_ranges


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
