"""Backpressure: invocations the platform refuses (Lambda's 429 TooManyRequests, injected
in the local backend) are asked again with backoff, spend no retry, are not billed, and
are counted in the summary."""

from __future__ import annotations

import pytest
from rich.console import Console

from serveless.backends.local import LocalBackend
from serveless.cost import bill
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.report.summary import print_summary, summarize
from serveless.store import Store


def test_throttled_invocations_back_off_without_spending_retries(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "t", "alexnet", preset="paper", records=str(records_dir))
    with LocalBackend(throttle_rate=0.4, throttle_seed=3) as backend:
        result = run_job(store, spec, backend, concurrency=2, retries=0, progress=False)
    # with no retries at all, any throttle counted as a failure would fail its record
    assert result.ok and result.images == 60 and result.retried == 0
    rows = load_log(store, "t")
    refused = [r for r in rows if r["throttled"]]
    ran = [r for r in rows if not r["throttled"]]
    assert result.throttled == len(refused) >= 3
    assert all(r["error"]["type"] == "TooManyRequests" and r["billed_ms"] == 0 for r in refused)
    assert len(ran) == len(spec.records) * spec.stages and all(r["error"] is None for r in ran)
    assert bill(rows)["total"].invocations == len(ran)  # Lambda bills no refused request
    s = summarize(rows)
    assert s["throttled"] == len(refused)
    assert sum(st.invocations for st in s["stages"]) == len(ran)
    assert sum(st.errors for st in s["stages"]) == 0
    console = Console(record=True, width=200)
    print_summary(rows, console=console)
    assert f"throttled: {len(refused)} invocations refused" in console.export_text()


def test_throttle_rate_is_checked():
    with pytest.raises(ValueError, match="throttle_rate"):
        LocalBackend(throttle_rate=1.5)
