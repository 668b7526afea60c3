"""`serveless report JOB --json`: every field recomputes from the job's log and predictions."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import onnx
import pytest
from helpers import rows_of, tiny_conv_classifier

from serveless.backends.local import LocalBackend
from serveless.cost import LAMBDA_GB_SECOND, LAMBDA_REQUEST, S3_GET, S3_PUT
from serveless.data.records import Example, write_record
from serveless.data.samples import synthetic_photo
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.store import Store

pytestmark = pytest.mark.e2e


def _jpeg(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    synthetic_photo(seed, (320, 240)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, records_dir):
    """'labelled': the shared records plus one with a broken image; 'unlabelled': no labels."""
    root = tmp_path_factory.mktemp("report")
    model = root / "tiny.onnx"
    onnx.save(tiny_conv_classifier(), model)
    labelled = root / "labelled"
    shutil.copytree(records_dir, labelled)
    with open(labelled / "extra.tfrecord", "wb") as f:
        write_record(f, [Example(_jpeg(1), "a.jpg", 2), Example(_jpeg(2)[:900], "cut.jpg", 1),
                         Example(_jpeg(3), "b.jpg", 0)])
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    with open(unlabelled / "u.tfrecord", "wb") as f:
        write_record(f, [Example(_jpeg(i), f"u{i}.jpg") for i in range(4)])
    store = Store(str(root / "store"))
    with LocalBackend() as backend:
        for job, recs in (("labelled", labelled), ("unlabelled", unlabelled)):
            spec = prepare_job(store, job, str(model), cuts="r1", memory="1769,1024",
                               records=str(recs))
            run_job(store, spec, backend, concurrency=2, progress=False)
    return store


def _report(store: Store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serveless.cli", "report", *args, "--json",
                           "--store", store.root], capture_output=True, text=True, timeout=120)


def test_report_json_fields_recompute_from_the_log(jobs):
    store = jobs
    out = _report(store, "labelled", "--arch", "arm64")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)  # stdout holds the JSON and nothing else
    log = load_log(store, "labelled")
    preds = rows_of(store, "labelled")

    images = sum(r["images"] for r in log if r["stage"] == 0)
    assert got["images"] == images == 63
    assert got["failed_images"] == sum(r["image_errors"] for r in log if r["stage"] == 0) == 1
    wall = max(r["started"] + (r["init_ms"] + r["duration_ms"]) / 1000 for r in log) - min(
        r["started"] for r in log)
    assert got["wall_s"] == pytest.approx(wall, abs=1e-3)
    assert got["images_per_s"] == pytest.approx(images / wall, rel=1e-3)
    gb_s = sum(r["memory_mb"] / 1024 * r["billed_ms"] / 1000 for r in log)
    assert got["gb_s"] == pytest.approx(gb_s, rel=1e-12)
    driver = json.loads(store.get_bytes("labelled/driver.json"))  # the driver's own requests
    assert driver.get("put", 0) > 0
    cost = (gb_s * LAMBDA_GB_SECOND["arm64"] + len(log) * LAMBDA_REQUEST
            + sum(r["gets"] + r.get("heads", 0) for r in log) * S3_GET
            + sum(r["puts"] for r in log) * S3_PUT
            + (driver.get("get", 0) + driver.get("head", 0)) * S3_GET
            + (driver.get("put", 0) + driver.get("list", 0)) * S3_PUT)
    assert got["cost_usd"] == pytest.approx(cost, rel=1e-12)
    assert got["cost_per_million"] == pytest.approx(cost / images * 1e6, rel=1e-12)
    served = [p for p in preds if p["error"] is None and p["label"] is not None]
    assert len(served) == 62
    top1 = sum(p["top5"][0] == p["label"] for p in served) / len(served)
    top5 = sum(p["label"] in p["top5"] for p in served) / len(served)
    assert got["accuracy_top1"] == pytest.approx(top1)
    assert got["accuracy_top5"] == pytest.approx(top5)
    assert 0.0 <= top1 <= top5 <= 1.0
    assert got["quantize"] is None and got["arch"] == "arm64"

    assert [s["stage"] for s in got["stages"]] == [0, 1]
    for st, memory in zip(got["stages"], (1769, 1024), strict=True):
        rows = [r for r in log if r["stage"] == st["stage"]]
        assert st["memory_mb"] == memory and st["invocations"] == len(rows) == 4
        assert st["cold"] == sum(bool(r["cold"]) for r in rows) >= 1
        assert st["mean_duration_ms"] == pytest.approx(
            sum(r["duration_ms"] for r in rows) / len(rows))
        assert st["peak_mb"] == max(r["peak_mb"] for r in rows)
        assert st["gb_s"] == pytest.approx(
            sum(r["memory_mb"] / 1024 * r["billed_ms"] / 1000 for r in rows))
    assert math.isclose(sum(s["gb_s"] for s in got["stages"]), got["gb_s"])


def test_report_json_without_labels_and_for_several_jobs(jobs):
    out = _report(jobs, "unlabelled", "labelled")
    assert out.returncode == 0, out.stderr
    both = json.loads(out.stdout)
    assert [j["job"] for j in both] == ["unlabelled", "labelled"]
    assert both[0]["images"] == 4 and both[0]["failed_images"] == 0
    assert both[0]["accuracy_top1"] is None and both[0]["accuracy_top5"] is None


def test_report_json_user_mistakes_are_one_line(jobs):
    for args in (("nope",), ("labelled", "--arch", "sparc")):
        out = _report(jobs, *args)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.startswith("error:") and len(out.stderr.strip().splitlines()) == 1
