"""The formats a record may have, behind one small interface (one module per format).

A record is many images in one object. Two formats are records as users already have them,
so a job serves them byte for byte: TFRecord files of `tf.train.Example` (records.py: our
own, and TensorFlow's ImageNet shards) and WebDataset tar shards (webdataset.py). Everything
that reads a record (the driver's checks, stage 0, planning) goes through `RecordFormat`:
how a file is recognised from its first bytes, how its images are counted (before anything
runs) and how stage 0 reads them: their count first (its output's shape), then the images
as `Example`s, in one pass over the record where the format allows it. A format
added here is found by `detect`, named in job.json and in events by `name`, and stored in a
job under its `suffix` (store/layout.py keeps the suffixes, with every other key rule).

Formats are told apart by content, never by name (DESIGN.md): a TFRecord file by its first
entry's length CRC, a shard by the `ustar` magic and checksum of its first tar header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from ..store.layout import RECORD_SUFFIXES
from . import webdataset
from .records import Example, count_examples, iter_record, masked_crc32c

__all__ = ["FORMATS", "HEAD_BYTES", "RecordFormat", "detect", "get_format", "is_record_head"]

HEAD_BYTES = 4096
"""The first bytes that tell a record's format: a TFRecord needs 12, a tar header 512 (a
gzipped one a few hundred more, compressed)."""


def is_record_head(head: bytes) -> bool:
    """Whether bytes start like a TFRecord file: a length whose masked CRC32C follows it."""
    if len(head) < 12:
        return False
    (crc,) = struct.unpack("<I", head[8:12])
    return masked_crc32c(head[:8]) == crc


def _read_tfrecord(f: IO[bytes], path: str, options: dict[str, Any]
                   ) -> tuple[int, Iterator[Example]]:
    """Counted by its headers alone (seeking past the data), then read from the start."""
    n = count_examples(f, path)  # type: ignore[arg-type]
    f.seek(0)
    return n, iter_record(f, path)  # type: ignore[arg-type]


def _read_shard(f: IO[bytes], path: str, options: dict[str, Any]
                ) -> tuple[int, Iterator[Example]]:
    return webdataset.read_shard(f, path, label_key=options.get("label_key") or "")


@dataclass(frozen=True)
class RecordFormat:
    """One format of records: how to recognise, count and read it."""

    name: str  # in job.json and events: "tfrecord", "webdataset"
    description: str  # for messages: "a TFRecord file"
    user_suffixes: tuple[str, ...]  # a file so named is meant as one: refused if it is not
    sniff: Callable[[bytes], bool]  # from the first HEAD_BYTES bytes
    count: Callable[[IO[bytes], str], int]  # images (samples), the framing checked
    # (images, their Examples) of a file that can seek; options: {"label_key": …}
    read: Callable[[IO[bytes], str, dict[str, Any]], tuple[int, Iterator[Example]]]

    @property
    def suffix(self) -> str:
        """The suffix of this format's records in a job."""
        return RECORD_SUFFIXES[self.name]


TFRECORD = RecordFormat(
    "tfrecord", "a TFRecord file (the first entry's length CRC does not match)",
    (".tfrecord",), is_record_head, count_examples, _read_tfrecord)  # type: ignore[arg-type]
WEBDATASET = RecordFormat(
    "webdataset", "a tar shard (no tar header with the ustar magic at byte 257)",
    (".tar", ".tar.gz", ".tgz"), webdataset.is_shard_head, webdataset.count_samples,
    _read_shard)

FORMATS: dict[str, RecordFormat] = {f.name: f for f in (TFRECORD, WEBDATASET)}


def detect(head: bytes) -> RecordFormat | None:
    """The format of a file from its first HEAD_BYTES bytes, or None (not a record)."""
    for fmt in FORMATS.values():
        if fmt.sniff(head):
            return fmt
    return None


def get_format(name: str) -> RecordFormat:
    """A format by its name in job.json or an event; ValueError names the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown record format {name!r} (known: "
                         f"{', '.join(FORMATS)})") from None
