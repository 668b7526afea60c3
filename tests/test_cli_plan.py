"""Calibrate, plan, simulate, run --plan (issue 10)."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from plan_reference import brute_force, predict
from typer.testing import CliRunner

from serveless.cli import app
from serveless.cost import bill
from serveless.errors import CalibrationError, PlanError
from serveless.planning.calibrate import CALIBRATION_KIND, validate
from serveless.planning.plan import check_plan
from serveless.planning.search import search
from serveless.planning.simulate import SIMULATED, Target, simulate
from serveless.planning.stagemodel import StageModel, speedup, stage_ranges

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def synthetic_calibration(blocks: int = 4) -> dict:
    """A made-up 4-block model: heavy early blocks with big outputs, a heavy classifier."""
    ms = [12.0, 6.0, 4.0, 2.0][:blocks]
    weights = [5.0, 20.0, 40.0, 250.0][:blocks]
    out = [600_000, 150_000, 40_000, 260][:blocks]
    return {
        "kind": CALIBRATION_KIND, "version": 1, "model": "synthetic", "input_hw": [224, 224],
        "boundaries": [f"b{k}" for k in range(blocks - 1)],
        "blocks": [{"index": k, "end": f"b{k}", "ms_per_image_b1": ms[k] * 1.5,
                    "ms_per_image": ms[k], "speedup_2vcpu": 1.2 + 0.2 * k,
                    "weights_mb": weights[k], "act_mb_base": 2.0, "act_mb_per_image": 1.5,
                    "bytes_out_per_image": out[k], "load_ms": weights[k],
                    "model_bytes": int(weights[k] * 2**20), "load_peak_mb": weights[k] * 1.2,
                    "first_run_ms": 3.0 + k}
                   for k in range(blocks)],
        "input_bytes_per_image": 100_000, "decode_ms_per_image": 5.0, "runtime_mb": 70.0,
        "start_ms": 300.0, "load_ms_fixed": 5.0, "load_ms_per_mb": 1.0,
        "store": {"read_mb_s": 500.0, "write_mb_s": 500.0, "request_ms": 1.0},
        "calibration_batch": 16, "stage0_first_call_ms": 40.0, "record_ms_per_image": 0.3,
        "write_ms_per_mb": 2.0, "read_ms_per_mb": 0.5, "predictions_ms_per_image": 0.1,
    }


def tiny_residual_model(path: Path) -> Path:
    """Conv -> ReLU -> [Conv + skip] -> ReLU -> GAP -> Gemm -> Softmax, 3×32×32 input."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32),
                                       name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv2", "relu1"], ["add"]),
        helper.make_node("Relu", ["add"], ["relu2"]),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny-residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 8, 3, 3), init("b2", 8),
         init("w3", 10, 8), init("b3", 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


# -- the performance model ----------------------------------------------------------------


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


# -- the planner -----------------------------------------------------------------------------


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


def test_deadline_below_fastest_plan_is_refused(tmp_path):
    cal_file = tmp_path / "cal.json"
    cal_file.write_text(json.dumps(synthetic_calibration()))
    res = runner.invoke(app, ["plan", "synthetic", "--images", "100000", "--deadline", "0.5",
                              "--calibration", str(cal_file), "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # the error console may wrap
    assert "fastest achievable is" in text and "within 0.5 s" in text
    assert not (tmp_path / "p.json").exists()


def test_plan_command_writes_plan_with_presets_and_pareto(tmp_path):
    cal_file = tmp_path / "cal.json"
    cal_file.write_text(json.dumps(synthetic_calibration()))
    out = tmp_path / "plan.json"
    res = runner.invoke(app, ["plan", "synthetic", "--images", "20000", "--deadline", "300",
                              "--calibration", str(cal_file), "--out", str(out),
                              "--memory-step", "256"])
    assert res.exit_code == 0, res.output
    plan = json.loads(out.read_text())
    assert plan["predicted"]["wall_s"] <= 300 and plan["request"]["memory_step"] == 256
    text = " ".join(res.output.split())
    assert "simulated on lambda" in text and "fastest" in text
    assert out.with_suffix(".pareto.png").stat().st_size > 0
    check_plan(plan)  # the planner never proposes a plan run --plan would refuse


# -- the simulator ---------------------------------------------------------------------------


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
    assert sim.cost == pytest.approx(measured_cost, rel=0.05)
    assert all(r["label"] == SIMULATED for r in sim.rows)


def test_a_calibration_with_a_bad_measured_path_is_refused():
    cal = synthetic_calibration()
    cal["write_ms_per_mb"] = -1.0
    with pytest.raises(CalibrationError, match="write_ms_per_mb"):
        validate(cal)
    cal["write_ms_per_mb"] = "fast"
    with pytest.raises(CalibrationError, match="write_ms_per_mb"):
        validate(cal)


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


def test_simulate_command_json_is_labelled(tmp_path):
    cal = synthetic_calibration()
    plan_file = tmp_path / "plan.json"
    res = runner.invoke(app, ["plan", "synthetic", "--images", "5000", "--deadline", "600",
                              "--calibration", _write(tmp_path / "c.json", cal), "--out",
                              str(plan_file)])
    assert res.exit_code == 0, res.output
    assert json.loads(plan_file.read_text())["request"]["memory_step"] == 1  # the default
    assert "memory step 1 MB" in " ".join(res.output.split())
    res = runner.invoke(app, ["simulate", "--plan", str(plan_file), "--json",
                              "--cpu-factor", "2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["label"] == SIMULATED and out["cpu_factor"] == 2
    assert out["images"] == 5000 and Path(out["timeline"]).stat().st_size > 0


def _write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# -- any model, calibrate and run --plan ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
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


def test_plan_round_trips_into_run_plan(tiny_plan, records_dir, tmp_path, monkeypatch):
    root, plan = tiny_plan
    store = tmp_path / "store"
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    res = runner.invoke(app, ["run", "--plan", str(root / "plan.json"), "--records",
                              str(records_dir), "--store", str(store), "--job", "planned"])
    assert res.exit_code == 0, res.output
    assert not list(temp.glob("serveless-plan-*")), "the repacked records were left behind"
    spec = json.loads((store / "planned" / "job.json").read_text())
    assert spec["cuts"] == plan["cuts"] and spec["micro_batch"] == plan["micro_batch"]
    assert spec["model"] == plan["model"]
    rows = [json.loads(x) for x in (store / "planned" / "invocations.jsonl").read_text()
            .splitlines()]
    per = plan["images_per_record"]
    assert len(spec["records"]) == math.ceil(60 / per)  # repacked to the plan's size
    assert {r["memory_mb"] for r in rows if r["stage"] == 0} == {plan["memory"][0]}


def test_plan_with_a_stage_over_its_memory_is_refused_before_any_invocation(
        tiny_plan, records_dir, tmp_path):
    root, plan = tiny_plan
    bad = copy.deepcopy(plan)
    bad["calibration"]["blocks"][0]["weights_mb"] = 4000.0
    bad["calibration"]["blocks"][0]["load_peak_mb"] = 4000.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(PlanError, match="stage 0: predicted peak"):
        check_plan(bad)
    store = tmp_path / "store"
    res = runner.invoke(app, ["run", "--plan", str(path), "--records", str(records_dir),
                              "--store", str(store), "--job", "refused"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "stage 0" in text and f"exceeds its memory {plan['memory'][0]} MB" in text
    assert not (store / "refused").exists()


def test_plan_with_a_record_over_the_timeout_is_refused(tiny_plan):
    _root, plan = tiny_plan
    bad = copy.deepcopy(plan)
    bad["images_per_record"] = 10_000_000
    with pytest.raises(PlanError, match="over the 900 s timeout"):
        check_plan(bad)


def test_calibration_defaults_to_the_store_where_plan_finds_it(tmp_path):
    model = tiny_residual_model(tmp_path / "m.onnx")
    store = tmp_path / "store"
    res = runner.invoke(app, ["calibrate", str(model), "--store", str(store)])
    assert res.exit_code == 0, res.output
    assert (store / "calibration" / "m.json").is_file()
    res = runner.invoke(app, ["plan", str(model), "--images", "1000", "--deadline", "600",
                              "--store", str(store), "--out", str(tmp_path / "p.json"),
                              "--memory-step", "512"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["plan", "alexnet", "--images", "1000", "--deadline", "600",
                              "--store", str(store), "--out", str(tmp_path / "q.json")])
    assert res.exit_code == 2 and "serveless calibrate alexnet" in " ".join(res.output.split())


def test_sweep_simulate_writes_labelled_figure_and_table(tmp_path):
    cal = _write(tmp_path / "c.json", synthetic_calibration())
    out = tmp_path / "fig5"
    res = runner.invoke(app, ["sweep", "--simulate", "--target", "lambda", "--images", "20000",
                              "--per-record", "100", "--concurrency", "1,8,64,1000",
                              "--cuts", "b1", "--memory", "1769", "--calibration", cal,
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "sweep.json").read_text())
    assert data["label"] == SIMULATED and data["paper_gpu_s_100k"] == 902.0
    walls = [p["wall_s"] for p in data["points"]]
    assert [p["concurrency"] for p in data["points"]] == [1, 8, 64, 1000]
    assert walls[0] > walls[1] > walls[2] and walls[3] <= walls[2]  # 200 records: flat past 200
    assert "simulated" in (out / "sweep.md").read_text() and (out / "sweep.png").is_file()


def test_plan_quantize_int8_calibrates_int8_blocks_and_runs_quantized(
        tiny_plan, records_dir, tmp_path):
    """calibrate --quantize int8 times the int8 blocks (QDQ nodes in what it timed);
    plan --quantize int8 records it; run --plan runs the job quantized."""
    root, fp32_plan = tiny_plan
    model = root / "tiny.onnx"
    cal_file = tmp_path / "cal-int8.json"
    res = runner.invoke(app, ["calibrate", str(model), "--quantize", "int8", "--out",
                              str(cal_file), "--store", str(tmp_path / "cstore")])
    assert res.exit_code == 0, res.output
    cal = validate(json.loads(cal_file.read_text()))
    fp32 = fp32_plan["calibration"]
    assert cal["quantize"] == "int8" and fp32.get("quantize") is None
    assert cal["blocks"][0]["qdq_nodes"] > 0 and fp32["blocks"][0]["qdq_nodes"] == 0
    # planning fp32 on an int8 calibration (or the reverse) is refused
    res = runner.invoke(app, ["plan", str(model), "--images", "60", "--deadline", "3600",
                              "--calibration", str(cal_file), "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "calibrate with the same --quantize" in " ".join(
        res.output.split())
    plan_file = tmp_path / "plan-int8.json"
    res = runner.invoke(app, ["plan", str(model), "--images", "60", "--deadline", "3600",
                              "--target", "local", "--max-concurrency", "2", "--quantize",
                              "int8", "--calibration", str(cal_file), "--out", str(plan_file),
                              "--memory-step", "256"])
    assert res.exit_code == 0, res.output
    plan = json.loads(plan_file.read_text())
    assert plan["quantize"] == "int8" and "chosen plan (int8)" in res.output
    store = tmp_path / "store"
    res = runner.invoke(app, ["run", "--plan", str(plan_file), "--records", str(records_dir),
                              "--store", str(store), "--job", "q"])
    assert res.exit_code == 0, res.output
    spec = json.loads((store / "q" / "job.json").read_text())
    assert spec["precision"] == "int8" and spec["cuts"] == plan["cuts"]
    res = runner.invoke(app, ["run", "--plan", str(root / "plan.json"), "--records",
                              str(records_dir), "--store", str(store), "--job", "q2",
                              "--quantize", "int8"])  # a fp32 plan asked to run int8
    assert res.exit_code == 2 and "differs from the plan's (fp32)" in " ".join(res.output.split())
    assert not (store / "q2").exists()


def test_sweep_simulate_draws_references_apart(tmp_path, monkeypatch):
    """Fig. 5: the paper's GPU time, the paper's points (only from a file: the project
    records none) and measured local points are each labelled, in the JSON and the table."""
    monkeypatch.chdir(tmp_path)  # no measured sweep under ./serveless-experiments yet
    cal = _write(tmp_path / "c.json", synthetic_calibration())
    args = ["sweep", "--simulate", "--target", "lambda", "--images", "100000",
            "--concurrency", "1,2,4,8,16,32,64,128,256,512,1000", "--cuts", "b1",
            "--memory", "1769", "--calibration", cal]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "bare")])
    assert res.exit_code == 0, res.output
    bare = json.loads((tmp_path / "bare" / "sweep.json").read_text())
    ref = bare["references"]
    assert ref["paper_gpu_s"]["wall_s"] == pytest.approx(902.0)
    assert ref["paper_points"]["points"] == [] and ref["measured_local"]["points"] == []
    md = (tmp_path / "bare" / "sweep.md").read_text()
    assert "not recorded in this project" in md and "902 s per 100,000 images" in md
    assert len(bare["points"]) == 11 and bare["precision"] == "fp32"
    # a measured sweep where `sweep` writes it is found; the paper's points come from a file
    measured = tmp_path / "serveless-experiments" / "sweep" / "sweep.json"
    measured.parent.mkdir(parents=True)
    measured.write_text(json.dumps({"points": [
        {"concurrency": 1, "wall_s": 40.5, "per_million": 0.61, "images": 400},
        {"concurrency": 2, "wall_s": 22.25, "per_million": 0.63, "images": 400}]}))
    paper = _write(tmp_path / "paper.json", [{"concurrency": 10, "wall_s": 1234.5}])
    res = runner.invoke(app, [*args, "--paper-points", paper, "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "f" / "sweep.json").read_text())
    ref = data["references"]
    assert [p["wall_s"] for p in ref["measured_local"]["points"]] == [40.5, 22.25]
    assert ref["paper_points"]["points"] == [{"concurrency": 10, "wall_s": 1234.5}]
    legend = data["legend"]
    assert len(set(legend)) == len(legend) == 6  # every series drawn and labelled apart
    assert sum("(simulated)" in x for x in legend) == 2
    assert any("paper's GPU" in x for x in legend) and any("paper's reported" in x
                                                             for x in legend)
    assert sum("measured" in x for x in legend) == 2
    md = (tmp_path / "f" / "sweep.md").read_text()
    assert "| 2 | 22.25 | 0.630 | 400 |" in md and "| 10 | 1,234.50 | - | - |" in md
    assert "measured on this machine: 2 points" in md
    bad = _write(tmp_path / "bad.json", [{"concurrency": "ten"}])
    res = runner.invoke(app, [*args, "--paper-points", bad, "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "--paper-points: point 0" in " ".join(res.output.split())


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


@pytest.mark.parametrize("width", [40, 80, 100, 160])
def test_simulated_plans_fit_the_terminal_with_every_value_whole(monkeypatch, width):
    """`plan` and `simulate` print their table whole where it fits, else in two halves, else
    a line per plan: at 80 columns the one wide table used to cut every number ('0.5…')."""
    import io

    from rich.console import Console

    from serveless.cli import plan as plan_cli

    out = io.StringIO()
    monkeypatch.setattr(plan_cli, "console", Console(file=out, width=width,
                                                     force_terminal=False))
    summary = {"wall_s": 41773.71, "cost": 0.5026, "per_million": 0.5031, "cold_starts": 128,
               "throttles": 0}
    rows = [("chosen", {"cuts": [], "memory": [698], "images_per_record": 5000,
                        "micro_batch": 32, "concurrency": 128}, summary),
            ("memMax", {"cuts": ["pool1", "pool2", "pool5"], "memory": [3008] * 4,
                        "images_per_record": 5000, "micro_batch": 32, "concurrency": 128},
             {**summary, "wall_s": 260.04, "per_million": 1.2913})]
    plan_cli._print_sims(rows, "simulated on lambda")
    text = out.getvalue()
    assert "…" not in text and "simulated" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width, text
    tokens = set(text.replace(",", " ").split()) | set(text.split())
    for value in ("(whole model)", "pool1,pool2,pool5", "3008/3008/3008/3008", "698", "5000",
                  "41,773.7", "260.0", "0.5026", "0.503", "1.291", "128"):
        assert value in tokens or value in text.replace("\n", " "), (value, text)
    if width >= 160:
        assert text.count("chosen") == 1  # one table
    elif width == 80:
        assert text.count("chosen") == 2  # the plans, then what the simulation found


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
