"""The store on a real S3 API (moto's server on 127.0.0.1): the end-to-end job, atomic and
bounded uploads, endpoints from the environment, stale temporaries found inside their job
only, and clear errors before any invocation."""

from __future__ import annotations

from typing import Any

import fsspec.asyn
import numpy as np
import pytest
from helpers import check_layout_in_bucket, check_predictions, rows_of

from serveless.backends import FunctionSpec, InvocationResult
from serveless.backends.local import LocalBackend
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.errors import StoreError
from serveless.store import Store
from serveless.store import s3 as s3_module

pytest_plugins = ["s3server"]

pytestmark = pytest.mark.e2e


# -- the end-to-end job on S3 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_job(s3_server, records_dir):
    """The test_driver_job job, with every object in the bucket; workers reach it by options."""
    store = Store(s3_server.url("e2e"), s3_server.options())
    assert store.local_path("x") is None  # no shortcut through a local folder
    store.check()
    spec = prepare_job(store, "e2e", "alexnet", preset="paper", records=str(records_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    return store, spec, result


def test_job_on_s3_gives_one_row_per_image_equal_to_the_whole_model(
        s3_job, records_dir, alexnet):
    store, spec, result = s3_job
    assert spec.stages == 4 and result.ok and result.images == 60
    check_predictions(store, "e2e", records_dir, alexnet, 60)
    assert sorted(r["record"] for r in rows_of(store, "e2e")).count("00002") == 10


def test_job_on_s3_keeps_everything_in_the_bucket(s3_job, s3_server):
    store, spec, _ = s3_job
    check_layout_in_bucket(s3_server.keys("e2e/"), "e2e", "e2e", spec.records, spec.stages,
                           spec.models)
    log = load_log(store, "e2e")
    assert len(log) == 3 * 4 and all(r["error"] is None for r in log)
    assert all(r["bytes_in"] > 0 and r["bytes_out"] > 0 for r in log)


# -- the store on S3 --------------------------------------------------------------------------


def test_round_trip_and_listing(s3_server, tmp_path):
    st = Store(s3_server.url("basic"), s3_server.options())
    st.put_bytes("j/a.bin", b"hello")
    (tmp_path / "b.bin").write_bytes(b"x" * 1000)
    st.put_file(tmp_path / "b.bin", "j/b.bin")
    assert st.get_bytes("j/a.bin") == b"hello" and st.size("j/b.bin") == 1000
    assert st.exists("j/a.bin") and not st.exists("j/zzz")
    assert st.list("j") == ["j/a.bin", "j/b.bin"] and st.list("nothing") == []
    with st.open_read("j/b.bin") as f:
        assert f.read(10) == b"x" * 10
    st.get_file("j/a.bin", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"hello"
    with pytest.raises(StoreError, match="missing"):
        st.get_bytes("j/zzz")
    st.delete("j")
    assert st.list("j") == []


def test_objects_written_by_another_client_are_seen_after_a_listing(s3_server):
    """A listing must not hide an object written later by a function in another process."""
    st = Store(s3_server.url("stale"), s3_server.options())
    st.put_bytes("p/a", b"1")
    assert st.list("p") == ["p/a"]
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="stale/p/b", Body=b"2")
    assert st.exists("p/b") and st.size("p/b") == 1
    assert st.list("p") == ["p/a", "p/b"]


def _record_calls(monkeypatch, st: Store, fail_on: str | None = None) -> list[str]:
    """Record every S3 request the store's filesystem makes; optionally fail one kind."""
    calls: list[str] = []
    real = st.fs._call_s3

    async def spy(method, *args, **kwargs):
        calls.append(method)
        if method == fail_on and calls.count(method) == 3:  # alone in its batch of parts
            raise RuntimeError("injected failure")
        return await real(method, *args, **kwargs)

    def sync_spy(method, *args, **kwargs):
        return fsspec.asyn.sync(st.fs.loop, spy, method, *args, **kwargs)

    real_direct = st._s3_call

    def direct_spy(method, **kwargs):
        calls.append(method)
        return real_direct(method, **kwargs)

    monkeypatch.setattr(st.fs, "_call_s3", spy)  # what s3fs's own methods call
    monkeypatch.setattr(st.fs, "call_s3", sync_spy)  # its blocking twin
    monkeypatch.setattr(st, "_s3_call", direct_spy)  # our single PUTs (and their checks)
    return calls


def test_an_object_is_one_streamed_put_and_one_get(s3_server, monkeypatch, tmp_path):
    """One request each way, as the cost model counts them, even above s3fs's 50 MiB
    chunks (where s3fs alone would send 10 parallel parts and hold them all in memory)."""
    st = Store(s3_server.url("put"), s3_server.options())
    data = np.random.default_rng(0).bytes(60 << 20)
    calls = _record_calls(monkeypatch, st)
    with st.writer("o/big.npy") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i:i + (1 << 20)])
    assert calls == ["put_object"]
    calls.clear()
    st.get_file("o/big.npy", tmp_path / "big")
    assert calls == ["get_object"] and (tmp_path / "big").read_bytes() == data
    calls.clear()
    assert st.get_bytes("o/big.npy") == data and calls == ["get_object"]


def test_writer_leaves_nothing_when_the_block_fails(s3_server):
    st = Store(s3_server.url("atomic"), s3_server.options())
    with pytest.raises(RuntimeError), st.writer("o/x.npy") as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert not st.exists("o/x.npy") and s3_server.keys("atomic/") == []


def test_multipart_upload_is_atomic_and_aborted_on_failure(s3_server, monkeypatch, tmp_path):
    """Objects over S3's PUT limit go multipart: visible only when complete, aborted on error."""
    monkeypatch.setattr(s3_module, "S3_MAX_PUT", 1 << 20)
    monkeypatch.setattr(s3_module, "S3_PART_SIZE", 5 << 20)  # S3's smallest part
    st = Store(s3_server.url("mpu"), s3_server.options())
    src = tmp_path / "big"
    data = np.random.default_rng(1).bytes(12 << 20)
    src.write_bytes(data)
    calls = _record_calls(monkeypatch, st, fail_on="upload_part")
    with pytest.raises(RuntimeError, match="injected"):
        st.put_file(src, "o/big")
    assert "abort_multipart_upload" in calls and "complete_multipart_upload" not in calls
    assert not st.exists("o/big")
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", []) == []
    monkeypatch.undo()
    monkeypatch.setattr(s3_module, "S3_MAX_PUT", 1 << 20)
    monkeypatch.setattr(s3_module, "S3_PART_SIZE", 5 << 20)
    calls = _record_calls(monkeypatch, st)
    st.put_file(src, "o/big")
    assert calls.count("upload_part") == 3 and calls[-2] == "complete_multipart_upload"
    assert calls[-1] == "head_object"  # the size S3 stored, confirmed
    assert st.get_bytes("o/big") == data


def test_endpoint_and_credentials_from_the_aws_environment(s3_server, monkeypatch):
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.setenv(var, s3_server.endpoint)
        st = Store(s3_server.url(f"env-{var}"), {"skip_instance_cache": True})
        st.check()
        st.put_bytes("k", var.encode())
        assert st.get_bytes("k") == var.encode()
        assert s3_server.keys(f"env-{var}/") == [f"env-{var}/k"]


# -- clear errors before any invocation --------------------------------------------------------


def test_missing_bucket_is_a_clear_store_error(s3_server):
    st = Store("s3://no-such-bucket/prefix", s3_server.options())
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        st.check()


@pytest.mark.parametrize("which", ["unknown key", "wrong secret"])
def test_wrong_credentials_are_a_clear_store_error(s3_server, which):
    opts = (s3_server.options(key="AKIAUNKNOWNUNKNOWN00") if which == "unknown key"
            else s3_server.options(secret="not-the-secret"))
    st = Store(s3_server.url("creds"), opts)
    with pytest.raises(StoreError, match="access denied to bucket 'serveless-test'.*credentials"):
        st.check()
    assert s3_server.keys("creds/") == []


class _CountingBackend:
    """A backend that must never be reached: counts invocations."""

    name = "counting"

    def __init__(self) -> None:
        self.invocations = 0

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "cpu_share": "n/a"}

    def invoke(self, fn: FunctionSpec, event: dict[str, Any]) -> InvocationResult:
        self.invocations += 1
        return InvocationResult(None, {"type": "Unreachable", "message": "invoked"}, False,
                                0.0, 0.0, None)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("problem", ["missing bucket", "wrong credentials"])
def test_job_with_an_unusable_bucket_fails_before_any_invocation(
        s3_server, records_dir, problem):
    """prepare_job and run_job call Store.check() first: a StoreError, not failed functions."""
    if problem == "missing bucket":
        st = Store("s3://no-such-bucket/j", s3_server.options())
    else:
        st = Store(s3_server.url("j"), s3_server.options(secret="wrong"))
    with pytest.raises(StoreError, match="does not exist|access denied"):
        prepare_job(st, "j", "alexnet", records=str(records_dir))
    backend = _CountingBackend()
    spec = JobSpec(job="j", model="alexnet", cuts=[], memory=[1769], records=["00000"])
    with pytest.raises(StoreError, match="does not exist|access denied"):
        run_job(st, spec, backend, progress=False)
    assert backend.invocations == 0


def test_missing_credentials_are_said_at_once(s3_server, monkeypatch, tmp_path):
    """No credentials anywhere is final: said as such, not retried as a network fault."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    st = Store(s3_server.url("nocreds"), {"endpoint_url": s3_server.endpoint,
                                          "skip_instance_cache": True})
    with pytest.raises(StoreError, match="no AWS credentials found"):
        st.check()


def test_stale_temporaries_on_s3_stay_inside_the_job(s3_server):
    store = Store(s3_server.url("tmps"), s3_server.options())
    mine, theirs = "j/stage-0/.serveless-tmp-1", "j2/stage-0/.serveless-tmp-2"
    for key in [mine, theirs, "j/a.npy", "j/a.npy.tmp-1"]:  # the last: a user's name
        store.put_bytes(key, b"x")
    assert store.stale_temporaries("j") == [mine]
