"""The Lithops backend on Lithops' localhost engine, with the store on the S3 test server:
the end-to-end job, calls that time out or die, config handling, and nothing left behind;
what it says of a cloud engine (vCPUs, ephemeral storage) without starting one; how the
sidecar turns what Lithops reports into results. (What every backend must do, this one
included, is test_backend_contract.py.)"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from helpers import check_layout_in_bucket, check_predictions, small_records

from serveless.backends import FunctionSpec, make_backend
from serveless.backends.lithops import LithopsBackend
from serveless.backends.lithops.backend import build_config
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.store import Store

pytest_plugins = ["s3server"]


def _snapshot() -> dict[str, Any]:
    """What Lithops could leave behind: processes under us, temp entries, ~/.lithops."""
    lithops_home = Path.home() / ".lithops"
    mentions_lithops = set()
    for proc in psutil.process_iter(["cmdline"]):
        if "lithops" in " ".join(proc.info["cmdline"] or []):  # orphans are not our children
            mentions_lithops.add(proc.pid)
    return {
        "children": {p.pid for p in psutil.Process().children(recursive=True)},
        "lithops_processes": mentions_lithops,
        # Only names Lithops or this backend would use: other programs share the folder.
        "tmp": {n for n in os.listdir(tempfile.gettempdir()) if "lithops" in n.lower()},
        "home": sorted(str(p) for p in lithops_home.rglob("*")) if lithops_home.exists()
        else None,
    }


def _assert_nothing_left(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["children"] - before["children"] == set(), "stray processes"
    assert after["lithops_processes"] - before["lithops_processes"] == set(), "stray processes"
    assert after["tmp"] - before["tmp"] == set(), "stray temp folders or files"
    assert after["home"] == before["home"], "~/.lithops was written"


# -- the end-to-end job -----------------------------------------------------------------------


@pytest.fixture(scope="module", name="small_records")
def _small_records(tmp_path_factory) -> Path:
    """20 images in records of 10: Lithops localhost v1 starts a process per call."""
    return small_records(tmp_path_factory.mktemp("lithops"), seed=11)


@pytest.fixture(scope="module")
def lithops_job(s3_server, small_records):
    store = Store(s3_server.url("lithops"), s3_server.options())
    spec = prepare_job(store, "lj", "alexnet", preset="paper", records=str(small_records),
                       memory="1024,1536,1024,2048")
    before = _snapshot()
    backend = make_backend("lithops", {"backend": "localhost"})
    leaks = _CredentialWatch(backend, s3_server.secret)
    try:
        described = backend.describe()
        t0 = time.perf_counter()
        result = run_job(store, spec, backend, concurrency=2, progress=False)
        wall = time.perf_counter() - t0
    finally:
        leaks.stop()
        backend.close()
    return SimpleNamespace(store=store, spec=spec, result=result, described=described,
                           wall=wall, before=before, after=_snapshot(), leaks=leaks)


class _CredentialWatch:
    """Where the store's secret shows up while a Lithops job runs: in a message to the
    sidecar other than the environment hand-over, in any file under the backend's folder
    (Lithops' storage: call payloads and results, and the sidecar's log)."""

    def __init__(self, backend: LithopsBackend, secret: str):
        self.secret = secret.encode()
        self.found: list[str] = []
        self.files_seen: set[str] = set()
        self.messages = 0
        self._root = backend._root
        real_send = backend._send

        def send(msg: dict[str, Any]) -> None:
            self.messages += 1
            if msg.get("op") != "env" and self.secret.decode() in json.dumps(msg):
                self.found.append(f"message {msg.get('op')}")
            real_send(msg)

        backend._send = send  # type: ignore[method-assign]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scan, daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        while not self._stop.wait(0.02):
            self._pass()

    def _pass(self) -> None:
        try:
            paths = list(self._root.rglob("*"))
        except OSError:  # a folder went away mid-walk (Lithops cleans up): walk again next time
            return
        for path in paths:
            try:
                if path.is_file() and self.secret in path.read_bytes():
                    self.found.append(str(path))
                self.files_seen.add(str(path.relative_to(self._root)))
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pass()


@pytest.mark.e2e
def test_lithops_job_gives_one_row_per_image_equal_to_the_whole_model(
        lithops_job, small_records, alexnet, s3_server):
    store, spec, result, described = (lithops_job.store, lithops_job.spec,
                                      lithops_job.result, lithops_job.described)
    assert described["backend"] == "lithops" and described["lithops_backend"] == "localhost"
    assert spec.stages == 4 and result.ok and result.images == 20
    check_predictions(store, "lj", small_records, alexnet, 20)
    check_layout_in_bucket(s3_server.keys("lithops/"), "lithops", "lj", spec.records,
                           spec.stages, spec.models)


@pytest.mark.e2e
def test_lithops_job_logs_each_call_with_its_stats(lithops_job):
    store, spec, wall = lithops_job.store, lithops_job.spec, lithops_job.wall
    log = load_log(store, "lj")
    assert len(log) == 2 * 4 and {(r["record"], r["stage"]) for r in log} == {
        (rec, k) for rec in spec.records for k in range(4)}
    for r in log:
        assert r["error"] is None and r["memory_mb"] == spec.memory[r["stage"]]
        assert r["cold"] and r["init_ms"] > 0  # localhost v1: a fresh process per call
        assert r["peak_mb"] > 50 and r["billed_ms"] >= r["duration_ms"] > 0
        assert r["instance"].startswith("lithops:")
        # a fresh process per call: the stage comes from the store or the disk cache
        assert r["model_source"] in ("store", "disk")
    assert len({r["instance"] for r in log}) == len(log)
    assert {r["stage"] for r in log if r["model_source"] == "store"} == set(range(4))
    assert wall < 120  # no hang


@pytest.mark.e2e
def test_lithops_job_leaves_no_process_or_folder(lithops_job):
    _assert_nothing_left(lithops_job.before, lithops_job.after)


@pytest.mark.e2e
def test_lithops_job_sends_no_credentials(lithops_job, s3_server):
    """The store's secret (given as a store option) is in no payload, message or log of
    Lithops, nor in the bucket; the runners got it from the sidecar's environment."""
    leaks = lithops_job.leaks
    assert lithops_job.result.ok and leaks.found == []
    assert leaks.messages > 8  # the watch saw the calls go out
    assert any("storage" in f or "jobs" in f for f in leaks.files_seen), leaks.files_seen
    client = s3_server.client()
    for key in s3_server.keys("lithops/"):
        body = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        assert s3_server.secret.encode() not in body, key


# -- calls that fail, time out, or lose their worker ------------------------------------------


def _probe(event: dict[str, Any]) -> dict[str, Any]:
    """A stand-in for the stage handler, run by Lithops; `do` says how to misbehave."""
    do = event["do"]
    if do == "raise":
        raise ValueError("bad record")
    if do == "sleep":  # past the call's timeout: Lithops kills it
        time.sleep(60)
    if do == "die":  # the runner process dies: no status will ever come
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)
    if do == "hang":  # the runner freezes: only our own deadline ends the call
        os.kill(os.getppid(), signal.SIGSTOP)
        time.sleep(60)
    return {"echo": event, "duration_ms": 1.0, "handler_init_ms": 0.0, "peak_mb": 1.0,
            "cold": True}


@pytest.mark.e2e
def test_calls_end_with_a_result_whatever_happens_to_them():
    before = _snapshot()
    backend = LithopsBackend({"backend": "localhost", "function": "test_backend_lithops:_probe",
                              "timeout_s": 4, "grace_s": 4})
    cases = ["ok", "raise", "sleep", "die", "hang"]
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = {
                do: pool.submit(backend.invoke, FunctionSpec(0, 512 + i, "m", {}), {"do": do})
                for i, do in enumerate(cases)}
            results = {do: f.result(timeout=60) for do, f in futures.items()}
        wall = time.perf_counter() - t0
    finally:
        backend.close()
    ok = results["ok"]
    assert ok.ok and ok.metrics["echo"] == {"do": "ok"}
    assert ok.extra["lithops"]["runtime_memory"] == 512  # the stage's memory, as asked
    assert ok.extra["lithops"]["worker_exec_time"] > 0 and ok.duration_ms >= 1.0
    raised = results["raise"].error
    assert raised.type == "ValueError" and raised.message == "bad record"
    assert raised.final and "deterministic" in raised.why  # not retried, and why
    assert results["sleep"].error.type == "Timeout"
    assert results["die"].error.type == "InstanceDied"
    assert results["hang"].error.type == "Timeout"
    assert "within 4 s + 4 s" in results["hang"].error.message
    assert all(r.extra["lithops"]["runtime_memory"] == 512 + i
               for i, r in enumerate(results.values()))
    assert wall < 30  # the five ran side by side, and none hung
    _assert_nothing_left(before, _snapshot())  # the frozen and orphaned runners are gone
    with pytest.raises(RuntimeError, match="closed"):
        backend.invoke(FunctionSpec(0, 512, "m", {}), {"do": "ok"})


@pytest.mark.e2e
def test_many_back_to_back_calls_neither_hang_nor_get_lost():
    """Localhost version 2 hung after 11-34 back-to-back maps and lost 1-2% of calls."""
    before = _snapshot()
    backend = LithopsBackend({"backend": "localhost", "timeout_s": 60, "grace_s": 10,
                              "function": "serveless.backends.lithops:ping"})
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(
                lambda i: backend.invoke(FunctionSpec(0, 512, "m", {}), {"i": i}), range(40)))
    finally:
        backend.close()
    assert [r.error for r in results if not r.ok] == []
    assert sorted(r.metrics["event"]["i"] for r in results) == list(range(40))
    _assert_nothing_left(before, _snapshot())


# -- configuration ----------------------------------------------------------------------------


def test_config_file_and_options_are_merged_with_the_localhost_fixes(tmp_path):
    cfg = tmp_path / "lithops.yaml"
    cfg.write_text("lithops:\n  backend: localhost\n  data_cleaner: true\n"
                   "localhost:\n  version: 2\n  runtime: python3\n")
    config = build_config({"config_file": str(cfg), "lithops.monitoring_interval": 1})
    assert config["lithops"]["data_cleaner"] is False
    assert config["lithops"]["monitoring_interval"] == 1
    assert config["localhost"]["version"] == 1
    assert config["localhost"]["runtime"] == "python3"  # the user's own choice stays
    assert build_config({})["localhost"]["runtime"] == sys.executable
    aws = build_config({"backend": "aws_lambda", "storage": "aws_s3", "aws.region": "eu-west-1",
                        "aws_lambda.execution_role": "arn:role", "runtime": "serveless-rt"})
    assert aws["aws_lambda"] == {"execution_role": "arn:role", "runtime": "serveless-rt"}
    assert aws["aws"] == {"region": "eu-west-1"} and "localhost" not in aws
    with pytest.raises(ValueError, match="unknown lithops backend options"):
        build_config({"memory": 1024})
    with pytest.raises(ValueError, match="does not exist"):
        build_config({"config_file": str(tmp_path / "missing.yaml")})


def test_cloud_functions_refuse_a_store_on_this_machine():
    lam, local = SimpleNamespace(compute="aws_lambda"), SimpleNamespace(compute="localhost")
    for url in ("./serveless-store", "/data/store", "file:///data", "memory://x"):
        assert "cannot reach the store" in LithopsBackend.store_problem(lam, url)
        assert LithopsBackend.store_problem(local, url) is None
    assert LithopsBackend.store_problem(lam, "s3://bucket/prefix") is None


@pytest.mark.e2e
def test_a_bad_config_fails_at_start_and_leaves_nothing():
    before = _snapshot()
    with pytest.raises(ValueError, match="execution_role"):
        LithopsBackend({"backend": "aws_lambda", "storage": "aws_s3", "aws.region": "us-east-1",
                        "aws_lambda.runtime_timeout": 300})
    _assert_nothing_left(before, _snapshot())


def test_lithops_on_lambda_reports_its_ephemeral_storage():
    pytest.importorskip("lithops")
    from serveless.backends.lithops import LithopsBackend

    backend = object.__new__(LithopsBackend)  # no sidecar: only describe() is looked at
    backend.compute, backend.storage, backend.info = "aws_lambda", "aws_s3", {}
    backend.config = {"aws_lambda": {"ephemeral_storage": 2048}}
    assert backend.describe()["ephemeral_mb"] == 2048
    backend.config = {"aws_lambda": {}}
    assert backend.describe()["ephemeral_mb"] == 512


def test_lithops_on_a_cloud_gives_functions_their_own_vcpus():
    pytest.importorskip("lithops")
    from serveless.backends.lithops import LithopsBackend

    backend = object.__new__(LithopsBackend)  # no sidecar: only the rule is looked at
    backend.compute = "aws_lambda"
    assert backend.function_cores() is None
    backend.compute = "localhost"
    assert backend.function_cores() == os.cpu_count()


def test_lithops_failures_become_the_protocols_error_kinds():
    """The sidecar names what Lithops reports in the kinds the driver's rules read:
    MemoryError is OutOfMemory, a deterministic error is final, a 429 is TooManyRequests,
    Lambda's time limit a Timeout, a runner that exited InstanceDied; else its own name."""
    pytest.importorskip("lithops")
    from serveless.backends.lithops.sidecar import _error_of

    class InvalidArgument(Exception):
        pass

    class TooManyRequestsException(Exception):
        pass

    assert _error_of(None) == {"type": "LithopsError",
                               "message": "the call failed without an exception"}
    assert _error_of(MemoryError("no room"))["type"] == "OutOfMemory"
    final = _error_of(InvalidArgument("got 3 channels"))
    assert final["type"] == "InvalidArgument" and final["final"] is True
    assert "deterministic" in final["why"]
    assert _error_of(TooManyRequestsException("slow down"))["type"] == "TooManyRequests"
    assert _error_of(RuntimeError("Rate exceeded"))["type"] == "TooManyRequests"
    assert _error_of(TimeoutError("the maximum time of 900 s was reached"))["type"] == "Timeout"
    assert _error_of(RuntimeError("worker exited with code 137"))["type"] == "InstanceDied"
    other = _error_of(KeyError("x"))
    assert other == {"type": "KeyError", "message": "'x'"}


def test_a_lithops_calls_result_bills_the_worker_less_the_model_load():
    """A call's result from the handler's metrics and Lithops' stats: the duration billed
    is the worker's execution less the model load (never less than the handler's own),
    the peak the larger of the handler's and the worker's, cold as Lithops saw it."""
    pytest.importorskip("lithops")
    from serveless.backends.lithops.sidecar import _result

    metrics = {"handler_init_ms": 300.0, "duration_ms": 500.0, "peak_mb": 120.0, "cold": False}
    stats = {"worker_exec_time": 1.0, "worker_peak_memory_end": 200 * 2**20,
             "worker_cold_start": True, "worker_func_exec_time": 0.9, "unlisted": 1}
    r = _result(metrics, None, 0.0, stats)
    assert (r["metrics"], r["error"], r["cold"]) == (metrics, None, True)
    assert r["init_ms"] == 300.0 and r["duration_ms"] == pytest.approx(700.0)
    assert r["peak_mb"] == 200.0 and r["instance"] == ""
    assert r["extra"]["lithops"] == {"worker_exec_time": 1.0,
                                     "worker_peak_memory_end": 200 * 2**20,
                                     "worker_cold_start": True, "worker_func_exec_time": 0.9}
    slow = _result({**metrics, "duration_ms": 900.0}, None, 0.0, stats)
    assert slow["duration_ms"] == pytest.approx(900.0)  # the handler's own time at least
    bare = _result(metrics, None, 0.0)  # no stats: cold as the handler said
    assert bare["cold"] is False and bare["peak_mb"] == 120.0 and bare["duration_ms"] == 500.0
    t0 = time.perf_counter()
    failed = _result(None, {"type": "Timeout", "message": "m"}, t0)
    assert failed["error"]["type"] == "Timeout" and failed["peak_mb"] is None
    assert failed["duration_ms"] >= 0.0 and failed["init_ms"] == 0.0
