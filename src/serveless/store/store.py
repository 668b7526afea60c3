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
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec
import fsspec.asyn

from ..errors import StoreError
from .credentials import lookup, merge, register, split_credentials
from .layout import is_internal, is_temporary, probe_key, sidecar_key, temporary

T = TypeVar("T")
DEFAULT_STORE = "./serveless-store"
_S3_PROTOCOLS = {"s3", "s3a"}
S3_MAX_PUT = 5 << 30  # S3's limit for one PUT; larger objects go multipart
S3_PART_SIZE = 64 << 20  # multipart part size (above S3_MAX_PUT only)
S3_UPLOAD_CONCURRENCY = 2  # parts in flight: at most 128 MiB buffered per upload
S3_MAX_PARTS = 10_000  # S3's limit on parts per upload
READ_BLOCK = 64 << 20
"""One ranged GET per 64 MiB of an object: what the S3 reader fetches at a time, and what the
functions' request counts and the simulator assume of any object store."""



class TransientStoreError(OSError):
    """A store request failed in a way that may succeed when tried again."""


STORE_RETRIES = 5


def _retrying(op: Callable[[], T], what: str) -> T:
    """Object stores fail transiently (throttling, resets): retry with backoff and jitter.

    Missing objects and permission errors are final and raised at once.
    """
    for attempt in range(STORE_RETRIES + 1):
        try:
            return op()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError:
            if attempt == STORE_RETRIES:
                raise
            time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError(what)  # unreachable



class Store:
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
        if "://" not in url:
            url = Path(url).expanduser().resolve().as_uri()
        fs_options = dict(self.options)
        if url.split("://", 1)[0] in _S3_PROTOCOLS:
            # Functions in other processes write objects this process may have listed:
            # a cached listing would hide them (s3fs answers "missing" from it, no HEAD).
            fs_options.setdefault("use_listings_cache", False)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **fs_options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot open store {self.url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        self.s3 = bool(_S3_PROTOCOLS & set(_protocols(self.fs)))
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
        out: dict[str, Any] = {"url": self.url, "options": self._public}
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
        return _retrying(lambda: bool(self.fs.exists(self.path(key))), key)

    def size(self, key: str) -> int:
        self.requests["head"] += 1
        try:
            return _retrying(lambda: int(self.fs.size(self.path(key))), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def get_bytes(self, key: str) -> bytes:
        self.requests["get"] += 1
        kwargs = self._one_get["_cat_file"]
        try:
            return _retrying(lambda: self.fs.cat_file(self.path(key), **kwargs), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def open_read(self, key: str) -> IO[bytes]:
        self.requests["head"] += 1  # s3fs asks for the size first
        self.requests["get"] += 1
        kwargs: dict[str, Any] = {"block_size": READ_BLOCK} if self.s3 else {}
        try:
            return _retrying(lambda: self.fs.open(self.path(key), "rb", **kwargs), key)
        except FileNotFoundError as exc:
            raise StoreError(f"missing object {self.url}/{key}") from exc

    def get_file(self, key: str, local: str | os.PathLike[str]) -> None:
        """Download an object to a local file, streaming: it is never whole in memory."""
        self.requests["get"] += 1
        kwargs = self._one_get["_get_file"]
        try:
            _retrying(lambda: self.fs.get_file(self.path(key), os.fspath(local), **kwargs), key)
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
        if self.s3 and len(data) <= S3_MAX_PUT:
            self.requests["put"] += 1
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            _retrying(lambda: self._put_object(self.path(key), lambda: _Bytes(data),
                                               len(data), md5), key)
        else:
            self.requests["put"] += 1
            _retrying(lambda: self.fs.pipe_file(self.path(key), data), key)
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
        if self.s3 and size <= S3_MAX_PUT:
            md5 = _file_md5(local)
            _retrying(lambda: self._put_object(dest, lambda: open(local, "rb"), size, md5,
                                               metadata), key)
        elif self.s3:  # s3fs sends each part as bytes read for that part: re-sendable
            extra = {"Metadata": metadata} if metadata else {}

            def multipart() -> None:
                self.fs.put_file(local, dest, **_s3_upload_options(size), **extra)
                self._confirm_size(dest, size)

            _retrying(multipart, key)
        else:
            if metadata:  # before the object: where the object is, its metadata is too
                self._put_sidecar(key, metadata)
            _retrying(lambda: self.fs.put_file(local, dest), key)

    def _put_object(self, dest: str, open_body: Callable[[], Any], size: int,
                    md5: str, metadata: dict[str, str] | None = None) -> None:
        """One S3 PUT of exactly `size` bytes, confirmed; called once per attempt.

        Not through s3fs's call_s3: its retry loop re-sends the same body object, which
        after a failed attempt (botocore's own retries exhausted, e.g. by 503 SlowDown)
        is read to its end, so S3 stores an empty or short object and reports success
        (tests/test_store_s3_faults.py reproduces it through a fault-injecting proxy). Here
        botocore still retries within the call (it rewinds our fresh body to its start), and
        `_retrying` makes each further attempt with a new body. Content-Length and
        Content-MD5 are sent, so S3 itself refuses a body that is not the one meant.
        """
        bucket, key, _ = self.fs.split_path(dest)
        with open_body() as body:
            extra = {"Metadata": metadata} if metadata else {}
            reply = self._s3_call("put_object", Bucket=bucket, Key=key, Body=body, **extra,
                                  ContentLength=size,
                                  ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode())
        self.fs.invalidate_cache(dest)
        etag = str(reply.get("ETag", "")).strip('"')
        plain = (reply.get("ServerSideEncryption") in (None, "AES256")
                 and not reply.get("SSECustomerAlgorithm"))
        if plain and re.fullmatch(r"[0-9a-f]{32}", etag):
            if etag != md5:  # a plain PUT's ETag is the MD5 of what S3 stored
                raise TransientStoreError(
                    f"S3 stored {dest} with MD5 {etag}, not the {size} bytes sent (MD5 "
                    f"{md5}): written again")
        else:  # SSE-KMS/C ETags are not MD5s: check the size S3 stored
            self._confirm_size(dest, size)

    def _confirm_size(self, dest: str, size: int) -> None:
        bucket, key, _ = self.fs.split_path(dest)
        stored = int(self._s3_call("head_object", Bucket=bucket, Key=key)["ContentLength"])
        if stored != size:
            raise TransientStoreError(f"S3 stored {stored} bytes for {dest}, not {size}")

    def _s3_call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        """One botocore call (with botocore's own retries only); errors as OSErrors."""
        fs = self.fs

        async def call() -> dict[str, Any]:
            await fs.set_session()
            s3 = await fs.get_s3(kwargs.get("Bucket"))
            fn = getattr(s3, method)
            return await fn(**fs._get_s3_method_kwargs(fn, **kwargs))

        try:
            return fsspec.asyn.sync(fs.loop, call)
        except OSError:
            raise
        except Exception as exc:
            from botocore.exceptions import ClientError
            from s3fs.errors import translate_boto_error

            if isinstance(exc, ClientError):
                raise translate_boto_error(exc) from exc
            if type(exc).__name__ in {"NoCredentialsError", "PartialCredentialsError"}:
                raise PermissionError(str(exc)) from exc  # final: no retry finds credentials
            # connection resets, timeouts, a body cut short: worth another attempt
            raise TransientStoreError(f"{type(exc).__name__}: {exc}") from exc

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
            _retrying(lambda: self.fs.pipe_file(self.path(key), data), key)
        self._wrote(key)
        return True

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """(the object's bytes, its version: the ETag on S3, else an MD5 of the bytes), or
        None when there is no object: what `replace` compares."""
        self.requests["get"] += 1
        if self.s3:
            bucket, k, _ = self.fs.split_path(self.path(key))
            try:
                reply = _retrying(lambda: self._s3_call("get_object", Bucket=bucket, Key=k), key)
            except FileNotFoundError:
                return None
            body = reply["Body"]
            data = fsspec.asyn.sync(self.fs.loop, body.read)
            return data, str(reply.get("ETag", "")).strip('"')
        try:
            data = _retrying(lambda: self.fs.cat_file(self.path(key)), key)
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
                current = _retrying(lambda: self.fs.cat_file(self.path(key)), key)
            except FileNotFoundError:
                return None
            if hashlib.md5(current, usedforsecurity=False).hexdigest() != version:
                return None
            if self.local:
                with self.writer(key) as f:
                    self.requests["put"] -= 1  # counted above
                    f.write(data)
            else:
                _retrying(lambda: self.fs.pipe_file(self.path(key), data), key)
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def _conditional_put(self, bucket: str, key: str, data: bytes, **condition: str) -> str:
        """One S3 PUT with a condition; its ETag, or "" when the condition failed (412)."""
        from botocore.exceptions import ClientError

        fs = self.fs

        async def call() -> dict[str, Any]:
            await fs.set_session()
            s3 = await fs.get_s3(bucket)
            return await s3.put_object(Bucket=bucket, Key=key, Body=data, **condition)

        for attempt in range(STORE_RETRIES + 1):
            try:
                reply = fsspec.asyn.sync(fs.loop, call)
                fs.invalidate_cache(f"{bucket}/{key}")
                return str(reply.get("ETag", "")).strip('"')
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return ""
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status < 500 and code not in ("SlowDown", "RequestTimeout"):
                    raise self._translated(exc) from exc
            except OSError:
                if attempt == STORE_RETRIES:
                    raise
            time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))
        raise TransientStoreError(f"conditional write of {bucket}/{key} kept failing")

    @staticmethod
    def _translated(exc: Exception) -> OSError:
        from s3fs.errors import translate_boto_error

        return translate_boto_error(exc)

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
            entries = _retrying(lambda: self.fs.ls(base, detail=False), prefix)
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
            return int(_retrying(lambda: self.fs.du(self.path(prefix), total=True), prefix))
        except FileNotFoundError:
            return 0

    def etag(self, key: str) -> str | None:
        """The object's S3 ETag (one HEAD; a content hash), None if it does not exist."""
        self.requests["head"] += 1
        bucket, k, _ = self.fs.split_path(self.path(key))
        try:
            head = _retrying(lambda: self._s3_call("head_object", Bucket=bucket, Key=k), key)
        except FileNotFoundError:
            return None
        return str(head.get("ETag", "")).strip('"') or None

    def content_md5(self, key: str) -> str:
        """The object's MD5, hex: on S3 the ETag of a plain PUT (one HEAD, no download),
        else computed by reading it."""
        self.requests["head"] += 1
        if self.s3:
            bucket, k, _ = self.fs.split_path(self.path(key))
            try:
                head = _retrying(lambda: self._s3_call("head_object", Bucket=bucket, Key=k), key)
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
            found = _retrying(lambda: self.fs.find(base), prefix)
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
            entries = _retrying(lambda: self.fs.ls(base, detail=True), prefix)
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
            bucket, k, _ = self.fs.split_path(self.path(key))
            try:
                head = _retrying(lambda: self._s3_call("head_object", Bucket=bucket, Key=k), key)
            except FileNotFoundError:
                return None
            meta = {str(a).lower(): str(b) for a, b in (head.get("Metadata") or {}).items()}
            return int(head.get("ContentLength", 0)), meta
        try:
            size = int(_retrying(lambda: self.fs.size(self.path(key)), key))
        except FileNotFoundError:
            return None
        try:
            raw = _retrying(lambda: self.fs.cat_file(self.path(sidecar_key(key))), key)
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
            _retrying(lambda: self.fs.pipe_file(path, data), key)

    def delete(self, key: str) -> None:
        if not self.s3:  # its metadata too (a folder's, for a folder), where it has any
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm(self.path(sidecar_key(key)), recursive=True)
        self.requests["delete"] += 1
        with contextlib.suppress(FileNotFoundError):
            _retrying(lambda: self.fs.rm(self.path(key), recursive=True), key)

    def check(self) -> None:
        """Fail now, with a clear StoreError, if jobs cannot read and write this store.

        Called before anything is invoked: a missing bucket or wrong credentials would
        otherwise surface as every function failing (and retrying) one by one. A local
        folder is checked without writing (the nearest existing folder must be writable);
        any other store gets a tiny probe object written, read back and deleted.
        """
        if self.local:
            self._check_local()
            return
        key = probe_key()
        probe = self.path(key)
        try:  # transient errors are retried as for any request; the rest are final
            # put_bytes, not a bare pipe_file: on S3 it sends Content-MD5 and checks the
            # ETag, so an upload cut short on the wire is written again, not reported as
            # a store that returns what it was not given
            self.put_bytes(key, b"ok")
            self.requests.update(get=1, delete=1)
            if _retrying(lambda: self.fs.cat_file(probe), probe) != b"ok":
                raise StoreError(f"store {self.url!r} did not return what was written to it")
            _retrying(lambda: self.fs.rm(probe), probe)
        except StoreError:
            raise
        except Exception as exc:  # s3fs/botocore raise many types; all mean "unusable"
            raise StoreError(self._explain(exc)) from exc

    def _check_local(self) -> None:
        path = Path(self.root)
        if path.exists() and not path.is_dir():
            raise StoreError(f"store {self.url!r} is a file, not a folder")
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write to store {self.url!r}: {existing} is not writable")
        try:  # os.access says yes to root everywhere, /sys and /proc included: try it
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise StoreError(f"cannot write to store {self.url!r}: {existing} does not take "
                             f"files ({exc.strerror or exc})") from exc

    def _explain(self, exc: BaseException) -> str:
        """Say what is wrong with the store in words a user can act on."""
        if isinstance(exc, TransientStoreError) and exc.__cause__ is not None:
            exc = exc.__cause__  # what botocore said, not our wrapper for retrying it
        name = type(exc).__name__
        text = str(exc) or name
        where = f"store {self.url!r}"
        if self.s3:
            bucket = self.root.split("/", 1)[0]
            creds = ("AWS_PROFILE (a profile in ~/.aws/credentials), or "
                     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
            cause = type(exc.__cause__).__name__
            if {name, cause} & {"NoCredentialsError", "PartialCredentialsError"}:
                return f"{where}: no AWS credentials found ({text}); set {creds}"
            if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
                return (f"{where}: bucket {bucket!r} does not exist (create it first, or check "
                        f"the endpoint and region): {text}")
            if isinstance(exc, PermissionError):
                return (f"{where}: access denied to bucket {bucket!r}: {text}. Check the "
                        f"credentials ({creds}) and that they may read, write and delete "
                        "objects there")
            if name in {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError",
                        "ClientConnectorError"}:
                return (f"{where}: cannot reach the S3 endpoint ({text}); check "
                        "AWS_ENDPOINT_URL / --store-option endpoint_url=...")
        if isinstance(exc, PermissionError):
            return f"{where}: access denied: {text}"
        if isinstance(exc, FileNotFoundError):
            return f"{where} does not exist: {text}"
        return f"{where} cannot be used: {name}: {text}"


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _takes(fs: Any, method: str) -> bool:
    """Whether this filesystem's method accepts max_concurrency (newer s3fs only)."""
    try:
        return "max_concurrency" in inspect.signature(getattr(fs, method)).parameters
    except (AttributeError, TypeError, ValueError):
        return False


class _Bytes:
    """bytes as a context manager, like an open file: a body for `Store._put_object`."""

    def __init__(self, data: bytes):
        self.data = data

    def __enter__(self) -> bytes:
        return self.data

    def __exit__(self, *exc: object) -> None:
        pass


def file_md5(path: str | os.PathLike[str]) -> str:
    """MD5 of a local file, hex (what `Store.content_md5` gives for the same bytes)."""
    return _file_md5(os.fspath(path))


def _file_md5(path: str) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            md5.update(chunk)
    return md5.hexdigest()


def _s3_upload_options(size: int) -> dict[str, int]:
    """s3fs upload arguments that bound the memory one upload holds (see the module doc)."""
    return {"chunksize": max(S3_PART_SIZE, math.ceil(size / S3_MAX_PARTS)),
            "max_concurrency": S3_UPLOAD_CONCURRENCY}


