"""Whether a job's folder and its input share objects (issue 21): equal, one inside the
other, through a glob, a relative path or a symlink; and when they do not."""

from __future__ import annotations

import os

import pytest

from serveless.driver.prepare import _overlap, check_job_folder
from serveless.errors import JobError
from serveless.store import JobLayout, Store

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
