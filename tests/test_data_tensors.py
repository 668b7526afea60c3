"""The intermediate tensors between stages (data/tensors.py): written and read in blocks,
float16 and compressed too; plain .npy readable by numpy; truncated, foreign, pickled or
integer data refused; a writer holds its declared number of rows."""

from __future__ import annotations

import io

import numpy as np
import pytest

from serveless.data.tensors import TensorFormat, TensorReader, TensorWriter, decode, encode
from serveless.errors import TensorFormatError


@pytest.mark.parametrize("fmt", [TensorFormat(), TensorFormat("float16"),
                                 TensorFormat(compress=True), TensorFormat("float16", True)])
def test_round_trip_in_blocks(fmt):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 4, 5, 5)).astype(np.float32)
    buf = io.BytesIO()
    w = TensorWriter(buf, 37, (4, 5, 5), fmt)
    for i in range(0, 37, 8):
        w.write(a[i:i + 8])
    w.close()
    r = TensorReader(io.BytesIO(buf.getvalue()), fmt.compress)
    blocks = list(r.blocks(10))
    assert [len(b) for b in blocks] == [10, 10, 10, 7]
    back = np.concatenate(blocks)
    assert back.dtype == np.float32
    tol = 2e-3 if fmt.dtype == "float16" else 0
    np.testing.assert_allclose(back, a, rtol=tol, atol=tol)


def test_plain_npy_is_numpy_compatible():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(np.load(io.BytesIO(encode(a)), allow_pickle=False), a)


def test_float16_halves_the_bytes():
    a = np.ones((64, 256), np.float32)
    assert len(encode(a, TensorFormat("float16"))) < 0.55 * len(encode(a))


def test_truncated_and_foreign_data_are_refused():
    data = encode(np.ones((4, 10), np.float32))
    with pytest.raises(TensorFormatError, match="truncated"):
        decode(data[:-5])
    with pytest.raises(TensorFormatError):
        decode(b"not a tensor at all")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TensorFormatError):
        decode(obj.getvalue())  # object arrays (pickle) are never read
    ints = io.BytesIO()
    np.save(ints, np.ones(3, np.int64))
    with pytest.raises(TensorFormatError):
        decode(ints.getvalue())


def test_writer_checks_declared_rows():
    w = TensorWriter(io.BytesIO(), 3, (2,), TensorFormat())
    w.write(np.zeros((2, 2), np.float32))
    with pytest.raises(TensorFormatError):
        w.close()
    with pytest.raises(TensorFormatError):
        w.write(np.zeros((2, 2), np.float32))
