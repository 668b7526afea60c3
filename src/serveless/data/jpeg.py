"""The fast path of stage 0: JPEG decoding with libjpeg-turbo, sized to what the model needs.

Same transform as the Pillow path in `images.py` (EXIF orientation, RGB, shorter side to
`resize`, centre crop, scale to [0, 1], normalise with mean/std), done with less work:

- libjpeg-turbo through simplejpeg (its wheels bundle the library), about 1.5× faster than
  Pillow's decoder on photos;
- DCT-domain downscaling by 1/2, 1/4 or 1/8 when the image is at least twice the target
  (the rule of Pillow's `draft()`, so both paths start from the same pixels);
- one resize, straight from the crop box of the source to the output size, instead of
  resizing the whole image and then cropping (Pillow's `resize(box=...)`, same filter);
- EXIF orientation applied to the small result, not the decoded image;
- normalisation fused into one multiply-add per channel, written into the caller's batch.

`preprocess_jpeg` raises `FastPathRefused` for anything it does not handle (not a JPEG, CMYK
or YCCK, a decoder error, a crop outside the image); the caller falls back to Pillow.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image

try:  # optional at import so that a missing wheel means "Pillow only", not a broken package
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency; this is a safety net
    simplejpeg = None

# Colour spaces of the JPEG header that the fast path decodes; CMYK/YCCK go to Pillow, which
# handles Adobe's inverted CMYK.
_FAST_COLORSPACES = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "GRAY"}
ORIENTATION_TAG = 0x0112


class FastPathRefused(Exception):
    """This image is not for the fast path; the Pillow path serves it (or reports why not)."""


def preprocess_jpeg(
    data: bytes,
    out_hw: tuple[int, int],
    resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """JPEG bytes -> normalised float32 (3, H, W), written into `out` when given.

    Raises FastPathRefused, and nothing else, when the Pillow path must serve the image
    (including images over `max_pixels`: the Pillow path words that error).
    """
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        raise FastPathRefused("not a JPEG")
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception as exc:  # simplejpeg raises ValueError; refuse whatever it raises
        raise FastPathRefused(f"header: {exc}") from exc
    if colorspace not in _FAST_COLORSPACES:
        raise FastPathRefused(f"colour space {colorspace}")
    if w * h > max_pixels or w < 1 or h < 1:
        raise FastPathRefused("too large or empty: the Pillow path reports it")
    out_h, out_w = out_hw
    k = dct_scale(w, h, resize)
    mode = _FAST_COLORSPACES[colorspace]
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace=mode, min_height=-(-h // k), min_width=-(-w // k)
        )
    except Exception as exc:  # corrupt or truncated: Pillow decides (and words the error)
        raise FastPathRefused(f"decode: {exc}") from exc
    orientation = exif_orientation(data)
    src_h, src_w = pixels.shape[:2]
    swap = orientation >= 5  # the oriented image is the source transposed
    ow, oh = (src_h, src_w) if swap else (src_w, src_h)
    box = crop_box(ow, oh, resize, out_h, out_w)
    slack = 1e-6  # (left + out_w) * w / rw can land a hair past w when the crop is whole
    if box[0] < -slack or box[1] < -slack or box[2] > ow + slack or box[3] > oh + slack:
        raise FastPathRefused("crop larger than the resized image")  # Pillow pads it
    box = (max(0.0, box[0]), max(0.0, box[1]), min(float(ow), box[2]), min(float(oh), box[3]))
    src_box = _unorient_box(box, src_w, src_h, orientation)
    size = (out_h, out_w) if swap else (out_w, out_h)
    small = _resize_box(pixels, mode, src_box, size)
    small = orient(small, orientation)
    if out is None:
        out = np.empty((3, out_h, out_w), np.float32)
    normalize_into(small, mean, std, out)
    return out


def dct_scale(w: int, h: int, resize: int) -> int:
    """1, 2, 4 or 8: decode at 1/k scale, keeping the shorter side >= `resize`.

    The rule of Pillow's JPEG draft(), so the fast path and the Pillow path resample the
    same decoded pixels: k is the largest power of two <= 8 that leaves the image at least
    as large as its resized size.
    """
    scale = resize / min(w, h)
    req_w, req_h = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
    fits = min(w // req_w, h // req_h)
    for k in (8, 4, 2):
        if fits >= k:
            return k
    return 1


def resized_size(w: int, h: int, resize: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `resize`, rounded as the Pillow path does."""
    if w <= h:
        return resize, max(1, round(h * resize / w))
    return max(1, round(w * resize / h)), resize


def crop_box(w: int, h: int, resize: int, out_h: int, out_w: int) -> tuple[float, ...]:
    """The centre crop of the image resized to `resize`, in the image's own coordinates.

    Resizing this box straight to (out_w, out_h) gives the pixels of "resize, then crop"
    with the same filter, without resampling what the crop throws away.
    """
    rw, rh = resized_size(w, h, resize)
    left = int(round((rw - out_w) / 2.0))
    top = int(round((rh - out_h) / 2.0))
    sx, sy = w / rw, h / rh
    return (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)


def _unorient_box(box: tuple[float, ...], w: int, h: int, orientation: int) -> tuple[float, ...]:
    """A box in the EXIF-oriented image -> the same box in the stored (w x h) image."""
    if orientation == 1:
        return box
    x0, y0, x1, y1 = box
    # Each maps an oriented point (X, Y) to the stored image's (x, y); see exif_transpose.
    inverse = {
        1: lambda X, Y: (X, Y),
        2: lambda X, Y: (w - X, Y),
        3: lambda X, Y: (w - X, h - Y),
        4: lambda X, Y: (X, h - Y),
        5: lambda X, Y: (Y, X),
        6: lambda X, Y: (Y, h - X),
        7: lambda X, Y: (w - Y, h - X),
        8: lambda X, Y: (w - Y, X),
    }[orientation]
    (ax, ay), (bx, by) = inverse(x0, y0), inverse(x1, y1)
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The view of an (H, W, C) array as EXIF `orientation` says to show it (no copy)."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return pixels.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return pixels.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return pixels.transpose(1, 0, 2)[::-1]
    return pixels


def _resize_box(
    pixels: np.ndarray, mode: str, box: tuple[float, ...], size: tuple[int, int]
) -> np.ndarray:
    """Bilinear resize of `box` to `size` (w, h) with Pillow's filter; (h, w, C) uint8."""
    if size == (box[2] - box[0], box[3] - box[1]) and all(float(v).is_integer() for v in box):
        x0, y0, x1, y1 = (int(v) for v in box)  # no scaling: a crop is exact and free
        return pixels[y0:y1, x0:x1]
    # RGB is copied into Pillow's 4-byte pixels (measured faster to resize than a mapped
    # RGBX buffer); grey is mapped without a copy.
    img = Image.fromarray(pixels if mode == "RGB" else pixels[:, :, 0])
    small = np.asarray(img.resize(size, Image.Resampling.BILINEAR, box=box))
    return small if small.ndim == 3 else small[:, :, None]


@functools.lru_cache(maxsize=16)
def _scale_bias(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    return (np.float32(1 / 255) / s).astype(np.float32), (-m / s).astype(np.float32)


def normalize_into(
    pixels: np.ndarray, mean: Sequence[float], std: Sequence[float], out: np.ndarray
) -> None:
    """uint8 (H, W, C) -> out[c] = (pixels / 255 - mean[c]) / std[c], one pass per channel.

    C may be 1 (gray: every channel reads it), 3 or 4 (RGBX: the 4th is ignored).
    """
    scale, bias = _scale_bias(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    gray = pixels.shape[2] == 1
    for c in range(3):
        np.multiply(pixels[:, :, 0 if gray else c], scale[c], out=out[c])
        out[c] += bias[c]


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG, read from its APP1 segment; 1 when absent.

    A small marker walk instead of opening the image with Pillow: the header is all we need.
    """
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return 1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no more headers
            return 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            return 1
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            value = _tiff_orientation(data[pos + 10:pos + 2 + length])
            if value is not None:
                return value
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int | None:
    """Tag 0x0112 of IFD0 of a TIFF block (the body of an Exif segment), if valid."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        tag, kind, n = struct.unpack(order + "HHI", tiff[entry:entry + 8])
        if tag == ORIENTATION_TAG:
            code = _TIFF_INTEGERS.get(kind)
            if code is None or n < 1:  # not an integer: Pillow ignores it too
                return None
            field = tiff[entry + 8:entry + 8 + struct.calcsize(code)]
            (value,) = struct.unpack(order + code, field)
            return value if 1 <= value <= 8 else None
    return None


_TIFF_INTEGERS = {3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}
"""TIFF's integer types by code (SHORT, LONG, SBYTE, SSHORT, SLONG) and their struct
formats: the orientation is a SHORT by the standard, yet writers store it as any of these,
and Pillow applies it whichever it is, so the fast path must too. An unsigned BYTE (1)
Pillow reads as bytes and does not apply: neither path applies it."""

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}


def jpeg_frame(data: bytes) -> tuple[int, int, int, bool] | None:
    """(width, height, components, progressive) from a JPEG's frame header; None when it
    has none before its first scan. A header walk: nothing is decoded."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD9, 0xDA):
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            return None
        if marker in _SOF and pos + 10 <= end:
            h, w, comps = struct.unpack(">HHB", data[pos + 5:pos + 10])
            return w, h, comps, marker in _PROGRESSIVE
        pos += 2 + length
    return None

