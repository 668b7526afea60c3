"""`serveless run` and `serveless demo` as a user meets them: every mistake is refused with
its message and exit 2 before anything is written (a corrupt record, a model that is no
image model, a job name that escapes, an unusable store), a resume follows the rules, new
jobs get readable names, and the setup says what it does (issue 12)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli, snapshot
from typer.testing import CliRunner

from serveless import __version__
from serveless.cli import app
from serveless.data.records import read_record
from serveless.driver.log import load_log
from serveless.driver.spec import JobSpec
from serveless.errors import RecordError
from serveless.model.stagecache import STAGE_CACHE_ENV
from serveless.store import Store

runner = CliRunner()


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


@pytest.mark.parametrize("module", ["serveless", "serveless.cli"])
def test_python_m_runs_the_command_line(module, monkeypatch, capsys):
    """`python -m serveless` and `python -m serveless.cli` are the `serveless` script (run
    here in this process, as `python -m` runs them)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [module, "--version"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert done.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"serveless {__version__}"


@pytest.mark.e2e
def test_corrupt_record_is_refused_before_anything_runs(tmp_path, records_dir):
    """A flipped bit in the user's file: named (their path, byte offset), nothing invoked."""
    rec_dir = tmp_path / "recs"
    rec_dir.mkdir()
    for p in sorted(records_dir.glob("*.tfrecord")):
        data = bytearray(p.read_bytes())
        if p.stem == "00001":
            data[len(data) // 2] ^= 0x40  # a flipped bit inside some image's bytes
        (rec_dir / p.name).write_bytes(bytes(data))
    with pytest.raises(RecordError, match="CRC"):
        read_record((rec_dir / "00001.tfrecord").read_bytes())
    store_dir = tmp_path / "store"
    proc = run_cli("run", "--store", str(store_dir), "--job", "crc", "--records",
                    str(rec_dir), "--preset", "paper")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    flat = " ".join(err.split()).replace(" ", "")
    assert f"{rec_dir / '00001.tfrecord'}:byte" in flat and "dataCRCmismatch" in flat
    assert not (store_dir / "crc").exists()  # refused before the job had a folder


@pytest.mark.e2e
def test_bad_input_refused_before_any_invocation(tmp_path, records_dir):
    import onnx
    from onnx import TensorProto, helper

    bad_model = tmp_path / "ints.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 10])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 10])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])],
                                                  "g", [x], [y])), bad_model)
    store_dir = tmp_path / "store"
    cases = [
        (["--model", str(bad_model)], "N×3×H×W"),
        (["--model", str(tmp_path / "missing.onnx")], "not found"),
        (["--job", "../escape"], "job name"),
        (["--job", "a/b"], "job name"),
    ]
    for extra, needle in cases:
        args = ["run", "--store", str(store_dir), "--records", str(records_dir), *extra]
        if "--job" not in extra:
            args += ["--job", "ok"]
        proc = run_cli(*args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and needle in err.replace("\n", ""), (extra, err)
    assert not store_dir.exists() or not any(store_dir.rglob("*")), "something was written"
    proc = run_cli("run", "--store", "nosuchproto://x", "--records", str(records_dir))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "store" in err


# -- resume --------------------------------------------------------------------------------


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_setup_steps_are_shown(tmp_path, tiny, records_dir, monkeypatch):
    monkeypatch.setenv(STAGE_CACHE_ENV, "0")  # the steps of a model this machine never split
    res = run("run", "--job", "s", "--records", str(records_dir), "--model", str(tiny),
              "--cuts", "flat", "--store", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "partitioning" in res.output and "checking the chained stages" in res.output
    assert re.search(r"uploaded 2 stage models \([\d.]+ MB\); uploading 3 records", res.output)


# -- demo ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_demo_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "serveless.cli", "demo", "--images", "40", "--store", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "40 images" in out.stdout and "GB-s" in out.stdout and "per 1M images" in out.stdout
    preds = sorted((tmp_path / "demo" / "predictions").glob("*.jsonl"))
    assert preds and sum(len(p.read_text().splitlines()) for p in preds) == 40
    assert len(load_log(Store(str(tmp_path)), "demo")) == 4  # one record, four stages
    assert f"invocation log: {tmp_path / 'demo' / 'log'}/" in out.stdout.replace("\n", "")
