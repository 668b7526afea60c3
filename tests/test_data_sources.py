"""Inputs found by content (issue 11, items 1 and 2): TensorFlow-named shards in a folder, a
glob or an S3 prefix; every record's framing checked before any invocation, with errors that
name the user's own file, the byte offset and the reason; folders of images scanned (the
one scanner) and packed into records (the one packer)."""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

import pytest
from datakit import CLASSES, gray_jpeg_bytes, image_folder, png_bytes
from helpers import no_hang, rows_of, run_local

from serveless.data.records import Example, count_examples, iter_record, read_record, write_record
from serveless.data.sources import NOT_A_RECORD, check_records, pack, record_chunks, scan_inputs
from serveless.driver.prepare import prepare_job
from serveless.errors import JobError, RecordError, SourceError
from serveless.store import JobLayout, Store

pytest_plugins = ["s3server"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, records_dir) -> Path:
    """The session's records renamed as TensorFlow names its ImageNet shards (no extension),
    next to a README that is neither a record nor an image."""
    root = tmp_path_factory.mktemp("shards")
    files = sorted(records_dir.glob("*.tfrecord"))
    for i, f in enumerate(files):
        shutil.copy(f, root / f"train-{i:05d}-of-{len(files):05d}")
    (root / "README.txt").write_text("ImageNet shards\n")
    return root


@pytest.mark.e2e
def test_tf_named_shards_in_a_folder_are_records(tmp_path, shards, tiny_model_path):
    inputs = scan_inputs(str(shards))
    assert [f.record_name for f in inputs.records] == ["train-00000-of-00003",
                                                       "train-00001-of-00003",
                                                       "train-00002-of-00003"]
    assert inputs.images == []
    assert inputs.skipped == [(str(shards / "README.txt"),
                               "not an image (unrecognised format) and not a record (a TFRecord "
                               "file or a tar shard)")]
    assert check_records(inputs.records) == {"train-00000-of-00003": 25,
                                             "train-00001-of-00003": 25,
                                             "train-00002-of-00003": 10}
    store = Store(str(tmp_path))
    spec = prepare_job(store, "tf", tiny_model_path, records=str(shards))
    assert spec.records == ["train-00000-of-00003", "train-00001-of-00003",
                            "train-00002-of-00003"]
    run_local(store, spec)
    rows = rows_of(store, "tf")
    assert len(rows) == 60 and all(r["error"] is None for r in rows)
    assert {r["record"] for r in rows} == set(spec.records)
    assert all(len(r["top5"]) == 5 and max(r["top5"]) < CLASSES for r in rows)


def test_a_glob_of_shards(tmp_path, shards, tiny_model_path):
    inputs = scan_inputs(str(shards / "train-0000[01]-*"))
    assert [f.record_name for f in inputs.records] == ["train-00000-of-00003",
                                                       "train-00001-of-00003"]


@pytest.mark.e2e
def test_tf_named_shards_from_an_s3_prefix(tmp_path, shards, s3_server, tiny_model_path):
    client = s3_server.client()
    for f in sorted(shards.iterdir()):
        client.put_object(Bucket=s3_server.bucket, Key=f"imagenet/val/{f.name}",
                          Body=f.read_bytes())
    url = s3_server.url("imagenet/val")
    inputs = scan_inputs(url, s3_server.options())
    assert [f.record_name for f in inputs.records] == ["train-00000-of-00003",
                                                       "train-00001-of-00003",
                                                       "train-00002-of-00003"]
    assert inputs.skipped[0][0] == f"{url}/README.txt"
    store = Store(str(tmp_path))
    spec = prepare_job(store, "s3in", tiny_model_path, records=url + "/",
                       input_options=s3_server.options())
    run_local(store, spec)
    assert len(rows_of(store, "s3in")) == 60
    for name in spec.records:  # byte-identical copies of the user's shards
        assert (tmp_path / "s3in" / "records" / f"{name}.tfrecord").read_bytes() == (
            shards / name).read_bytes()


def test_random_bytes_named_tfrecord_fail_before_anything_runs(tmp_path, tiny_model_path):
    src = tmp_path / "in"
    src.mkdir()
    bad = src / "photos.tfrecord"
    bad.write_bytes(bytes(range(256)) * 4)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(RecordError) as exc:
        prepare_job(store, "bad", tiny_model_path, records=str(src))
    assert str(exc.value) == (f"{bad}: byte 0: not a TFRecord file (the first entry's length "
                              "CRC does not match)")
    assert NOT_A_RECORD in str(exc.value)
    assert not (tmp_path / "store").exists()  # nothing written, nothing invoked


def _record(path: Path, n: int) -> list[int]:
    """A record of n small examples; returns each entry's byte offset."""
    with open(path, "wb") as f:
        write_record(f, [Example(b"x" * (10 + i), f"f{i}.jpg", i) for i in range(n)])
    data = path.read_bytes()
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 12 + int.from_bytes(data[pos:pos + 8], "little") + 4
    return offsets


def test_a_truncated_shard_is_named_with_its_offset_before_anything_runs(tmp_path, tiny_model_path):
    src = tmp_path / "in"
    src.mkdir()
    good, cut = src / "train-00000-of-00002", src / "train-00001-of-00002"
    _record(good, 3)
    offsets = _record(cut, 3)
    data = cut.read_bytes()
    cut.write_bytes(data[:-7])
    store = Store(str(tmp_path / "store"))
    with pytest.raises(RecordError) as exc:
        prepare_job(store, "cut", tiny_model_path, records=str(src))
    assert str(exc.value) == (f"{cut}: byte {offsets[2]}: truncated data: expected "
                              f"{len(data) - offsets[2] - 16} bytes, got "
                              f"{len(data) - offsets[2] - 12 - 7}")
    assert not (tmp_path / "store").exists()


def test_a_bad_data_crc_names_the_users_file_and_no_copy_appears(tmp_path, tiny_model_path):
    src = tmp_path / "in"
    src.mkdir()
    shard = src / "validation-00000-of-00001"
    offsets = _record(shard, 3)
    data = bytearray(shard.read_bytes())
    data[offsets[1] + 12] ^= 0xFF  # first data byte of the second entry
    shard.write_bytes(bytes(data))
    store = Store(str(tmp_path / "store"))
    with pytest.raises(RecordError) as exc:
        prepare_job(store, "crc", tiny_model_path, records=str(src))
    assert str(exc.value) == f"{shard}: byte {offsets[1]}: data CRC mismatch"
    layout = JobLayout("crc")
    assert store.list(layout.records_prefix) == [] and not store.exists(layout.spec)


def test_records_and_images_in_one_source_are_refused(tmp_path, records_dir, tiny_model_path):
    src = tmp_path / "mixed"
    image_folder(src, per_class=1)
    shutil.copy(records_dir / "00000.tfrecord", src / "00000.tfrecord")
    with pytest.raises(JobError) as exc:
        prepare_job(Store(str(tmp_path / "s")), "mix", tiny_model_path, records=str(src))
    assert str(exc.value) == (f"{src} holds both records (1) and images (2); give a folder "
                              "of one kind")


@pytest.mark.e2e
def test_images_straight_in_are_packed_into_the_jobs_records(tmp_path, tiny_model_path):
    src = tmp_path / "photos"
    names = image_folder(src, per_class=3)
    (src / "notes.txt").write_text("not an image")
    store = Store(str(tmp_path / "s"))
    spec = prepare_job(store, "img", tiny_model_path, records=str(src), per_record=4)
    assert spec.records == ["00000", "00001"] and spec.classes
    packed = read_record((tmp_path / "s" / "img" / "records" / "00000.tfrecord").read_bytes())
    assert [ex.filename for ex in packed] == names[:4]
    assert [ex.label for ex in packed] == [0, 0, 0, 1]
    run_local(store, spec)
    rows = sorted(rows_of(store, "img"), key=lambda r: (r["record"], r["index"]))
    assert [r["filename"] for r in rows] == names
    assert [r["class_name"] for r in rows] == ["cat"] * 3 + ["dog"] * 3
    # the same command again resumes the same job: the packed records are the same
    again = prepare_job(store, "img", tiny_model_path, records=str(src), per_record=4)
    assert again.records == spec.records
    with pytest.raises(JobError, match="already has a different record '00000'"):
        prepare_job(store, "img", tiny_model_path, records=str(src), per_record=5)


@pytest.mark.e2e
def test_images_under_an_s3_prefix_are_found_by_content_with_their_classes(s3_server,
                                                                          tmp_path):
    photos = tmp_path / "photos"
    names = image_folder(photos, per_class=2, classes=("cat", "dog"))
    client = s3_server.client()
    for rel in names:  # names without extensions: content decides
        client.put_object(Bucket=s3_server.bucket, Key=f"users/photos/{rel.rsplit('.', 1)[0]}",
                          Body=(photos / rel).read_bytes())
    inputs = scan_inputs(s3_server.url("users/photos"), s3_server.options())
    assert inputs.records == [] and inputs.classes == ["cat", "dog"]
    assert [(f.rel, label) for f, label in inputs.images] == [
        ("cat/img_0", 0), ("cat/img_1", 0), ("dog/img_0", 1), ("dog/img_1", 1)]


@pytest.mark.e2e
def test_packed_records_carry_labels_json_into_predictions(tmp_path, tiny_model_path):
    from serveless.data.sources import pack_source

    photos, dest = tmp_path / "photos", tmp_path / "records"
    image_folder(photos, per_class=2, classes=("cat", "dog"))
    done = pack_source(str(photos), Store(str(dest)), per_record=3)
    assert (done.images, done.records, done.classes) == (4, ["00000", "00001"], ["cat", "dog"])
    store = Store(str(tmp_path / "s"))
    spec = prepare_job(store, "lab", tiny_model_path, records=str(dest))
    assert spec.classes and spec.records == ["00000", "00001"]  # labels.json is no record
    run_local(store, spec)
    rows = sorted(rows_of(store, "lab"), key=lambda r: (r["record"], r["index"]))
    assert [(r["filename"], r["label"], r["class_name"]) for r in rows] == [
        ("cat/img_0.jpg", 0, "cat"), ("cat/img_1.jpg", 0, "cat"),
        ("dog/img_0.jpg", 1, "dog"), ("dog/img_1.jpg", 1, "dog")]


@pytest.mark.e2e
def test_records_option_stays_an_alias_of_input(tmp_path, shards, tiny_model_path):
    from typer.testing import CliRunner

    from serveless.cli import app

    result = CliRunner().invoke(app, ["run", "--job", "alias", "--records", str(shards),
                                      "--model", tiny_model_path, "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "60 images" in result.output
    assert len(rows_of(Store(str(tmp_path)), "alias")) == 60


def test_resume_refuses_other_preprocessing(tmp_path, shards, tiny_model_path):
    from serveless.data.images import make_transform

    store = Store(str(tmp_path))
    prepare_job(store, "re", tiny_model_path, records=str(shards))
    again = prepare_job(store, "re", tiny_model_path, records=str(shards),
                        transform=make_transform("imagenet"))  # the default, said explicitly
    assert again.records == ["train-00000-of-00003", "train-00001-of-00003",
                             "train-00002-of-00003"]
    with pytest.raises(JobError) as exc:
        prepare_job(store, "re", tiny_model_path, records=str(shards),
                    transform=make_transform("raw"))
    assert str(exc.value) == ("job 're' was started with --preprocess imagenet, not "
                              "--preprocess raw: resume it with --preprocess imagenet (or leave "
                              "the option out), or give a new --job")
    with pytest.raises(JobError, match="started with --softmax giving probs, not --softmax "
                                       "giving softmax\\(logits\\)"):
        prepare_job(store, "re", tiny_model_path, records=str(shards), softmax="always")
    assert prepare_job(store, "re").transform == make_transform()  # left out: as before


@pytest.mark.e2e
def test_run_input_says_which_files_it_skipped(tmp_path, tiny_model_path):
    from typer.testing import CliRunner

    from serveless.cli import app

    src = tmp_path / "photos"
    image_folder(src, per_class=1)
    (src / "notes.txt").write_text("hello")
    result = CliRunner().invoke(app, ["run", "--job", "sk", "--input", str(src), "--model",
                                      tiny_model_path, "--store", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    i = lines.index(f"skipped 1 files of {src} (neither records nor images):")
    assert lines[i + 1] == (f"  {src / 'notes.txt'}: not an image (unrecognised format) and "
                            "not a record (a TFRecord file or a tar shard)")


# --- scanning a folder of images (the one scanner: sources.scan_inputs) -------------


def touch(path: Path, data: bytes | None = None) -> Path:
    """A file; an 8×8 PNG unless `data` says otherwise (images are found by content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes() if data is None else data)
    return path


def scanned(root: Path) -> list[tuple[str, int]]:
    """(path relative to root, label) of every image scan_inputs finds, in its order."""
    return [(f.rel, label) for f, label in scan_inputs(str(root)).images]


def test_scan_imagefolder_labels_in_sorted_order(tmp_path):
    touch(tmp_path / "dog" / "b.jpg")
    touch(tmp_path / "dog" / "a.JPEG")
    touch(tmp_path / "cat" / "z.png")
    touch(tmp_path / "cat" / "deep" / "y.Png")
    touch(tmp_path / "cat" / "notes.txt", b"not an image")
    touch(tmp_path / "cat" / ".hidden.jpg")
    (tmp_path / "empty-class").mkdir()
    touch(tmp_path / "zebra" / "q.jpg")
    touch(tmp_path / ".cache" / "x.jpg")
    # cat=0, dog=1, empty-class=2 (keeps its slot as in ImageFolder), zebra=3
    assert scanned(tmp_path) == [
        ("cat/deep/y.Png", 0),
        ("cat/z.png", 0),
        ("dog/a.JPEG", 1),
        ("dog/b.jpg", 1),
        ("zebra/q.jpg", 3),
    ]
    inputs = scan_inputs(str(tmp_path))
    assert inputs.classes == ["cat", "dog", "empty-class", "zebra"]
    assert [Path(name).name for name, _ in inputs.skipped] == ["notes.txt"]


def test_scan_flat_folder_has_unknown_labels(tmp_path):
    for name in ["b.png", "a.jpg", "c.JPG"]:
        touch(tmp_path / name)
    touch(tmp_path / "readme.md", b"# not an image")
    (tmp_path / "no-images-here").mkdir()
    assert scanned(tmp_path) == [("a.jpg", -1), ("b.png", -1), ("c.JPG", -1)]


def test_scan_finds_images_by_content_not_by_name(tmp_path):
    touch(tmp_path / "photo.dat")  # a PNG, whatever its name says
    touch(tmp_path / "fake.jpg", b"this is text")  # named as an image, is not one
    assert scanned(tmp_path) == [("photo.dat", -1)]
    assert [Path(name).name for name, _ in scan_inputs(str(tmp_path)).skipped] == ["fake.jpg"]


def test_scan_rejects_empty_or_missing_folder(tmp_path):
    with pytest.raises(SourceError, match="no records or images"):
        scan_inputs(str(tmp_path))
    touch(tmp_path / "sub" / "notes.txt", b"text")
    with pytest.raises(SourceError, match="no records or images"):
        scan_inputs(str(tmp_path))
    with pytest.raises(SourceError, match="no such file or folder"):
        scan_inputs(str(tmp_path / "missing"))


def test_scan_survives_symlink_loop(tmp_path):
    touch(tmp_path / "cls" / "a.jpg")
    (tmp_path / "cls" / "loop").symlink_to(tmp_path / "cls", target_is_directory=True)
    with no_hang():
        found = scanned(tmp_path)
    assert found == [("cls/a.jpg", 0)]


# --- packing (the one packer: sources.pack_images, through sources.pack) -------------


def make_dataset(root: Path) -> list[tuple[str, bytes, int]]:
    """Seven images in two classes; returns (relative name, bytes, label) in scan order."""
    expected = []
    for label, cls in enumerate(["cat", "dog"]):
        for i in range(3 + label):
            name = f"{cls}/img{i}.png" if i % 2 else f"{cls}/img{i}.jpg"
            data = png_bytes((i * 30, label * 100, 5)) if i % 2 else gray_jpeg_bytes(8 + i)
            touch(root / name, data)
            expected.append((name, data, label))
    return expected


@pytest.fixture(params=["memory", "local"])
def store(request, tmp_path):
    if request.param == "memory":
        url = f"memory://test-records-{uuid.uuid4().hex}"
        yield Store(url)
        Store(url).delete("")
    else:
        yield Store(str(tmp_path / "store"))


@pytest.mark.parametrize("per_record", [1, 3, 7, 100])
def test_pack(tmp_path, store, per_record):
    expected = make_dataset(tmp_path / "images")
    calls: list[int] = []
    names = pack(tmp_path / "images", store, "job/records", per_record, calls.append)

    n_records = math.ceil(len(expected) / per_record)
    assert names == [f"{i:05d}" for i in range(n_records)]
    assert store.list("job/records", ".tfrecord") == [
        f"job/records/{name}.tfrecord" for name in names
    ]
    sizes = [min(per_record, len(expected) - i * per_record) for i in range(n_records)]
    assert calls == sizes
    assert sizes[-1] == len(expected) - per_record * (n_records - 1)

    got = []
    for name, size in zip(names, sizes, strict=True):
        key = f"job/records/{name}.tfrecord"
        with store.open_read(key) as f:
            examples = list(iter_record(f, key))
        with store.open_read(key) as f:
            assert count_examples(f, key) == size
        assert len(examples) == size
        got.extend(examples)
    assert got == [Example(data, name, label) for name, data, label in expected]


def test_record_chunks_name_and_key_each_record_in_order():
    """The one naming of records that the packer uses, for a job's records and `pack`'s."""
    got = list(record_chunks(list(range(7)), 3, "/job/records/"))
    assert got == [("00000", "job/records/00000.tfrecord", [0, 1, 2]),
                   ("00001", "job/records/00001.tfrecord", [3, 4, 5]),
                   ("00002", "job/records/00002.tfrecord", [6])]
    assert [k for _, k, _ in record_chunks("ab", 5, "")] == ["00000.tfrecord"]
    assert list(record_chunks([], 5, "x")) == []
    with pytest.raises(ValueError, match="per_record"):
        list(record_chunks([1], 0, "x"))


def test_pack_rejects_bad_per_record(tmp_path):
    make_dataset(tmp_path)
    store = Store(f"memory://test-records-{uuid.uuid4().hex}")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="per-record"):
            pack(tmp_path, store, "r", bad)
    assert store.list("r") == []


def test_pack_flat_folder_without_progress(tmp_path):
    b, a = png_bytes((1, 2, 3)), gray_jpeg_bytes(9)
    touch(tmp_path / "src" / "b.png", b)
    touch(tmp_path / "src" / "a.jpg", a)
    store = Store(str(tmp_path / "out"))
    assert pack(tmp_path / "src", store, "recs/", 5) == ["00000"]
    assert read_record(store.get_bytes("recs/00000.tfrecord")) == [
        Example(a, "a.jpg", -1),
        Example(b, "b.png", -1),
    ]


def test_pack_refuses_a_source_of_records(tmp_path, store):
    make_dataset(tmp_path / "images")
    pack(tmp_path / "images", Store(str(tmp_path / "recs")), "", 4)
    with pytest.raises(SourceError, match="holds records, not images"):
        pack(tmp_path / "recs", store, "again", 4)
