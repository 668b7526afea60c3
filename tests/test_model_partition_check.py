"""partition() itself refuses stages that do not reproduce the model (issue 25: skipping
the check inside partition(), or raising its tolerance from 1e-4 to 1e-1, passed)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_conv_classifier
from onnx import numpy_helper

from serveless.errors import PartitionError
from serveless.model import partition as part


def _perturbed_split(delta: float):
    """split() whose last stage has its weights moved by `delta`: a wrong stage."""
    real = part.split

    def split(model, cuts):
        stages = real(model, cuts)
        for init in stages[-1].graph.initializer:
            if init.name == "w2":
                w = numpy_helper.to_array(init).copy()
                w[:, 0] += np.float32(delta)  # one class's logit: the probabilities move
                init.CopyFrom(numpy_helper.from_array(w, "w2"))
        return stages

    return split


def test_partition_refuses_a_split_that_differs_from_the_model(monkeypatch):
    model = tiny_conv_classifier()
    good = part.partition(model, ["r1"])  # the true split passes
    assert len(good) == 2
    monkeypatch.setattr(part, "split", _perturbed_split(0.5))
    with pytest.raises(PartitionError, match="chained stages differ from the whole model"):
        part.partition(model, ["r1"])


def test_partition_refuses_a_difference_between_1e_4_and_1e_1(monkeypatch):
    model = tiny_conv_classifier()
    for delta in np.geomspace(1e-4, 10.0, 26):  # the smallest wrong weight that shows
        diff = part.check_equivalence(model, _perturbed_split(float(delta))(model, ["r1"]),
                                      atol=1.0)  # measured, not refused
        if diff > 1e-3:
            break
    assert 1e-4 < diff < 1e-1, diff  # refused at 1e-4; a check at 1e-1 would let it through
    monkeypatch.setattr(part, "split", _perturbed_split(float(delta)))
    with pytest.raises(PartitionError):
        part.partition(model, ["r1"])
