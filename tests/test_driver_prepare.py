"""What prepare_job refuses before it writes anything: memory sizes that do not fit the
stages or Lambda, a job name that escapes the store, no records, two records of one name."""

from __future__ import annotations

import os

import pytest

from serveless.driver.prepare import _overlap, check_job_folder, prepare_job
from serveless.errors import JobError
from serveless.store import JobLayout, Store


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, records_dir):
    store = Store(str(tmp_path))
    with pytest.raises(JobError, match="4 stages"):
        prepare_job(store, "j", "alexnet", preset="paper", memory="1024,1024",
                    records=str(records_dir))
    with pytest.raises(JobError, match="outside"):
        prepare_job(store, "j", "alexnet", memory="64", records=str(records_dir))
    with pytest.raises(ValueError, match="job name"):
        prepare_job(store, "../evil", "alexnet", records=str(records_dir))
    with pytest.raises(JobError, match="no records"):
        prepare_job(store, "j", "alexnet", records=str(tmp_path / "nothing"))
    assert list(tmp_path.iterdir()) == []


def test_records_with_the_same_name_are_refused(tmp_path, records_dir):
    import shutil

    for sub in ("a", "b"):
        shutil.copytree(records_dir, tmp_path / "in" / sub)
    store = Store(str(tmp_path / "s"))
    with pytest.raises(JobError, match="two records named"):
        prepare_job(store, "dup", "alexnet", records=str(tmp_path / "in" / "*" / "*.tfrecord"))


# Whether a job's folder and its input share objects (issue 21): equal, one inside the
# other, through a glob, a relative path or a symlink; and when they do not.


pytest_plugins = ["s3server"]


def test_local_inputs_that_overlap_the_jobs_folder(tmp_path, monkeypatch):
    st = Store(str(tmp_path / "st"))
    (tmp_path / "st" / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "st" / "photos", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for source in ("st/photos", str(tmp_path / "st" / "photos" / "sub"), "st", "st/photos/*.jpg",
                   str(tmp_path / "link"), f"file://{tmp_path}/st/photos"):
        assert _overlap(st, "photos", source, None), source
    for source in ("elsewhere", "st/photos2", str(tmp_path / "st" / "other")):
        assert not _overlap(st, "photos", source, None), source


def test_s3_inputs_that_overlap_the_jobs_folder(s3_server):
    st = Store(s3_server.url("pre"), s3_server.options())
    opts = s3_server.options()
    assert _overlap(st, "dataset", s3_server.url("pre/dataset"), opts)
    assert _overlap(st, "dataset", s3_server.url("pre"), opts)
    assert _overlap(st, "dataset", s3_server.url("pre/dataset/shard-*.tar"), opts)
    assert not _overlap(st, "dataset", s3_server.url("pre/dataset2"), opts)
    assert not _overlap(st, "dataset", "/tmp/pre/dataset", opts)  # another file system


def test_the_check_names_the_conflict(tmp_path):
    st = Store(str(tmp_path / "st"))
    layout = JobLayout("photos")
    check_job_folder(st, layout, False, str(tmp_path / "imgs"))  # nothing there: fine
    st.put_bytes("photos/lease", b"{}")  # the driver's own lease is not foreign data
    check_job_folder(st, layout, False, str(tmp_path / "imgs"))
    st.put_bytes("photos/records/00000.tfrecord", b"x")
    check_job_folder(st, layout, False, None, records_placed=True)  # the demo's own records
    with pytest.raises(JobError, match="holds objects but no job.json"):
        check_job_folder(st, layout, False, None)
    with pytest.raises(JobError, match="overlap"):
        check_job_folder(st, layout, True, str(tmp_path / "st" / "photos"))
