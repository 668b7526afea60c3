"""Intermediate tensors as `.npy` objects, streamed in row blocks; never pickle.

A stage writes its output row block by row block and the next stage reads it the same
way, so neither holds more than one micro-batch of activations. Options: float16 storage
(half the bytes, activations are cast back to float32 on read) and zstd compression
(`.npy.zst`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import zstandard
from numpy.lib import format as npy_format

from ..errors import TensorFormatError

_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


@dataclass(frozen=True)
class TensorFormat:
    dtype: str = "float32"
    compress: bool = False
    level: int = 3

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"tensor dtype must be one of {', '.join(sorted(_DTYPES))}, "
                             f"got {self.dtype!r}")

    @property
    def suffix(self) -> str:
        return ".npy.zst" if self.compress else ".npy"

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "compress": self.compress, "level": self.level}

    def describe(self) -> str:
        """In words, for a person: 'float32, uncompressed' or 'float16, zstd level 3'."""
        return f"{self.dtype}, " + (f"zstd level {self.level}" if self.compress
                                    else "uncompressed")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TensorFormat:
        return cls(**(d or {}))


class TensorWriter:
    """Writes an (n, *row_shape) array to a binary file, one block of rows at a time."""

    def __init__(self, f: IO[bytes], n: int, row_shape: tuple[int, ...], fmt: TensorFormat):
        self.fmt = fmt
        self.dtype = _DTYPES[fmt.dtype]
        self._zstd = None
        if fmt.compress:
            self._zstd = zstandard.ZstdCompressor(level=fmt.level).stream_writer(f, closefd=False)
            out: IO[bytes] = self._zstd  # type: ignore[assignment]
        else:
            out = f
        self._out = out
        self.shape = (n, *row_shape)
        self.rows = 0
        header = {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}
        npy_format.write_array_header_1_0(out, header)

    def write(self, block: np.ndarray) -> None:
        if block.shape[1:] != self.shape[1:]:
            raise TensorFormatError(f"row shape {block.shape[1:]} != {self.shape[1:]}")
        if self.rows + len(block) > self.shape[0]:
            raise TensorFormatError(f"more than the declared {self.shape[0]} rows")
        self._out.write(np.ascontiguousarray(block, dtype=self.dtype).data)
        self.rows += len(block)

    def close(self) -> None:
        if self.rows != self.shape[0]:
            raise TensorFormatError(f"wrote {self.rows} rows, declared {self.shape[0]}")
        if self._zstd is not None:
            self._zstd.flush(zstandard.FLUSH_FRAME)
            self._zstd.close()


class TensorReader:
    """Reads an .npy (or .npy.zst) stream block by block as float32."""

    def __init__(self, f: IO[bytes], compressed: bool = False):
        src = zstandard.ZstdDecompressor().stream_reader(f, closefd=False) if compressed else f
        self._src = src
        try:
            version = npy_format.read_magic(src)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(src)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(src)
            else:
                raise TensorFormatError(f"unsupported .npy version {version}")
        except (ValueError, zstandard.ZstdError) as exc:
            raise TensorFormatError(f"not a .npy stream: {exc}") from exc
        if fortran or dtype.hasobject or dtype not in _DTYPES.values() or len(shape) < 1:
            raise TensorFormatError(f"expected a C-order float16/32 array, got {dtype} {shape}")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.rows_read = 0

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: int) -> np.ndarray:
        rows = min(rows, self.shape[0] - self.rows_read)
        want = rows * self._row_bytes
        buf = bytearray(want)
        view = memoryview(buf)
        got = 0
        while got < want:
            n = self._src.readinto(view[got:])
            if not n:
                raise TensorFormatError(
                    f"truncated tensor: row {self.rows_read}, expected {want} bytes, got {got}"
                )
            got += n
        self.rows_read += rows
        block = np.frombuffer(buf, dtype=self.dtype).reshape((rows, *self.shape[1:]))
        return block if self.dtype == np.float32 else block.astype(np.float32)

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        while self.rows_read < self.shape[0]:
            yield self.read(rows)


def encode(array: np.ndarray, fmt: TensorFormat = TensorFormat()) -> bytes:
    """A whole array as one object (tests and small tensors)."""
    buf = io.BytesIO()
    w = TensorWriter(buf, len(array), tuple(array.shape[1:]), fmt)
    w.write(array)
    w.close()
    return buf.getvalue()


def decode(data: bytes, compressed: bool = False) -> np.ndarray:
    r = TensorReader(io.BytesIO(data), compressed)
    return r.read(len(r)) if len(r) else np.zeros(r.shape, np.float32)
