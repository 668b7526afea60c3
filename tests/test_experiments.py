"""The experiment commands (profile, baseline, sweep, memory-compare, report --out) end to end,
and every job an experiment makes keeps the model's input H×W (non-square too).

A tiny two-stage ONNX model and a few sample photos keep each command to seconds. Every
number a command prints in its markdown tables is recomputed here from the invocation logs
it was made from, with this file's own arithmetic, so a wrong aggregation fails the test.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import check_png, tables
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from serveless.cli import app
from serveless.cost import LAMBDA_GB_SECOND, LAMBDA_REQUEST, S3_GET, S3_PUT
from serveless.driver.log import load_log
from serveless.experiments import Setup, recommend_memory, time_whole_model
from serveless.model.graph import save_model
from serveless.store import Store

runner = CliRunner()


def tiny_model(path: Path) -> Path:
    """224×224 input (what stage 0 decodes to), conv → pool | conv → pool → fc → softmax."""
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[8, 8],
                         strides=[8, 8]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["fc"], transB=1),
        helper.make_node("Softmax", ["fc"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [init("w1", (8, 3, 8, 8)), init("b1", (8,)), init("w2", (16, 8, 3, 3)),
         init("b2", (16,)), init("w3", (10, 16)), init("b3", (10,))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    return {"root": root, "model": str(tiny_model(root / "tiny.onnx")),
            "store": str(root / "store")}


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def log(env, job: str) -> list[dict]:
    return load_log(Store(env["store"]), job)


def close(cell: str, value: float, digits: int) -> None:
    """A table cell printed with `digits` decimals equals value up to that rounding."""
    assert abs(float(cell) - value) <= 0.5 * 10**-digits + 1e-9, (cell, value)


def ok_rows(rows: list[dict], stage: int | None = None) -> list[dict]:
    return [r for r in rows if r["error"] is None and (stage is None or r["stage"] == stage)]


def span(rows: list[dict]) -> float:
    return (max(r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in rows)
            - min(r["started"] for r in rows))


def modeled(rows: list[dict]) -> tuple[float, float]:
    """(GB-s, USD) of a log with the published prices."""
    gb_s = sum(r["memory_mb"] / 1024 * r["billed_ms"] / 1000 for r in rows)
    usd = (gb_s * LAMBDA_GB_SECOND["x86_64"] + len(rows) * LAMBDA_REQUEST
           + sum(r["gets"] for r in rows) * S3_GET + sum(r["puts"] for r in rows) * S3_PUT)
    return gb_s, usd


def expected_memory(peak: float, step: int) -> int:
    return max(128, math.ceil(Fraction(str(peak)) * Fraction(11, 10) / step) * step)


# -- profile --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profiled(env):
    out = env["root"] / "profile"
    text = invoke("profile", "--model", env["model"], "--cuts", "p1", "--per-record", "4,8",
                  "--images", "8", "--store", env["store"], "--out", str(out))
    return out, text


@pytest.mark.e2e
def test_profile_table_png_and_recommendation_match_the_logs(env, profiled):
    out, text = profiled
    check_png(out / "profile.png")
    md = (out / "profile.md").read_text()
    measured, recommended = tables(md)[0], tables(md)[1]
    assert len(measured) == 2 * 2  # stages × sizes
    peaks: dict[int, float] = {}
    for row in measured:
        stage, size = int(row["stage"]), int(row["images per record"])
        rows = log(env, f"profile-{size}")
        mine = ok_rows(rows, stage)
        assert len(mine) == 1 and mine[0]["images"] in (size, None)
        assert {r["memory_mb"] for r in rows} == {1769}  # one CPU share (the default) for all
        assert int(row["invocations"]) == len(mine)
        peak = max(r["peak_mb"] for r in mine)
        close(row["peak MB"], peak, 1)
        close(row["duration s"], statistics.fmean(r["duration_ms"] for r in mine) / 1000, 3)
        peaks[stage] = max(peaks.get(stage, 0.0), peak)
    # one invocation at a time: no two invocations of a job overlap
    for size in (4, 8):
        rows = sorted(log(env, f"profile-{size}"), key=lambda r: r["started"])
        assert [r["stage"] for r in rows] == [0, 1]
        first_end = rows[0]["started"] + (rows[0]["init_ms"] + rows[0]["duration_ms"]) / 1000
        assert rows[1]["started"] >= first_end - 0.01
    data = json.loads((out / "profile.json").read_text())
    want = [expected_memory(peaks[k], 1) for k in (0, 1)]
    assert data["recommended_mb"] == want
    assert [int(r["recommended MB (1 MB steps)"]) for r in recommended] == want
    assert "--memory " + ",".join(map(str, want)) in text
    assert "Machine" in md and f"{os.cpu_count()} cores" in md and "onnxruntime" in md


def test_profile_refuses_a_pool_smaller_than_a_record(env):
    result = runner.invoke(app, ["profile", "--model", env["model"], "--cuts", "p1",
                                 "--per-record", "4,30", "--images", "6", "--store",
                                 env["store"], "--out", str(env["root"] / "bad")])
    assert result.exit_code == 2 and "at least 30 images" in result.output
    assert not (env["root"] / "bad" / "profile.md").exists()


def test_recommended_memory_rounding():
    assert recommend_memory(100.0) == 128  # never below Lambda's minimum
    assert recommend_memory(200.0) == 220  # 220.00000000000003 must not become 221
    assert recommend_memory(200.1) == 221
    assert recommend_memory(200.0, 64) == 256
    assert recommend_memory(1163.6, 64) == 1280  # 1279.96
    assert recommend_memory(1163.7, 64) == 1344  # 1280.07: just over a step
    assert recommend_memory(1163.7) == 1281
    assert recommend_memory(4000.0, 64) == 4416


def test_recommendation_takes_the_largest_peak_over_sizes_and_ignores_failures():
    from serveless.experiments import profile_from_logs

    def row(stage: int, peak: float | None, ms: float, error: dict | None = None) -> dict:
        return {"stage": stage, "record": "r", "peak_mb": peak, "duration_ms": ms,
                "memory_mb": 3008, "error": error}

    logs = {
        4: [row(0, 150.0, 100), row(1, 300.0, 10)],
        8: [row(0, None, 5, {"type": "OutOfMemory"}), row(0, 200.0, 300), row(0, 180.0, 100),
            row(1, 90.0, 30)],
    }
    for step, want in ((1, [220, 330]), (64, [256, 384])):
        p = profile_from_logs(logs, 2, step)
        assert p["recommended_mb"] == want
    cell = p["stages"][0]["sizes"]["8"]
    assert cell == {"invocations": 2, "failed": 1, "peak_mb": 200.0, "duration_s": 0.2}



def test_sweep_numbers_recompute_from_recorded_logs(recorded_job):
    """sweep_from_logs and its table on a recorded log (nothing run): wall time, GB-s and
    cost per concurrency from the rows, and oversubscription where c × vCPU > cores."""
    from serveless.experiments import sweep_from_logs, sweep_markdown
    from serveless.report.machine import machine_info

    store, job, rows = recorded_job
    cores = os.cpu_count() or 1
    # at 1769 MB (1 vCPU) each: within the cores, exactly all of them, more than there are
    levels = sorted({1, cores, 2 * cores})
    result = sweep_from_logs({c: rows for c in levels}, [1769, 1769], "x86_64")
    assert result["cores"] == cores and result["vcpus_per_function"] == pytest.approx(1.0)
    result.update({"model": "alexnet", "records": 4, "jobs": [job], "store": store.url,
                   "memory": [1769, 1769], "arch": "x86_64", "machine": machine_info()})
    md = sweep_markdown(result)
    (table,) = [t for t in tables(md) if t and "concurrency" in t[0]]
    assert [int(r["concurrency"]) for r in table] == levels
    gb_s, usd = modeled(rows)
    for row in table:
        close(row["wall s"], span(rows), 3)
        close(row["GB-s"], gb_s, 4)
        close(row["cost USD"], usd, 8)
        close(row["USD per 1M images"], usd / 100 * 1e6, 2)
        assert int(row["cold starts"]) == sum(bool(r["cold"]) for r in rows)
        over = int(row["concurrency"]) > cores
        assert row[f"oversubscribed (> {cores} cores)"] == ("**yes**" if over else "no")
    assert [p["oversubscribed"] for p in result["points"]] == [c > cores for c in levels]
    assert result["points"][-1]["oversubscribed"]
    assert "this machine's limit" in md and "Fig. 5" in md


def test_memory_compare_and_baseline_numbers_recompute_from_a_recorded_log(recorded_job):
    """Tables 1-2 and Fig. 4's table from a recorded log (nothing run): memory and peak per
    stage, time and cost per configuration and size, the pipeline's time per record
    against one process's."""
    from serveless.experiments import (
        baseline_from,
        baseline_markdown,
        memory_compare_from_logs,
        memory_compare_markdown,
    )
    from serveless.report.machine import machine_info

    store, job, rows = recorded_job
    m = memory_compare_from_logs({("memMin", 25): rows}, {"memMin": [1769, 1769]}, "x86_64")
    m.update({"model": "alexnet", "sizes": [25], "concurrency": 1, "store": store.url,
              "arch": "x86_64", "machine": machine_info()})
    t1, peaks, t2 = tables(memory_compare_markdown(m))
    assert [(r["configuration"], r["stage 0 MB"], r["stage 1 MB"]) for r in t1] == [
        ("memMin", "1769", "1769")]  # it ran at the sizes asked: no OOM note
    for k in (0, 1):
        close(peaks[0][f"stage {k} MB"], max(r["peak_mb"] for r in ok_rows(rows, k)), 1)
    (row,) = t2
    gb_s, usd = modeled(rows)
    assert (int(row["images per record"]), int(row["records"]), int(row["images"])) == (
        25, 4, 100)
    close(row["wall s"], span(rows), 3)
    close(row["GB-s"], gb_s, 4)
    close(row["cost USD"], usd, 8)
    assert int(row["OOM"]) == 0
    base = {"records": [{"images": 25, "seconds": 0.5}, {"images": 25, "seconds": 1.5}],
            "provider": "CPUExecutionProvider", "threads": 1, "provider_note": "as asked",
            "load_s": 0.25}
    b = baseline_from(rows, base, [25])
    b.update({"baseline": base, "model": "alexnet", "job": job, "store": store.url,
              "cuts": ["pool5"], "memory": [1769, 1769], "micro_batch": 25,
              "machine": machine_info()})
    (table,) = [t for t in tables(baseline_markdown(b)) if t and "records" in t[0]]
    (row,) = table
    per_record = {}
    for r in ok_rows(rows):
        per_record.setdefault(r["record"], []).append(r)
    assert int(row["images per record"]) == 25 and int(row["records"]) == len(per_record) == 4
    sums = [sum(r["duration_ms"] for r in rs) / 1000 for rs in per_record.values()]
    close(row["serverless s (sum of stages)"], statistics.fmean(sums), 3)
    close(row["serverless s (end to end)"],
          statistics.fmean(span(rs) for rs in per_record.values()), 3)
    close(row["one process s"], 1.0, 3)
    close(row["serverless / one process"], statistics.fmean(sums) / 1.0, 2)

# -- baseline -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_baseline_table_and_png(env):
    out = env["root"] / "baseline"
    invoke("baseline", "--model", env["model"], "--cuts", "p1", "--per-record", "4,8",
           "--images", "8", "--memory", "1769", "--store", env["store"], "--out", str(out),
           "--job", "bl")
    check_png(out / "baseline.png")
    md = (out / "baseline.md").read_text()
    data = json.loads((out / "baseline.json").read_text())
    assert data["baseline"]["provider"] in md
    rows = log(env, "bl")
    (table,) = [t for t in tables(md) if t and "images per record" in t[0]]
    assert [int(r["images per record"]) for r in table] == [4, 8]
    for row in table:
        size = int(row["images per record"])
        records = {r["record"] for r in ok_rows(rows, 0) if r["images"] == size}
        assert len(records) == int(row["records"]) == 1
        mine = [r for r in rows if r["record"] in records]
        assert {r["memory_mb"] for r in mine} == {1769}
        close(row["serverless s (sum of stages)"],
              sum(r["duration_ms"] for r in ok_rows(mine)) / 1000, 3)
        close(row["serverless s (end to end)"], span(mine), 3)
        one = [r["seconds"] for r in data["baseline"]["records"] if r["images"] == size]
        assert len(one) == 1 and one[0] > 0
        close(row["one process s"], one[0], 3)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_baseline_says_when_the_cuda_provider_cannot_run(env, monkeypatch):
    import onnxruntime as ort

    from serveless.experiments import baseline_session

    data = Path(env["model"]).read_bytes()
    sess, provider, why = baseline_session(data, 1)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert provider == "CPUExecutionProvider" and "not installed" in why
        # as if onnxruntime-gpu were installed on a machine without a usable GPU
        monkeypatch.setattr(ort, "get_available_providers",
                            lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
        sess, provider, why = baseline_session(data, 1)
        assert provider == "CPUExecutionProvider" and "CUDA" in why
    assert sess.get_providers()[0] == provider


# -- sweep ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_sweep_table_marks_oversubscription(env):
    out = env["root"] / "sweep"
    invoke("sweep", "--model", env["model"], "--cuts", "p1", "--concurrency", "1,2,4",
           "--images", "16", "--per-record", "4", "--store", env["store"], "--out", str(out))
    check_png(out / "sweep.png")
    md = (out / "sweep.md").read_text()
    (table,) = [t for t in tables(md) if t and "concurrency" in t[0]]
    cores = os.cpu_count() or 1
    assert [int(r["concurrency"]) for r in table] == [1, 2, 4]
    for row in table:
        c = int(row["concurrency"])
        rows = log(env, f"sweep-c{c}")
        assert len(ok_rows(rows)) == 4 * 2 and {r["memory_mb"] for r in rows} == {1769}
        close(row["wall s"], span(rows), 3)
        gb_s, usd = modeled(rows)
        close(row["GB-s"], gb_s, 4)
        close(row["cost USD"], usd, 8)
        close(row["USD per 1M images"], usd / 16 * 1e6, 2)
        over = c * 1769 / 1769 > cores
        assert row[f"oversubscribed (> {cores} cores)"] == ("**yes**" if over else "no")
        # never more invocations in flight than asked (10 ms of slack: `started` is rounded
        # to 1 ms and taken on the driver's clock, durations on the instance's)
        events = sorted([(r["started"], 1) for r in rows]
                        + [(r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 - 0.01, -1)
                           for r in rows])
        depth = peak_depth = 0
        for _, d in events:
            depth += d
            peak_depth = max(peak_depth, depth)
        assert peak_depth <= c
    data = json.loads((out / "sweep.json").read_text())
    assert [p["oversubscribed"] for p in data["points"]] == [
        c * 1769 / 1769 > cores for c in (1, 2, 4)]
    if any(p["oversubscribed"] for p in data["points"]):
        assert "this machine's limit" in md


# -- memory-compare -------------------------------------------------------------------------


@pytest.mark.e2e
def test_memory_compare_tables_match_the_logs(env, profiled):
    out = env["root"] / "memcmp"
    profile_json = profiled[0] / "profile.json"
    mem_min = json.loads(profile_json.read_text())["recommended_mb"]
    text = invoke("memory-compare", "--profile", str(profile_json), "--per-record", "8,4",
                  "--images", "8", "--store", env["store"], "--out", str(out))
    md = (out / "memory-compare.md").read_text()
    assert "Table 1" in text and "Table 2" in text
    check_png(out / "memory-compare.png")
    t1, peaks, t2 = tables(md)
    assert [r["configuration"] for r in t1] == ["memMax", "memMin"]
    assert [int(t1[0][f"stage {k} MB"]) for k in (0, 1)] == [3008, 3008]
    assert [int(t1[1][f"stage {k} MB"].split()[0]) for k in (0, 1)] == mem_min
    for row in peaks:
        cfg = row["configuration"].lower()
        rows = log(env, f"memcmp-{cfg}-8") + log(env, f"memcmp-{cfg}-4")
        for k in (0, 1):
            close(row[f"stage {k} MB"], max(r["peak_mb"] for r in ok_rows(rows, k)), 1)
    assert len(t2) == 4
    for row in t2:
        cfg, size = row["configuration"], int(row["images per record"])
        rows = log(env, f"memcmp-{cfg.lower()}-{size}")
        want_mem = [3008, 3008] if cfg == "memMax" else mem_min
        assert {(r["stage"], r["memory_mb"]) for r in rows} == {(0, want_mem[0]),
                                                                (1, want_mem[1])}
        assert int(row["records"]) == 8 // size
        assert int(row["images"]) == sum(r["images"] for r in ok_rows(rows, 0)) == 8
        close(row["wall s"], span(rows), 3)
        gb_s, usd = modeled(rows)
        close(row["GB-s"], gb_s, 4)
        close(row["cost USD"], usd, 8)


# -- report ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_report_md_embeds_pngs_and_matches_the_log(env, profiled):
    out = env["root"] / "report"
    invoke("report", "profile-4", "profile-8", "--store", env["store"], "--out", str(out))
    md = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 6  # per job: time and memory, cost, timeline
    assert (out / "report.html").read_text().count("<svg") == 6
    for name in images:
        check_png(out / name)
    for job, summary in zip(("profile-4", "profile-8"), [t for t in tables(md)
                                                        if t and "peak MB" in t[0]],
                            strict=True):
        rows = log(env, job)
        for row in summary:
            mine = [r for r in rows if r["stage"] == int(row["stage"])]
            assert int(row["calls"]) == len(mine)
            close(row["peak MB"], max(r["peak_mb"] for r in mine), 1)
            close(row["mean duration ms"], statistics.fmean(r["duration_ms"] for r in mine), 1)
            close(row["GB-s"], sum(r["memory_mb"] / 1024 * r["billed_ms"] / 1000
                                   for r in mine), 4)
    spec = json.loads((Path(env["store"]) / "profile-4" / "job.json").read_text())
    assert spec["model"] in md and "p1" in md
    assert "CPU:" in md and f"{os.cpu_count()} cores" in md
    for lib in ("python", "serveless", "onnxruntime", "numpy", "onnx"):
        assert f"{lib} " in md


# -- any model's input size ------------------------------------------------------------------


H, W = 40, 56


def _non_square_model():
    """Conv -> global average pool -> flatten -> softmax over 4 classes, input 3×40×56."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3))
                                .astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Softmax", ["f"], ["probabilities"], name="softmax")]
    graph = helper.make_graph(
        nodes, "nonsquare",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, H, W])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.e2e
def test_every_job_of_an_experiment_keeps_the_models_input_size(tmp_path, records_dir):
    path = save_model(_non_square_model(), tmp_path / "ns.onnx")
    setup = Setup(store=Store(str(tmp_path / "store")), model=str(path), cuts=[])
    first = setup.prepare("first", [512], records_dir)
    second = setup.prepare("second", [1024], records_dir)  # copied from the first
    assert first.input_hw == [H, W] and second.input_hw == [H, W]
    setup.run(second, concurrency=2)
    rows = load_log(setup.store, "second")
    assert rows and all(r["error"] is None for r in rows)
    whole = time_whole_model(str(path), sorted(records_dir.glob("*.tfrecord"))[:1], 8, 1)
    assert whole["records"][0]["images"] == 25
