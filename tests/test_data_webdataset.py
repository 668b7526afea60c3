"""WebDataset tar shards served in place as records (issue 23, item 1).

Every shard here is written by webdataset's own `TarWriter`, not by our code, and the
samples are checked against webdataset's own reader: the keys, their order and grouping
must be what `webdataset.WebDataset` yields. A job over the shards must give one row per
sample with the key as filename and id, the label from .cls/.json/.txt, the same scores as
the same images served from a folder, and an error row (never silence) for a broken image
member or a sample without one. Broken shards are refused before anything runs."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from datakit import encode, picture
from helpers import assert_one_row_per_image, rows_of, run_local

from serveless.data.sources import check_records, scan_inputs
from serveless.data.webdataset import count_samples, is_shard_head, iter_samples, sample_key
from serveless.driver.prepare import prepare_job
from serveless.errors import JobError, RecordError, SourceError
from serveless.store import Store

wds = pytest.importorskip("webdataset")
pytest_plugins = ["s3server"]


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A shard as webdataset's users write one: its own TarWriter (gzipped for .tar.gz)."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def reference_keys(path: Path) -> list[str]:
    """The sample keys webdataset's own reader gives, in order."""
    return [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]


@pytest.fixture(scope="module")
def photos(image_dir) -> list[tuple[str, int, bytes]]:
    """(stem, class, JPEG bytes) of the session's 60 sample photos, as the packer orders them."""
    files = sorted(image_dir.rglob("*.jpg"), key=lambda p: p.relative_to(image_dir).parts)
    return [(p.stem, int(p.parent.name.split("_")[-1]), p.read_bytes()) for p in files]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos) -> Path:
    """The photos in three shards of 25, 25 and 10, each labelled another way: .cls, a .json
    with "label", a .txt holding the integer. The last shard has no .tar in its name."""
    root = tmp_path_factory.mktemp("shards")
    for n, start in enumerate(range(0, len(photos), 25)):
        samples = []
        for stem, label, data in photos[start:start + 25]:
            sample = {"__key__": stem, "jpg": data}
            if n == 0:
                sample["cls"] = label
            elif n == 1:
                sample["json"] = {"label": label, "caption": "a photo"}
            else:
                sample["txt"] = str(label)
            samples.append(sample)
        write_shard(root / (f"shard-{n:06d}.tar" if n < 2 else f"shard-{n:06d}"), samples)
    (root / "README.md").write_text("shards\n")
    return root


# --- the reader, against webdataset's own ------------------------------------------------


def test_shards_are_found_by_content_and_counted(shards):
    inputs = scan_inputs(str(shards))
    assert [(f.record_name, f.format) for f in inputs.records] == [
        ("shard-000000", "webdataset"), ("shard-000001", "webdataset"),
        ("shard-000002", "webdataset")]
    assert inputs.images == [] and inputs.record_format == "webdataset"
    assert [name for name, _ in inputs.skipped] == [str(shards / "README.md")]
    assert check_records(inputs.records) == {"shard-000000": 25, "shard-000001": 25,
                                             "shard-000002": 10}


def test_samples_are_webdatasets_own(shards, photos):
    """Keys, order and grouping as webdataset's reader gives them; labels from each member."""
    labels = {stem: label for stem, label, _ in photos}
    jpegs = {stem: data for stem, _, data in photos}
    for path in sorted(p for p in shards.iterdir() if p.name.startswith("shard-")):
        with open(path, "rb") as f:
            examples = list(iter_samples(f, str(path)))
            f.seek(0)
            assert count_samples(f, str(path)) == len(examples)
        assert [ex.filename for ex in examples] == reference_keys(path)
        for ex in examples:
            assert ex.id == ex.filename and not ex.error
            assert ex.label == labels[ex.filename]
            assert bytes(ex.encoded) == jpegs[ex.filename]


def test_grouping_extensions_and_labels(tmp_path):
    """WebDataset's key rule (path up to the first dot of the file name), the image picked
    among several members, and where each label comes from."""
    jpg, png = encode(picture(1), "JPEG"), encode(picture(2), "PNG")
    path = write_shard(tmp_path / "s.tar", [
        {"__key__": "a/x", "seg.png": png, "jpg": jpg, "cls": 3},
        {"__key__": "a/y", "json": {"label": 4, "cls": 9}},  # no image member
        {"__key__": "b.c", "png": png, "json": {"cls": "5"}},  # the key's dot: webdataset's rule
        {"__key__": "d", "webp": encode(picture(3), "WEBP"), "txt": "a photo of a dog"},
        {"__key__": "e", "JPG": jpg, "cls": "not a number"},
    ])
    with open(path, "rb") as f:
        examples = list(iter_samples(f, str(path)))
    assert [ex.filename for ex in examples] == reference_keys(path)
    by_key = {ex.filename: ex for ex in examples}
    assert bytes(by_key["a/x"].encoded) == jpg and by_key["a/x"].label == 3
    assert by_key["a/y"].error == "sample 'a/y' has no image member (it has .json)"
    assert by_key["a/y"].label == 4
    assert by_key["d"].label == -1 and by_key["e"].label == -1  # a caption, not a number
    assert bytes(by_key["e"].encoded) == jpg  # extensions are lower-cased, as webdataset does
    with open(path, "rb") as f:
        labels = [ex.label for ex in iter_samples(f, str(path), label_key="cls")]
    assert labels == [3, 9, -1, -1, -1]
    assert sample_key("dir/000123.seg.png") == ("dir/000123", "seg.png")
    assert sample_key("dir.v2/README") is None


def test_gzipped_shards_read_as_the_plain_ones(shards, tmp_path):
    plain = shards / "shard-000000.tar"
    gz = tmp_path / "shard-000000.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert is_shard_head(gz.read_bytes()[:4096]) and is_shard_head(plain.read_bytes()[:4096])
    with open(plain, "rb") as a, open(gz, "rb") as b:
        assert [(e.filename, e.label, bytes(e.encoded)) for e in iter_samples(a)] == [
            (e.filename, e.label, bytes(e.encoded)) for e in iter_samples(b)]
    inputs = scan_inputs(str(gz))
    assert [(f.record_name, f.format) for f in inputs.records] == [("shard-000000",
                                                                     "webdataset")]


@pytest.mark.parametrize("damage, why", [
    ("cut in a member", "not a readable tar shard: unexpected end of data"),
    ("cut at a member", "the shard ends without its end-of-archive block (cut short?)"),
    ("header", "a tar header that cannot be read (corrupt shard)"),
    ("gzip cut", "not a readable tar shard: Compressed file ended before the end-of-stream"),
])
def test_broken_shards_are_refused_before_anything_runs(tmp_path, shards, tiny_model_path, damage,
                                                        why):
    data = (shards / "shard-000000.tar").read_bytes()
    with open(shards / "shard-000000.tar", "rb") as f:
        import tarfile
        members = tarfile.open(fileobj=f).getmembers()
    src = tmp_path / "in"
    src.mkdir()
    bad = src / "bad.tar"
    if damage == "cut in a member":
        bad.write_bytes(data[:members[9].offset_data + 100])
    elif damage == "cut at a member":
        bad.write_bytes(data[:members[10].offset])
    elif damage == "header":
        broken = bytearray(data)
        broken[members[10].offset + 10] ^= 0xFF  # its name: the header checksum fails
        bad.write_bytes(bytes(broken))
    else:
        bad = src / "bad.tar.gz"
        packed = gzip.compress(data)
        bad.write_bytes(packed[:len(packed) * 2 // 3])
    store = Store(str(tmp_path / "store"))
    with pytest.raises(RecordError) as exc:
        prepare_job(store, "bad", tiny_model_path, records=str(src))
    assert str(exc.value).startswith(f"{bad}: byte ") and why in str(exc.value)
    assert not (tmp_path / "store" / "bad").exists()


def test_a_tar_named_file_that_is_no_tar_and_a_mix_are_refused(tmp_path, shards, records_dir):
    src = tmp_path / "named"
    src.mkdir()
    (src / "photos.tar").write_bytes(b"\0" * 100 + b"not a tar" * 100)
    with pytest.raises(RecordError, match=r"photos\.tar: byte 0: not a tar shard"):
        scan_inputs(str(src))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(shards / "shard-000000.tar", mixed)
    shutil.copy(next(records_dir.glob("*.tfrecord")), mixed)
    with pytest.raises(SourceError, match="records of two formats"):
        scan_inputs(str(mixed))


# --- jobs over shards ------------------------------------------------------------------


@pytest.mark.e2e
def test_a_job_over_shards_equals_the_folder(tmp_path, shards, photos, folder_rows,
                                             tiny_model_path):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "wds", tiny_model_path, records=str(shards))
    assert spec.record_format == "webdataset"
    assert spec.records == ["shard-000000", "shard-000001", "shard-000002"]
    for name in spec.records:  # served as they are: byte for byte the user's shards
        user = shards / name if name == "shard-000002" else shards / f"{name}.tar"
        assert (tmp_path / "wds" / "records" / f"{name}.tar").read_bytes() == user.read_bytes()
    run_local(store, spec)
    rows = rows_of(store, "wds")
    assert_one_row_per_image(rows, len(photos))
    assert [r["id"] for r in rows] == [stem for stem, _, _ in photos]
    labels = {stem: label for stem, label, _ in photos}
    for r in rows:
        ref = folder_rows[r["filename"]]
        assert r["error"] is None and r["id"] == r["filename"]
        assert r["label"] == labels[r["filename"]] == ref["label"]
        assert r["top5"] == ref["top5"]
        np.testing.assert_allclose(r["probs"], ref["probs"], atol=1e-6)


@pytest.mark.e2e
def test_every_image_type_and_broken_members_give_rows(tmp_path, tiny_model_path):
    """Each image type stage 0 decodes, in a shard and in a folder, scores the same; a
    broken member, a truncated one and a sample with no image get error rows naming them."""
    pics = {fmt: encode(picture(i + 10, (48, 40)), fmt)
            for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])}
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff",
           "GIF": "gif"}
    folder = tmp_path / "folder"
    folder.mkdir()
    samples = []
    for fmt, data in pics.items():
        (folder / f"{fmt.lower()}.{ext[fmt]}").write_bytes(data)
        samples.append({"__key__": fmt.lower(), ext[fmt]: data, "cls": 1})
    samples[2:2] = [{"__key__": "garbage", "jpg": b"\xff\xd8\xff" + b"\x00" * 50, "cls": 2},
                    {"__key__": "cut", "png": pics["PNG"][:60], "cls": 3},
                    {"__key__": "caption-only", "txt": "no picture here"}]
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    write_shard(shard_dir / "mixed.tar", samples)
    store = Store(str(tmp_path / "store"))
    run_local(store, prepare_job(store, "folder", tiny_model_path, records=str(folder)))
    run_local(store, prepare_job(store, "wds", tiny_model_path, records=str(shard_dir),
                            micro_batch=4), image_errors=3)
    ref = {Path(r["filename"]).stem: r for r in rows_of(store, "folder")}
    rows = rows_of(store, "wds")
    assert [r["id"] for r in rows] == [s["__key__"] for s in samples]
    errors = {r["id"]: r["error"]["message"] for r in rows if r["error"]}
    assert set(errors) == {"garbage", "cut", "caption-only"}
    assert errors["caption-only"] == "sample 'caption-only' has no image member (it has .txt)"
    assert "JPEG" in errors["garbage"] and "PNG" in errors["cut"]
    assert all(r["top5"] is None and r["probs"] is None for r in rows if r["error"])
    assert [r["label"] for r in rows if r["error"]] == [2, 3, None]
    for r in rows:
        if not r["error"]:
            assert r["top5"] == ref[r["id"]]["top5"] and r["label"] == 1
            np.testing.assert_allclose(r["probs"], ref[r["id"]]["probs"], atol=1e-6)


@pytest.mark.e2e
def test_gzipped_shards_and_label_key_in_a_job(tmp_path, shards, photos, tiny_model_path):
    src = tmp_path / "in"
    src.mkdir()
    samples = [{"__key__": stem, "jpg": data, "json": {"class_id": label}}
               for stem, label, data in photos[:12]]
    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for s in samples:
            sink.write(s)
    (src / "part-0.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "gz", tiny_model_path, records=str(src), label_key="class_id")
    assert spec.records == ["part-0"] and spec.label_key == "class_id"
    run_local(store, spec)
    rows = rows_of(store, "gz")
    assert [(r["id"], r["label"]) for r in rows] == [(s, lab) for s, lab, _ in photos[:12]]
    assert all(r["error"] is None for r in rows)
    job = json.loads((tmp_path / "store" / "gz" / "job.json").read_text())
    assert job["record_format"] == "webdataset" and job["label_key"] == "class_id"


@pytest.mark.e2e
def test_a_shard_job_refuses_tfrecords_on_resume(tmp_path, shards, records_dir, tiny_model_path):
    store = Store(str(tmp_path))
    src = tmp_path / "one"
    src.mkdir()
    shutil.copy(shards / "shard-000002", src)
    prepare_job(store, "wds", tiny_model_path, records=str(src))
    with pytest.raises(JobError, match="holds webdataset records"):
        prepare_job(store, "wds", tiny_model_path, records=str(records_dir))


def test_commands_that_read_tfrecords_say_so_for_shards(shards):
    """calibrate, partition --records, the experiments and run --plan read TFRecord files:
    shards are refused with a line saying what to do, not read as broken TFRecords."""
    from serveless.data.sources import find_records

    with pytest.raises(SourceError, match="holds webdataset shards; this reads TFRecord"):
        find_records(str(shards))


@pytest.mark.e2e
def test_the_readme_command_a_resume_and_export(tmp_path, shards, photos, tiny_model_path):
    """`serveless run --input shards/ --label-key …` as the README gives it; a resume keeps
    the label key or refuses another; `export` carries the ids."""
    from typer.testing import CliRunner

    from serveless.cli import app

    runner = CliRunner()
    store = str(tmp_path / "store")
    src = tmp_path / "in"
    src.mkdir()
    write_shard(src / "part-0.tar", [{"__key__": stem, "jpg": data, "json": {"class_id": lab}}
                                     for stem, lab, data in photos[:6]])
    args = ["--store", store, "--model", tiny_model_path]
    res = runner.invoke(app, ["run", "--job", "cli", "--input", str(src), "--label-key",
                              "class_id", *args])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", "--job", "cli", "--label-key", "label", *args])
    assert res.exit_code == 2
    assert "started with --label-key class_id, not --label-key label" in res.output
    res = runner.invoke(app, ["export", "cli", "--store", store, "--format", "jsonl", "--out",
                              str(tmp_path / "out.jsonl")])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["filename"], r["label"]) for r in rows] == [
        (stem, stem, lab) for stem, lab, _ in photos[:6]]


@pytest.mark.e2e
def test_shards_from_an_s3_prefix(tmp_path, shards, s3_server, tiny_model_path):
    client = s3_server.client()
    for f in sorted(shards.iterdir()):
        client.put_object(Bucket=s3_server.bucket, Key=f"wds/{f.name}", Body=f.read_bytes())
    url = s3_server.url("wds")
    inputs = scan_inputs(url, s3_server.options())
    assert [(f.record_name, f.format) for f in inputs.records] == [
        ("shard-000000", "webdataset"), ("shard-000001", "webdataset"),
        ("shard-000002", "webdataset")]
    store = Store(str(tmp_path))
    spec = prepare_job(store, "s3wds", tiny_model_path, records=url + "/",
                       input_options=s3_server.options())
    run_local(store, spec)
    assert len(rows_of(store, "s3wds")) == 60


def test_a_stream_that_cannot_seek_reads_as_the_file(shards):
    """A shard from a pipe (no seek) is spooled, then read as the file is."""
    path = shards / "shard-000001.tar"

    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes):
            self.data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            chunk = self.data.read(min(len(b), 1000))
            b[:len(chunk)] = chunk
            return len(chunk)

    with open(path, "rb") as f:
        expected = [(e.filename, e.label, bytes(e.encoded)) for e in iter_samples(f)]
    assert count_samples(Pipe(path.read_bytes())) == 25
    assert [(e.filename, e.label, bytes(e.encoded))
            for e in iter_samples(Pipe(path.read_bytes()))] == expected
