"""The planner's search (planning/search.py) against brute force over every plan
(tests/support/plan_reference.py), by deadline and by budget, at 1 MB steps; and the
checks a plan must pass before it runs (planning/plan.py)."""

from __future__ import annotations

import copy

import pytest
from plan_reference import brute_force, predict
from plankit import synthetic_calibration

from serveless.errors import PlanError
from serveless.planning.plan import check_plan
from serveless.planning.search import search
from serveless.planning.simulate import Target


@pytest.mark.parametrize("target", ["lambda", "local"])
def test_planner_optimum_equals_brute_force(target):
    cal = synthetic_calibration()
    tgt = Target.make(target, cal)
    kw = {"per_record": [50, 200], "micro_batch": [1, 16], "concurrency": [1, 4]}
    step = 1536  # 8 sizes per stage: brute force stays small
    fastest = search(cal, 2000, tgt, "x86_64", deadline_s=1e9, memory_step=step, **kw).fastest
    for deadline in (fastest.wall_s * 1.2, fastest.wall_s * 3, fastest.wall_s * 30):
        got = search(cal, 2000, tgt, "x86_64", deadline_s=deadline, memory_step=step, **kw).best
        ref = brute_force(cal, 2000, tgt, "x86_64", deadline, step, **kw)
        assert got is not None and ref is not None
        assert got.cost == pytest.approx(ref.cost, rel=1e-12)
        assert got.wall_s <= deadline


def _memory_bound_calibration() -> dict:
    """Two blocks where cutting pays: a compute block that gains nothing past 1 vCPU and a
    light block whose 3 GB of weights force a large memory size."""
    cal = synthetic_calibration(2)
    cal["blocks"][0].update(speedup_2vcpu=1.0, bytes_out_per_image=20_000)
    cal["blocks"][1].update(weights_mb=3000.0, load_peak_mb=3000.0,
                            model_bytes=300 * 2**20)
    return cal


@pytest.mark.parametrize("target", ["lambda", "local"])
def test_planner_optimum_equals_brute_force_at_1_mb_steps(target):
    """The default grid (1 MB): brute force tries every memory of every stage (10,113 each)
    of every cut set; the planner must find the same cheapest plan, cut or not."""
    cal = _memory_bound_calibration()
    tgt = Target.make(target, cal)
    kw = {"per_record": [200], "micro_batch": [16], "concurrency": [1, 4]}
    fastest = search(cal, 2000, tgt, "x86_64", deadline_s=1e9, **kw).fastest
    seen = set()
    for deadline in (fastest.wall_s * 1.02, fastest.wall_s * 1.2, fastest.wall_s * 30):
        got = search(cal, 2000, tgt, "x86_64", deadline_s=deadline, **kw).best
        ref = brute_force(cal, 2000, tgt, "x86_64", deadline, 1, **kw)
        assert got is not None and ref is not None
        assert got.cost == pytest.approx(ref.cost, rel=1e-12)
        assert (got.cuts, got.memory) == (ref.cuts, ref.memory)
        assert got.wall_s <= deadline
        assert predict(cal, got, 2000, tgt, "x86_64") == pytest.approx((got.wall_s, got.cost))
        seen.add((len(got.cuts), got.memory[0] % 64 != 0))
    assert (1, True) in seen  # a cut plan off the old 64 MB grid was among the answers
    cheapest = search(cal, 2000, tgt, "x86_64", deadline_s=1e9, **kw).best.cost
    assert cheapest < fastest.cost
    for budget in (cheapest * 1.01, (cheapest + fastest.cost) / 2):
        got = search(cal, 2000, tgt, "x86_64", budget=budget, **kw).best
        ref = brute_force(cal, 2000, tgt, "x86_64", None, 1, **kw, budget=budget)
        assert got is not None and ref is not None and got.cost <= budget
        assert got.wall_s == pytest.approx(ref.wall_s, rel=1e-12)


def test_budget_mode_is_fastest_within_budget():
    cal = synthetic_calibration()
    tgt = Target.make("lambda")
    kw = {"per_record": [100], "micro_batch": [16], "concurrency": [1, 8]}
    cheap = search(cal, 2000, tgt, deadline_s=1e9, memory_step=256, **kw).best
    res = search(cal, 2000, tgt, budget=cheap.cost * 1.5, memory_step=256, **kw)
    assert res.best.cost <= cheap.cost * 1.5
    assert res.best.wall_s <= cheap.wall_s


def test_planner_searches_no_micro_batch_past_what_was_measured():
    """Past the calibration batch (and the default 32) a larger micro-batch gains nothing
    in the model, only memory: the planner does not offer it unless asked."""
    from serveless.planning.jobmodel import MICRO_BATCHES
    from serveless.planning.search import _configs

    cal = synthetic_calibration()  # measured at 16: up to the default 32 is searched
    tgt = Target.make("lambda", cal)
    res = search(cal, 5000, tgt, "x86_64", deadline_s=1e9, front=False)
    upto32 = _configs(5000, 1000, None, [b for b in MICRO_BATCHES if b <= 32], None)
    assert 64 in MICRO_BATCHES and res.configs == len(upto32)
    assert res.best.micro_batch <= 32 and res.fastest.micro_batch <= 32
    asked = search(cal, 5000, tgt, "x86_64", deadline_s=1e9, micro_batch=[64], front=False)
    assert asked.best.micro_batch == 64


def test_plan_with_a_record_over_the_timeout_is_refused(tiny_plan):
    _root, plan = tiny_plan
    bad = copy.deepcopy(plan)
    bad["images_per_record"] = 10_000_000
    with pytest.raises(PlanError, match="over the 900 s timeout"):
        check_plan(bad)
