"""`serveless report` from what the store holds alone, on a job recorded in tests/data (its
real invocation log, with job.json and prediction rows made to match; nothing is run):
the summary printed again, `--json`, and `--out`'s report.md with its tables, plots and
machine. Every number is recomputed here from the log rows, with this file's arithmetic."""

from __future__ import annotations

import json
import os
import re
import statistics

import pytest
from helpers import check_png, rows_of, tables
from typer.testing import CliRunner

from serveless.cli import app
from serveless.cost import LAMBDA_GB_SECOND, LAMBDA_REQUEST, S3_GET, S3_PUT

runner = CliRunner()


def _span(rows: list[dict]) -> float:
    return (max(r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in rows)
            - min(r["started"] for r in rows))


def _gb_s(rows: list[dict]) -> float:
    return sum(r["memory_mb"] / 1024 * r["billed_ms"] / 1000 for r in rows)


def _accuracy_line(store, job: str) -> str:
    preds = rows_of(store, job)
    top1 = sum(p["top5"][0] == p["label"] for p in preds) / len(preds)
    top5 = sum(p["label"] in p["top5"] for p in preds) / len(preds)
    return f"accuracy on {len(preds)} labelled images: top-1 {top1:.2%}, top-5 {top5:.2%}"


def test_report_out_writes_tables_plots_and_machine_from_the_log(recorded_job, tmp_path):
    store, job, rows = recorded_job
    out = tmp_path / "report"
    res = runner.invoke(app, ["report", job, "--store", store.root, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'report.md'} and {out / 'report.html'}" in " ".join(res.output.split())
    md = (out / "report.md").read_text()
    assert md.startswith(f"# serveless report: {job}") and f"## Job `{job}`" in md
    (spec,) = [t for t in tables(md) if t and "job.json" in t[0]]
    fields = {r["job.json"]: r["value"] for r in spec}
    assert fields["model"] == "`alexnet`" and fields["cuts"] == "pool5"
    assert fields["stages"] == "2" and fields["memory MB per stage"] == "1769/1769"
    assert fields["records"] == "4" and fields["precision"] == "fp32"
    assert (f"100 images; 8 invocations (0 failed); first start to last end "
            f"{_span(rows):.2f} s = {100 / _span(rows):.2f} images/s.") in md
    (stages,) = [t for t in tables(md) if t and "peak MB" in t[0]]
    assert [int(r["stage"]) for r in stages] == [0, 1]
    for row in stages:
        mine = [r for r in rows if r["stage"] == int(row["stage"])]
        assert int(row["calls"]) == len(mine) == 4
        assert int(row["cold"]) == sum(bool(r["cold"]) for r in mine)
        assert row["memory MB"] == "1769" and int(row["failed"]) == 0
        assert float(row["peak MB"]) == pytest.approx(max(r["peak_mb"] for r in mine), abs=0.05)
        assert float(row["mean duration ms"]) == pytest.approx(
            statistics.fmean(r["duration_ms"] for r in mine), abs=0.05)
        assert float(row["GB-s"]) == pytest.approx(_gb_s(mine), abs=5e-5)
    assert f"Total: 100 images, {_gb_s(rows):.4f} GB-s" in md and "Failed images: 0." in md
    assert _accuracy_line(store, job) + " (the built-in AlexNet's weights are untrained" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images == [f"{job}-stages.png", f"{job}-costs.png", f"{job}-timeline.png"]
    for name in images:
        check_png(out / name)
    assert "CPU:" in md and f"{os.cpu_count()} cores" in md
    for lib in ("python", "serveless", "onnxruntime", "numpy"):
        assert f"{lib} " in md


def test_report_prints_the_summary_again_from_the_log(recorded_job):
    store, job, rows = recorded_job
    res = runner.invoke(app, ["report", job, "--store", store.root])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert text.startswith("100 images")
    assert f"total {_gb_s(rows):,.2f} GB-s" in text and "per 1M images" in text
    assert _accuracy_line(store, job) in text
    res = runner.invoke(app, ["report", "nosuch", "--store", store.root])
    assert res.exit_code == 2 and "no invocation log for job 'nosuch'" in res.output


def test_report_json_recomputes_from_the_recorded_log(recorded_job):
    store, job, rows = recorded_job
    res = runner.invoke(app, ["report", job, "--store", store.root, "--json", "--arch",
                              "arm64"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["images"] == sum(r["images"] for r in rows if r["stage"] == 0) == 100
    assert got["failed_images"] == 0 and got["arch"] == "arm64"
    assert got["wall_s"] == pytest.approx(_span(rows), abs=1e-3)
    gb_s = _gb_s(rows)
    assert got["gb_s"] == pytest.approx(gb_s, rel=1e-12)
    cost = (gb_s * LAMBDA_GB_SECOND["arm64"] + len(rows) * LAMBDA_REQUEST
            + sum(r["gets"] + r.get("heads", 0) for r in rows) * S3_GET
            + sum(r["puts"] for r in rows) * S3_PUT)  # no driver.json: no driver requests
    assert got["cost_usd"] == pytest.approx(cost, rel=1e-12)
    assert got["cost_per_million"] == pytest.approx(cost / 100 * 1e6, rel=1e-12)
    preds = rows_of(store, job)
    assert got["labelled_images"] == 100
    assert got["accuracy_top1"] == pytest.approx(
        sum(p["top5"][0] == p["label"] for p in preds) / 100)
    assert [s["invocations"] for s in got["stages"]] == [4, 4]
    assert got["job"] == job and got["quantize"] is None
