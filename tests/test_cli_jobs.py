"""The command line checks everything before it writes anything, resumes by the rules,
names new jobs, manages jobs, and fits its summary to the terminal (issue 12)."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from helpers import tiny_classifier
from rich.console import Console
from typer.testing import CliRunner

from serveless import __version__
from serveless.cli import app
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.spec import JobSpec
from serveless.model.graph import save_model
from serveless.report.summary import print_summary, stage_cells, summarize
from serveless.store import Store

runner = CliRunner()


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")} \
        if root.exists() else {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    save_model(tiny_classifier(), path)
    return path


@pytest.fixture(scope="module")
def done_store(tmp_path_factory, tiny, records_dir) -> Path:
    """A store with one finished two-stage job, 'done'."""
    store = tmp_path_factory.mktemp("store")
    res = runner.invoke(app, ["run", "--job", "done", "--records", str(records_dir), "--model",
                              str(tiny), "--cuts", "flat", "--store", str(store)])
    assert res.exit_code == 0, res.output
    return store


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


# -- every input mistake: its message, exit 2, and the store as it was ---------------------


MISTAKES = [
    (["--concurrency", "0"], "--concurrency"),
    (["--arch", "arm"], "'arm' is not one of"),
    (["--retries", "-1"], "--retries"),
    (["--max-instances", "0"], "--max-instances"),
    (["--keep-alive", "-1"], "--keep-alive"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--backend", "nosuch"], "'nosuch' is not one of"),
    (["--memory", "64"], "outside Lambda's 128-10240 MB"),
    (["--memory", "512,512,512"], "3 sizes for 2 stages"),
    (["--cuts", "nosuch"], "nosuch"),
    (["--job", "../escape"], "invalid job name"),
    (["--store-option", "novalue"], "must be key=value"),
]


@pytest.mark.parametrize(("args", "words"), MISTAKES)
def test_run_mistakes_exit_2_and_write_nothing(tmp_path, tiny, records_dir, args, words):
    store = tmp_path / "store"
    (store / "other").mkdir(parents=True)
    (store / "other" / "keep.txt").write_text("x")
    before = snapshot(store)
    base = ["run", "--records", str(records_dir), "--model", str(tiny), "--store", str(store)]
    if "--cuts" not in args:
        base += ["--cuts", "flat"]
    res = run(*base, *args)
    assert res.exit_code == 2, res.output
    assert words in res.output
    assert "Traceback" not in res.output
    assert snapshot(store) == before


@pytest.mark.parametrize("store", ["/sys/kernel", "/proc/serveless-x"])
def test_unwritable_store_is_one_line(tmp_path, records_dir, tiny, store):
    res = run("run", "--records", str(records_dir), "--model", str(tiny), "--store", store)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to store"), res.output
    if store.startswith("/proc"):
        assert not Path(store).exists()


def test_missing_records_and_no_job(tmp_path):
    res = run("run", "--store", str(tmp_path / "s"))
    assert res.exit_code == 2 and "give --input" in res.output
    res = run("run", "--store", str(tmp_path / "s"), "--records", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and "no records or images at" in res.output
    assert not (tmp_path / "s").exists()


def test_missing_lithops_is_said_before_anything(tmp_path, records_dir, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "serveless.backends.lithops", None)  # import fails
    store = tmp_path / "store"
    res = run("run", "--records", str(records_dir), "--model", str(tiny), "--store", str(store),
              "--backend", "lithops")
    assert res.exit_code == 2 and "pip install lithops" in res.output, res.output
    assert not store.exists() or not any(store.iterdir())


def test_failed_partition_leaves_no_job_folder(tmp_path, records_dir):
    store = tmp_path / "store"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    res = run("run", "--job", "j", "--records", str(records_dir), "--model", str(bad),
              "--store", str(store))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (store / "j").exists()


def test_debug_shows_the_traceback(tmp_path):
    res = run("--debug", "run", "--store", str(tmp_path), "--records", str(tmp_path / "none"))
    assert res.exit_code != 0 and res.exception is not None


def test_version():
    res = run("--version")
    assert res.exit_code == 0 and res.output.strip() == f"serveless {__version__}"


# -- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "stored", "given"), [
    (["--micro-batch", "8"], "--micro-batch 32", "--micro-batch 8"),
    (["--float16"], "--no-float16 --no-compress", "--float16 --no-compress"),
    (["--cuts", "logits"], "--cuts flat", "--cuts logits"),
    (["--model", "alexnet"], "--model ", "--model alexnet"),
])
def test_resume_refuses_a_changed_option(done_store, args, stored, given):
    before = (done_store / "done" / "job.json").read_text()
    res = run("run", "--job", "done", "--store", str(done_store), *args)
    assert res.exit_code == 2, res.output
    assert f"was started with {stored}" in res.output and f"not {given}" in res.output
    assert (done_store / "done" / "job.json").read_text() == before


def test_resume_takes_what_was_left_out_and_may_change_memory(done_store, records_dir):
    # --records again without --cuts: the stored cuts, not "the cuts differ"
    res = run("run", "--job", "done", "--store", str(done_store), "--records", str(records_dir),
              "--memory", "1024", "--concurrency", "1", "--retries", "0")
    assert res.exit_code == 0, res.output
    assert "resuming with --memory 1024,1024 (was --memory 1769,1769)" in res.output
    assert "resuming with --concurrency 1 (was --concurrency 2)" in res.output
    assert "resuming: 3 of 3 records done" in res.output
    spec = JobSpec.load(Store(str(done_store)), "done")
    assert spec.cuts == ["flat"] and spec.memory == [1024, 1024] and spec.concurrency == 1
    res = run("run", "--job", "done", "--store", str(done_store), "--memory", "1769",
              "--concurrency", "2", "--retries", "3")  # back as it was, for the other tests
    assert res.exit_code == 0, res.output


def test_new_jobs_get_unique_readable_names(tmp_path, tiny, records_dir):
    store = tmp_path / "store"
    names = []
    for _ in range(2):
        res = run("run", "--records", str(records_dir), "--model", str(tiny), "--store",
                  str(store))
        assert res.exit_code == 0, res.output
        names += re.findall(r"^job (\S+)$", res.output, re.M)
    folder = records_dir.name
    assert len(names) == 2 and names[0] != names[1]
    assert all(re.fullmatch(rf"{re.escape(folder)}-\d{{8}}-[12]", n) for n in names), names
    jobs = sorted(p.name for p in store.iterdir() if p.name != "models")  # shared stages
    assert jobs == sorted(names)


def test_setup_steps_are_shown(tmp_path, tiny, records_dir):
    res = run("run", "--job", "s", "--records", str(records_dir), "--model", str(tiny),
              "--cuts", "flat", "--store", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "partitioning" in res.output and "checking the chained stages" in res.output
    assert re.search(r"uploaded 2 stage models \([\d.]+ MB\); uploading 3 records", res.output)


# -- jobs list / show / clean / delete ------------------------------------------------------


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


def test_jobs_clean_keeps_predictions(three_jobs):
    job = three_jobs / "done"
    assert (job / "stage-0").exists()
    preds = snapshot(job / "predictions")
    res = run("jobs", "clean", "done", "--store", str(three_jobs))
    assert res.exit_code == 0 and "MB freed" in res.output, res.output
    assert not list(job.glob("stage-*")) and snapshot(job / "predictions") == preds
    assert (job / "job.json").exists() and (job / "invocations.jsonl").exists()
    res = run("jobs", "--store", str(three_jobs))
    assert re.search(r"^\s+done\s+done\s+3/3", res.output, re.M)  # still done


def test_jobs_delete_asks_first(three_jobs):
    res = run("jobs", "delete", "partial", "--store", str(three_jobs), input="n\n")
    assert res.exit_code == 1 and (three_jobs / "partial").exists()
    res = run("jobs", "delete", "partial", "--store", str(three_jobs), input="y\n")
    assert res.exit_code == 0 and not (three_jobs / "partial").exists()
    res = run("jobs", "delete", "failed", "--store", str(three_jobs), "--yes")
    assert res.exit_code == 0 and not (three_jobs / "failed").exists()
    assert (three_jobs / "done" / "job.json").exists()


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


# -- the summary at 80, 100 and 160 columns ---------------------------------------------------


@pytest.mark.parametrize("width", [40, 80, 100, 160])
def test_summary_fits_the_terminal_with_every_value_whole(done_store, width):
    rows = load_log(Store(str(done_store)), "done")
    out = io.StringIO()
    print_summary(rows, 12.5, "x86_64", Console(file=out, width=width, force_terminal=False))
    text = out.getvalue()
    assert "…" not in text
    lines = text.splitlines()
    table_lines = [line for line in lines if not line.startswith("total ")]
    assert max(len(line.rstrip()) for line in table_lines) <= width, text
    tokens = set(" ".join(lines).replace(",", " ").split()) | set(text.split())
    for row in stage_cells(summarize(rows)):
        for value in row:
            whole = value in tokens or any(f"{value}{end}" in text for end in ",:")
            assert whole, (value, text)
