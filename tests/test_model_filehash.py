"""The model's hash is taken from the file's bytes (with its external data), remembered while
the file is unchanged, and any change to the file gives a new hash."""

from __future__ import annotations

import hashlib
import json
import os

import onnx
import pytest
from helpers import tiny_conv_classifier

from serveless.model import filehash
from serveless.model.loading import load_model_hashed
from serveless.model.stagestore import model_sha256


@pytest.fixture
def memo(tmp_path, monkeypatch):
    from serveless.paths import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "hashes"


def _age(path, seconds=60):
    """Date the file back, past the racy window (an old file, as a user's model is)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_hash_is_the_file_bytes_and_follows_every_change(tmp_path, memo):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_conv_classifier(), path)
    model, sha = load_model_hashed(str(path))
    assert sha == _sha(path)
    assert model.SerializeToString() == onnx.load(path).SerializeToString()
    assert not memo.exists()  # written just now: racily new, not remembered

    _age(path)
    assert load_model_hashed(str(path))[1] == sha
    [entry] = list(memo.iterdir())
    record = json.loads(entry.read_text())
    assert record["sha256"] == sha and record["path"] == str(path)
    record["sha256"] = "0" * 64  # what a later load trusts, while the file is unchanged
    entry.write_text(json.dumps(record))
    assert load_model_hashed(str(path))[1] == "0" * 64

    onnx.save(tiny_conv_classifier(channels=8), path)  # other weights, other size
    _age(path)
    assert load_model_hashed(str(path))[1] == _sha(path) != sha
    raw = bytearray(path.read_bytes())  # same size, same mtime, other bytes (a weight)
    st = os.stat(path)
    weights = max(onnx.load(path).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    raw[raw.find(weights) + 8] ^= 0x01
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_model_hashed(str(path))[1] == _sha(path)


def test_external_data_is_part_of_the_hash(tmp_path, memo):
    path = tmp_path / "ext.onnx"
    onnx.save_model(tiny_conv_classifier(), path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    model, sha = load_model_hashed(str(path))
    assert sha is not None and sha != _sha(path)
    assert model.SerializeToString() == onnx.load(path).SerializeToString()  # weights loaded
    raw = bytearray(data.read_bytes())
    raw[3] ^= 0xFF  # the graph file untouched, a weight changed
    data.write_bytes(bytes(raw))
    again, changed = load_model_hashed(str(path))
    assert changed not in (None, sha)
    assert again.SerializeToString() != model.SerializeToString()


def test_builtin_alexnet_keeps_its_address(alexnet):
    """The cached AlexNet is hashed from its file, which is the model's deterministic
    serialisation: the same digest as before file hashing (stores keep their stages)."""
    model, sha = load_model_hashed("alexnet")
    assert sha == model_sha256(alexnet) == model_sha256(model)


def test_file_sha256_refuses_a_file_that_changes(tmp_path, memo, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    assert filehash.hash_file(str(path))[0] == _sha(path)
    stats = iter([[100, 1, 1, 1, 1], [101, 2, 2, 1, 1]])
    monkeypatch.setattr(filehash, "_stat_key", lambda st: next(stats))
    with pytest.raises(OSError, match="changed"):
        filehash.hash_file(str(path))[0]
