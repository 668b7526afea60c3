"""`serveless jobs`: list, show, clean and delete the jobs of a store (issue 12), and the
rule `jobs delete` follows for the stage models jobs share (driver/jobs.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import snapshot
from typer.testing import CliRunner

from serveless.cli import app
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.spec import JobSpec
from serveless.store import Store

runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def calls(job: Path) -> int:
    """One call per record and stage: what a finished job's log holds."""
    spec = json.loads((job / "job.json").read_text())
    return len(spec["records"]) * (len(spec["cuts"]) + 1)


@pytest.fixture()
def three_jobs(tmp_path, done_store, tiny, records_dir) -> Path:
    """A store with a done, a partial (never run) and a failed job (a corrupt record)."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(done_store, store)
    prepare_job(Store(str(store)), "partial", str(tiny), cuts="flat", records=str(records_dir))
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(records_dir / "00001.tfrecord", one)
    prepare_job(Store(str(store)), "failed", str(tiny), records=str(one), retries=0)
    # a corrupt user file is refused before the job starts (issue 11); one that rots in the
    # store after its check fails at run time
    copy = store / "failed" / "records" / "00001.tfrecord"
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x40
    copy.write_bytes(bytes(data))
    res = run("run", "--job", "failed", "--store", str(store))
    assert res.exit_code == 1, res.output
    return store


@pytest.mark.e2e
def test_jobs_list_and_show(three_jobs):
    res = run("jobs", "--store", str(three_jobs))
    assert res.exit_code == 0, res.output
    states = dict(re.findall(r"^\s+(done|partial|failed)\s+(\w+)", res.output, re.M))
    assert states == {"done": "done", "partial": "partial", "failed": "failed"}, res.output
    assert re.search(r"^\s+done\s+done\s+3/3\s+60\s+0\s+\d\.\d{6}", res.output, re.M)
    assert re.search(r"^\s+partial\s+partial\s+0/3\s+0\s", res.output, re.M)
    res = run("jobs", "show", "failed", "--store", str(three_jobs), "--json")
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert shown["state"] == "failed" and "CRC" in shown["failed_records"]["00001"]
    res = run("jobs", "show", "nosuch", "--store", str(three_jobs))
    assert res.exit_code == 2 and "no job 'nosuch'" in res.output


@pytest.mark.e2e
def test_jobs_clean_keeps_predictions(three_jobs):
    job = three_jobs / "done"
    assert (job / "stage-0").exists()
    preds = snapshot(job / "predictions")
    res = run("jobs", "clean", "done", "--store", str(three_jobs))
    assert res.exit_code == 0 and "MB freed" in res.output, res.output
    assert not list(job.glob("stage-*")) and snapshot(job / "predictions") == preds
    assert len(load_log(Store(str(three_jobs)), "done")) == calls(job)  # the log is kept
    res = run("jobs", "--store", str(three_jobs))
    assert re.search(r"^\s+done\s+done\s+3/3", res.output, re.M)  # still done


@pytest.mark.e2e
def test_jobs_delete_asks_first(three_jobs):
    res = run("jobs", "delete", "partial", "--store", str(three_jobs), input="n\n")
    assert res.exit_code == 1 and (three_jobs / "partial").exists()
    res = run("jobs", "delete", "partial", "--store", str(three_jobs), input="y\n")
    assert res.exit_code == 0 and not (three_jobs / "partial").exists()
    res = run("jobs", "delete", "failed", "--store", str(three_jobs), "--yes")
    assert res.exit_code == 0 and not (three_jobs / "failed").exists()
    assert (three_jobs / "done" / "job.json").exists()


@pytest.mark.e2e
def test_jobs_delete_frees_stage_models_no_other_job_uses(three_jobs):
    """Stage models are shared by the jobs of one model and cuts: deleting a job deletes
    them with it once no job left uses them (--keep-models keeps them), never before."""
    st = Store(str(three_jobs))
    models = {j: JobSpec.load(st, j).models for j in ("done", "partial", "failed")}
    assert models["done"] == models["partial"] != models["failed"]
    assert all((three_jobs / m / "manifest.json").exists() for m in models.values())
    res = run("jobs", "delete", "partial", "--store", str(three_jobs), "--yes")
    assert res.exit_code == 0 and f"kept {models['done']}: other jobs use it" in res.output
    assert (three_jobs / models["done"] / "manifest.json").exists()
    res = run("jobs", "delete", "failed", "--store", str(three_jobs), "--yes")
    assert res.exit_code == 0 and f"deleted {models['failed']}, used by no other job" in (
        res.output)
    assert not (three_jobs / models["failed"]).exists()
    res = run("jobs", "delete", "done", "--store", str(three_jobs), "--yes", "--keep-models")
    assert res.exit_code == 0 and "models/" not in res.output, res.output
    assert (three_jobs / models["done"] / "manifest.json").exists()


def test_a_job_json_names_only_models_prefixes_for_deletion():
    """job.json is read from the store: what `jobs delete` follows must be a models/ folder."""
    from serveless.driver.jobs import shared_models

    def spec(models: str, cache: str | None = None) -> JobSpec:
        s = JobSpec(job="j", model="m", cuts=[], memory=[1769], records=[])
        s.models, s.quantize = models, {"cache": cache} if cache else None
        return s

    assert shared_models(spec("models/ab12", "models/int8-cd34")) == [
        "models/ab12", "models/int8-cd34"]
    for bad in ("", "models", "models/", "models/..", "models/a/b", "../models/x", "done",
                "/models/x", "models/."):
        assert shared_models(spec(bad)) == [], bad


def test_jobs_list_show_and_clean_a_recorded_job(recorded_job):
    """`jobs` on a store's job.json, log and predictions alone (a recorded job: nothing
    run): its state, records, images and cost as the log prices them; a missing
    predictions object makes it partial; clean removes intermediates only."""
    import datetime as dt

    from serveless.cost import LAMBDA_GB_SECOND, LAMBDA_REQUEST, S3_GET, S3_PUT

    store, job, rows = recorded_job
    gb_s = sum(r["memory_mb"] / 1024 * r["billed_ms"] / 1000 for r in rows)
    cost = (gb_s * LAMBDA_GB_SECOND["x86_64"] + len(rows) * LAMBDA_REQUEST
            + sum(r["gets"] + r.get("heads", 0) for r in rows) * S3_GET
            + sum(r["puts"] for r in rows) * S3_PUT)
    when = dt.datetime.fromtimestamp(max(r["started"] for r in rows), dt.UTC)
    res = run("jobs", "--store", store.root)
    assert res.exit_code == 0, res.output
    assert re.search(rf"^\s*{job}\s+done\s+4/4\s+100\s+0\s+{cost:.6f}\s+"
                     rf"{cost / 100 * 1e6:.2f}\s+{when:%Y-%m-%d %H:%M}", res.output, re.M), (
        res.output)
    res = run("jobs", "show", job, "--store", store.root, "--json")
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert (shown["state"], shown["records"], shown["records_done"], shown["images"]) == (
        "done", 4, 4, 100)
    assert shown["failed_records"] == {} and shown["spec"]["cuts"] == ["pool5"]
    assert shown["cost"] == pytest.approx(cost, rel=1e-12)
    store.delete(f"{job}/predictions/00003.jsonl")
    store.put_bytes(f"{job}/stage-0/00003.npy", b"x" * 1000)
    res = run("jobs", "show", job, "--store", store.root)
    assert res.exit_code == 0, res.output
    fields = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1].strip()
              for line in res.output.splitlines()[2:] if line.strip()}
    assert f"job {job}" in res.output.splitlines()[0]
    assert fields["state"] == "partial, 3 of 4 records done"
    assert fields["intermediates"] == "float32, uncompressed" and fields["cuts"] == "pool5"
    res = run("jobs", "clean", job, "--store", store.root)
    assert res.exit_code == 0 and "MB freed" in res.output, res.output
    assert not store.exists(f"{job}/stage-0/00003.npy")
    assert len(store.list(f"{job}/predictions")) == 3 and store.exists(f"{job}/job.json")
