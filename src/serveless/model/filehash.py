"""SHA-256 of model files: hashed from the bytes read, remembered while the file is unchanged.

Stage models are content-addressed by the model's SHA-256 (stagestore.py). Hashing a
model's deterministic serialisation costs a second serialisation (AlexNet: 244 MB, about
0.5 s per job); a model read from a file is hashed from the bytes onnx parsed instead, and
the hash is remembered in the user cache folder (`hashes/`, JSON) under the file's path,
size, mtime, ctime, inode and device, so a later job with the same file does not hash it
again. Any change to the file changes that key, hence the hash is taken afresh. A file
changed within the last RACY_S seconds is not remembered (an mtime can be coarser than
two writes: git's "racily clean" rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import onnx

MEMO_VERSION = 1
RACY_S = 2.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def memo_dir() -> Path:
    from ..paths import cache_dir

    return cache_dir() / "hashes"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _memo_file(path: str) -> Path:
    return memo_dir() / (hashlib.sha256(path.encode()).hexdigest()[:40] + ".json")


def recall(path: str, key: list[int]) -> str | None:
    """The remembered SHA-256 of `path` (absolute) when its stat key is still `key`."""
    try:
        data = json.loads(_memo_file(path).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("version") != MEMO_VERSION
            or data.get("path") != path or data.get("stat") != key):
        return None
    sha = data.get("sha256")
    return sha if isinstance(sha, str) and _HEX64.match(sha) else None


def remember(path: str, key: list[int], sha: str) -> None:
    """Remember `sha` for `path` at stat `key`, unless the file is racily new; a cache
    folder that cannot be written is skipped."""
    if time.time_ns() - key[1] < RACY_S * 1e9:
        return
    memo = _memo_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=memo.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": MEMO_VERSION, "path": path, "stat": key, "sha256": sha}, f)
            os.replace(tmp, memo)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


def hash_file(path: str) -> tuple[str, list[int]]:
    """(SHA-256 of a file, streamed, and the stat key it was taken under); remembered while
    the file stays unchanged. Raises OSError when the file changed while it was read."""
    with open(path, "rb") as f:
        key = _stat_key(os.fstat(f.fileno()))
        sha = recall(path, key)
        if sha is not None:
            return sha, key
        h = hashlib.sha256()
        while chunk := f.read(1 << 22):
            h.update(chunk)
        if _stat_key(os.fstat(f.fileno())) != key:
            raise OSError(f"{path} changed while it was hashed")
    sha = h.hexdigest()
    remember(path, key, sha)
    return sha, key


class _HashingReader:
    """The file object onnx.load reads (it takes the format and the external-data folder
    from `name`), hashing the bytes it hands over unless the hash is remembered."""

    def __init__(self, f: IO[bytes], path: str):
        self.name = path
        self._f = f
        self.key = _stat_key(os.fstat(f.fileno()))
        self.sha = recall(path, self.key)
        self.recalled = self.sha is not None
        self.whole = False

    def read(self, *args: Any) -> bytes:
        data = self._f.read(*args)
        if not args:
            if self.sha is None:
                self.sha = hashlib.sha256(data).hexdigest()
            self.whole = (len(data) == self.key[0]
                          and _stat_key(os.fstat(self._f.fileno())) == self.key)
        return data


def load_hashed(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, str | None]:
    """onnx.load(path), and the SHA-256 of what it read: the file's bytes, or for a model
    with external data, of the file's hash and each data file's. None when that cannot be
    told for sure (a file changed while it was read): hash the model instead."""
    path = os.path.abspath(path)
    with open(path, "rb") as f:
        reader = _HashingReader(f, path)
        model = onnx.load_model(reader, load_external_data=False)  # type: ignore[arg-type]
    sha = reader.sha if reader.whole else None
    locations = _external_locations(model)
    if sha is not None and not reader.recalled:
        remember(path, reader.key, sha)
    if not locations:
        return model, sha
    base = os.path.dirname(path)
    files = {loc: os.path.join(base, loc) for loc in sorted(locations)}
    try:
        before = {loc: _stat_key(os.stat(p)) for loc, p in files.items()}
    except OSError:
        before = None  # missing: onnx's own error says so below
    onnx.load_external_data_for_model(model, base)  # refuses locations outside `base`
    if sha is None or before is None:
        return model, None
    try:
        hashed = {loc: hash_file(p) for loc, p in files.items()}
    except OSError:
        return model, None
    if any(key != before[loc] for loc, (_, key) in hashed.items()):
        return model, None  # a data file changed since onnx read it
    parts = {loc: h for loc, (h, _) in hashed.items()}
    key = json.dumps({"model": sha, "external_data": parts}, sort_keys=True)
    return model, hashlib.sha256(key.encode()).hexdigest()


def _external_locations(model: onnx.ModelProto) -> set[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    found = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add(entry.value)
    return found
