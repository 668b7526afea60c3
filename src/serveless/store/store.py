"""The object store: any fsspec URL, atomic writes, and the job layout of DESIGN.md.

Every object is written whole or not at all (temp file + rename on local disks, a single
PUT on object stores), so a re-run stage never leaves a torn object behind.

On S3 (s3fs) every object up to 5 GiB is one PUT whose body is streamed from a local
file, so an upload holds a few MB, not the object (s3fs's own put_file reads the whole file,
or 10 parts of 50 MiB, into memory: 400 MB more for a 200 MB tensor, measured) and counts as
one request, as the cost model assumes. Each attempt of that PUT gets a fresh body that
starts at its first byte (never the half-read file object of a failed attempt), sends its
Content-Length and Content-MD5, and the write counts as done only once S3's reply confirms
it (the ETag of a plain PUT is the MD5 of what S3 stored; under SSE-KMS/C a HEAD checks the
size). Larger objects use a multipart upload with bounded parts, checked by size; that is
just as atomic, since S3 shows the object only once CompleteMultipartUpload succeeds, and
s3fs aborts the upload when a part fails. The endpoint and credentials come
from the standard AWS environment (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, AWS_PROFILE,
...) or from the store options (`endpoint_url`, `key`, `secret`, ...).

Credentials never travel: `spec()`, what goes into events, Lithops payloads and logs, holds
the options that are not credentials and an opaque reference to the rest. The process that
opened the store keeps them; its local workers get them through their environment
(`credentials_env()`); remote functions use their own role or environment.

The parts: S3's own requests (single verified PUTs, conditional PUTs, multipart bounds) are
in s3.py, retries in retry.py, `check` and the wording of store errors in check.py, key
rules in layout.py; this module is what every store shares.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

from ..errors import StoreError
from . import s3 as s3limits
from .check import StoreCheck
from .credentials import lookup, merge, register, split_credentials
from .layout import is_internal, is_temporary, sidecar_key, temporary
from .retry import retrying
from .s3 import S3_PROTOCOLS, Bytes, S3Requests, upload_options

DEFAULT_STORE = "./serveless-store"
READ_BLOCK = 64 << 20
"""One ranged GET per 64 MiB of an object: what the S3 reader fetches at a time, and what the
functions' request counts and the simulator assume of any object store."""



class Store(S3Requests, StoreCheck):
    """A folder-like view of an fsspec URL. Keys are '/'-separated paths below the root."""

    def __init__(self, url: str = DEFAULT_STORE, options: dict[str, Any] | None = None):
        self.url = url
        self.options = dict(options or {})
        public, secret = split_credentials(self.options)
        self._public = public
        self._credentials_ref = register(secret) if secret else None
        # Requests this Store object made, by S3 price class, one per call (retries not
        # counted): the driver's share of the bill (the functions count their own).
        self.requests: Counter[str] = Counter()
        self._journals: list[list[str]] = []  # open journal() blocks: keys written in each
        self._journal_lock = threading.Lock()
        # What functions open (`spec`): a folder by its absolute path, so that a function
        # whose working folder is not the driver's (Lithops runs its calls in a private
        # one) finds the same folder; as a path, not a file:// URL, so it still reads as a
        # folder store wherever the URL is told apart (the simulator, the calibration).
        self._function_url = url
        if "://" not in url:
            self._function_url = str(Path(url).expanduser().resolve())
            url = Path(url).expanduser().resolve().as_uri()
        fs_options = dict(self.options)
        if url.split("://", 1)[0] in S3_PROTOCOLS:
            # Functions in other processes write objects this process may have listed:
            # a cached listing would hide them (s3fs answers "missing" from it, no HEAD).
            fs_options.setdefault("use_listings_cache", False)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **fs_options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot open store {self.url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        self.s3 = bool(S3_PROTOCOLS & set(_protocols(self.fs)))
        # s3fs >= 2026.2 splits a whole-object GET into 10 ranged GETs of 50 MiB at once:
        # up to 500 MB in flight (and twice the object for cat_file). One GET instead.
        self._one_get = {m: {"max_concurrency": 1} if self.s3 and _takes(self.fs, m) else {}
                         for m in ("_cat_file", "_get_file")}

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def spec(self) -> dict[str, Any]:
        """What a function needs to open the same store elsewhere (JSON-safe): no
        credentials, only a reference to them that `from_spec` resolves where they were
        handed over (this process, or a local worker's environment)."""
        out: dict[str, Any] = {"url": self._function_url, "options": self._public}
        if self._credentials_ref:
            out["credentials"] = self._credentials_ref
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Store:
        """The store of `spec()`; credentials from this process or its environment, and
        where they are not there, the platform's (a Lambda function's role, AWS_* vars)."""
        options = dict(spec.get("options") or {})
        found = lookup(str(spec["credentials"])) if spec.get("credentials") else None
        if found:
            options = merge(options, found)
        return cls(spec["url"], options)

    def path(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str) -> bool:
        self.requests["head"] += 1
        return retrying(lambda: bool(self.fs.exists(self.path(key))), key)

    def size(self, key: str) -> int:
        self.requests["head"] += 1
        try:
            return retrying(lambda: int(self.fs.size(self.path(key))), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def get_bytes(self, key: str) -> bytes:
        self.requests["get"] += 1
        kwargs = self._one_get["_cat_file"]
        try:
            return retrying(lambda: self.fs.cat_file(self.path(key), **kwargs), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def open_read(self, key: str) -> IO[bytes]:
        self.requests["head"] += 1  # s3fs asks for the size first
        self.requests["get"] += 1
        kwargs: dict[str, Any] = {"block_size": READ_BLOCK} if self.s3 else {}
        try:
            return retrying(lambda: self.fs.open(self.path(key), "rb", **kwargs), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def get_file(self, key: str, local: str | os.PathLike[str]) -> None:
        """Download an object to a local file, streaming: it is never whole in memory."""
        self.requests["get"] += 1
        kwargs = self._one_get["_get_file"]
        try:
            retrying(lambda: self.fs.get_file(self.path(key), os.fspath(local), **kwargs), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def local_path(self, key: str) -> str | None:
        """The file's path on this machine when the store is a local folder, else None."""
        return self.path(key) if self.local else None

    @contextlib.contextmanager
    def journal(self) -> Iterator[list[str]]:
        """The keys of the objects this Store object writes inside the block, in order: what
        a failed setup removes, and nothing else."""
        written: list[str] = []
        with self._journal_lock:
            self._journals.append(written)
        try:
            yield written
        finally:
            with self._journal_lock:
                self._journals.remove(written)

    def _wrote(self, key: str) -> None:
        with self._journal_lock:
            for written in self._journals:
                written.append(key.strip("/"))

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.local:
            with self.writer(key) as f:
                f.write(data)
            return
        if self.s3 and len(data) <= s3limits.S3_MAX_PUT:
            self.requests["put"] += 1
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            retrying(lambda: self._put_object(self.path(key), lambda: Bytes(data),
                                               len(data), md5), key)
        else:
            self.requests["put"] += 1
            retrying(lambda: self.fs.pipe_file(self.path(key), data), key)
        self._wrote(key)

    def put_file(self, local: str | os.PathLike[str], key: str) -> None:
        """Upload a finished local file as one object, atomically."""
        dest = self.path(key)
        if self.local:
            with open(local, "rb") as src, self.writer(key) as out:
                shutil.copyfileobj(src, out, 1 << 22)
        else:
            self.requests["put"] += 1
            self._upload(os.fspath(local), dest, key)
            self._wrote(key)

    def _upload(self, local: str, dest: str, key: str,
                metadata: dict[str, str] | None = None) -> None:
        """One object from a finished local file: a PUT, or an atomic multipart upload.

        Every attempt sends the file from its first byte (a fresh file object per attempt,
        whatever layer retries), and the object counts as written only once S3 confirmed
        its size and checksum.
        """
        size = os.path.getsize(local)
        if self.s3 and size <= s3limits.S3_MAX_PUT:
            md5 = _file_md5(local)
            retrying(lambda: self._put_object(dest, lambda: open(local, "rb"), size, md5,
                                               metadata), key)
        elif self.s3:  # s3fs sends each part as bytes read for that part: re-sendable
            extra = {"Metadata": metadata} if metadata else {}

            def multipart() -> None:
                self.fs.put_file(local, dest, **upload_options(size), **extra)
                self._confirm_size(dest, size)

            retrying(multipart, key)
        else:
            if metadata:  # before the object: where the object is, its metadata is too
                self._put_sidecar(key, metadata)
            retrying(lambda: self.fs.put_file(local, dest), key)

    # -- conditional writes: what a job's lease rests on ----------------------------------

    def create(self, key: str, data: bytes) -> bool:
        """Write an object only if there is none, atomically; False when there is one. On
        S3 a PUT with If-None-Match: *, on a local folder a hard link of a finished file
        (refused if the name exists), elsewhere a check and then a write."""
        self.requests["put"] += 1
        if self.local:
            dest = self.path(key)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = temporary(dest)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        elif self.s3:
            bucket, k, _ = self.fs.split_path(self.path(key))
            if not self._conditional_put(bucket, k, data, IfNoneMatch="*"):
                return False
        else:
            if self.exists(key):
                return False
            retrying(lambda: self.fs.pipe_file(self.path(key), data), key)
        self._wrote(key)
        return True

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """(the object's bytes, its version: the ETag on S3, else an MD5 of the bytes), or
        None when there is no object: what `replace` compares."""
        self.requests["get"] += 1
        if self.s3:
            bucket, k, _ = self.fs.split_path(self.path(key))
            try:
                reply = retrying(lambda: self._s3_call("get_object", Bucket=bucket, Key=k), key)
            except FileNotFoundError:
                return None
            body = reply["Body"]
            data = fsspec.asyn.sync(self.fs.loop, body.read)
            return data, str(reply.get("ETag", "")).strip('"')
        try:
            data = retrying(lambda: self.fs.cat_file(self.path(key)), key)
        except FileNotFoundError:
            return None
        return data, hashlib.md5(data, usedforsecurity=False).hexdigest()

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite an object only while it is still at `version`; its new version, or
        None when someone else changed or removed it first. On S3 a PUT with If-Match; on a
        local folder a compare and rename under an exclusive lock on a file beside it."""
        self.requests["put"] += 1
        if self.s3:
            bucket, k, _ = self.fs.split_path(self.path(key))
            return self._conditional_put(bucket, k, data, IfMatch=f'"{version}"') or None
        with self._local_lock(key):
            try:
                current = retrying(lambda: self.fs.cat_file(self.path(key)), key)
            except FileNotFoundError:
                return None
            if hashlib.md5(current, usedforsecurity=False).hexdigest() != version:
                return None
            if self.local:
                with self.writer(key) as f:
                    self.requests["put"] -= 1  # counted above
                    f.write(data)
            else:
                retrying(lambda: self.fs.pipe_file(self.path(key), data), key)
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    @contextlib.contextmanager
    def _local_lock(self, key: str) -> Iterator[None]:
        """An exclusive lock for a compare-and-write of `key` by processes of this machine:
        flock on the folder that holds it, so that no lock file is left behind (a no-op for
        stores that are not local)."""
        if not self.local:
            yield
            return
        import fcntl

        folder = os.path.dirname(self.path(key))
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def writer(self, key: str, metadata: Callable[[], dict[str, str]] | None = None,
               ) -> Iterator[IO[bytes]]:
        """A file to write an object into; the object appears only if the block succeeds.

        `metadata` is called once the block has written everything, and its small text
        fields are stored with the object, in the same request (S3 user metadata) or, on
        stores without metadata, in a hidden folder (`layout.sidecar_key`) written before the
        object appears: where the object is, its metadata is (`head`)."""
        self.requests["put"] += 1
        dest = self.path(key)
        if self.local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = temporary(dest)
            try:
                with open(tmp, "wb") as f:
                    yield f
                if metadata is not None:
                    self._put_sidecar(key, metadata())
                os.replace(tmp, dest)
                self._wrote(key)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fd, tmp = tempfile.mkstemp(prefix="serveless-")
            try:
                with os.fdopen(fd, "wb") as f:
                    yield f
                self._upload(tmp, dest, key, metadata() if metadata is not None else None)
                self._wrote(key)
            finally:
                os.unlink(tmp)

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Keys directly under a prefix ending in suffix, sorted; [] if the prefix is absent."""
        self.requests["list"] += 1
        base = self.path(prefix)
        try:
            entries = retrying(lambda: self.fs.ls(base, detail=False), prefix)
        except FileNotFoundError:
            return []
        keys = []
        for entry in entries:
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(suffix) and not is_internal(name):
                keys.append(f"{prefix.strip('/')}/{name}")
        return sorted(keys)

    def du(self, prefix: str) -> int:
        """Bytes under a prefix (0 if it is absent)."""
        try:
            return int(retrying(lambda: self.fs.du(self.path(prefix), total=True), prefix))
        except FileNotFoundError:
            return 0

    def etag(self, key: str) -> str | None:
        """The object's S3 ETag (one HEAD; a content hash), None if it does not exist."""
        self.requests["head"] += 1
        try:
            head = self._head_object(key, self.path(key))
        except FileNotFoundError:
            return None
        return str(head.get("ETag", "")).strip('"') or None

    def content_md5(self, key: str) -> str:
        """The object's MD5, hex: on S3 the ETag of a plain PUT (one HEAD, no download),
        else computed by reading it."""
        self.requests["head"] += 1
        if self.s3:
            try:
                head = self._head_object(key, self.path(key))
            except FileNotFoundError as exc:
                raise StoreError(f"missing object {self.url}/{key}") from exc
            etag = str(head.get("ETag", "")).strip('"')
            if (re.fullmatch(r"[0-9a-f]{32}", etag) and not head.get("SSECustomerAlgorithm")
                    and head.get("ServerSideEncryption") in (None, "AES256")):
                return etag
        md5 = hashlib.md5(usedforsecurity=False)
        with self.open_read(key) as f:
            while chunk := f.read(1 << 22):
                md5.update(chunk)
        return md5.hexdigest()

    def find(self, prefix: str) -> list[str]:
        """Keys of every object anywhere under a prefix, sorted; [] if there is none (one
        listing request, paginated by the store as it needs)."""
        self.requests["list"] += 1
        base = self.path(prefix)
        try:
            found = retrying(lambda: self.fs.find(base), prefix)
        except FileNotFoundError:
            return []
        root = self.root + "/" if self.root else ""
        return sorted(str(p).removeprefix(root) for p in found)

    def stale_temporaries(self, prefix: str) -> list[str]:
        """Keys of temporary objects (`layout.is_temporary`) anywhere under a prefix: what
        killed writers left."""
        return [key for key in self.find(prefix) if is_temporary(key)]

    def sizes(self, prefix: str, suffix: str = "") -> dict[str, int]:
        """Key -> size of the objects directly under a prefix ending in suffix (one listing
        request; the store's own bookkeeping left out); {} if the prefix is absent."""
        self.requests["list"] += 1
        base = self.path(prefix)
        try:
            entries = retrying(lambda: self.fs.ls(base, detail=True), prefix)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") != "directory" and name.endswith(suffix) \
                    and not is_internal(name):
                out[f"{prefix.strip('/')}/{name}"] = int(entry.get("size") or 0)
        return out

    def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        """(size, the metadata stored with it) of an object, or None when there is none: one
        HEAD on S3; elsewhere the object's size and its sidecar."""
        self.requests["head"] += 1
        if self.s3:
            try:
                head = self._head_object(key, self.path(key))
            except FileNotFoundError:
                return None
            meta = {str(a).lower(): str(b) for a, b in (head.get("Metadata") or {}).items()}
            return int(head.get("ContentLength", 0)), meta
        try:
            size = int(retrying(lambda: self.fs.size(self.path(key)), key))
        except FileNotFoundError:
            return None
        try:
            raw = retrying(lambda: self.fs.cat_file(self.path(sidecar_key(key))), key)
            meta = json.loads(raw)
        except (FileNotFoundError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        return size, {str(a): str(b) for a, b in meta.items()}

    def _put_sidecar(self, key: str, metadata: dict[str, str]) -> None:
        """Metadata of an object on a store that has none of its own: written whole, not
        counted (it stands for what S3 keeps with the object for free)."""
        data = json.dumps(metadata).encode()
        path = self.path(sidecar_key(key))
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = temporary(path)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            retrying(lambda: self.fs.pipe_file(path, data), key)

    def delete(self, key: str) -> None:
        if not self.s3:  # its metadata too (a folder's, for a folder), where it has any
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm(self.path(sidecar_key(key)), recursive=True)
        self.requests["delete"] += 1
        with contextlib.suppress(FileNotFoundError):
            retrying(lambda: self.fs.rm(self.path(key), recursive=True), key)


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _takes(fs: Any, method: str) -> bool:
    """Whether this filesystem's method accepts max_concurrency (newer s3fs only)."""
    try:
        return "max_concurrency" in inspect.signature(getattr(fs, method)).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def file_md5(path: str | os.PathLike[str]) -> str:
    """MD5 of a local file, hex (what `Store.content_md5` gives for the same bytes)."""
    return _file_md5(os.fspath(path))


def _file_md5(path: str) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            md5.update(chunk)
    return md5.hexdigest()
