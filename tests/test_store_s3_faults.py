"""S3 through a fault-injecting proxy (tests/faultproxy.py) in front of the moto server:
every write sends all its bytes on every attempt and is confirmed, whatever layer retries,
and a job through a faulty network loses no row and stores no short object."""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from helpers import small_records

from serveless.backends.local import LocalBackend
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.store import Store

pytest_plugins = ["s3server", "faultproxy"]

pytestmark = pytest.mark.e2e

# botocore's "legacy" retries with 2 retries: 3 attempts, then s3fs (or we) take over.
FEW_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "legacy"}}}


def _store(s3_server, proxy, prefix: str) -> Store:
    return Store(s3_server.url(prefix), s3_server.options(endpoint_url=proxy.endpoint,
                                                          **FEW_RETRIES))


def _direct_bytes(s3_server, key: str) -> bytes:
    """The object as the server holds it, not through the proxy."""
    return s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()


def _write(st: Store, how: str, key: str, data: bytes, tmp_path: Path) -> None:
    if how == "put_file":
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        st.put_file(src, key)
    elif how == "writer":
        with st.writer(key) as f:
            for i in range(0, len(data), 1 << 20):
                f.write(data[i:i + (1 << 20)])
    else:
        st.put_bytes(key, data)


@pytest.mark.parametrize("how", ["put_file", "writer", "put_bytes"])
@pytest.mark.parametrize("fault", ["slowdown", "drop"])
def test_every_attempt_sends_every_byte_after_botocore_gives_up(
        s3_server, s3_proxy, tmp_path, how, fault):
    """Four faults in a row exhaust botocore's three attempts; the next layer's attempt must
    send the whole body again (s3fs's own retry re-sent the spent file: an empty object)."""
    st = _store(s3_server, s3_proxy, f"exhaust-{how}-{fault}")
    data = np.random.default_rng(3).bytes(3 << 20)
    s3_proxy.set_policy(lambda m, k, n: fault if m == "PUT" and n <= 4 else "pass")
    _write(st, how, "o/x.bin", data, tmp_path)
    puts = s3_proxy.seen("PUT", "/o/x.bin", forwarded=None)
    assert [p.action for p in puts] == [fault] * 4 + ["pass"]
    full = [p.body_bytes for p in puts if p.action != "drop"]
    assert full == [len(data)] * len(full)  # every attempt carried all of it
    assert _direct_bytes(s3_server, f"exhaust-{how}-{fault}/o/x.bin") == data


@pytest.mark.parametrize("how", ["put_file", "writer", "put_bytes"])
def test_a_short_object_stored_as_success_is_caught_and_written_again(
        s3_server, s3_proxy, tmp_path, how):
    """A layer that loses bytes silently (the server stores half and answers 200) is caught
    by the ETag/MD5 confirmation, and the write is made again with a fresh body."""
    st = _store(s3_server, s3_proxy, f"short-{how}")
    data = np.random.default_rng(4).bytes(1 << 20)
    s3_proxy.set_policy(lambda m, k, n: "truncate" if m == "PUT" and n == 1 else "pass")
    _write(st, how, "o/y.bin", data, tmp_path)
    puts = s3_proxy.seen("PUT", "/o/y.bin")
    assert [(p.action, p.body_bytes) for p in puts] == [("truncate", len(data) // 2),
                                                        ("pass", len(data))]
    assert _direct_bytes(s3_server, f"short-{how}/o/y.bin") == data


def test_store_check_survives_a_probe_cut_short_on_the_wire(s3_server, s3_proxy):
    """The store probe is written like any object: a short upload stored as success is
    written again, not reported as "did not return what was written" (CI saw that when a
    job's probe, a fresh random key, drew a truncation)."""
    st = _store(s3_server, s3_proxy, "probe")
    s3_proxy.set_policy(lambda m, k, n: "truncate" if m == "PUT" and n == 1 else
                        "drop" if m == "GET" and n == 1 else "pass")
    st.check()
    puts = [p.action for p in s3_proxy.seen("PUT", ".serveless-check-", forwarded=None)]
    assert puts == ["truncate", "pass"]
    assert not [k for k in s3_server.keys("probe/") if ".serveless-check-" in k]


def test_an_object_is_one_put_and_one_get_on_the_wire(s3_server, s3_proxy, tmp_path):
    """One request each way, as the cost model counts them, counted by the server's side:
    a write is one PUT (confirmed by its own reply, no HEAD), a read one GET."""
    st = _store(s3_server, s3_proxy, "wire")
    data = np.random.default_rng(5).bytes(6 << 20)
    s3_proxy.clear()
    with st.writer("o/big.npy") as f:
        f.write(data)
    assert [r.method for r in s3_proxy.seen()] == ["PUT"]
    s3_proxy.clear()
    st.get_file("o/big.npy", tmp_path / "big")
    assert [r.method for r in s3_proxy.seen()] == ["GET"]
    assert (tmp_path / "big").read_bytes() == data


# -- a whole job through a faulty network -------------------------------------------------------


@pytest.fixture(scope="module", name="small_records")
def _small_records(tmp_path_factory) -> Path:
    return small_records(tmp_path_factory.mktemp("faulty"), seed=13)


def test_job_through_a_faulty_network_loses_no_row_and_no_byte(
        s3_server, s3_proxy, small_records):
    from faultproxy import random_faults

    st = _store(s3_server, s3_proxy, "faultyjob")
    spec = prepare_job(st, "fj", "alexnet", preset="paper", records=str(small_records))
    s3_proxy.clear()
    faulty = random_faults(0.3, seed=1, delay_s=0.05)
    # and the first upload of every stage-1 output and predictions object arrives short
    s3_proxy.set_policy(lambda m, k, n: "truncate" if m == "PUT" and n == 1 and (
        "/stage-1/" in k or "/predictions/" in k) else faulty(m, k, n))
    with LocalBackend() as backend:
        result = run_job(st, spec, backend, concurrency=2, progress=False)
    faults = s3_proxy.faults()
    s3_proxy.set_policy(lambda m, k, n: "pass")
    assert result.ok and not result.failed_records and result.images == 20
    # enough of every kind of fault to matter (seeded: the same every run)
    assert sum(faults.values()) >= 15 and {"drop", "slowdown", "delay"} <= set(faults)
    assert faults["truncate"] >= 2 * len(spec.records)
    # every row, read straight from the server
    rows = []
    for rec in spec.records:
        text = _direct_bytes(s3_server, f"faultyjob/fj/predictions/{rec}.jsonl").decode()
        rows += [json.loads(line) for line in text.splitlines()]
    assert sorted((r["record"], r["index"]) for r in rows) == sorted(
        (rec, i) for rec in spec.records for i in range(10))
    assert all(r["error"] is None and len(r["top5"]) == 5 for r in rows)
    # no object shorter than meant: each output as its writer hashed it, each record as sent
    outputs = [r["output"] for r in load_log(st, "fj") if r["error"] is None]
    assert len(outputs) >= 2 * spec.stages
    for out in outputs:
        data = _direct_bytes(s3_server, f"faultyjob/{out['key']}")
        assert len(data) == out["size"] and f"{google_crc32c.value(data):08x}" == out["crc32c"]
    for rec in spec.records:
        local = (small_records / f"{rec}.tfrecord").read_bytes()
        assert _direct_bytes(s3_server, f"faultyjob/fj/records/{rec}.tfrecord") == local


# -- requests counted as the server sees them (item 3) -------------------------------------------


def test_each_invocation_logs_the_requests_the_server_saw(s3_server, s3_proxy, small_records,
                                                          monkeypatch, tmp_path):
    """Stage 0 fetches its record once (one GET, even when the record spans many read
    blocks), and every stage's gets/heads/puts equal the GETs/HEADs/PUTs on the wire."""
    from serveless.runtime import handler, loader
    from serveless.runtime.protocol import MODEL_CACHE_ENV
    from serveless.store import store as store_module

    monkeypatch.setattr(store_module, "READ_BLOCK", 64 << 10)  # records span ~10 blocks
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    st = _store(s3_server, s3_proxy, "counted")
    spec = prepare_job(st, "cj", "alexnet", preset="paper", records=str(small_records))
    record = spec.records[0]
    assert st.size(f"cj/records/{record}.tfrecord") > 4 * (64 << 10)
    monkeypatch.setattr(loader, "_SESSIONS", {})  # a cold start: the model is fetched too
    for stage in range(spec.stages):
        s3_proxy.clear()
        event = {"store": st.spec(), "job": "cj", "stage": stage, "stages": spec.stages,
                 "record": record, "size": spec.input_hw, "format": spec.format,
                 "model": spec.stage_model_key(stage)}
        metrics = handler.handle(event)
        loader._SESSIONS.clear()
        assert metrics["images"] == 10
        assert metrics["gets"] == len(s3_proxy.seen("GET")), stage
        assert metrics["heads"] == len(s3_proxy.seen("HEAD")), stage
        assert metrics["puts"] == len(s3_proxy.seen("PUT")), stage
        if stage == 0:
            assert len(s3_proxy.seen("GET", f"/records/{record}.tfrecord")) == 1
        else:
            size = st.size(f"cj/stage-{stage - 1}/{record}.npy")
            gets = len(s3_proxy.seen("GET", f"/stage-{stage - 1}/{record}.npy"))
            assert 1 <= gets <= -(-size // (64 << 10))  # at most one per read block
