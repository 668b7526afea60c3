"""A job touches only what it wrote and takes any name (issue 21): refused over data that is
not its own, a failed setup removes only its own objects, names from outside made safe.
These run the command line on small jobs of a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from datakit import image_folder, save, tiny_classifier
from typer.testing import CliRunner

from serveless.cli import app
from serveless.data.predictions import read_predictions
from serveless.data.records import Example, write_record
from serveless.driver.log import load_log
from serveless.store import Store

pytestmark = pytest.mark.e2e
pytest_plugins = ["s3server"]
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save(tiny_classifier(), tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "imgs"
    image_folder(root, per_class=3)
    return root


def test_an_input_inside_the_jobs_folder_is_refused_and_left_alone(tmp_path, images, model):
    st = tmp_path / "st"
    assert run("pack", str(images), str(st / "photos"), "--per-record", "2").exit_code == 0
    before = snapshot(st)
    res = run("run", "--job", "photos", "--input", str(st / "photos"), "--cuts", "bogus",
              "--model", model, "--store", str(st))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert snapshot(st) == before  # the user's records are all there, byte for byte
    # a job whose folder holds the input, or is it, is refused however it is named
    res = run("run", "--job", "photos", "--input", str(st / "photos"), "--model", model,
              "--store", str(st))
    assert res.exit_code == 2 and "no job.json" in res.output
    assert snapshot(st) == before


def test_an_input_that_is_the_jobs_folder_on_s3_is_refused(s3_server, images, model, tmp_path):
    prefix = f"own-{uuid.uuid4().hex[:8]}"
    st = Store(s3_server.url(prefix), s3_server.options())
    from serveless.data.sources import pack

    pack(images, st, "dataset", 1)
    st.put_bytes("dataset/labels.json", b'["cat", "dog"]')
    before = s3_server.keys(f"{prefix}/dataset/")
    assert len(before) == 7
    args = ["--store-option", f"endpoint_url={s3_server.endpoint}"]
    env = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    res = subprocess.run(
        [sys.executable, "-m", "serveless.cli", "run", "--job", "dataset", "--input",
         s3_server.url(f"{prefix}/dataset"), "--cuts", "typo", "--model", model, "--store",
         s3_server.url(prefix), *args], capture_output=True, text=True,
        env={**os.environ, **env}, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "overlap" in res.stderr or "no job.json" in res.stderr
    assert s3_server.keys(f"{prefix}/dataset/") == before


def test_a_failed_setup_removes_what_it_wrote_and_nothing_else(tmp_path, images, model,
                                                                monkeypatch):
    st = tmp_path / "st"
    assert run("run", "--job", "done", "--input", str(images), "--model", model, "--store",
               str(st), "--per-record", "3").exit_code == 0
    before = snapshot(st)
    import serveless.driver.prepare as prepare

    def fail_at_the_end(*args, **kwargs):
        raise OSError("the store went away at the last step")

    monkeypatch.setattr(prepare, "save_driver_requests", fail_at_the_end)
    res = run("run", "--job", "new", "--input", str(images), "--model", model, "--store",
              str(st), "--per-record", "2", "--cuts", "r1")
    assert res.exit_code != 0
    assert snapshot(st) == before, "the failed setup left objects, or took some away"
    assert not (st / "new").exists(), "the failed setup left the job's (empty) folder"
    (st / "mine").mkdir()  # a folder the user made before is theirs, even empty
    res = run("run", "--job", "mine", "--input", str(images), "--model", model, "--store",
              str(st), "--per-record", "2", "--cuts", "r1")
    assert res.exit_code != 0 and (st / "mine").is_dir() and not any((st / "mine").iterdir())
    (st / "mine").rmdir()
    # a resume that fails after adding records removes those records, and only those
    more = tmp_path / "more"
    image_folder(more, per_class=2, classes=("cat", "dog", "eel"), seed=50)
    res = run("run", "--job", "done", "--input", str(more), "--store", str(st),
              "--per-record", "3")
    assert res.exit_code != 0
    assert snapshot(st) == before


def test_the_demo_clears_only_a_demo_job(tmp_path):
    st = tmp_path / "st"
    (st / "demo").mkdir(parents=True)
    (st / "demo" / "thesis.tex").write_text("not a job")
    res = run("demo", "--images", "4", "--store", str(st))
    assert res.exit_code == 2 and "not a demo job" in res.output
    assert (st / "demo" / "thesis.tex").read_text() == "not a job"


def test_a_folder_that_is_not_a_job_is_refused(tmp_path, images, model):
    st = tmp_path / "st"
    (st / "photos").mkdir(parents=True)
    (st / "photos" / "notes.txt").write_text("mine")
    res = run("run", "--job", "photos", "--input", str(images), "--model", model, "--store",
              str(st))
    assert res.exit_code == 2 and "holds objects but no job.json" in res.output
    assert snapshot(st) == {"photos/notes.txt": b"mine"}


def _records(folder: Path, names: list[str]) -> None:
    import io

    from datakit import encode, picture

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        buf = io.BytesIO()
        write_record(buf, [Example(encode(picture(i), "JPEG"), f"{i}.jpg", i % 2)])
        (folder / name).write_bytes(buf.getvalue())


def test_any_record_name_serves_and_serves_again(tmp_path, model):
    long = "x" * 240 + ".tfrecord"  # + '.tmp-<32 hex>' overflowed a file name's 255 bytes
    names = ["train.tmp-00000.tfrecord", "a.tmp-1", long, "plain.tfrecord"]
    _records(tmp_path / "recs", names)
    st = tmp_path / "st"
    for _ in range(2):  # the second run is a resume: nothing deleted, nothing redone
        res = run("run", "--job", "names", "--input", str(tmp_path / "recs"), "--model", model,
                  "--store", str(st))
        assert res.exit_code == 0, res.output
    rows = read_predictions(Store(str(st)), "names")
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    records = {r["record"] for r in rows}
    assert {"train.tmp-00000", "a.tmp-1", "plain"} <= records
    assert max(len(r.encode()) for r in records) <= 200
    calls = load_log(Store(str(st)), "names")
    assert len(calls) == 4  # one stage, four records, each once over both runs


def test_a_file_name_that_is_not_utf8_is_skipped_and_the_rest_served(tmp_path, images, model):
    bad = os.path.join(os.fsencode(images / "cat"), b"caf\xe9.jpg")
    os.rename(os.fsencode(images / "cat" / "img_0.jpg"), bad)
    res = run("run", "--job", "u8", "--input", str(images), "--model", model, "--store",
              str(tmp_path / "st"))
    assert res.exit_code == 0, res.output
    assert "caf\\xe9.jpg: its name is not valid UTF-8" in res.output
    assert len(read_predictions(Store(str(tmp_path / "st")), "u8")) == 5


def test_a_long_input_folder_name_makes_a_job_name_that_fits(tmp_path, model):
    folder = tmp_path / ("p" * 150)
    image_folder(folder, per_class=1)
    res = run("run", "--input", str(folder), "--model", model, "--store", str(tmp_path / "st"))
    assert res.exit_code == 0, res.output
    (job,) = [p.name for p in (tmp_path / "st").iterdir() if p.name != "models"]
    assert len(job) <= 128 and job.startswith("p" * 100)


def test_damaged_store_json_is_one_line_and_not_retried(tmp_path, images, model):
    st = tmp_path / "st"
    assert run("run", "--job", "lab", "--input", str(images), "--model", model, "--store",
               str(st), "--per-record", "3").exit_code == 0
    (st / "lab" / "labels.json").write_text('{"0": "cat"}')  # a dict, not a list
    for p in (st / "lab" / "predictions").glob("*.jsonl"):
        p.unlink()
    res = run("run", "--job", "lab", "--store", str(st))
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "labels.json: expected a JSON list of class names" in res.output
    assert "not retried" in res.output
    failed = [r for r in load_log(Store(str(st)), "lab") if r["error"]]
    assert len(failed) == 2  # one call per record: none retried
    # a job.json that is a list breaks neither `jobs` nor the store's other jobs
    (st / "broken").mkdir()
    (st / "broken" / "job.json").write_text("[1, 2]")
    res = run("jobs", "--store", str(st))
    assert res.exit_code == 0 and "unreadable" in res.output and "lab" in res.output
    assert "broken/job.json is not a job's spec: a JSON list, not an object" in res.output
    res = run("jobs", "show", "broken", "--store", str(st))
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    spec = json.loads((st / "lab" / "job.json").read_text())
    spec["records"] = ["../../outside"]
    (st / "lab" / "job.json").write_text(json.dumps(spec))
    res = run("run", "--job", "lab", "--store", str(st))
    assert res.exit_code == 2 and "is not one a job makes" in res.output
