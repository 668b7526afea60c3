"""The store's rules for names and writes (issue 21): temporary objects no user name can
reach, long and hidden record names made safe, job names checked whole, the journal of
what a setup wrote, conditional writes, and object metadata."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid

import pytest

from serveless.store import JobLayout, Store
from serveless.store.layout import (
    MAX_NAME_BYTES,
    is_internal,
    is_temporary,
    record_name,
    temporary,
    validate_job_name,
)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield Store(str(tmp_path / "store"))
        return
    url = f"memory://rules-{uuid.uuid4().hex}"
    yield Store(url)
    Store(url).delete("")


def test_a_record_named_like_an_old_temporary_is_a_record(store):
    """`x.tmp-1.tfrecord` was taken for a leftover temporary object and deleted."""
    key = JobLayout("j").record("train.tmp-00000")
    store.put_bytes(key, b"record")
    assert not is_temporary(key)
    assert store.stale_temporaries("j") == []
    assert store.list("j/records", ".tfrecord") == [key]


def test_temporary_names_stay_short_and_beside_their_key():
    long = "j/records/" + "x" * 240 + ".tfrecord"
    tmp = temporary(long)
    assert tmp.startswith("j/records/.serveless-tmp-") and len(tmp) < 70
    assert is_temporary(tmp) and is_internal(tmp) and not is_temporary(long)
    assert temporary("top.json").startswith(".serveless-tmp-")


def test_killed_writers_leave_only_temporaries_the_driver_removes(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(RuntimeError), store.writer("j/stage-0/r.npy") as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert not list(tmp_path.rglob("r.npy")) and not list(tmp_path.rglob(".serveless-tmp-*"))
    # a writer killed for real leaves its temporary: listed, removable, never a record
    (tmp_path / "j" / "stage-0" / ".serveless-tmp-0123abcd").write_bytes(b"torn")
    (tmp_path / "j2").mkdir()
    (tmp_path / "j2" / ".serveless-tmp-ffff").write_bytes(b"someone else's")
    assert store.stale_temporaries("j") == ["j/stage-0/.serveless-tmp-0123abcd"]
    assert store.list("j/stage-0") == []


def test_long_and_hidden_record_names_are_made_safe():
    assert record_name("a/b/photos.tfrecord") == "photos"
    assert record_name(".hidden.tfrecord") == "_.hidden"
    long = "é" * 150 + ".tfrecord"  # 300 bytes of UTF-8
    safe = record_name(long)
    assert len(safe.encode()) <= MAX_NAME_BYTES
    assert safe.startswith("é" * 10) and safe != record_name("é" * 149 + "e.tfrecord")
    assert record_name(safe + ".tfrecord") == safe  # idempotent: keys give the name back
    # every key of a safe name fits a file system's 255 bytes
    layout = JobLayout("j")
    assert len(layout.record_meta(safe).rsplit("/", 1)[-1].encode()) <= 255


def test_job_names_are_checked_whole():
    assert validate_job_name("photos-1") == "photos-1"
    for bad in ("photos\n", "a/b", "..", ".hidden", "x" * 129, "models", ""):
        with pytest.raises(ValueError):
            validate_job_name(bad)


def test_the_journal_holds_what_this_store_object_wrote(store):
    store.put_bytes("before", b"1")
    with store.journal() as written:
        store.put_bytes("j/a", b"a")
        with store.writer("j/b") as f:
            f.write(b"b")
        with pytest.raises(RuntimeError), store.writer("j/c") as f:
            raise RuntimeError("not written")
    store.put_bytes("after", b"2")
    assert written == ["j/a", "j/b"]


def test_create_is_exclusive_and_replace_is_conditional(store):
    assert store.create("j/lease", b"mine")
    assert not store.create("j/lease", b"yours")
    data, version = store.read_versioned("j/lease")
    assert data == b"mine"
    new = store.replace("j/lease", b"renewed", version)
    assert new is not None and store.read_versioned("j/lease")[0] == b"renewed"
    assert store.replace("j/lease", b"stale", version) is None  # someone changed it first
    assert store.read_versioned("j/lease")[0] == b"renewed"
    store.delete("j/lease")
    assert store.replace("j/lease", b"gone", new) is None
    assert store.read_versioned("j/lease") is None


def test_two_processes_racing_to_create_one_object_one_wins(tmp_path):
    store = Store(str(tmp_path))
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        wins.append(Store(str(tmp_path)).create("j/lease", str(i).encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert not list(tmp_path.rglob(".serveless-tmp-*"))
    assert store.read_versioned("j/lease") is not None


def test_metadata_is_stored_with_the_object_and_goes_with_it(store):
    with store.writer("j/predictions/r.jsonl", lambda: {"serveless-call": '{"v":1}'}) as f:
        f.write(b"row\n")
    size, meta = store.head("j/predictions/r.jsonl")
    assert size == 4 and meta == {"serveless-call": '{"v":1}'}
    assert store.sizes("j/predictions") == {"j/predictions/r.jsonl": 4}  # no sidecar listed
    assert store.list("j/predictions") == ["j/predictions/r.jsonl"]
    # nothing hidden beside the object: a glob of the folder (pathlib's matches dot files)
    # finds the predictions only
    assert [k.rsplit("/", 1)[-1] for k in store.find("j/predictions")] == ["r.jsonl"]
    store.put_bytes("j/plain", b"x")
    assert store.head("j/plain") == (1, {})
    store.delete("j/predictions/r.jsonl")
    assert store.head("j/predictions/r.jsonl") is None and store.find("j/predictions") == []
    # a folder deleted whole takes its objects' metadata with it
    with store.writer("j/stage-0/a.npy", lambda: {"serveless-call": "{}"}) as f:
        f.write(b"t")
    store.delete("j/stage-0")
    assert [k for k in store.find("j") if k != "j/plain"] == []


def test_metadata_on_s3_is_the_objects_own(s3_server):
    st = Store(s3_server.url(f"meta-{uuid.uuid4().hex[:8]}"), s3_server.options())
    with st.writer("j/stage-0/r.npy", lambda: {"serveless-call": json.dumps({"v": 1})}) as f:
        f.write(b"tensor")
    assert st.head("j/stage-0/r.npy") == (6, {"serveless-call": '{"v": 1}'})
    assert st.find("j") == ["j/stage-0/r.npy"]  # no sidecar: S3 keeps it with the object
    assert st.create("j/lease", b"a") and not st.create("j/lease", b"b")
    data, version = st.read_versioned("j/lease")
    assert version == hashlib.md5(b"a").hexdigest()  # a plain PUT's ETag
    assert st.replace("j/lease", b"c", version) and st.replace("j/lease", b"d", version) is None


pytest_plugins = ["s3server"]
