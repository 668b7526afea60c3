"""A job's inputs as users have them: records or plain images, found by content, not by name.

A source is a local folder, a glob, a single file or an fsspec URL (``s3://bucket/prefix``).
Each file is classified by its first bytes: a TFRecord file is one whose first entry's
length CRC is valid (TensorFlow's own shards, named ``train-00000-of-01024``, are records),
a WebDataset shard one whose first tar header is (formats.py: every format of records),
an image is one whose signature is JPEG, PNG, WebP, BMP, TIFF or GIF, and anything else is
skipped with its reason. A text file given alone is a manifest (manifest.py: CSV or JSONL
listing images by URL); in a folder it is skipped, as an images folder's metadata.csv
must not turn the folder into something else. Images in subfolders are labelled by
folder, as in torchvision's ImageFolder (label = index of the subfolder among all
subfolders sorted by name).

Every record's framing is checked here, on the driver, before any function is invoked, and
errors name the user's own file (not the store's copy), the byte offset and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from ..errors import RecordError, SourceError
from ..store import file_md5
from ..store.layout import LABELS_FILE, RECORD_SUFFIXES, record_key, record_name
from .formats import FORMATS, HEAD_BYTES, TFRECORD, detect
from .images import EMPTY_FILE, IMAGE_FORMATS, NOT_AN_IMAGE, sniff_image
from .manifest import MANIFEST_SUFFIXES, manifest_kind
from .parquet import is_parquet_head
from .predictions import parse_classes
from .records import Example, count_examples, iter_record, write_record

T = TypeVar("T")

if TYPE_CHECKING:
    from ..store import Store

_HEAD = HEAD_BYTES
NOT_A_RECORD = f"not {TFRECORD.description}"
NOT_A_SOURCE = f"{NOT_AN_IMAGE} and not a record (a TFRecord file or a tar shard)"
NOT_UTF8 = "its name is not valid UTF-8 (rename the file to serve it)"
A_MANIFEST = "a manifest (CSV or JSONL) is read when given alone as --input"


@dataclass(frozen=True)
class InputFile:
    """One file of the input, as the user names it (`shown`) and as fsspec reaches it."""

    fs: Any
    path: str
    rel: str  # '/'-separated, relative to the input's root: the image's filename in rows
    shown: str
    size: int
    format: str = "tfrecord"  # a record's format (formats.py), when it is a record

    def open(self) -> IO[bytes]:
        return self.fs.open(self.path, "rb")

    def read(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def md5(self) -> str:
        """MD5 of the bytes, hex (what `Store.content_md5` gives for the same bytes)."""
        digest = hashlib.md5(usedforsecurity=False)
        with self.open() as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        return digest.hexdigest()

    def head(self, n: int = _HEAD) -> bytes:
        if self.size == 0:
            return b""
        with self.open() as f:
            return bytes(f.read(n))

    @property
    def record_name(self) -> str:
        """The record's name in the job: the file name without its format's suffix
        (`.tfrecord`; `.tar`, `.tar.gz`, `.tgz`)."""
        return record_name(self.rel, self.format)


@dataclass
class Inputs:
    """What a source holds, classified; labels index `classes`, -1 for unlabelled images."""

    source: str
    records: list[InputFile] = field(default_factory=list)
    images: list[tuple[InputFile, int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file as shown, reason)
    labels_file: InputFile | None = None
    tables: list[InputFile] = field(default_factory=list)  # Parquet image tables (parquet.py)
    manifest: InputFile | None = None  # a CSV or JSONL list of image URLs (manifest.py)
    manifest_kind: str = ""  # "csv" or "jsonl"

    @property
    def record_format(self) -> str:
        """The format of the records (scan_inputs refuses a mix): "tfrecord" when none."""
        return self.records[0].format if self.records else TFRECORD.name


def walk_files(root: str | Path) -> Iterator[tuple[str, int]]:
    """(path, size) of every non-hidden file under root; symlinks followed, each real
    folder visited once (a symlink loop, or two links to one folder)."""
    seen: set[str] = set()
    stack = [str(root)]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.is_file():
                    yield entry.path, entry.stat().st_size


def _utf8(name: str) -> bool:
    """Whether a file name is text: a local name that was not UTF-8 comes from the file
    system with surrogate escapes, which no JSON row, key or terminal can carry."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(name: str) -> str:
    """A file name with its undecodable bytes shown as \\xNN, for a message."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def input_location(source: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(file system, path in it) of an input as a user names it: a local path or a URL."""
    fs, path, _ = _open_fs(source, options)
    return fs, path


def _open_fs(source: str, options: dict[str, Any] | None) -> tuple[Any, str, bool]:
    """(filesystem, path in it, is-local) for a local path or an fsspec URL."""
    import fsspec

    if "://" not in source:
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(source)), True
    protocol = source.split("://", 1)[0]
    opts = dict(options or {})
    if protocol in {"s3", "s3a"}:
        opts.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(source, **opts)
    except (ImportError, ValueError, TypeError) as exc:
        raise SourceError(f"cannot open input {source!r}: {exc}") from exc
    return fs, path, protocol == "file"


def _shown(source: str, root: str, rel: str, local: bool) -> str:
    """The file as the user would write it: their folder or URL joined with the rest."""
    if not rel:
        return source
    if local and "://" not in source:
        return os.path.join(source, *rel.split("/"))
    return f"{source.rstrip('/')}/{rel}"


def _list(fs: Any, root: str, local: bool) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Files (path, rel, size) below a folder and its top-level subfolders (the classes)."""
    if local:
        files = [(p, Path(p).relative_to(root).as_posix(), s) for p, s in walk_files(root)]
        with os.scandir(root) as entries:
            subs = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
        return files, sorted(subs)
    base = root.rstrip("/")
    found = fs.find(base, detail=True)
    files = []
    subs: set[str] = set()
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = path[len(base):].lstrip("/")
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        files.append((path, rel, int(info.get("size") or 0)))
        if "/" in rel:
            subs.add(rel.split("/", 1)[0])
    return files, sorted(subs)


def scan_inputs(source: str, options: dict[str, Any] | None = None) -> Inputs:
    """Classify every file of a source by content; raises SourceError if it holds nothing.

    A file named ``*.tfrecord`` whose bytes are not a record is an error (the user meant it
    as one), not a skipped file; so is a source holding both records and images.
    """
    fs, root, local = _open_fs(source, options)
    out = Inputs(source)
    single = False  # one file named: a text file is a manifest, not a skipped file
    try:
        if _is_glob(source):
            paths = sorted(fs.glob(root))
            listing = [(p, p.rstrip("/").rsplit("/", 1)[-1], int(fs.size(p)))
                       for p in paths if not fs.isdir(p)]
            classes: list[str] = []
            shown = {p: (p if local and "://" not in source else fs.unstrip_protocol(p))
                     for p, _, _ in listing}
        elif fs.isdir(root):
            listing, classes = _list(fs, root, local)
            listing.sort(key=lambda f: f[1].split("/"))
            shown = {p: _shown(source, root, rel, local) for p, rel, _ in listing}
        elif fs.isfile(root):
            listing = [(root, root.rstrip("/").rsplit("/", 1)[-1], int(fs.size(root)))]
            classes = []
            shown = {root: source}
            single = True
        else:
            raise SourceError(f"no records or images at {source}: no such file or folder")
    except (FileNotFoundError, PermissionError, OSError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"cannot list input {source!r}: {exc}") from exc
    out.classes = classes
    index = {name: i for i, name in enumerate(classes)}
    for path, rel, size in listing:
        if not _utf8(rel):  # its name could not be written in a row, a key or a report
            out.skipped.append((_printable(shown[path]), NOT_UTF8))
            continue
        f = InputFile(fs, path, rel, shown[path], size)
        if rel == LABELS_FILE:
            out.labels_file = f
            continue
        if size == 0:
            if single and rel.lower().endswith(tuple(MANIFEST_SUFFIXES)):
                raise SourceError(f"{f.shown}: an empty manifest (0 bytes)")
            out.skipped.append((f.shown, EMPTY_FILE))
            continue
        head = f.head()
        fmt = detect(head)
        meant = [g for g in FORMATS.values() if rel.endswith(g.user_suffixes)]
        if fmt is not None:
            out.records.append(replace(f, format=fmt.name))
        elif sniff_image(head) is not None:
            label = index.get(rel.split("/", 1)[0], -1) if "/" in rel else -1
            out.images.append((f, label))
        elif is_parquet_head(head):
            out.tables.append(f)
        elif rel.endswith(".parquet"):
            raise SourceError(f"{f.shown}: not a Parquet file (no PAR1 magic at its start)")
        elif meant:  # named as a record: the user meant it as one
            raise RecordError(f.shown, 0, f"not {meant[0].description}")
        elif single and (kind := manifest_kind(head, rel)) is not None:
            out.manifest, out.manifest_kind = f, kind
            return out
        elif rel.lower().endswith(tuple(MANIFEST_SUFFIXES)):
            out.skipped.append((f.shown, A_MANIFEST))
        else:
            out.skipped.append((f.shown, NOT_A_SOURCE))
    kinds = sorted({f.format for f in out.records})
    if len(kinds) > 1:
        raise SourceError(f"{source} holds records of two formats ({' and '.join(kinds)}); "
                          "a job reads one: give a folder of one kind")
    if out.tables and (out.records or out.images):
        raise SourceError(f"{source} holds Parquet tables ({len(out.tables)}) and "
                          f"{'records' if out.records else 'images'}; give a folder of one kind")
    if out.tables:
        return out
    if out.records and out.images:
        raise SourceError(f"{source} holds both records ({len(out.records)}) and images "
                          f"({len(out.images)}); give a folder of one kind")
    if not out.records and not out.images:
        why = "; ".join(f"{name}: {reason}" for name, reason in out.skipped[:3])
        raise SourceError(f"no records or images at {source} (images: "
                          f"{', '.join(IMAGE_FORMATS)}, told apart by content)"
                          + (f"; skipped {len(out.skipped)} files, e.g. {why}" if why else ""))
    return out


# -- records ---------------------------------------------------------------------------------


def check_records(records: list[InputFile]) -> dict[str, int]:
    """Every record's framing (lengths, their CRCs, truncation; a shard's tar headers and
    end), before anything runs.

    Returns images per record name; a RecordError names the user's file and byte offset.
    Names must be distinct: they name the record's objects in the job.
    """
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for f in records:
        name = f.record_name
        if name in first:
            raise SourceError(f"two records named {name!r}: {first[name]} and {f.shown}; "
                              "records of one job need distinct file names")
        first[name] = f.shown
        with f.open() as src:
            counts[name] = FORMATS[f.format].count(src, f.shown)
    return counts


class _Tee:
    """A reader that copies what it reads into a writer: check and upload in one pass."""

    def __init__(self, src: IO[bytes], dst: IO[bytes]):
        self.src, self.dst = src, dst
        self.copied = 0

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        if data:
            self.dst.write(data)
            self.copied += len(data)
        return data

    def tell(self) -> int:
        return 0  # iter_frames starts its offsets here


def copy_record(f: InputFile, store: Store, key: str) -> int:
    """Copy a record into the store as it is, checking it on the way: a TFRecord's every
    CRC and example; a shard's bytes, which `check_records` walked, must be as many as
    listed (tar has no checksum of its data to check). Returns the bytes copied.

    The object appears only if the whole file is sound; errors name the user's file.
    """
    with f.open() as src, store.writer(key) as out:
        if f.format == TFRECORD.name:
            tee = _Tee(src, out)
            for _ in iter_record(tee, f.shown):  # type: ignore[arg-type]
                pass
            return tee.copied
        copied = 0
        while chunk := src.read(1 << 22):
            out.write(chunk)
            copied += len(chunk)
        if copied != f.size:
            raise SourceError(f"{f.shown} changed while it was copied ({f.size} bytes "
                              f"listed, {copied} read); run again")
        return copied


# -- images ----------------------------------------------------------------------------------


def record_chunks(items: Sequence[T], per_record: int, prefix: str,
                  stem: str = "") -> Iterator[tuple[str, str, Sequence[T]]]:
    """(name, store key, items) of each record when `items` are packed `per_record` to a
    record under `prefix`: ``<prefix>/<stem><00000..>.tfrecord``, in order."""
    if per_record < 1:
        raise ValueError(f"per_record must be >= 1, got {per_record}")
    for n, start in enumerate(range(0, len(items), per_record)):
        name = f"{stem}{n:05d}"
        yield name, record_key(prefix, name), items[start:start + per_record]


def pack_images(
    images: list[tuple[InputFile, int]],
    store: Store,
    prefix: str,
    per_record: int,
    progress: Callable[[int], None] | None = None,
    exists: Callable[[str, int, Callable[[], str]], bool] | None = None,
) -> list[str]:
    """Images, bytes as-is, into records ``<prefix>/<00000..>.tfrecord``; returns their names.

    Packed to a local temporary file first, so `exists(key, size, md5)` can tell that the
    same record is already in the store (a re-run of the same command) and skip the upload.
    """
    if per_record < 1:
        raise SourceError(f"--per-record must be >= 1, got {per_record}")
    return pack_examples((Example(f.read(), f.rel, label) for f, label in images), store,
                         prefix, per_record, progress, exists)


def pack_examples(
    examples: Iterator[Example],
    store: Store,
    prefix: str,
    per_record: int,
    progress: Callable[[int], None] | None = None,
    exists: Callable[[str, int, Callable[[], str]], bool] | None = None,
) -> list[str]:
    """Examples as they come (a folder's images, a table's rows), `per_record` to a record
    ``<prefix>/<00000..>.tfrecord``; returns the names. One record's examples are read at
    a time, so a source of any size streams through."""
    import itertools
    import tempfile

    names: list[str] = []
    for n in itertools.count():
        chunk = itertools.islice(examples, per_record)
        first = next(chunk, None)
        if first is None:
            break
        name = f"{n:05d}"
        key = record_key(prefix, name)
        fd, tmp = tempfile.mkstemp(prefix="serveless-pack-")
        try:
            with os.fdopen(fd, "wb") as out:
                written = write_record(out, itertools.chain([first], chunk))
            if exists is None or not exists(key, os.path.getsize(tmp),
                                            lambda tmp=tmp: file_md5(tmp)):
                store.put_file(tmp, key)
        finally:
            os.unlink(tmp)
        names.append(name)
        if progress is not None:
            progress(written)
    return names


def labels_json(classes: list[str]) -> bytes:
    """labels.json: the class names, index = label (what `pack` writes beside the records)."""
    return (json.dumps(classes, indent=1) + "\n").encode()


def read_labels(data: bytes, where: str) -> list[str]:
    """Class names from a labels.json: a JSON list of strings (index = label)."""
    try:
        return parse_classes(data, where)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc


@dataclass
class Packed:
    """What `pack` did, for it to say so."""

    images: int
    records: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]]
    removed: int = 0


def records_in(store: Store) -> list[str]:
    """Keys of the records (by name or by content) and labels.json directly in a store."""
    found = []
    for key in store.list(""):
        name = key.rsplit("/", 1)[-1]
        if name == LABELS_FILE or name.endswith(tuple(RECORD_SUFFIXES.values())):
            found.append(key)
            continue
        try:
            with store.open_read(key) as f:
                if detect(bytes(f.read(_HEAD))) is not None:
                    found.append(key)
        except (OSError, IsADirectoryError, ValueError):
            continue  # a folder, or unreadable: not a record of ours
    return found


def _not_images(inputs: Inputs) -> str:
    """What a source holds instead of images, for a message."""
    if inputs.records:
        return "records"
    return "Parquet tables" if inputs.tables else "a manifest"


def pack_source(
    src: str,
    dest: Store,
    per_record: int,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    options: dict[str, Any] | None = None,
) -> Packed:
    """`serveless pack`: images into records of `dest`, plus labels.json; never mixes old
    records with new ones (a destination holding records is refused unless `overwrite`,
    which deletes them first)."""
    if per_record < 1:
        raise SourceError(f"--per-record must be >= 1, got {per_record}")
    inputs = scan_inputs(src, options)
    if inputs.records or inputs.tables or inputs.manifest:
        raise SourceError(f"{src} holds {_not_images(inputs)}, not images; a job reads "
                          "them as they are (run --input)")
    old = records_in(dest)
    if old and not overwrite:
        raise SourceError(f"{dest.url} already holds {len(old)} records or labels files; "
                          "pass --overwrite to replace them (they are deleted first)")
    for key in old:
        dest.delete(key)
    names = pack_images(inputs.images, dest, "", per_record, progress=progress)
    if inputs.classes:
        dest.put_bytes(LABELS_FILE, labels_json(inputs.classes))
    return Packed(len(inputs.images), names, inputs.classes, inputs.skipped, len(old))


def pack(
    source: str | Path,
    store: Store,
    prefix: str,
    per_record: int,
    progress: Callable[[int], None] | None = None,
    options: dict[str, Any] | None = None,
) -> list[str]:
    """The images of a source (found by content, labelled by subfolder) packed into records
    ``<prefix>/<00000..>.tfrecord`` of the store; returns the record names in order. A
    source that holds records is refused: they are served as they are."""
    inputs = scan_inputs(str(source), options)
    if inputs.records or inputs.tables or inputs.manifest:
        raise SourceError(f"{source} holds {_not_images(inputs)}, not images; a job reads "
                          "them as they are (run --input)")
    return pack_images(inputs.images, store, prefix, per_record, progress=progress)


def find_records(source: str) -> list[str]:
    """Local TFRecord files named by a folder or a glob, found by content, sorted; shards
    are refused with a message saying so, not read as broken TFRecords."""
    inputs = scan_inputs(source)
    if not inputs.records:
        raise SourceError(f"no records at {source!r} (it holds images or tables: use run "
                          "--input)")
    if inputs.record_format != TFRECORD.name:  # calibrate, partition, experiments, --plan
        raise SourceError(f"{source} holds {inputs.record_format} shards; this reads TFRecord "
                          "files (a job serves shards as they are: run --input without --plan)")
    return [f.path for f in inputs.records]


def write_records(examples: Sequence[Example], store: Store, prefix: str, per_record: int,
                  stem: str = "") -> list[str]:
    """Examples already read, into records ``<prefix>/<stem><00000..>.tfrecord`` of the
    store (the last may be short), each written atomically; returns the record names."""
    names = []
    for name, key, chunk in record_chunks(examples, per_record, prefix, stem):
        with store.writer(key) as f:
            write_record(f, chunk)
        names.append(name)
    return names


def repack(records: str, per_record: int, dest: str | Path, stem: str = "p-") -> int | None:
    """The images of local records, in order, into records of `per_record` in the folder
    `dest` (`<stem><00000..>.tfrecord`, the last may be short); None, and nothing written,
    when they already hold `per_record` images each (the last may hold fewer). Else the
    number of images repacked. One record's images are in memory at a time."""
    files = find_records(records)
    counts = []
    for path in files:
        with open(path, "rb") as f:
            counts.append(count_examples(f, path))  # type: ignore[arg-type]
    if all(c == per_record for c in counts[:-1]) and counts[-1] <= per_record:
        return None
    from ..store import Store

    store = Store(str(dest))
    chunk: list[Example] = []
    written = 0

    def flush() -> None:
        nonlocal written, chunk
        with store.writer(record_key("", f"{stem}{written // per_record:05d}")) as out:
            write_record(out, chunk)
        written += len(chunk)
        chunk = []

    for path in files:
        with open(path, "rb") as f:
            for ex in iter_record(f, path):  # type: ignore[arg-type]
                chunk.append(ex)
                if len(chunk) == per_record:
                    flush()
    if chunk:
        flush()
    return written
