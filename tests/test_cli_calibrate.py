"""`serveless calibrate` as a command (cli/calibrate.py): --backend, --backend-option and
--memory, what it prints of where the calibration was measured, and the mistakes a user
makes, each one line and exit status 2. (What it measures is test_planning_calibrate.py.)"""

from __future__ import annotations

import json
import sys

import pytest
from plankit import tiny_residual_model
from typer.testing import CliRunner

from serveless.cli import app

runner = CliRunner()


def _said(res) -> str:
    return " ".join(res.output.split())


@pytest.mark.parametrize("args, said", [
    (["--memory", "1024"], "--memory and --backend-option need --backend"),
    (["--backend-option", "cpu_scale=0.5"], "--memory and --backend-option need --backend"),
    (["--backend", "lambda"], "unknown backend 'lambda'; available: local, lithops"),
    (["--backend", "local", "--backend-option", "cpu=2"], "unknown local backend option(s) cpu"),
    (["--backend", "local", "--memory", "64"], "--memory"),
])
def test_calibrate_refuses_bad_options_in_one_line(tmp_path, args, said):
    res = runner.invoke(app, ["calibrate", "alexnet", "--store", str(tmp_path / "s"), *args])
    assert res.exit_code == 2, res.output
    assert said in _said(res)
    assert "Traceback" not in res.output and not (tmp_path / "s" / "calibration").exists()


def test_calibrate_without_lithops_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "serveless.backends.lithops", None)  # import fails
    res = runner.invoke(app, ["calibrate", "alexnet", "--store", str(tmp_path / "s"),
                              "--backend", "lithops"])
    assert res.exit_code == 2 and "pip install lithops" in _said(res), res.output


@pytest.mark.e2e
def test_calibrate_on_the_local_backend_at_a_memory_and_plan_say_where(tmp_path):
    """At 1024 MB (0.58 vCPU, a cgroup quota) the CPU figures are brought to 1 vCPU; the
    file, calibrate's own output and plan's all say where it was measured."""
    model = tiny_residual_model(tmp_path / "m.onnx")
    out = tmp_path / "cal.json"
    res = runner.invoke(app, ["calibrate", str(model), "--backend", "local", "--memory", "1024",
                              "--store", str(tmp_path / "store"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    said = _said(res)
    assert "calibration call on the local backend at 1024 MB (0.58 vCPUs)" in said
    assert "calibration measured in a function on the local backend at 1024 MB" in said
    m = json.loads(out.read_text())["measured_on"]
    assert (m["backend"], m["memory_mb"], m["vcpus"]) == ("local", 1024, 0.579)
    assert m["scaled_to_1_vcpu"] == (pytest.approx(1024 / 1769) if m["cpu_share_enforced"]
                                     else 1.0)
    res = runner.invoke(app, ["plan", str(model), "--images", "60", "--deadline", "3600",
                              "--target", "local", "--calibration", str(out), "--out",
                              str(tmp_path / "plan.json"), "--memory-step", "512"])
    assert res.exit_code == 0, res.output
    assert "calibration measured in a function on the local backend at 1024 MB" in _said(res)
