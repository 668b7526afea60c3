"""A function's input side: its input object fetched once, and read in micro-batches.

Stage 0 decodes a record's images into batches of the model's input, on `threads` threads;
later stages read the previous stage's tensor. Either way the blocks come from a generator,
so memory holds a micro-batch or two, never the record, whatever its size, and `prefetch`
produces the next block on a thread while the model computes on this one.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import numpy as np

from ..data.tensors import TensorFormat, TensorReader
from ..store import Store
from .counters import Counters
from .protocol import Event


class InputObject:
    """The input object of an invocation, opened so that it is fetched once, and counted.

    A record (`whole`) is read twice, once to count its images (the output's shape needs
    the count first) and once to decode them; from an object store that would fetch it
    twice, so it is downloaded to local disk (/tmp on Lambda) with one streamed GET and
    read there. A tensor is read once, front to back, through the store's ranged reader;
    on S3 its GETs are counted from the reader's cache misses, one per fetched block.
    """

    def __init__(self, store: Store, key: str, whole: bool):
        self.store, self.key, self.whole = store, key, whole
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.file: IO[bytes]

    def __enter__(self) -> InputObject:
        if self.whole and self.store.local_path(self.key) is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="serveless-input-")
            path = os.path.join(self._tmp.name, "input")
            self.store.get_file(self.key, path)  # one GET, streamed to disk
            self.file = open(path, "rb")  # noqa: SIM115 - closed in __exit__
        else:
            self.file = self.store.open_read(self.key)
        return self

    def count(self, c: Counters) -> None:
        """Add this input's bytes and requests to the counters, once it has been read."""
        f = self.file
        size = getattr(f, "size", None)
        if size is None:
            size = os.fstat(f.fileno()).st_size
        if not self.store.s3:
            c.got(int(size))
        elif self._tmp is not None:
            c.got(int(size), 1)
        else:  # s3fs: one HEAD at open for the size, then one GET per cache miss
            c.heads += 1
            c.got(int(size), int(getattr(getattr(f, "cache", None), "miss_count", 1)))

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def image_blocks(
    src: IO[bytes], key: str, ev: Event, c: Counters
) -> tuple[int, Iterator[np.ndarray], dict[str, Any]]:
    """Decode a record's images micro-batch by micro-batch; broken images become zero rows.

    The record is read through its format (data/formats.py: a TFRecord file or a WebDataset
    shard). An entry that holds no image (a shard's sample without an image member) is an
    error row as a broken image is, with its reason, and is not decoded. The meta keeps
    every image's name, label and id (the source's: a shard's key, a TFRecord's
    image/source_id, else the name), which the last stage writes into its rows.

    The images of a micro-batch are decoded on `ev.threads` threads (the function's vCPUs):
    libjpeg-turbo, Pillow's resize and numpy release the GIL, so they run in parallel.
    """
    from ..data.formats import get_format
    from ..data.images import DECODE_SHARE, preprocess

    fmt = get_format(ev.record_format)
    budget = DECODE_SHARE * ev.memory_mb * 2**20  # one image's decode, at most
    n, examples = fmt.read(src, key, {"label_key": ev.label_key})  # a local file: one fetch
    meta: dict[str, Any] = {"n": n, "filenames": [], "labels": [], "ids": [], "errors": {}}
    tf = ev.transform or {}
    mean, std = tf.get("mean"), tf.get("std")
    resize = tf.get("resize") or ev.preprocess.get("resize")  # asked, else the model's own

    def decode(batch: np.ndarray, row: int, data: bytes | str) -> dict[str, str] | None:
        if isinstance(data, str):  # no image to decode: the entry says why
            batch[row] = 0.0
            return {"type": "MissingImage", "message": data}
        try:
            preprocess(data, ev.size, resize=resize, max_pixels=ev.max_pixels, mean=mean,
                       std=std, out=batch[row], max_decode_bytes=budget)
            return None
        except ValueError as exc:
            batch[row] = 0.0
            return {"type": type(exc).__name__, "message": str(exc)}

    def fill(pool: ThreadPoolExecutor | None, first: int,
             encoded: list[bytes | str]) -> np.ndarray:
        batch = np.empty((len(encoded), 3, *ev.size), np.float32)
        rows = range(len(encoded))
        if pool is None:
            errors = [decode(batch, i, encoded[i]) for i in rows]
        else:
            errors = list(pool.map(lambda i: decode(batch, i, encoded[i]), rows))
        for i, err in enumerate(errors):
            if err is not None:
                meta["errors"][str(first + i)] = err
        return batch

    def blocks() -> Iterator[np.ndarray]:
        pool = ThreadPoolExecutor(ev.threads, "serveless-decode") if ev.threads > 1 else None
        try:
            encoded: list[bytes | str] = []
            first = 0
            t = time.perf_counter()
            for ex in examples:
                meta["filenames"].append(ex.filename)
                meta["labels"].append(ex.label)
                meta["ids"].append(ex.filename if ex.id is None else ex.id)
                encoded.append(ex.error or ex.encoded)
                if len(encoded) == ev.micro_batch:
                    batch = fill(pool, first, encoded)
                    first += len(encoded)
                    encoded = []
                    c.read_ms += (time.perf_counter() - t) * 1000
                    yield batch
                    t = time.perf_counter()
            batch = fill(pool, first, encoded) if encoded else None
            c.read_ms += (time.perf_counter() - t) * 1000
            if batch is not None:
                yield batch
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    return n, blocks(), meta


def tensor_blocks(
    src: IO[bytes], fmt: TensorFormat, micro_batch: int, c: Counters
) -> tuple[int, Iterator[np.ndarray]]:
    """A stage's input tensor, micro-batch by micro-batch: (rows, the blocks)."""
    reader = TensorReader(src, fmt.compress)

    def blocks() -> Iterator[np.ndarray]:
        t = time.perf_counter()
        for block in reader.blocks(micro_batch):
            c.read_ms += (time.perf_counter() - t) * 1000
            yield block
            t = time.perf_counter()

    return len(reader), blocks()


def prefetch(blocks: Iterator[np.ndarray], depth: int = 1) -> Iterator[np.ndarray]:
    """Produce the next block on a thread while the caller computes on this one.

    Not for stage 0 at 1 vCPU or less: its record is already on local disk, so decoding is
    CPU work alone, and a second thread under the same quota cannot overlap it with the
    model; it only switches between them. Measured at 1 vCPU, AlexNet whole, 100 images:
    16.7 ms per image with the thread, 15.9 inline; at 0.58 vCPU 30.2 and 27.9."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def hand_over(item: Any) -> bool:
        """Put unless the consumer has gone (it failed or finished): never block forever."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for block in blocks:
                if not hand_over(block):
                    return
            hand_over(done)
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(exc)

    thread = threading.Thread(target=produce, daemon=True, name="serveless-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def run_blocks(
    session: Any, input_name: str, blocks: Iterator[np.ndarray], c: Counters,
    fixed: int | None = None,
) -> Iterator[np.ndarray]:
    """Run each block; a model with a fixed batch size gets chunks of exactly that size
    (the last one zero-padded, its padding rows dropped from the output)."""
    for block in blocks:
        t = time.perf_counter()
        if fixed is None or len(block) == fixed:
            (out,) = session.run(None, {input_name: block})
        else:
            parts = []
            for start in range(0, len(block), fixed):
                chunk = block[start:start + fixed]
                rows = len(chunk)
                if rows < fixed:
                    pad = np.zeros((fixed - rows, *chunk.shape[1:]), chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                (part,) = session.run(None, {input_name: chunk})
                parts.append(part[:rows])
            out = np.concatenate(parts)
        c.compute_ms += (time.perf_counter() - t) * 1000
        yield out
