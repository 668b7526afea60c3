"""What one image or one record entry may cost (issue 21): a decode held to a share of the
function's memory, an entry read into one buffer, the EXIF orientation of any integer
type on both decode paths, and the Example read from its wire format as protobuf reads it."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serveless.data import records
from serveless.data.images import DECODE_SHARE, ImageDecodeError, decode_bytes, preprocess
from serveless.data.jpeg import exif_orientation, jpeg_frame
from serveless.data.records import Example, decode_example, encode_example
from serveless.data.samples import synthetic_photo
from serveless.errors import RecordError


def _progressive_claiming(w: int, h: int) -> bytes:
    """A tiny progressive JPEG whose frame header claims w×h pixels (a decompression bomb
    of about 500 bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG", progressive=True)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc2")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def test_a_progressive_jpeg_bomb_is_its_images_error_not_the_records():
    bomb = _progressive_claiming(10000, 9999)
    assert len(bomb) < 1000
    assert jpeg_frame(bomb) == (10000, 9999, 3, True)
    need, what = decode_bytes(bomb, 256)
    assert need > 500 * 2**20 and what == "10000×9999 progressive JPEG"
    budget = DECODE_SHARE * 256 * 2**20  # the share of a 256 MB function
    with pytest.raises(ImageDecodeError, match=r"needs about 577 MB, over the 64 MB one image "
                                               r"may take \(25% of the function's memory\)"):
        preprocess(bomb, 224, max_decode_bytes=budget)


def test_ordinary_photos_fit_the_budget_of_a_small_function():
    buf = io.BytesIO()
    big = synthetic_photo(1, (800, 600)).resize((4000, 3000))
    big.save(buf, "JPEG", quality=85)  # a 12 MP photo
    photo = buf.getvalue()
    need, _ = decode_bytes(photo, 256)
    assert need < 2 * 2**20  # baseline: decoded at 1/8 scale
    out = preprocess(photo, 224, max_decode_bytes=DECODE_SHARE * 256 * 2**20)
    assert out.shape == (3, 224, 224)
    png = io.BytesIO()
    synthetic_photo(2, (600, 400)).save(png, "PNG")
    assert decode_bytes(png.getvalue(), 256) == (600 * 400 * 4, "600×400 PNG")


def _with_orientation(kind: int, value: int) -> bytes:
    """A JPEG whose EXIF orientation is stored as TIFF type `kind` (3 SHORT, 4 LONG, ...)."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = value
    synthetic_photo(5, (320, 240)).save(buf, "JPEG", exif=exif.tobytes(), quality=90)
    data = bytearray(buf.getvalue())
    at = data.find(b"\x01\x12\x00\x03")  # big-endian: tag 0x0112, type SHORT
    assert at > 0
    size = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4}[kind]
    data[at + 2:at + 4] = struct.pack(">H", kind)
    data[at + 8:at + 12] = value.to_bytes(size, "big").ljust(4, b"\0")
    return bytes(data)


@pytest.mark.parametrize("kind", [3, 4, 6, 8, 9])
def test_exif_orientation_of_any_integer_type_is_applied_as_pillow_applies_it(kind):
    data = _with_orientation(kind, 6)
    assert exif_orientation(data) == 6
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif().get(0x0112) == 6  # Pillow reads it whatever its type
    fast, slow = preprocess(data, 224), preprocess(data, 224, fast=False)
    assert float(np.abs(fast - slow).max()) < 0.05  # within about one grey level
    upright = preprocess(_with_orientation(3, 1), 224)
    assert float(np.abs(fast - upright).max()) > 0.5  # and it was rotated


def test_an_orientation_pillow_does_not_apply_neither_path_applies():
    data = _with_orientation(1, 6)  # an unsigned BYTE: Pillow reads bytes, not a number
    assert exif_orientation(data) == 1
    fast, slow = preprocess(data, 224), preprocess(data, 224, fast=False)
    assert float(np.abs(fast - slow).max()) < 0.05


def test_a_large_entry_is_read_into_one_buffer(tmp_path):
    """A 128 MB image entry: read to its Example with at most 1.3× its size above the start
    (joining chunks, then protobuf's copies, took 3×)."""
    path = tmp_path / "big.tfrecord"
    with open(path, "wb") as f:
        records.write_record(f, [Example(os.urandom(128 << 20), "big.jpg", 1)])
    code = """
import sys, psutil
from serveless.data.records import iter_record
p = psutil.Process(); start = p.memory_info().rss
open("/proc/self/clear_refs", "w").write("5")
with open(sys.argv[1], "rb") as f:
    for ex in iter_record(f, sys.argv[1]):
        n = len(ex.encoded)
peak = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) * 1024
print(n, peak - start)
"""
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    size, above = int(out[0]), int(out[1])
    assert size == 128 << 20
    assert above < 1.3 * size, f"peak {above / 2**20:.0f} MB above the start"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.text(max_size=20), st.integers(-(2**63), 2**63 - 1),
       st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=20)), max_size=3))
def test_the_wire_reader_agrees_with_protobuf(image, name, label, extra):
    msg = records.ExamplePB()
    feature = msg.features.feature
    feature["image/encoded"].bytes_list.value.append(image)
    feature["image/filename"].bytes_list.value.append(name.encode())
    feature["image/class/label"].int64_list.value.append(label)
    for key, value in extra:  # other features, as ImageNet shards carry
        if not key.startswith("image/"):
            feature[key].bytes_list.value.append(value)
    data = msg.SerializeToString()
    got = decode_example(data)
    assert got == Example(image, name, label) and isinstance(got.encoded, bytes)
    view = decode_example(memoryview(bytearray(data)))
    assert bytes(view.encoded) == image and view.label == label


def test_packed_and_unpacked_labels_and_the_last_value_wins():
    base = encode_example(Example(b"img", "a.jpg", -1))
    # an unpacked int64 label (field 1, varint) appended as a second map entry for the key
    label = b"\x1a\x02\x08\x07"  # Feature.int64_list { value: 7 } (unpacked)
    entry = b"\x0a\x11image/class/label\x12" + bytes([len(label)]) + label
    features = b"\x0a" + bytes([len(entry)]) + entry
    data = base + b"\x0a" + bytes([len(features)]) + features  # Example.features again
    assert decode_example(data).label == 7  # merged, as protobuf merges repeated messages
    with pytest.raises(RecordError, match="not a tf.train.Example"):
        decode_example(b"\x0a\x05\x0a\x03\x0a")  # a length that runs past the message
