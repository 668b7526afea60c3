"""`serveless pack` is safe and says what it did (issue 11, item 3)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from datakit import encode, image_folder, picture
from typer.testing import CliRunner

from serveless.cli import app
from serveless.data.records import read_record

runner = CliRunner()


def invoke(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def packed(dest: Path) -> list[tuple[str, int]]:
    out = []
    for f in sorted(dest.glob("*.tfrecord")):
        out += [(ex.filename, ex.label) for ex in read_record(f.read_bytes())]
    return out


def test_pack_says_what_it_did_and_writes_labels(tmp_path):
    src, dest = tmp_path / "photos", tmp_path / "records"
    image_folder(src, per_class=3, classes=("cat", "dog"))
    (src / "dog" / "img_9.webp").write_bytes(encode(picture(9), "WEBP"))
    (src / "cat" / "empty.jpg").write_bytes(b"")
    (src / "cat" / "notes.txt").write_text("hello")
    out = invoke("pack", str(src), str(dest), "--per-record", "3")
    assert out.splitlines() == [
        f"packed 7 images into 3 records in {dest}",
        "labels (2 classes, written to labels.json):",
        "  0  cat",
        "  1  dog",
        "skipped 2 files:",
        f"  {src / 'cat' / 'empty.jpg'}: empty file (0 bytes)",
        f"  {src / 'cat' / 'notes.txt'}: not an image (unrecognised format) and not a record "
        "(a TFRecord file or a tar shard)",
    ]
    assert json.loads((dest / "labels.json").read_text()) == ["cat", "dog"]
    assert packed(dest) == [("cat/img_0.jpg", 0), ("cat/img_1.jpg", 0), ("cat/img_2.jpg", 0),
                            ("dog/img_0.jpg", 1), ("dog/img_1.jpg", 1), ("dog/img_2.jpg", 1),
                            ("dog/img_9.webp", 1)]


def test_pack_refuses_a_destination_with_records_and_overwrite_replaces_them(tmp_path):
    first, second, dest = tmp_path / "a", tmp_path / "b", tmp_path / "records"
    image_folder(first, per_class=5, classes=("x", "y", "z"))
    image_folder(second, per_class=2, classes=("u",), seed=50)
    invoke("pack", str(first), str(dest), "--per-record", "4")
    assert len(list(dest.glob("*.tfrecord"))) == 4
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    out = invoke("pack", str(second), str(dest), code=2)
    assert re.sub(r"\s+", " ", out).strip() == (
        f"error: {dest} already holds 5 records or labels files; "
        "pass --overwrite to replace them (they are deleted first)")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # untouched
    out = invoke("pack", str(second), str(dest), "--overwrite")
    assert out.splitlines()[0] == f"removed 5 old records/labels files from {dest}"
    assert packed(dest) == [("u/img_0.jpg", 0), ("u/img_1.jpg", 0)]  # exactly the new images
    assert sorted(p.name for p in dest.iterdir()) == ["00000.tfrecord", "labels.json"]
    assert json.loads((dest / "labels.json").read_text()) == ["u"]


def test_pack_refuses_records_found_by_content_too(tmp_path):
    src, dest = tmp_path / "photos", tmp_path / "records"
    image_folder(src, per_class=1)
    invoke("pack", str(src), str(dest))
    (dest / "00000.tfrecord").rename(dest / "train-00000-of-00001")
    (dest / "labels.json").unlink()
    out = invoke("pack", str(src), str(dest), code=2)
    assert "already holds 1 records or labels files" in out
