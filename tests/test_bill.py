"""The bill includes the driver's own store requests (uploads, job.json, the log), counted
by the store, kept in <job>/driver.json across runs, and listed apart from the functions'."""

from __future__ import annotations

import pytest
from rich.console import Console

from serveless.backends.local import LocalBackend
from serveless.cost import LAMBDA_EPHEMERAL_GB_SECOND, S3_GET, S3_PUT, bill, store_request_cost
from serveless.driver.log import load_driver_requests, load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.report.summary import print_summary, summarize
from serveless.store import Store


def test_store_request_cost_prices_each_kind():
    assert store_request_cost({"get": 10, "head": 5, "put": 3, "list": 2, "delete": 7}) == (
        pytest.approx(15 * S3_GET + 5 * S3_PUT))


def test_the_bill_lists_the_drivers_requests_apart(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "b", "alexnet", preset="paper", records=str(records_dir))
    after_prepare = load_driver_requests(store, "b")
    # 3 records, 4 stage graphs and 4 weight files, job.json, driver.json itself
    assert after_prepare["put"] >= 3 + 4 + 4 + 1 + 1
    spec.records = spec.records[:1]
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=1, progress=False)
    assert result.ok
    driver = load_driver_requests(store, "b")
    assert driver == result.driver_requests
    assert driver["put"] > after_prepare["put"]  # the log and driver.json, at least
    assert driver["head"] > after_prepare.get("head", 0)  # the resume checks
    rows = load_log(store, "b")
    functions = bill(rows)["total"].total
    s = summarize(rows, driver=driver)
    assert s["driver_store_ops"] == pytest.approx(store_request_cost(driver))
    assert s["driver_store_ops"] > 0
    assert s["cost"] == pytest.approx(functions + s["driver_store_ops"])
    console = Console(record=True, width=250)
    print_summary(rows, console=console, driver=driver)
    text = console.export_text()
    assert "driver store requests" in text and f"{driver['put']} PUT" in text


def test_ephemeral_storage_above_512_mb_is_billed():
    row = {"stage": 0, "memory_mb": 1024, "billed_ms": 2000, "gets": 0, "puts": 0}
    plain = bill([row])["total"]
    more = bill([{**row, "ephemeral_mb": 2560}])["total"]
    assert plain.ephemeral == 0
    # 2 GB above the free 512 MB for 2 s
    assert more.ephemeral == pytest.approx(2 * 2 * LAMBDA_EPHEMERAL_GB_SECOND)
    assert more.total == pytest.approx(plain.total + more.ephemeral)


def test_lithops_on_lambda_reports_its_ephemeral_storage():
    pytest.importorskip("lithops")
    from serveless.backends.lithops import LithopsBackend

    backend = object.__new__(LithopsBackend)  # no sidecar: only describe() is looked at
    backend.compute, backend.storage, backend.info = "aws_lambda", "aws_s3", {}
    backend.config = {"aws_lambda": {"ephemeral_storage": 2048}}
    assert backend.describe()["ephemeral_mb"] == 2048
    backend.config = {"aws_lambda": {}}
    assert backend.describe()["ephemeral_mb"] == 512
