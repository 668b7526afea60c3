"""Drivers that race and drivers that die (issue 21): two drivers on one job, a driver
SIGKILLed at random moments then resumed, a log row edited to point outside the job. On a
local folder and on S3 (moto), through the command line as a user runs it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from datakit import image_folder, save, tiny_classifier

from serveless.data.predictions import read_predictions
from serveless.driver.log import load_log
from serveless.report.summary import summarize
from serveless.store import Store

pytestmark = pytest.mark.e2e
pytest_plugins = ["s3server"]
RECORDS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    image_folder(root / "imgs", per_class=RECORDS // 2)
    return root, save(tiny_classifier(), root / "tiny.onnx")


def _where(kind: str, root: Path, s3_server) -> tuple[str, list[str], dict[str, str], Store]:
    """(store URL, store options on the command line, environment, a Store to look with)."""
    if kind == "local":
        url = str(root / f"st-{uuid.uuid4().hex[:6]}")
        return url, [], {}, Store(url)
    url = s3_server.url(f"crash-{uuid.uuid4().hex[:8]}")
    env = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    return (url, ["--store-option", f"endpoint_url={s3_server.endpoint}"], env,
            Store(url, s3_server.options()))


def _run(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "serveless.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _job_args(setup, url: str, opts: list[str]) -> list[str]:
    root, model = setup
    return ["--job", "j5", "--input", str(root / "imgs"), "--model", model, "--cuts", "r1",
            "--per-record", "1", "--concurrency", "1", "--store", url, *opts]


def _each_call_once(st: Store) -> list[dict]:
    rows = load_log(st, "j5")
    ok = Counter((r["record"], r["stage"]) for r in rows if r["error"] is None)
    assert len(ok) == RECORDS * 2, f"{len(ok)} (record, stage) pairs done"
    twice = {k: n for k, n in ok.items() if n > 1}
    assert not twice, f"done more than once: {twice}"
    assert len(read_predictions(st, "j5")) == RECORDS
    return rows


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_drivers_on_one_job_one_runs_it(setup, s3_server, kind):
    url, opts, env, st = _where(kind, setup[0], s3_server)
    first = _run(_job_args(setup, url, opts), env)
    time.sleep(0.3)
    second = _run(_job_args(setup, url, opts), env)
    out2, err2 = second.communicate(timeout=120)
    out1, err1 = first.communicate(timeout=120)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (err1, err2)
    refused = err2 if second.returncode == 2 else err1
    assert "is run by another driver (host " in refused and "pid " in refused
    rows = _each_call_once(st)
    assert len(rows) == RECORDS * 2


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_driver_killed_at_random_moments_loses_no_call_and_redoes_none(setup, s3_server,
                                                                         kind):
    url, opts, env, st = _where(kind, setup[0], s3_server)
    rng = random.Random(21)
    for _ in range(2):  # killed twice, each time a moment after it began serving
        proc = _run(_job_args(setup, url, opts), env)
        deadline = time.time() + 60
        before = len(st.sizes("j5/predictions"))
        while (time.time() < deadline and proc.poll() is None
               and len(st.sizes("j5/predictions")) <= before):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    again = _run(_job_args(setup, url, opts), env)
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    rows = _each_call_once(st)
    summary = summarize(rows)
    assert sum(s.invocations for s in summary["stages"]) == len(rows)  # every call billed


def test_a_log_row_pointing_outside_the_job_is_not_followed(setup, tmp_path):
    url, opts, env, st = _where("local", tmp_path, None)
    done = _run(_job_args(setup, url, opts), env)
    assert done.wait(timeout=120) == 0
    (segment,) = sorted((Path(url) / "j5" / "log").glob("*.jsonl"))
    rows = [json.loads(line) for line in segment.read_text().splitlines()]
    for row in rows:
        row["output"]["key"] = "../../../../../dev/zero"
    segment.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t0 = time.monotonic()
    again = _run(_job_args(setup, url, opts), env)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert f"resuming: {RECORDS} of {RECORDS} records done" in err
    assert time.monotonic() - t0 < 30
