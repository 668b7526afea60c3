"""Tests of records.py: TFRecord framing, tf.train.Example compatibility, the reader fuzzed.

CRCs and protobuf bytes are computed here from the published specs, independently of
the module, so a wrong constant or field number fails a test instead of round-tripping.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
from pathlib import Path

import google_crc32c
import pytest
from datakit import gray_jpeg_bytes, png_bytes
from helpers import no_hang
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serveless.data import records
from serveless.data.records import (
    Example,
    count_examples,
    decode_example,
    encode_example,
    frame,
    iter_frames,
    iter_record,
    read_record,
    write_record,
)
from serveless.errors import RecordError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- independent reference implementations ------------------------------------------


def crc32c_ref(data: bytes) -> int:
    """Bitwise CRC32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def mask_ref(crc: int) -> int:
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return (rotated + 0xA282EAD8) & 0xFFFFFFFF


def frame_ref(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", mask_ref(crc32c_ref(length)))
        + data
        + struct.pack("<I", mask_ref(crc32c_ref(data)))
    )


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def read_all(data: bytes) -> list[Example]:
    with no_hang():
        return list(iter_record(io.BytesIO(data), "fuzz.tfrecord"))


SAMPLES = [
    Example(b"\xff\xd8jpeg bytes\xff\xd9", "a/one.jpg", 3),
    Example(b"", "", -1),
    Example(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40, "日本/été ü.png", 0),
    Example(b"x", "no-label.jpeg", -1),
    Example(b"\x00" * 3, "big-label.png", 2**63 - 1),
]


# --- round trip ---------------------------------------------------------------------


def test_round_trip_write_and_read():
    buf = io.BytesIO()
    assert write_record(buf, iter(SAMPLES)) == len(SAMPLES)
    data = buf.getvalue()
    assert read_record(data) == SAMPLES
    assert list(iter_record(io.BytesIO(data))) == SAMPLES
    assert count_examples(io.BytesIO(data)) == len(SAMPLES)
    assert b"".join(frame(encode_example(ex)) for ex in SAMPLES) == data


def test_label_feature_omitted_when_unknown():
    assert b"image/class/label" not in encode_example(Example(b"x", "f.jpg", -1))
    assert b"image/class/label" in encode_example(Example(b"x", "f.jpg", 0))


def test_encoding_is_deterministic():
    ex = Example(b"abc", "z.png", 7)
    assert encode_example(ex) == encode_example(Example(b"abc", "z.png", 7))


def test_empty_record():
    assert read_record(b"") == []
    assert count_examples(io.BytesIO(b"")) == 0
    assert write_record(io.BytesIO(), []) == 0


# --- framing and CRCs against the spec ----------------------------------------------


def test_crc32c_check_value():
    assert crc32c_ref(b"123456789") == 0xE3069283
    assert google_crc32c.value(b"123456789") == 0xE3069283
    assert records.masked_crc32c(b"123456789") == mask_ref(0xE3069283)


@pytest.mark.parametrize("data", [b"", b"x", b"hello tfrecord", bytes(range(256)) * 5])
def test_frame_matches_spec(data):
    assert frame(data) == frame_ref(data)
    assert list(iter_frames(io.BytesIO(frame_ref(data)))) == [(0, data)]


def test_frame_offsets_are_entry_starts():
    a, b = b"first", b"second entry"
    stream = io.BytesIO(frame_ref(a) + frame_ref(b))
    assert list(iter_frames(stream)) == [(0, a), (16 + len(a), b)]


# --- corruption ---------------------------------------------------------------------


def two_entry_record() -> tuple[bytes, int]:
    first = frame(encode_example(SAMPLES[0]))
    second = frame(encode_example(SAMPLES[3]))
    return first + second, len(first)


def test_flipped_data_byte_is_data_crc_error():
    data, second = two_entry_record()
    bad = bytearray(data)
    bad[second + 12 + 3] ^= 0x01
    with pytest.raises(RecordError, match="data CRC") as info:
        read_record(bytes(bad), "x.tfrecord")
    assert info.value.offset == second
    assert info.value.path == "x.tfrecord"
    assert str(info.value) == f"x.tfrecord: byte {second}: data CRC mismatch"


def test_flipped_length_byte_is_length_crc_error():
    data, second = two_entry_record()
    bad = bytearray(data)
    bad[second + 2] ^= 0x40
    with pytest.raises(RecordError, match="length CRC") as info:
        read_record(bytes(bad))
    assert info.value.offset == second
    with pytest.raises(RecordError, match="length CRC"):
        count_examples(io.BytesIO(bytes(bad)))


def test_truncation_names_offset_and_reason():
    data, second = two_entry_record()
    length = len(data) - second - 16
    cut = data[: second + 12 + 5]
    with pytest.raises(RecordError) as info:
        read_record(cut, "cut.tfrecord")
    assert info.value.offset == second
    assert info.value.reason == f"truncated data: expected {length} bytes, got 5"
    assert str(info.value).startswith(f"cut.tfrecord: byte {second}: truncated data")
    with pytest.raises(RecordError, match="truncated header"):
        read_record(data[: second + 7])
    with pytest.raises(RecordError, match="truncated footer"):
        read_record(data[:-1])
    for bad in (data[: second + 7], data[: second + 12 + 5], data[:-1]):
        with pytest.raises(RecordError) as info:
            count_examples(io.BytesIO(bad))
        assert info.value.offset == second


@pytest.mark.parametrize("length", [2**64 - 1, 2**40, records.MAX_RECORD_BYTES + 1])
def test_absurd_length_is_an_error_not_an_allocation(length):
    size = struct.pack("<Q", length)
    bad = size + struct.pack("<I", mask_ref(crc32c_ref(size))) + b"tiny"
    with pytest.raises(RecordError, match="exceeds"):
        read_record(bad)
    with pytest.raises(RecordError, match="exceeds"):
        count_examples(io.BytesIO(bad))


def test_length_beyond_end_of_file():
    size = struct.pack("<Q", 100_000_000)
    bad = size + struct.pack("<I", mask_ref(crc32c_ref(size))) + b"0123456789"
    with pytest.raises(RecordError, match="expected 100000000 bytes, got 10"):
        read_record(bad)
    with pytest.raises(RecordError, match="expected 100000000 bytes, got 10"):
        count_examples(io.BytesIO(bad))


def test_record_error_is_picklable():
    err = RecordError("r.tfrecord", 42, "data CRC mismatch")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.offset, back.reason, str(back)) == (
        "r.tfrecord",
        42,
        "data CRC mismatch",
        "r.tfrecord: byte 42: data CRC mismatch",
    )


# --- count_examples -----------------------------------------------------------------


class CountingBytesIO(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n=-1):
        chunk = super().read(n)
        self.bytes_read += len(chunk)
        return chunk


class TrickleStream(io.RawIOBase):
    """Not seekable and returns at most 5 bytes per read, like a pipe."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        chunk = self._data.read(min(len(buf), 5))
        buf[: len(chunk)] = chunk
        return len(chunk)


def test_count_examples_reads_only_headers():
    buf = io.BytesIO()
    write_record(buf, SAMPLES)
    stream = CountingBytesIO(buf.getvalue())
    assert count_examples(stream) == len(SAMPLES)
    assert stream.bytes_read == 12 * len(SAMPLES)


def test_non_seekable_stream_with_short_reads():
    buf = io.BytesIO()
    write_record(buf, SAMPLES)
    assert count_examples(TrickleStream(buf.getvalue())) == len(SAMPLES)
    assert list(iter_record(TrickleStream(buf.getvalue()))) == SAMPLES


def test_count_examples_does_not_check_data_crc_but_reader_does():
    data, second = two_entry_record()
    bad = bytearray(data)
    bad[second + 20] ^= 0xFF
    assert count_examples(io.BytesIO(bytes(bad))) == 2
    with pytest.raises(RecordError, match="data CRC"):
        read_record(bytes(bad))


# --- tf.train.Example compatibility -------------------------------------------------


def test_hand_encoded_example_matches_descriptor_messages():
    # Example{features=1: Features{feature=1: map entry{key=1, value=2: Feature{...}}}}
    def example_with(key: bytes, feature: bytes) -> bytes:
        return ld(1, ld(1, ld(1, key) + ld(2, feature)))

    bytes_feature = ld(1, ld(1, b"v"))  # Feature.bytes_list=1 {BytesList.value=1}
    float_feature = ld(2, ld(1, struct.pack("<2f", 1.5, -2.0)))  # packed floats
    int64_feature = ld(3, ld(1, varint(1) + varint(300) + varint(-1)))  # packed varints

    msg = records.ExamplePB()
    msg.features.feature["k"].bytes_list.value.append(b"v")
    assert msg.SerializeToString() == example_with(b"k", bytes_feature)

    msg = records.ExamplePB()
    msg.features.feature["f"].float_list.value.extend([1.5, -2.0])
    assert msg.SerializeToString() == example_with(b"f", float_feature)

    msg = records.ExamplePB()
    msg.features.feature["i"].int64_list.value.extend([1, 300, -1])
    assert msg.SerializeToString() == example_with(b"i", int64_feature)

    # And our encoder, byte for byte (map keys sorted: class/label < encoded < filename).
    hand = ld(
        1,
        ld(1, ld(1, b"image/class/label") + ld(2, ld(3, ld(1, varint(5)))))
        + ld(1, ld(1, b"image/encoded") + ld(2, ld(1, ld(1, b"JPEG"))))
        + ld(1, ld(1, b"image/filename") + ld(2, ld(1, ld(1, "é.jpg".encode())))),
    )
    assert encode_example(Example(b"JPEG", "é.jpg", 5)) == hand
    assert decode_example(hand) == Example(b"JPEG", "é.jpg", 5)


def test_reads_tensorflow_style_imagenet_shard():
    png, jpeg = png_bytes(), gray_jpeg_bytes()
    shard = io.BytesIO()
    for encoded, name, label, fmt, box in [
        (png, "n01440764_10026.PNG", 1, b"PNG", [0.1, 0.2]),
        (jpeg, "ILSVRC2012_val_00000001.JPEG", 65, b"JPEG", []),
    ]:
        msg = records.ExamplePB()
        feat = msg.features.feature
        feat["image/height"].int64_list.value.append(8)
        feat["image/width"].int64_list.value.append(8)
        feat["image/colorspace"].bytes_list.value.append(b"RGB")
        feat["image/channels"].int64_list.value.append(3)
        feat["image/class/label"].int64_list.value.append(label)
        feat["image/class/synset"].bytes_list.value.append(b"n01440764")
        feat["image/class/text"].bytes_list.value.append(b"tench, Tinca tinca")
        feat["image/object/bbox/xmin"].float_list.value.extend(box)
        feat["image/object/bbox/label"].int64_list.value.extend([label] * len(box))
        feat["image/format"].bytes_list.value.append(fmt)
        feat["image/filename"].bytes_list.value.append(name.encode())
        feat["image/encoded"].bytes_list.value.append(encoded)
        shard.write(frame_ref(msg.SerializeToString()))

    examples = read_record(shard.getvalue(), "train-00000-of-01024")
    assert examples == [
        Example(png, "n01440764_10026.PNG", 1),
        Example(jpeg, "ILSVRC2012_val_00000001.JPEG", 65),
    ]
    with Image.open(io.BytesIO(examples[0].encoded)) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (8, 8))
    with Image.open(io.BytesIO(examples[1].encoded)) as img:
        assert (img.format, img.mode) == ("JPEG", "L")


def test_decode_defaults_and_errors():
    msg = records.ExamplePB()
    msg.features.feature["image/encoded"].bytes_list.value.append(b"img")
    assert decode_example(msg.SerializeToString()) == Example(b"img", "", -1)

    no_image = records.ExamplePB()
    no_image.features.feature["image/filename"].bytes_list.value.append(b"a.jpg")
    with pytest.raises(RecordError, match="missing feature image/encoded") as info:
        decode_example(no_image.SerializeToString(), "r.tfrecord", 96)
    assert (info.value.path, info.value.offset) == ("r.tfrecord", 96)

    wrong_kind = records.ExamplePB()
    wrong_kind.features.feature["image/encoded"].int64_list.value.append(1)
    with pytest.raises(RecordError, match="int64_list"):
        decode_example(wrong_kind.SerializeToString())

    two_labels = records.ExamplePB()
    two_labels.MergeFrom(msg)
    two_labels.features.feature["image/class/label"].int64_list.value.extend([1, 2])
    with pytest.raises(RecordError, match="2 values"):
        decode_example(two_labels.SerializeToString())

    with pytest.raises(RecordError, match="not a tf.train.Example"):
        decode_example(b"\x0a\xff\xff\xff")


def proto_text_fields() -> dict[str, dict[str, tuple[str, str, int, bool]]]:
    """message -> field -> (label, type, number, packed), parsed from the .proto file."""
    text = (Path(records.__file__).parent / "proto" / "example.proto").read_text()
    text = re.sub(r"//[^\n]*", "", text)
    assert re.search(r"^\s*package\s+tensorflow\s*;", text, re.M)
    token = re.compile(
        r"message\s+(?P<msg>\w+)\s*\{"
        r"|(?P<label>repeated\s+)?(?P<type>map\s*<[^>]*>|[\w.]+)\s+(?P<name>\w+)\s*=\s*"
        r"(?P<num>\d+)\s*(?P<opts>\[[^\]]*\])?\s*;"
    )
    messages: dict[str, dict[str, tuple[str, str, int, bool]]] = {}
    current = None
    for m in token.finditer(text):
        if m["msg"]:
            current = messages.setdefault(m["msg"], {})
            continue
        assert current is not None
        type_ = re.sub(r"\s+", "", m["type"])
        label = "repeated" if m["label"] or type_.startswith("map<") else "optional"
        packed = bool(m["opts"] and re.search(r"packed\s*=\s*true", m["opts"]))
        current[m["name"]] = (label, type_, int(m["num"]), packed)
    return messages


def descriptor_fields() -> dict[str, dict[str, tuple[str, str, int, bool]]]:
    fd = records.FILE_DESCRIPTOR
    assert fd.package == "tensorflow"
    scalar = {
        fd.message_type[0].field[0].TYPE_BYTES: "bytes",
        fd.message_type[0].field[0].TYPE_FLOAT: "float",
        fd.message_type[0].field[0].TYPE_INT64: "int64",
        fd.message_type[0].field[0].TYPE_STRING: "string",
    }

    def type_of(field, msg) -> str:
        if field.type_name:
            nested = {n.name: n for n in msg.nested_type}
            short = field.type_name.rsplit(".", 1)[-1]
            if short in nested and nested[short].options.map_entry:
                key, value = nested[short].field
                return f"map<{type_of(key, msg)},{type_of(value, msg)}>"
            return short
        return scalar[field.type]

    out = {}
    for msg in fd.message_type:
        out[msg.name] = {
            f.name: (
                "repeated" if f.label == f.LABEL_REPEATED else "optional",
                type_of(f, msg),
                f.number,
                f.options.packed,
            )
            for f in msg.field
        }
    return out


def test_proto_text_matches_descriptor():
    parsed = proto_text_fields()
    assert parsed == descriptor_fields()
    # The numbers TensorFlow uses, spelled out once more.
    assert parsed["Feature"]["bytes_list"][2] == 1
    assert parsed["Feature"]["float_list"][2] == 2
    assert parsed["Feature"]["int64_list"][2] == 3
    assert parsed["Features"]["feature"] == ("repeated", "map<string,Feature>", 1, False)
    assert parsed["Example"]["features"] == ("optional", "Features", 1, False)


# --- fuzzing the reader -------------------------------------------------------------


def small_record() -> bytes:
    buf = io.BytesIO()
    write_record(buf, [Example(b"\x89PNG..", "a.png", 1), Example(b"JPEG", "b/é.jpg", -1)])
    return buf.getvalue()


def test_truncation_at_every_offset():
    data = small_record()
    first_end = len(frame(encode_example(Example(b"\x89PNG..", "a.png", 1))))
    for cut in range(len(data) + 1):
        if cut in (0, first_end, len(data)):
            assert len(read_all(data[:cut])) == {0: 0, first_end: 1}.get(cut, 2)
            assert count_examples(io.BytesIO(data[:cut])) == len(read_all(data[:cut]))
            continue
        with pytest.raises(RecordError, match="truncated"):
            read_all(data[:cut])
        with pytest.raises(RecordError, match="truncated"):
            count_examples(io.BytesIO(data[:cut]))


def test_single_bit_flip_anywhere_is_detected():
    data = small_record()
    for bit in range(len(data) * 8):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(RecordError, match="CRC"):
            read_all(bytes(bad))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    try:
        read_all(data)
    except RecordError:
        pass
    try:
        with no_hang():
            count_examples(io.BytesIO(data))
    except RecordError:
        pass


@FUZZ
@given(st.data())
def test_fuzz_mutated_payload_with_valid_framing(data):
    """Corrupt the protobuf itself (re-framed so CRCs pass): the decoder must cope."""
    payload = bytearray(encode_example(Example(b"\xff\xd8image", "c/x.jpg", 9)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(payload)))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set" and pos < len(payload):
            payload[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del payload[pos : pos + data.draw(st.integers(1, 8))]
    try:
        out = read_all(frame(bytes(payload)))
    except RecordError:
        return
    assert len(out) == 1 and isinstance(out[0].encoded, (bytes, memoryview))


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_payload_with_valid_framing(payload):
    try:
        read_all(frame(payload) + frame(payload[::-1]))
    except RecordError:
        pass


feature_kinds = st.sampled_from(["bytes_list", "float_list", "int64_list", None])
feature_keys = st.sampled_from(
    ["image/encoded", "image/filename", "image/class/label", "image/height", "other"]
)


@FUZZ
@given(st.dictionaries(feature_keys, st.tuples(feature_kinds, st.integers(0, 3))))
def test_fuzz_valid_messages_with_odd_features(features):
    msg = records.ExamplePB()
    for key, (kind, count) in features.items():
        feat = msg.features.feature[key]
        if kind == "bytes_list":
            feat.bytes_list.value.extend([b"\xff\xfe"] * count)
        elif kind == "float_list":
            feat.float_list.value.extend([0.5] * count)
        elif kind == "int64_list":
            feat.int64_list.value.extend([-7] * count)
    parsed = records.ExamplePB.FromString(msg.SerializeToString())

    def ok(key: str, kind: str, required: bool) -> bool:
        if key not in parsed.features.feature:
            return not required
        found = parsed.features.feature[key].WhichOneof("kind")
        if found is None:
            return not required
        n = len(getattr(parsed.features.feature[key], found).value)
        return found == kind and (n == 1 if required else n <= 1)

    valid = (
        ok("image/encoded", "bytes_list", True)
        and ok("image/filename", "bytes_list", False)
        and ok("image/class/label", "int64_list", False)
    )
    if not valid:
        with pytest.raises(RecordError, match="image/"):
            read_all(frame(msg.SerializeToString()))
        return
    (ex,) = read_all(frame(msg.SerializeToString()))
    assert ex.encoded == b"\xff\xfe"
    assert ex.label in (-1, -7)
    assert ex.filename in ("", "\ufffd\ufffd")
