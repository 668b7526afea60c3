"""Whether a store can be used, said before anything is invoked, in words a user can act on.

A missing bucket or wrong credentials would otherwise surface as every function failing
(and retrying) one by one, minutes into a job. `StoreCheck` is a part of `Store`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .layout import probe_key
from .retry import TransientStoreError, retrying


class StoreCheck:
    """`Store.check` and the explanation of a store's errors."""

    url: str
    root: str
    local: bool
    s3: bool
    fs: Any
    requests: Any

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
            if retrying(lambda: self.fs.cat_file(probe), probe) != b"ok":
                raise StoreError(f"store {self.url!r} did not return what was written to it")
            retrying(lambda: self.fs.rm(probe), probe)
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
