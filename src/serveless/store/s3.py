"""S3's own requests, made beside s3fs where s3fs's would be wrong or unbounded.

s3fs carries most requests, but three kinds are ours. A plain PUT: s3fs's retry loop
re-sends the same body object, which after a failed attempt is read to its end, so S3
stores an empty or short object and reports success (reproduced through a fault-injecting
proxy, tests/test_store_s3_faults.py); ours gets a fresh body per attempt, sends its
Content-Length and Content-MD5, and counts as written only once S3's reply confirms it. A
conditional PUT (If-None-Match / If-Match): what a job's lease rests on, which s3fs does not
offer. And the bounds of a multipart upload (above S3's 5 GiB PUT limit): parts of 64 MiB,
two in flight, so one upload holds at most 128 MiB whatever the object's size.

`S3Requests` is a part of `Store` (store.py) and uses its `fs` (an s3fs filesystem).
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from typing import Any

import fsspec.asyn

from .retry import STORE_RETRIES, TransientStoreError, backoff, retrying

S3_PROTOCOLS = {"s3", "s3a"}
S3_MAX_PUT = 5 << 30  # S3's limit for one PUT; larger objects go multipart
S3_PART_SIZE = 64 << 20  # multipart part size (above S3_MAX_PUT only)
S3_UPLOAD_CONCURRENCY = 2  # parts in flight: at most 128 MiB buffered per upload
S3_MAX_PARTS = 10_000  # S3's limit on parts per upload


class S3Requests:
    """The S3 calls of a `Store` (whose `fs` is an s3fs filesystem)."""

    fs: Any

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
            backoff(attempt)
        raise TransientStoreError(f"conditional write of {bucket}/{key} kept failing")

    @staticmethod
    def _translated(exc: Exception) -> OSError:
        from s3fs.errors import translate_boto_error

        return translate_boto_error(exc)

    def _head_object(self, key: str, path: str) -> dict[str, Any]:
        """One HEAD of the object at `path` (retried); FileNotFoundError if there is none."""
        bucket, k, _ = self.fs.split_path(path)
        return retrying(lambda: self._s3_call("head_object", Bucket=bucket, Key=k), key)


class Bytes:
    """bytes as a context manager, like an open file: a body for `S3Requests._put_object`."""

    def __init__(self, data: bytes):
        self.data = data

    def __enter__(self) -> bytes:
        return self.data

    def __exit__(self, *exc: object) -> None:
        pass


def upload_options(size: int) -> dict[str, int]:
    """s3fs upload arguments that bound the memory one upload holds (see the module doc)."""
    return {"chunksize": max(S3_PART_SIZE, math.ceil(size / S3_MAX_PARTS)),
            "max_concurrency": S3_UPLOAD_CONCURRENCY}
