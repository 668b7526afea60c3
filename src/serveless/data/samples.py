"""The demo's synthetic photo set: deterministic JPEGs that compress like real photos.

No data set is downloaded (the project works offline), yet decode time, record sizes and
bytes moved should be those of real photos: these images are smooth at large scale with a
fine grain, so their JPEGs land near 100 KB at about 500×375, as ImageNet photos do.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

_GRAIN_SIZE = 1024


@functools.cache
def _grain() -> np.ndarray:
    """Fine grain, mostly in luminance as in camera noise; one tile, windows of it reused."""
    rng = np.random.default_rng(12345)
    n = _GRAIN_SIZE
    grain = rng.normal(0, 12, size=(n, n, 1)) + rng.normal(0, 4, size=(n, n, 3))
    return grain.astype(np.int16)


def synthetic_photo(seed: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A deterministic image that compresses like a photo: smooth shapes, gradients, texture.

    Noise would be incompressible and unlike real inputs; this is smooth at large scale
    with fine grain, so JPEG sizes land near those of real photos (about 100 KB).
    """
    rng = np.random.default_rng(seed)
    w, h = size
    # Low-frequency colour field: a few random values upsampled smoothly.
    coarse = rng.integers(0, 256, size=(rng.integers(3, 7), rng.integers(3, 7), 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16)
    # Mid-frequency structure: blobs and edges like objects.
    blobs = rng.integers(0, 256, size=(h // 6, w // 6, 3), dtype=np.uint8)
    mid = Image.fromarray(blobs, "RGB").resize((w, h), Image.Resampling.BILINEAR)
    mid = mid.filter(ImageFilter.GaussianBlur(0.8))
    arr = (arr * 0.6 + np.asarray(mid, dtype=np.int16) * 0.4).astype(np.int16)
    y, x = int(rng.integers(0, _GRAIN_SIZE - h)), int(rng.integers(0, _GRAIN_SIZE - w))
    arr += _grain()[y : y + h, x : x + w]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_sample_images(
    dest: str | Path, count: int, classes: int = 10, seed: int = 0, workers: int | None = None
) -> list[Path]:
    """Write `count` JPEGs of varied sizes around 500x375 into ImageFolder-style class folders.

    Deterministic for a given seed, whatever the number of worker processes.
    """
    dest = Path(dest)
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
        path = dest / f"class_{i % classes:03d}" / f"img_{i:06d}.jpg"
        jobs.append((str(path), seed * 1_000_003 + i, w, h))
    for folder in {Path(p).parent for p, *_ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    # Threads, not processes: Pillow and numpy release the GIL for the heavy parts, and a
    # process pool would re-run the caller's __main__ (broken from stdin or a notebook).
    workers = workers or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(_write_photo, jobs))
    return [Path(p) for p, *_ in jobs]


def _write_photo(job: tuple[str, int, int, int]) -> None:
    path, seed, w, h = job
    synthetic_photo(seed, (w, h)).save(path, "JPEG", quality=92)
