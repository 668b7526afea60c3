"""WebDataset tar shards, read in place as records.

A WebDataset shard (`shard-000000.tar`, the format of LAION-style sets and most large
training pipelines) is already what DESIGN.md calls a record: many images in one object.
So a job serves it as it is, byte for byte, and stage 0 reads it here, one sample at a
time, the way it reads a TFRecord: the shard is fetched with one streamed GET (one per
64 MiB block, `store.READ_BLOCK`), its headers walked once (the output's shape needs the
count of samples first), then its members read in order from that walk.

WebDataset's own rules, so that a shard means here what it means to `webdataset`:

- A member's *key* is its path up to the first dot of its file name, its *extension* the
  rest, lower-cased (`a/000123.seg.png`: key `a/000123`, extension `seg.png`); members of
  one sample are consecutive. A member whose file name has no dot, and anything that is not
  a regular file (folders, links), belongs to no sample.
- The image is the member whose extension is an image type (`jpg`, `png`, `webp`, …),
  a plain one (`jpg`) before a compound one (`seg.png`, often a mask), then the first in
  the shard. Its bytes are decoded by content, as every image is (data/images.py).
- The label is `.cls` (integer text), else `.json`'s `--label-key` (by default `label`,
  then `cls`), else `.txt` when it holds an integer (a `.txt` is often a caption).
- The key is the sample's filename and id in its prediction row. A sample with no image
  member is an error row naming what it had; an image that cannot be decoded is an error
  row like a broken JPEG in a TFRecord: never silence.

Parsing is Python's `tarfile` in random access (stage 0's local copy and the store's files
can seek; anything else is spooled first), never a hand parser, never extraction to disk.
`tarfile` ends an archive quietly at a header it cannot read, so the reader checks that
the walk ended at the end-of-archive block: a shard cut short or with a broken header is a
RecordError naming the byte offset, not a shorter record. A gzipped shard (`.tar.gz`, told
apart by its magic bytes, not its name) is inflated once through `gzip`, which checks its
CRC, into a temporary file beside the record's local copy (/tmp on Lambda), and read from
there: reading a gzip stream at random would inflate it again from the start for every
step back. In a job it is kept as `<name>.tar`, its bytes as they are.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

from ..errors import RecordError
from .records import MAX_RECORD_BYTES, Example

__all__ = [
    "DEFAULT_LABEL_KEYS",
    "IMAGE_EXTENSIONS",
    "count_samples",
    "is_shard_head",
    "iter_samples",
    "read_shard",
    "sample_key",
]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"})
"""Extensions of the image members stage 0 decodes (data/images.py's formats)."""
DEFAULT_LABEL_KEYS = ("label", "cls")
"""The keys of a `.json` member tried for the label when no --label-key is given."""
MAX_META_BYTES = 1 << 20
"""The largest label member (`.cls`, `.txt`, `.json`) read; a larger one is no label."""
GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = tarfile.BLOCKSIZE
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's own (tariterators.py)


def sample_key(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a member's path by WebDataset's rule, or None when
    its file name has no dot (such a member belongs to no sample)."""
    found = _KEY.match(name)
    if found is None:
        return None
    return found.group(1), found.group(2).lower()


def is_shard_head(head: bytes) -> bool:
    """Whether a file's first bytes are a tar archive's first header: the POSIX `ustar`
    magic at byte 257 and a valid header checksum; gzipped, once inflated. Content, not
    the name: a shard named `train-000` is one, a `.tar` of anything else is not."""
    if head[:2] == GZIP_MAGIC:
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, _BLOCK)
        except zlib.error:
            return False
    if len(head) < _BLOCK or head[257:262] != b"ustar":
        return False
    try:
        tarfile.TarInfo.frombuf(head[:_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def count_samples(f: IO[bytes], path: str = "<shard>") -> int:
    """The samples of a shard, from its headers alone (seeking past the data): what the
    driver checks before a job and planning counts. The shard's framing is checked as
    `read_shard` checks it, so the two agree on every shard they accept."""
    shard = _Shard(f, path)
    shard.close()
    return len(shard.samples)


def read_shard(f: IO[bytes], path: str = "<shard>", label_key: str = ""
               ) -> tuple[int, Iterator[Example]]:
    """(the number of samples, their Examples in order): what stage 0 needs, the count
    first for its output's shape. The headers are walked once (tarfile's parsing of a
    header is most of what reading a shard costs: 0.2 of 0.55 ms per image when counted
    and read in two walks) and the members read after, from that walk. Each Example holds
    the image member's bytes, the key as filename and id, the label (-1 when none), or
    `error` set when the sample has no image. Errors are RecordErrors naming `path`."""
    shard = _Shard(f, path)
    keys = (label_key,) if label_key else DEFAULT_LABEL_KEYS

    def examples() -> Iterator[Example]:
        try:
            for key, members in shard.samples:
                yield _example(key, [(ext, shard.read(info) if _wanted(ext) else None)
                                     for ext, info in members], keys)
        finally:
            shard.close()

    return len(shard.samples), examples()


def iter_samples(f: IO[bytes], path: str = "<shard>",
                 label_key: str = "") -> Iterator[Example]:
    """The samples of a shard in order, one Example each (see `read_shard`)."""
    return read_shard(f, path, label_key)[1]


def _example(key: str, members: list[tuple[str, bytes | None]],
             label_keys: tuple[str, ...]) -> Example:
    """One sample's Example from its (extension, bytes) members."""
    images = [(ext, data) for ext, data in members
              if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and data is not None]
    images.sort(key=lambda m: "." in m[0])  # plain `jpg` before `seg.png`; stable otherwise
    label = _label(dict((ext, data) for ext, data in members if data is not None), label_keys)
    if not images:
        had = ", ".join(f".{ext}" for ext, _ in members) or "nothing"
        return Example(b"", key, label, id=key,
                       error=f"sample {key!r} has no image member (it has {had})")
    return Example(images[0][1], key, label, id=key)


def _label(members: dict[str, bytes], keys: tuple[str, ...]) -> int:
    """The sample's label: `.cls`, else the `.json` member's first key of `keys` holding an
    integer, else `.txt` if it is an integer; -1 when none of them gives one."""
    if "cls" in members:
        value = _integer(members["cls"])
        if value is not None:
            return value
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict):
            for k in keys:
                value = meta.get(k)
                if isinstance(value, bool):
                    continue
                if isinstance(value, int) and value >= 0:
                    return value
                if isinstance(value, str) and (number := _integer(value.encode())) is not None:
                    return number
    if "txt" in members:
        value = _integer(members["txt"])
        if value is not None:
            return value
    return -1


def _integer(data: bytes) -> int | None:
    """A non-negative integer written as text (`"7"`, `"7\\n"`), else None."""
    text = data.strip()
    return int(text) if text.isdigit() and len(text) < 19 else None


def _wanted(ext: str) -> bool:
    """Whether a member's bytes are read: an image, or a label member."""
    return ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS or ext in ("cls", "json", "txt")


class _Shard:
    """A shard opened and walked: its samples, each (key, [(extension, TarInfo)]), grouped
    as WebDataset groups them (consecutive members of one key), and their members' bytes on
    demand. The walk checks the end of the archive (and a gzipped shard's CRC) before any
    sample is served. A file that cannot seek is spooled first (tarfile's random access
    reads a member after the walk; every file the store or a function opens can seek), and
    a gzipped one inflated to a temporary file."""

    def __init__(self, f: IO[bytes], path: str):
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.spool: Any = None
        if not _seekable(f):
            self.spool = tempfile.SpooledTemporaryFile(max_size=1 << 26)
            shutil.copyfileobj(f, self.spool, 1 << 20)
            self.spool.seek(0)
            f = self.spool
        if _peek(f, 2) == GZIP_MAGIC:
            f = self._inflate(f)
        src = _Tracked(f)
        self.samples: list[tuple[str, list[tuple[str, tarfile.TarInfo]]]] = []
        try:
            self.tar = tarfile.open(fileobj=src, mode="r:", errors="surrogateescape")
            for info in self.tar:
                named = sample_key(info.name) if info.isfile() else None
                if named is None:
                    continue
                if not self.samples or self.samples[-1][0] != named[0]:
                    self.samples.append((named[0], []))
                self.samples[-1][1].append((named[1], info))
            _check_end(src.last, self.tar.offset, path)
        except RecordError:
            self.close()
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
            where = self.tar.offset if self.tar is not None else 0  # the member being read
            self.close()
            raise RecordError(path, where, f"not a readable tar shard: {exc}") from None

    def read(self, info: tarfile.TarInfo) -> bytes:
        """A member's bytes, within the size an image or a label member may have."""
        assert self.tar is not None
        named = sample_key(info.name)
        meta = named is not None and named[1] in ("cls", "json", "txt")
        limit = MAX_META_BYTES if meta else MAX_RECORD_BYTES
        if info.size > limit:
            if meta:
                return b""  # an oversized label member gives no label, not a failed shard
            raise RecordError(self.path, info.offset, f"member {info.name!r} is {info.size} "
                              f"bytes, over the {limit}-byte limit of one image")
        try:
            member = self.tar.extractfile(info)
            return member.read() if member is not None else b""
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise RecordError(self.path, info.offset,
                              f"member {info.name!r} cannot be read: {exc}") from None

    def _inflate(self, f: IO[bytes]) -> IO[bytes]:
        """A gzipped shard inflated once into a temporary file (its CRC and length checked
        at the end of the stream), which replaces any spool."""
        inflated = tempfile.TemporaryFile(prefix="serveless-shard-")
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                shutil.copyfileobj(gz, inflated, 1 << 20)
        except (EOFError, OSError, zlib.error) as exc:
            inflated.close()
            self.close()
            raise RecordError(self.path, 0, f"not a readable tar shard: {exc}") from None
        if self.spool is not None:
            self.spool.close()
        self.spool = inflated
        inflated.seek(0)
        return inflated

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
        if self.spool is not None:
            self.spool.close()


class _Tracked:
    """A seekable file that remembers its last read (where, what): the block tarfile last
    tried as a header, checked without seeking back (a gzip stream would inflate again)."""

    def __init__(self, f: Any):
        self.f = f
        self.last: tuple[int, bytes] = (-1, b"")

    def read(self, n: int = -1) -> bytes:
        where = self.f.tell()
        data = self.f.read(n)
        self.last = (where, data)
        return data

    def seek(self, *args: int) -> int:
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True


def _check_end(last: tuple[int, bytes], end: int, path: str) -> None:
    """The walk ended at a zero block (the end-of-archive marker), not at a header tarfile
    could not read nor at the end of a file cut short: both end an archive quietly."""
    where, block = last
    if where != end:  # tarfile's last read is its try at a header there; if not, say so
        raise RecordError(path, end, "the walk did not end at a tar header (corrupt shard)")
    if len(block) < _BLOCK:
        raise RecordError(path, end, "the shard ends without its end-of-archive block "
                                     "(cut short?)")
    if block.count(0) != _BLOCK:
        raise RecordError(path, end, "a tar header that cannot be read (corrupt shard)")


def _peek(f: IO[bytes], n: int) -> bytes:
    """The next n bytes of a seekable file, which stays where it was; b"" if it can't seek."""
    if not _seekable(f):
        return b""
    here = f.tell()
    data = f.read(n)
    f.seek(here)
    return bytes(data)


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False
