"""Manifests: a CSV or JSONL file listing images by URL or path, fetched by the driver and
packed into records.

SageMaker Batch Transform and most data catalogues hand work out as a list of keys rather
than as the images: one row per image with its location (``s3://…``, ``file://…``, a
local path, or a path relative to the manifest's folder), an id to join results back on,
and maybe a label. A manifest is not a record (functions would need credentials and a
request per image), so the driver fetches the images through fsspec, many at a time on a
thread pool (one GET waits on the network, not on the CPU), and packs them into TFRecords
in the manifest's order.

Everything about the manifest itself is checked before anything is written, in a first
pass that holds no image: its columns (`--url-column`, else the one column named like a
location; `--id-column`; `--label-column`, else `label` when there is one), every line
(a bad JSONL line or a CSV row of the wrong width is refused, naming the line), that no
id is given twice (naming both lines), and that it lists something. What can only be
known by fetching (an unreachable URL, bytes that are not an image) is an error row
naming the entry and why, never a silent gap and never the end of the job.

Ids are the `--id-column` value as written (text stays text: ``0042`` keeps its zeros),
else the entry's index; labels are integers, or class names mapped to integers in sorted
order and written to the job's labels.json, as a folder's subfolders are.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, Protocol

from ..errors import SourceError
from .images import EMPTY_FILE, NOT_AN_IMAGE, sniff_image
from .records import DUPLICATE_IDS, Example

__all__ = ["FETCH_AHEAD", "FETCH_THREADS", "MANIFEST_SUFFIXES", "URL_NAMES", "ManifestColumns",
           "check_manifest", "manifest_examples", "manifest_kind", "resolve_entry"]

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
URL_NAMES = ("url", "uri", "path", "key", "s3_uri", "image_url")
"""Column names taken as the location column when --url-column is not given (one only)."""
FETCH_THREADS = 16
"""Images fetched at once: enough to hide an object store's latency (~20-50 ms a GET)
behind each other, few enough not to be throttled or to hold much memory."""
FETCH_AHEAD = 4
"""Fetches queued per thread: the pool never waits on the packer, and memory is bounded."""
_INTEGER = re.compile(r"[+-]?\d+")
_INT64 = (-(1 << 63), (1 << 63) - 1)


class ManifestFile(Protocol):
    """What is needed of a manifest file (sources.InputFile has it)."""

    fs: Any
    path: str
    shown: str

    def open(self) -> IO[bytes]: ...


@dataclass(frozen=True)
class ManifestColumns:
    """How to read a manifest: its kind, the columns of location, id and label, the class
    names when labels are names, and how many entries it lists."""

    kind: str  # "csv" or "jsonl"
    url: str
    id: str | None = None
    label: str | None = None
    classes: tuple[str, ...] | None = None  # labels are names: index = label
    entries: int = 0


def manifest_kind(head: bytes, name: str) -> str | None:
    """"csv" or "jsonl" for a file given alone as --input that is text: by its suffix, else
    by content (a first character ``{`` is JSONL, other text CSV); None for binary data."""
    lower = name.lower()
    for suffix, kind in MANIFEST_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    if b"\0" in head:
        return None
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the head
            return None
        text = head[:exc.start].decode("utf-8-sig")
    stripped = text.lstrip()
    if not stripped:
        return None
    return "jsonl" if stripped.startswith("{") else "csv"


def _rows(f: IO[bytes], kind: str, where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of every entry; a CSV's header is its first line. A line that is
    not an entry is a SourceError naming it."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    try:
        if kind == "jsonl":
            for n, line in enumerate(text, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.strip())
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{where}: line {n} is not JSON: {exc.msg} (column "
                                      f"{exc.colno})") from None
                if not isinstance(row, dict):
                    raise SourceError(f"{where}: line {n} is not a JSON object but a "
                                      f"{type(row).__name__}; each line is one entry")
                yield n, row
            return
        reader = csv.reader(text)
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise SourceError(f"{where}: an empty manifest (no header line)")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise SourceError(f"{where}: its header names {', '.join(map(repr, dup))} twice")
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise SourceError(f"{where}: line {reader.line_num} has {len(fields)} fields, "
                                  f"the header {len(header)}")
            yield reader.line_num, dict(zip(header, fields, strict=True))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start} of "
                          "a chunk)") from None
    except csv.Error as exc:
        raise SourceError(f"{where}: not a readable CSV file: {exc}") from None
    finally:
        text.detach()


def _present(value: Any) -> bool:
    return value is not None and value != ""


def _pick(names: list[str], given: str | None, flag: str, where: str) -> str | None:
    if given is not None and given not in names:
        raise SourceError(f"{where}: no column {given!r} ({flag}); it has {', '.join(names)}")
    return given


def _url_column(names: list[str], where: str) -> str:
    found = [n for n in names if n.lower() in URL_NAMES]
    if len(found) == 1:
        return found[0]
    raise SourceError(
        f"{where}: give --url-column: " + (
            f"several columns could hold the locations ({', '.join(found)})" if found else
            f"no column is named {', '.join(URL_NAMES[:-1])} or {URL_NAMES[-1]}")
        + f"; it has {', '.join(names) or 'no columns'}")


def _integer(value: Any) -> int | None:
    """A label or id as an integer when it is one (a JSON integer, or a CSV text of digits)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return None


def check_manifest(f: ManifestFile, kind: str, url: str | None = None, id: str | None = None,
                   label: str | None = None) -> ManifestColumns:
    """Read a manifest once, holding no image, and return how to read it: every mistake is
    a SourceError naming the file, and the line or column, before anything is written."""
    where = f.shown
    names: list[str] = []  # every column, in the order first seen (JSONL rows may differ)
    no_id = 0  # the first line without an id, said once the column is known to exist
    id_lines: dict[int | str, int] = {}  # each id's first line: ids join results back
    names_seen: set[str] = set()
    integers: set[str] = set()
    entries = 0
    with f.open() as fh:
        for n, row in _rows(fh, kind, where):
            names.extend(k for k in row if k not in names)
            entries += 1
            if entries == 1:
                if kind == "csv":  # the header: every column is known now
                    for given, flag in ((url, "--url-column"), (id, "--id-column"),
                                        (label, "--label-column")):
                        _pick(names, given, flag, where)
                url = url or _url_column(names, where)
                if label is None and "label" in names:
                    label = "label"
            location = row.get(url)
            if _present(location) and not isinstance(location, str):
                raise SourceError(f"{where}: line {n}: column {url!r} holds {location!r}, "
                                  "not a URL or path")
            if id is not None:
                ident = row.get(id)
                if not _present(ident):
                    no_id = no_id or n
                elif isinstance(ident, bool) or not isinstance(ident, int | str) or (
                        isinstance(ident, int) and not _INT64[0] <= ident <= _INT64[1]):
                    raise SourceError(f"{where}: line {n}: id {ident!r} in column {id!r} is "
                                      "neither text nor a 64-bit integer")
                elif (first := id_lines.setdefault(ident, n)) != n:
                    raise SourceError(f"{where}: line {n}: id {ident!r} in column {id!r} is "
                                      f"also on line {first}; {DUPLICATE_IDS}")
            if label is not None and _present(value := row.get(label)):
                if _integer(value) is not None:
                    integers.add(str(value).strip())
                elif isinstance(value, str):
                    names_seen.add(value)
                else:
                    raise SourceError(f"{where}: line {n}: label {value!r} in column "
                                      f"{label!r} is neither an integer nor a class name")
    if entries == 0:
        raise SourceError(f"{where}: an empty manifest (no entries)")
    for given, flag in ((url, "--url-column"), (id, "--id-column"), (label, "--label-column")):
        _pick(names, given, flag, where)  # a JSONL's columns are known only now
    if no_id:
        raise SourceError(f"{where}: line {no_id}: no id in column {id!r} (--id-column); "
                          "every entry needs one to join back on")
    assert url is not None
    # names (an integer-looking label among them is a name too), else integers as they are
    classes = tuple(sorted(names_seen | integers)) if names_seen else None
    return ManifestColumns(kind, url, id, label, classes, entries)


def _label(value: Any, cols: ManifestColumns, index: dict[str, int]) -> int:
    if not _present(value):
        return -1
    if cols.classes is not None:
        return index[str(value).strip() if _integer(value) is not None else value]
    number = _integer(value)
    return number if number is not None and number >= 0 else -1


def resolve_entry(entry: str, f: ManifestFile) -> str:
    """Where an entry points: a URL as it is, an absolute path as it is, a relative path
    joined to the manifest's folder (on whatever file system the manifest is)."""
    if "://" in entry or os.path.isabs(os.path.expanduser(entry)):
        return os.path.expanduser(entry) if "://" not in entry else entry
    protocol = f.fs.protocol if isinstance(f.fs.protocol, str) else f.fs.protocol[0]
    if protocol in ("file", "local"):
        return os.path.join(os.path.dirname(f.path), *entry.split("/"))
    return f.fs.unstrip_protocol(posixpath.join(posixpath.dirname(f.path), entry))


def _fetch(url: str, options: dict[str, Any]) -> bytes:
    """An entry's bytes through fsspec; the store options go to S3 URLs only (they are the
    user's credentials for that store, not for any host a manifest names)."""
    import fsspec

    if "://" not in url:
        with open(url, "rb") as fh:
            return fh.read()
    protocol = url.split("://", 1)[0]
    opts = dict(options) if protocol in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return bytes(fs.cat_file(path))


def _why(exc: BaseException) -> str:
    """A fetch failure in a few words: what a person needs to fix the entry."""
    if isinstance(exc, FileNotFoundError):
        return "no such file or object"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _entry(n: int, row: dict[str, Any], f: ManifestFile, cols: ManifestColumns,
           index: dict[str, int], options: dict[str, Any], ordinal: int) -> Example:
    """One entry fetched: its image, or an Example with `error` naming it and why."""
    location = row.get(cols.url)
    label = _label(row.get(cols.label), cols, index) if cols.label else -1
    ident: str | int = ordinal if cols.id is None else row[cols.id]
    if not _present(location):
        return Example(b"", f"{f.shown}#{ordinal}", label, id=ident,
                       error=f"line {n} of {f.shown}: no URL or path in column {cols.url!r}")
    target = resolve_entry(location, f)
    try:
        data = _fetch(target, options)
    except Exception as exc:  # any failure is this entry's, never the job's
        return Example(b"", location, label, id=ident,
                       error=f"cannot fetch {target}: {_why(exc)}")
    # the row's filename is the entry as written; say where it led when that differs
    at = "" if target == location else f", at {target}"
    if not data:
        return Example(b"", location, label, id=ident, error=f"{EMPTY_FILE}{at}")
    if sniff_image(data[:16]) is None:
        return Example(b"", location, label, id=ident, error=f"{NOT_AN_IMAGE}{at}")
    return Example(data, location, label, id=ident)


def manifest_examples(f: ManifestFile, cols: ManifestColumns,
                      options: dict[str, Any] | None = None,
                      progress: Callable[[int], None] | None = None,
                      threads: int = FETCH_THREADS) -> Iterator[Example]:
    """Every entry of a checked manifest, in order, as an Example: the image's bytes as
    fetched, the entry as written as filename, its label and id. `threads` fetches run at
    once, a bounded number ahead of the packer; `progress(1)` after each entry."""
    index = {name: i for i, name in enumerate(cols.classes or ())}
    opts = dict(options or {})
    pending: deque[Future[Example]] = deque()
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="serveless-fetch")
    try:
        with f.open() as fh:
            for ordinal, (n, row) in enumerate(_rows(fh, cols.kind, f.shown)):
                pending.append(pool.submit(_entry, n, row, f, cols, index, opts, ordinal))
                while len(pending) > threads * FETCH_AHEAD:
                    yield _done(pending.popleft(), progress)
        while pending:
            yield _done(pending.popleft(), progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _done(future: Future[Example], progress: Callable[[int], None] | None) -> Example:
    example = future.result()
    if progress is not None:
        progress(1)
    return example
