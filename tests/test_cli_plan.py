"""`calibrate`, `plan`, `simulate`, `sweep --simulate` and `run --plan` as commands (issue
10): plans written with their presets and Pareto front, refused when nothing meets the
deadline or a stage exceeds its memory, labelled as simulated; any model calibrated,
planned and run by its plan, int8 too; every value whole at any terminal width."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
from plankit import synthetic_calibration, tiny_residual_model
from typer.testing import CliRunner

from serveless.cli import app
from serveless.driver.log import load_log
from serveless.errors import PlanError
from serveless.planning.calibrate import validate
from serveless.planning.plan import check_plan
from serveless.planning.simulate import SIMULATED
from serveless.store import Store

runner = CliRunner()


# -- plan and simulate ------------------------------------------------------------------------


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
    # every assumed Lambda figure says where it comes from; the one set here says so
    figures = out["figures"]
    assert figures["cpu_factor"] == {"value": 2, "kind": "set for this run",
                                     "source": "given on the command line or by the caller"}
    assert figures["platform_init_ms"]["kind"] == "a guess"
    assert "docs.aws.amazon.com" in figures["concurrency_limit"]["source"]
    assert out["driver_requests"]["put"] >= 2 and out["driver_store_ops"] > 0
    res = runner.invoke(app, ["simulate", "--plan", str(plan_file), "--platform-init-ms", "500"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "set for this run: platform_init_ms 500" in text
    assert "a guess: bandwidth_mb_s 80" in text and "simulated driver store requests" in text


def _write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# -- any model, calibrate and run --plan ---------------------------------------------------


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


@pytest.mark.e2e
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
    rows = load_log(Store(str(store)), "planned")
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


@pytest.mark.e2e
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


# -- sweep --simulate (Fig. 5) -----------------------------------------------------------------


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


# -- the tables at any width -------------------------------------------------------------------


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


def test_a_calibration_timed_on_the_cloud_platform_makes_its_cpu_factor_measured():
    """A calibration measured in a function on Lambda (calibrate --backend lithops with a
    cloud engine) is Lambda's own speed: simulate calls cpu_factor 1.0 measured, not a
    guess; one measured on Lithops' localhost engine, or here, leaves it a guess."""
    from serveless.planning.figures import figure_sources
    from serveless.planning.simulate import Target

    on = {"where": "backend", "backend": "lithops", "lithops_backend": "aws_lambda",
          "memory_mb": 1769, "cpu_model": "Intel(R) Xeon(R) Processor @ 2.50GHz"}
    cal = {**synthetic_calibration(), "measured_on": on}
    target = Target.make("lambda", cal)
    f = figure_sources(target, cal)["cpu_factor"]
    assert f["kind"] == "measured" and "aws_lambda at 1769 MB" in f["source"]
    for other in ({**on, "lithops_backend": "localhost"}, {**on, "backend": "local"},
                  {"where": "this machine"}):
        assert figure_sources(target, {**cal, "measured_on": other})["cpu_factor"][
            "kind"] == "a guess"
    assert figure_sources(Target.make("lambda", cal, cpu_factor=2.0), cal)["cpu_factor"][
        "kind"] == "set for this run"
