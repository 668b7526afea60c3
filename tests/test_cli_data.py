"""`pack` is safe and says what it did; every accepted format decodes; broken images get
readable, exact reasons (issue 11, items 3 and 6)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from datakit import encode, image_folder, picture, save, tiny_classifier
from typer.testing import CliRunner

from serveless.cli import app
from serveless.data.images import ImageDecodeError, preprocess, sniff_image
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
        f"  {src / 'cat' / 'notes.txt'}: not an image (unrecognised format) and not a TFRecord "
        "file",
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


LOSSLESS = {"PNG": {}, "BMP": {}, "TIFF": {}, "WebP": {"lossless": True}}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WebP", "BMP", "TIFF", "GIF"])
def test_each_accepted_format_is_recognised_and_decodes(fmt):
    img = picture(1, (64, 48))
    data = encode(img, fmt.upper(), **LOSSLESS.get(fmt, {}))
    assert sniff_image(data[:16]) == fmt
    x = preprocess(data, 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    reference = preprocess(encode(img, "PNG"), 32)
    if fmt in LOSSLESS:  # the same pixels, so the same tensor
        np.testing.assert_array_equal(x, reference)
    else:  # lossy JPEG, 256-colour GIF: close to the original
        assert np.abs(x - reference).mean() < 0.1


def test_gif_uses_its_first_frame():
    first, second = picture(1, (40, 30)), picture(2, (40, 30))
    data = encode(first, "GIF", save_all=True, append_images=[second])
    np.testing.assert_array_equal(preprocess(data, 16), preprocess(encode(first, "GIF"), 16))


@pytest.mark.parametrize("data, message", [
    (b"", "empty file (0 bytes)"),
    (b"hello, this is text, not a picture", "not an image (unrecognised format)"),
    (encode(picture(3), "JPEG")[:300], "truncated JPEG file (the image data ends early)"),
    (encode(picture(3), "PNG")[:200], "truncated PNG file (the image data ends early)"),
    (b"\xff\xd8\xff" + b"junk" * 5, "corrupt JPEG file (its header cannot be read)"),
])
def test_broken_images_say_why_exactly(data, message):
    with pytest.raises(ImageDecodeError) as exc:
        preprocess(data, 16)
    assert str(exc.value) == message
    assert "BytesIO" not in str(exc.value)


def test_a_runs_summary_lists_the_first_ten_failed_images(tmp_path):
    src = tmp_path / "photos"
    image_folder(src, per_class=3, classes=("a",))
    whole = encode(picture(5, (200, 150)), "JPEG")
    for i in range(12):
        (src / "a" / f"bad_{i:02d}.jpg").write_bytes(whole[:400 + 10 * i])
    model = save(tiny_classifier(), tmp_path / "m.onnx")
    store = tmp_path / "store"
    result = runner.invoke(app, ["run", "--job", "j", "--input", str(src), "--model", model,
                                 "--store", str(store), "--per-record", "20"])
    assert result.exit_code == 1, result.output  # failed images make the run's status 1
    lines = result.output.splitlines()
    start = lines.index("12 images could not be served (their prediction rows carry the error):")
    assert lines[start + 1:start + 12] == [
        *(f"  a/bad_{i:02d}.jpg: truncated JPEG file (the image data ends early)"
          for i in range(10)),
        "  … and 2 more",
    ]
    assert "accuracy on 3 labelled images: top-1 " in result.output
    assert result.output.count("skipped") == 0  # every file there is an image (broken or not)
    report = runner.invoke(app, ["report", "j", "--store", str(store)])
    assert "12 images could not be served" in report.output and "  … and 2 more" in report.output
