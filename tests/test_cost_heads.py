"""HEAD requests are billed as GETs (issue 25: a bill that priced them as free passed)."""

from __future__ import annotations

import pytest

from serveless.cost import S3_GET, S3_PUT, bill, store_request_cost
from serveless.report.summary import summarize


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
