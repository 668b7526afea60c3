"""What prepare_job refuses before it writes anything: memory sizes that do not fit the
stages or Lambda, a job name that escapes the store, no records, two records of one name."""

from __future__ import annotations

import pytest

from serveless.driver.prepare import prepare_job
from serveless.errors import JobError
from serveless.store import Store


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
