"""Calibration (planning/calibrate.py, probe.py): blocks timed in the model's order, each on
its predecessor's output; a residual model never cut inside its skip; a calibration with
a bad measured path refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from plankit import synthetic_calibration

from serveless.errors import CalibrationError
from serveless.planning.calibrate import validate


def test_calibration_times_blocks_in_order_each_on_its_predecessors_output():
    """A block timed alone, back to back, keeps small weights in the cache that a stage's
    other layers evict: the timing passes run the blocks as the model does."""
    from serveless.planning.probe import _chain_times

    class Block:
        def __init__(self, k: int, out: tuple[int, ...]):
            self.k, self.out, self.seen = k, out, []

        def run(self, _names, feeds):
            (x,) = feeds.values()
            self.seen.append(x)
            return [np.full((x.shape[0], *self.out), self.k + 1, np.float32)]

    samples = [np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32),
               np.full((4, 5), -1, np.float32)]
    blocks = [Block(0, (2,)), Block(1, (7,)), Block(2, (1,))]
    kept = [(b, "x", x) for b, x in zip(blocks, samples, strict=True)]
    times = _chain_times(kept, 2, 3, min_s=60.0)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert [len(b.seen) for b in blocks] == [3, 3, 3]  # max_runs passes, min_s not reached
    assert all(x.shape[0] == 2 for b in blocks for x in b.seen)  # the batch asked for
    assert all((x == 1).all() for x in blocks[1].seen)  # block 0's output
    # block 1's output is not block 2's input (shape): block 2 runs on its own sample
    assert all((x == -1).all() and x.shape == (2, 5) for x in blocks[2].seen)
    assert [len(b.seen) for b in blocks] == [3, 3, 3]
    _chain_times(kept, 1, 5)  # min_s 0: one pass
    assert [len(b.seen) for b in blocks] == [4, 4, 4]


def test_calibration_of_a_residual_model_never_cuts_the_skip(tiny_plan):
    root, plan = tiny_plan
    cal = validate(json.loads((root / "cal.json").read_text()))
    assert "conv2" not in cal["boundaries"] and "relu1" in cal["boundaries"]
    assert len(cal["blocks"]) == len(cal["boundaries"]) + 1
    assert cal["decode_ms_per_image"] > 0 and cal["store"]["read_mb_s"] > 0
    assert all(b["ms_per_image"] > 0 for b in cal["blocks"][:2])
    # the function's own work around the model, timed on its code under the 1 vCPU quota
    for key in ("record_ms_per_image", "write_ms_per_mb", "read_ms_per_mb",
                "predictions_ms_per_image"):
        assert 0 < cal[key] < 50, key
    assert len(cal["start_ms_runs"]) == 3 and cal["start_ms"] in cal["start_ms_runs"]
    assert all(b["first_run_ms"] >= 0 for b in cal["blocks"])


def test_a_calibration_with_a_bad_measured_path_is_refused():
    cal = synthetic_calibration()
    cal["write_ms_per_mb"] = -1.0
    with pytest.raises(CalibrationError, match="write_ms_per_mb"):
        validate(cal)
    cal["write_ms_per_mb"] = "fast"
    with pytest.raises(CalibrationError, match="write_ms_per_mb"):
        validate(cal)
