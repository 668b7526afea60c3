import pytest

from serveless.cost import LAMBDA_GB_SECOND, bill, billed_ms, gb_seconds, vcpus


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
