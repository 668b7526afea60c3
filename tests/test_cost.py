"""cost.py: billed duration, the vCPU share of a memory size, and the bill of a job's log,
ephemeral storage included; the bill also holds the driver's own store requests (uploads,
job.json, the log), counted by the store, kept in <job>/driver.json across runs, and
listed apart from the functions'."""

from __future__ import annotations

import pytest
from rich.console import Console

from serveless.backends.local import LocalBackend
from serveless.cost import (
    LAMBDA_EPHEMERAL_GB_SECOND,
    LAMBDA_GB_SECOND,
    S3_GET,
    S3_PUT,
    bill,
    billed_ms,
    gb_seconds,
    store_request_cost,
    vcpus,
)
from serveless.driver.log import load_driver_requests, load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.report.summary import print_summary, summarize
from serveless.store import Store


def test_billed_ms_rounds_up_and_adds_init():
    assert billed_ms(100.0) == 100
    assert billed_ms(100.01) == 101
    assert billed_ms(0.2) == 1
    assert billed_ms(250.4, init_ms=812.1) == 251 + 813


def test_vcpu_share():
    assert vcpus(1769) == 1.0
    assert vcpus(885) == pytest.approx(0.5003, abs=1e-3)
    assert vcpus(10240) == pytest.approx(10240 / 1769)
    assert vcpus(12000) == 6.0  # the cap


def test_bill_by_hand():
    rows = [
        # 1024 MB for 1000 ms = 1 GB-s; 2 GETs, 1 PUT
        {"stage": 0, "memory_mb": 1024, "billed_ms": 1000, "gets": 2, "puts": 1},
        # 512 MB for 2 s = 1 GB-s
        {"stage": 1, "memory_mb": 512, "billed_ms": 2000, "gets": 1, "puts": 1},
    ]
    b = bill(rows, "x86_64")
    assert b[0].gb_s == pytest.approx(1.0)
    assert b["total"].gb_s == pytest.approx(2.0)
    expected = 2 * 0.0000166667 + 2 * 0.20 / 1e6 + 3 * 0.0004 / 1000 + 2 * 0.005 / 1000
    assert b["total"].total == pytest.approx(expected, rel=1e-12)
    arm = bill(rows, "arm64")["total"]
    assert arm.compute == pytest.approx(2 * LAMBDA_GB_SECOND["arm64"])
    assert gb_seconds(1769, 1000) == pytest.approx(1769 / 1024)
    with pytest.raises(ValueError):
        bill(rows, "sparc")


def test_store_request_cost_prices_each_kind():
    assert store_request_cost({"get": 10, "head": 5, "put": 3, "list": 2, "delete": 7}) == (
        pytest.approx(15 * S3_GET + 5 * S3_PUT))


def test_ephemeral_storage_above_512_mb_is_billed():
    row = {"stage": 0, "memory_mb": 1024, "billed_ms": 2000, "gets": 0, "puts": 0}
    plain = bill([row])["total"]
    more = bill([{**row, "ephemeral_mb": 2560}])["total"]
    assert plain.ephemeral == 0
    # 2 GB above the free 512 MB for 2 s
    assert more.ephemeral == pytest.approx(2 * 2 * LAMBDA_EPHEMERAL_GB_SECOND)
    assert more.total == pytest.approx(plain.total + more.ephemeral)


@pytest.mark.e2e
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


# HEAD requests are billed as GETs (issue 25: a bill that priced them as free passed).


def _row(stage: int, gets: int, heads: int, puts: int) -> dict:
    return {"stage": stage, "record": "r", "attempt": 0, "started": 1.0, "memory_mb": 1024,
            "init_ms": 0.0, "duration_ms": 1000.0, "billed_ms": 1000, "gets": gets,
            "heads": heads, "puts": puts, "images": 10, "error": None}


def test_heads_are_priced_as_gets_in_every_bill():
    rows = [_row(0, gets=0, heads=10, puts=0), _row(1, gets=3, heads=7, puts=2)]
    b = bill(rows)
    assert b[0].store_ops == pytest.approx(10 * S3_GET, rel=1e-12)  # 4e-6 $
    assert b[0].store_ops == pytest.approx(4e-6, rel=1e-12)
    assert b[1].store_ops == pytest.approx(10 * S3_GET + 2 * S3_PUT, rel=1e-12)
    assert b["total"].store_ops == pytest.approx(20 * S3_GET + 2 * S3_PUT, rel=1e-12)
    s = summarize(rows)
    assert s["store_ops"] == pytest.approx(20 * S3_GET + 2 * S3_PUT, rel=1e-12)
    assert store_request_cost({"head": 5, "get": 5, "put": 1}) == pytest.approx(
        10 * S3_GET + S3_PUT, rel=1e-12)
