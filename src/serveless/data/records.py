"""Records: images packed into TFRecord files of ``tf.train.Example`` messages.

A record is the unit of work of the pipeline (DESIGN.md). We use TensorFlow's own
format so that TensorFlow reads our records and we read existing ImageNet shards, but
without depending on TensorFlow:

- The protobuf messages are built at import time from a ``FileDescriptorProto`` that
  mirrors ``tensorflow/core/example/{feature,example}.proto`` (package ``tensorflow``,
  same field numbers), in a private descriptor pool, so no generated ``_pb2`` code and
  no clash with a TensorFlow loaded in the same process. The same schema is shipped as
  text in ``proto/example.proto`` to document the wire format; a test keeps the two in
  sync.
- Each entry is framed as TFRecord does: ``uint64 length``, ``uint32 masked_crc32c
  (length bytes)``, ``data``, ``uint32 masked_crc32c(data)``, all little-endian.

The reader treats its input as untrusted: any malformed byte sequence raises
:class:`RecordError` (naming the file, the byte offset of the entry and the reason),
never another exception, and it streams so a lying length cannot exhaust memory.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import google_crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ..errors import RecordError

__all__ = [
    "DUPLICATE_IDS",
    "MAX_RECORD_BYTES",
    "Example",
    "RecordError",
    "count_examples",
    "decode_example",
    "encode_example",
    "frame",
    "iter_frames",
    "iter_record",
    "masked_crc32c",
    "read_record",
    "write_record",
]

#: Largest entry the reader accepts; a bigger length is corruption, not an image.
MAX_RECORD_BYTES = 1 << 30

FEATURE_ENCODED = "image/encoded"
FEATURE_FILENAME = "image/filename"
FEATURE_LABEL = "image/class/label"
FEATURE_ID = "image/source_id"  # the source's id (TF's object detection shards name it so)
FEATURE_ERROR = "serveless/error"  # why an entry holds no image (fetch failed, null cell)

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_READ_CHUNK = 1 << 24  # read big entries piecewise so a false length never allocates it all
_MASK_DELTA = 0xA282EAD8


# --- protobuf schema (tensorflow/core/example/{feature,example}.proto) ---------------

_FD = descriptor_pb2.FieldDescriptorProto


def _build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The schema of tf.train.Example, field for field, as a descriptor (no protoc)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="serveless/proto/example.proto", package="tensorflow", syntax="proto3"
    )

    def add_field(
        msg: descriptor_pb2.DescriptorProto,
        name: str,
        number: int,
        type_: int,
        *,
        repeated: bool = False,
        type_name: str = "",
        packed: bool = False,
        oneof_index: int | None = None,
    ) -> None:
        field = msg.field.add(
            name=name,
            number=number,
            type=type_,
            label=_FD.LABEL_REPEATED if repeated else _FD.LABEL_OPTIONAL,
        )
        if type_name:
            field.type_name = type_name
        if packed:
            field.options.packed = True
        if oneof_index is not None:
            field.oneof_index = oneof_index

    bytes_list = file.message_type.add(name="BytesList")
    add_field(bytes_list, "value", 1, _FD.TYPE_BYTES, repeated=True)
    float_list = file.message_type.add(name="FloatList")
    add_field(float_list, "value", 1, _FD.TYPE_FLOAT, repeated=True, packed=True)
    int64_list = file.message_type.add(name="Int64List")
    add_field(int64_list, "value", 1, _FD.TYPE_INT64, repeated=True, packed=True)

    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        [
            ("bytes_list", ".tensorflow.BytesList"),
            ("float_list", ".tensorflow.FloatList"),
            ("int64_list", ".tensorflow.Int64List"),
        ],
        start=1,
    ):
        add_field(feature, name, number, _FD.TYPE_MESSAGE, type_name=type_name, oneof_index=0)

    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    add_field(entry, "key", 1, _FD.TYPE_STRING)
    add_field(entry, "value", 2, _FD.TYPE_MESSAGE, type_name=".tensorflow.Feature")
    add_field(
        features,
        "feature",
        1,
        _FD.TYPE_MESSAGE,
        repeated=True,
        type_name=".tensorflow.Features.FeatureEntry",
    )

    example = file.message_type.add(name="Example")
    add_field(example, "features", 1, _FD.TYPE_MESSAGE, type_name=".tensorflow.Features")
    return file


#: The schema as a descriptor proto (compared against ``proto/example.proto`` by a test).
FILE_DESCRIPTOR = _build_file_descriptor()
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(FILE_DESCRIPTOR)


def _message_class(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"tensorflow.{name}"))


#: The message class wire-compatible with ``tf.train.Example``.
ExamplePB = _message_class("Example")


# --- examples ------------------------------------------------------------------------


DUPLICATE_IDS = ("an id joins an image's results back, so each must be unique (without "
                 "--id-column the entries are numbered)")
"""Why a source whose ids repeat is refused (a manifest's, a table's --id-column)."""


@dataclass(frozen=True)
class Example:
    """One image as stored in a record: the file's bytes as-is, its name, its label, the
    source's id when it is not the name (a table's id column or row, a manifest's), and why
    there is no image when there is none (an unreachable URL: its row says so).

    Read from a record file, `encoded` is a view into the entry's buffer (bytes-like, not
    copied); decoded from bytes, it is bytes."""

    encoded: bytes | memoryview
    filename: str = ""
    label: int = -1  # -1 when unknown
    id: str | int | None = None  # None: the filename is the id
    error: str = ""  # set: the entry is an error row, not an image to decode


def encode_example(ex: Example) -> bytes:
    """Serialize as a tf.train.Example with the feature names ImageNet shards use.

    Serialization is deterministic (map keys sorted) so re-packing gives identical bytes.
    """
    msg = ExamplePB()
    feature = msg.features.feature
    feature[FEATURE_ENCODED].bytes_list.value.append(bytes(ex.encoded))
    feature[FEATURE_FILENAME].bytes_list.value.append(ex.filename.encode("utf-8"))
    if ex.label != -1:
        feature[FEATURE_LABEL].int64_list.value.append(ex.label)
    if isinstance(ex.id, int) and not isinstance(ex.id, bool):
        feature[FEATURE_ID].int64_list.value.append(ex.id)
    elif ex.id is not None:
        feature[FEATURE_ID].bytes_list.value.append(str(ex.id).encode("utf-8"))
    if ex.error:
        feature[FEATURE_ERROR].bytes_list.value.append(ex.error.encode("utf-8"))
    return msg.SerializeToString(deterministic=True)


def decode_example(data: bytes | memoryview, path: str = "<record>",
                   offset: int = 0) -> Example:
    """Parse one tf.train.Example, keeping only the image, filename and label.

    Other features (height, format, boxes, ...) are ignored so TensorFlow's ImageNet
    shards read as-is. An absent or empty filename/label gives ""/-1; a feature of the
    wrong kind or with several values is a RecordError rather than a silent guess.

    The wire format is read here rather than by protobuf's parser, which copies its input
    into an arena and each bytes value out again: a 256 MB image entry took 783 MB to read
    that way. Read here, the image is a view into the entry's one buffer (its `encoded` is
    a memoryview when `data` is one), and the rules are protobuf's: the last of repeated
    singular fields wins, unknown fields are skipped, map keys are UTF-8.
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    try:
        features: dict[str, tuple[str, list[Any]]] = {}
        for number, kind, value in _fields(view):
            if number == 1 and kind == _LEN:  # Example.features
                for fnum, fkind, entry in _fields(value):
                    if fnum == 1 and fkind == _LEN:  # Features.feature: map<string, Feature>
                        key, feature = _map_entry(entry)
                        features[key] = feature
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(path, offset, f"not a tf.train.Example: {exc}") from None

    def single(key: str, kind: str) -> Any:
        found, values = features.get(key, (None, []))
        if found is None:
            return None
        if found != kind:
            raise RecordError(path, offset, f"feature {key} is a {found}, expected a {kind}")
        if len(values) > 1:
            raise RecordError(path, offset, f"feature {key} has {len(values)} values, expected one")
        return values[0] if values else None

    def text(value: Any) -> str:
        # Names are metadata only: a stray non-UTF-8 byte must not cost the image.
        return bytes(value).decode("utf-8", errors="replace") if value else ""

    encoded = single(FEATURE_ENCODED, "bytes_list")
    error = single(FEATURE_ERROR, "bytes_list")
    if encoded is None and error is None:
        raise RecordError(path, offset, f"missing feature {FEATURE_ENCODED}")
    filename = single(FEATURE_FILENAME, "bytes_list")
    label = single(FEATURE_LABEL, "int64_list")
    kind = features.get(FEATURE_ID, (None, []))[0]  # an id is a number or a name
    source_id = single(FEATURE_ID, kind) if kind in ("int64_list", "bytes_list") else None
    return Example(
        encoded=b"" if encoded is None else bytes(encoded) if isinstance(data, bytes) else encoded,
        filename=text(filename),
        label=-1 if label is None else int(label),
        id=None if source_id is None else (int(source_id) if kind == "int64_list"
                                           else text(source_id)),
        error=text(error),
    )


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_KINDS = {1: "bytes_list", 2: "float_list", 3: "int64_list"}  # Feature's oneof, by field


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at pos."""
    value = shift = 0
    while True:
        if pos >= len(view):
            raise ValueError("truncated varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _fields(view: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of a message: an int for varints
    and fixed-size fields, a view for length-delimited ones."""
    pos, end = 0, len(view)
    while pos < end:
        tag, pos = _varint(view, pos)
        number, kind = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if kind == _VARINT:
            value, pos = _varint(view, pos)
        elif kind in (_I64, _I32):
            size = 8 if kind == _I64 else 4
            if pos + size > end:
                raise ValueError("truncated fixed-size field")
            value, pos = int.from_bytes(view[pos:pos + size], "little"), pos + size
        elif kind == _LEN:
            size, pos = _varint(view, pos)
            if pos + size > end:
                raise ValueError(f"field {number}: length {size} runs past the message")
            value, pos = view[pos:pos + size], pos + size
        else:
            raise ValueError(f"field {number}: unsupported wire type {kind}")
        yield number, kind, value


def _map_entry(entry: memoryview) -> tuple[str, tuple[str | None, list[Any]]]:
    """One map<string, Feature> entry: (key, (the Feature's kind or None, its values))."""
    key = ""
    feature: tuple[str | None, list[Any]] = (None, [])
    for number, kind, value in _fields(entry):
        if number == 1 and kind == _LEN:
            key = bytes(value).decode("utf-8")
        elif number == 2 and kind == _LEN:
            feature = _feature(value)
    return key, feature


def _feature(view: memoryview) -> tuple[str | None, list[Any]]:
    """A Feature: the kind of its oneof that is set last, and that list's values."""
    found: tuple[str | None, list[Any]] = (None, [])
    for number, kind, value in _fields(view):
        if number in _KINDS and kind == _LEN:
            found = (_KINDS[number], _list_values(_KINDS[number], value))
    return found


def _list_values(kind: str, view: memoryview) -> list[Any]:
    """The values of a BytesList (views), FloatList or Int64List (packed or not)."""
    values: list[Any] = []
    for number, wire, value in _fields(view):
        if number != 1:
            continue
        if kind == "bytes_list" and wire == _LEN:
            values.append(value)
        elif kind == "int64_list" and wire == _VARINT:
            values.append(value - (1 << 64) if value >= 1 << 63 else value)
        elif kind == "int64_list" and wire == _LEN:  # packed
            pos = 0
            while pos < len(value):
                v, pos = _varint(value, pos)
                values.append(v - (1 << 64) if v >= 1 << 63 else v)
        elif kind == "float_list" and wire == _I32:
            values.append(value)
        elif kind == "float_list" and wire == _LEN:  # packed
            if len(value) % 4:
                raise ValueError("packed floats not a multiple of 4 bytes")
            values.extend(range(len(value) // 4))
        else:
            raise ValueError(f"{kind} value of wire type {wire}")
    return values


# --- framing -------------------------------------------------------------------------


def masked_crc32c(data: bytes | memoryview) -> int:
    """CRC32C of data, masked as TFRecord does (CRCs of CRCs are weak otherwise). A buffer
    is checksummed a slice at a time (google-crc32c takes read-only bytes only), so a large
    entry is never copied whole."""
    if isinstance(data, bytes):
        crc = google_crc32c.value(data)
    else:
        view = memoryview(data).cast("B")
        crc = 0
        for i in range(0, len(view), _READ_CHUNK):
            crc = google_crc32c.extend(crc, bytes(view[i:i + _READ_CHUNK]))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _header(length: int) -> bytes:
    size = struct.pack("<Q", length)
    return size + _FOOTER.pack(masked_crc32c(size))


def frame(data: bytes) -> bytes:
    """One framed TFRecord entry: length, its CRC, the data, the data's CRC."""
    return _header(len(data)) + bytes(data) + _FOOTER.pack(masked_crc32c(data))


def write_record(f: BinaryIO, examples: Iterable[Example]) -> int:
    """Write examples one at a time (memory stays flat) and return how many were written."""
    count = 0
    for ex in examples:
        data = encode_example(ex)
        f.write(_header(len(data)))
        f.write(data)
        f.write(_FOOTER.pack(masked_crc32c(data)))
        count += 1
    return count


def _read_upto(f: BinaryIO, n: int) -> bytes:
    """Read n bytes, fewer only at end of file; tolerates short reads from raw streams."""
    first = f.read(min(n, _READ_CHUNK)) or b""
    if len(first) == n or not first:
        return first
    parts = [first]
    got = len(first)
    while got < n:
        chunk = f.read(min(n - got, _READ_CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _read_entry(f: BinaryIO, n: int) -> memoryview:
    """An entry's n bytes (fewer only at end of file) in one buffer. The buffer is sized
    once from what the stream says is left, never from the length alone (a lying length
    must not allocate it), and filled in place: joining chunks held a 256 MB entry twice."""
    left = _remaining(f)
    buf = bytearray(min(n, left) if left is not None else min(n, _READ_CHUNK))
    view = memoryview(buf)
    got = 0
    readinto = getattr(f, "readinto", None)
    while got < n:
        if got == len(buf):  # a stream that does not say its size: grow as data comes
            if left is not None:
                break
            buf.extend(bytes(min(n - got, max(len(buf), _READ_CHUNK))))
            view = memoryview(buf)
        want = min(len(buf) - got, _READ_CHUNK)
        if readinto is not None:
            k = readinto(view[got:got + want]) or 0
        else:
            chunk = f.read(want) or b""
            k = len(chunk)
            view[got:got + k] = chunk
        if k == 0:
            break
        got += k
    return view[:got]


def _remaining(f: BinaryIO) -> int | None:
    """Bytes left in a seekable stream, else None."""
    if not _seekable(f):
        return None
    here = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(here)
    return max(0, end - here)


def _check_header(header: bytes, path: str, offset: int) -> int:
    """Validate a (possibly short) 12-byte header and return the entry's data length."""
    if len(header) < _HEADER.size:
        raise RecordError(
            path, offset, f"truncated header: expected {_HEADER.size} bytes, got {len(header)}"
        )
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise RecordError(path, offset, "length CRC mismatch")
    if length > MAX_RECORD_BYTES:
        raise RecordError(
            path, offset, f"entry length {length} exceeds the {MAX_RECORD_BYTES}-byte limit"
        )
    return length


def _tell(f: BinaryIO) -> int:
    try:
        return int(f.tell())
    except (AttributeError, OSError, ValueError):
        return 0


def iter_frames(f: BinaryIO, path: str = "<record>") -> Iterator[tuple[int, bytes]]:
    """Yield (offset, payload) per entry, checking both CRCs, reading one entry at a time.

    Offsets are those of the entry's header in the stream; errors name that offset.
    """
    offset = _tell(f)
    while True:
        header = _read_upto(f, _HEADER.size)
        if not header:
            return
        length = _check_header(header, path, offset)
        data = _read_entry(f, length)
        if len(data) < length:
            raise RecordError(
                path, offset, f"truncated data: expected {length} bytes, got {len(data)}"
            )
        footer = _read_upto(f, _FOOTER.size)
        if len(footer) < _FOOTER.size:
            raise RecordError(
                path,
                offset,
                f"truncated footer: expected {_FOOTER.size} bytes, got {len(footer)}",
            )
        if _FOOTER.unpack(footer)[0] != masked_crc32c(data):
            raise RecordError(path, offset, "data CRC mismatch")
        yield offset, data
        offset += _HEADER.size + length + _FOOTER.size


def iter_record(f: BinaryIO, path: str = "<record>") -> Iterator[Example]:
    """Stream the examples of a record file, verifying framing and parsing each one."""
    for offset, data in iter_frames(f, path):
        example = decode_example(data, path, offset)
        del data  # the entry's buffer goes before the caller holds the example
        yield example


def read_record(data: bytes, path: str = "<record>") -> list[Example]:
    """All examples of a record held in memory."""
    return list(iter_record(io.BytesIO(data), path))


def _seekable(f: BinaryIO) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def count_examples(f: BinaryIO, path: str = "<record>") -> int:
    """Count entries by reading only their headers and seeking past the data.

    Planning a job needs counts of many records; this touches 12 bytes per image instead
    of the whole file. Length CRCs and sizes are still checked; data CRCs are not. A
    stream that cannot seek is read fully instead.
    """
    if not _seekable(f):
        return sum(1 for _ in iter_frames(f, path))
    offset = f.tell()
    f.seek(0, io.SEEK_END)
    end = f.tell()
    f.seek(offset)
    count = 0
    while offset < end:
        length = _check_header(_read_upto(f, _HEADER.size), path, offset)
        left = end - offset - _HEADER.size
        if left < length:
            raise RecordError(path, offset, f"truncated data: expected {length} bytes, got {left}")
        if left < length + _FOOTER.size:
            raise RecordError(
                path,
                offset,
                f"truncated footer: expected {_FOOTER.size} bytes, got {left - length}",
            )
        offset += _HEADER.size + length + _FOOTER.size
        f.seek(offset)
        count += 1
    return count
