"""Image decoding and preprocessing for stage 0.

Preprocessing is the standard ImageNet evaluation transform: EXIF orientation, RGB,
shorter side to 256, center crop 224, scale to [0, 1], normalize with ImageNet mean/std.
JPEGs go through the libjpeg-turbo fast path of `jpeg.py`; Pillow serves everything else.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from .jpeg import FastPathRefused, dct_scale, jpeg_frame, normalize_into, preprocess_jpeg

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_PIXELS = 100_000_000


class ImageDecodeError(ValueError):
    """One image could not be served; its prediction row carries this error."""


# -- what an image is, and why it could not be read (messages users see in their rows) ------

EMPTY_FILE = "empty file (0 bytes)"
NOT_AN_IMAGE = "not an image (unrecognised format)"
#: Formats stage 0 decodes (GIF and multi-page TIFF: the first frame), by leading bytes.
IMAGE_SIGNATURES: tuple[tuple[str, bytes, int], ...] = (
    ("JPEG", b"\xff\xd8\xff", 0), ("PNG", b"\x89PNG\r\n\x1a\n", 0), ("GIF", b"GIF87a", 0),
    ("GIF", b"GIF89a", 0), ("WebP", b"WEBP", 8), ("BMP", b"BM", 0), ("TIFF", b"II*\x00", 0),
    ("TIFF", b"MM\x00*", 0),
)
IMAGE_FORMATS = ("JPEG", "PNG", "WebP", "BMP", "TIFF", "GIF")


def sniff_image(head: bytes) -> str | None:
    """The image format of a file from its first 16 bytes, or None: content, not the name."""
    for name, magic, at in IMAGE_SIGNATURES:
        if head[at : at + len(magic)] == magic and (name != "WebP" or head[:4] == b"RIFF"):
            return name
    return None


def describe_decode_error(data: bytes, exc: BaseException) -> str:
    """One readable line for a failed decode; never Pillow's `<_io.BytesIO object at 0x…>`."""
    if not data:
        return EMPTY_FILE
    fmt = sniff_image(bytes(data[:16]))
    if fmt is None:
        return NOT_AN_IMAGE
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError) or (
            fmt == "WebP" and "decoder" in text):
        return f"truncated {fmt} file (the image data ends early)"
    if "cannot identify image file" in text:
        return f"corrupt {fmt} file (its header cannot be read)"
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image", text)
    return f"cannot decode {fmt}: {text or type(exc).__name__}"


# -- the transform a job applies (--preprocess), recorded in job.json -------------------------

#: name -> (mean, std) on [0, 1] pixels: ImageNet's statistics, Inception's [-1, 1], raw [0, 1].
TRANSFORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (tuple(float(v) for v in MEAN), tuple(float(v) for v in STD)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "raw": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def make_transform(
    name: str = "imagenet",
    resize: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> dict[str, object]:
    """The preprocessing of a job as JSON (job.json, events): a named preset, or explicit.

    `resize` is the shorter side before the center crop (None: crop x 256/224, as all three
    presets do); explicit mean/std replace the preset's and make the name "custom".
    """
    if name not in TRANSFORMS:
        raise ValueError(f"--preprocess must be one of {', '.join(TRANSFORMS)}, got {name!r}")
    p_mean, p_std = TRANSFORMS[name]
    out_mean = [float(v) for v in (mean if mean is not None else p_mean)]
    out_std = [float(v) for v in (std if std is not None else p_std)]
    for what, values in (("--mean", out_mean), ("--std", out_std)):
        if len(values) != 3:
            raise ValueError(f"{what} needs 3 values (R,G,B), got {len(values)}")
    if any(v <= 0 for v in out_std):
        raise ValueError(f"--std values must be > 0, got {out_std}")
    if resize is not None and resize < 1:
        raise ValueError(f"--resize must be >= 1, got {resize}")
    custom = mean is not None or std is not None
    return {"name": "custom" if custom else name, "resize": resize, "mean": out_mean,
            "std": out_std}


def describe_transform(transform: dict[str, object], size: list[int] | tuple[int, int]) -> str:
    """One line for the summary: what was done to every image before the model saw it."""
    h, w = int(size[0]), int(size[1])
    resize = transform.get("resize") or round(max(h, w) * 256 / 224)
    fmt = ", ".join

    def nums(key: str) -> str:
        return fmt(f"{float(v):g}" for v in transform[key])  # type: ignore[attr-defined]

    return (f"preprocess: {transform['name']} (shorter side {resize}, center crop {h}x{w}, "
            f"[0, 1] pixels, mean [{nums('mean')}], std [{nums('std')}])")


def preprocess(
    data: bytes,
    size: int | tuple[int, int] | list[int] = 224,
    resize: int | None = None,
    max_pixels: int = MAX_PIXELS,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out: np.ndarray | None = None,
    fast: bool = True,
    max_decode_bytes: float | None = None,
) -> np.ndarray:
    """Encoded image bytes -> normalized float32 array of shape (3, H, W).

    `size` is the model's input (H, W) (an int for square); the shorter side is first
    resized to `resize`, by default in the ImageNet ratio 256/224 of the larger of H, W;
    pixels in [0, 1] are then normalised by `mean`/`std` (ImageNet's by default).
    JPEGs take the libjpeg-turbo fast path (`jpeg.py`); PNG, CMYK and whatever it refuses
    take the Pillow path, which gives the same pixels to within rounding. The result is
    written into `out` (a (3, H, W) float32 array, e.g. a row of a batch) when given.
    An image whose decode would need more than `max_decode_bytes` is refused before it is
    decoded (`check_decode_budget`).
    """
    mean = MEAN if mean is None else mean
    std = STD if std is None else std
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not data:
        raise ImageDecodeError(EMPTY_FILE)
    if resize is None:
        resize = round(max(out_h, out_w) * 256 / 224)
    if max_decode_bytes is not None:
        check_decode_budget(data, resize, max_decode_bytes)
    if fast:
        try:
            return preprocess_jpeg(data, (out_h, out_w), resize, mean, std, max_pixels, out)
        except FastPathRefused:
            pass
    arr = preprocess_pillow(data, out_h, out_w, resize, max_pixels)
    if out is None:
        out = np.empty((3, out_h, out_w), np.float32)
    normalize_into(arr, mean, std, out)
    return out


DECODE_SHARE = 0.25
"""The share of a function's memory one image's decode may take. A 524-byte progressive
JPEG that claims 10000×9999 pixels makes libjpeg hold every DCT coefficient of the full
image (2 bytes per pixel and component: 600 MB) whatever the scale it decodes at; at the
memory `profile` recommends for stage 0 it had the whole record OOM-killed. Refused as that
image's error instead, the other images of the record are served."""


def decode_bytes(data: bytes, resize: int) -> tuple[int, str]:
    """(bytes a decode of this image holds at its peak, estimated from its header alone,
    and how the image reads in a message). A baseline JPEG decodes at 1/2, 1/4 or 1/8 scale
    when it is large, a progressive one buffers its whole coefficient array first, and the
    Pillow path decodes any other format at full size (4 bytes a pixel at most)."""
    frame = jpeg_frame(data) if data[:2] == b"\xff\xd8" else None
    if frame is not None:
        w, h, comps, progressive = frame
        k = dct_scale(w, h, resize) if w and h else 1
        scaled = -(-w // k) * -(-h // k) * 3
        kind = "progressive JPEG" if progressive else "JPEG"
        return (w * h * comps * 2 + scaled if progressive else scaled), f"{w}×{h} {kind}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            return w * h * 4, f"{w}×{h} {img.format or 'image'}"
    except Exception:  # not readable: the decode itself says why
        return 0, "image"


def check_decode_budget(data: bytes, resize: int, max_bytes: float) -> None:
    """Refuse, as this image's error, an image whose decode would take more than max_bytes."""
    need, what = decode_bytes(data, resize)
    if need > max_bytes:
        raise ImageDecodeError(
            f"decoding this {what} needs about {need / 2**20:,.0f} MB, over the "
            f"{max_bytes / 2**20:,.0f} MB one image may take ({DECODE_SHARE:.0%} of the "
            "function's memory)")


def preprocess_pillow(
    data: bytes, out_h: int, out_w: int, resize: int, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """The Pillow path: any format Pillow reads -> uint8 (out_h, out_w, 3), not normalised."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    f"image of {w}x{h} = {w * h / 1e6:.1f} MP exceeds the "
                    f"{max_pixels / 1e6:.0f} MP limit"
                )
            # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale when the target is smaller,
            # which is most of the decode time for photos.
            if img.format == "JPEG":
                scale = resize / min(w, h)
                img.draft("RGB", (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))))
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img = _resize_shorter(img, resize)
            img = _center_crop(img, out_h, out_w)
            return np.asarray(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb refused: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for broken files
        raise ImageDecodeError(describe_decode_error(data, exc)) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _resize_shorter(img: Image.Image, target: int) -> Image.Image:
    w, h = img.size
    if w <= h:
        new = (target, max(1, round(h * target / w)))
    else:
        new = (max(1, round(w * target / h)), target)
    return img.resize(new, Image.Resampling.BILINEAR) if new != (w, h) else img


def _center_crop(img: Image.Image, out_h: int, out_w: int) -> Image.Image:
    w, h = img.size
    left = int(round((w - out_w) / 2.0))
    top = int(round((h - out_h) / 2.0))
    return img.crop((left, top, left + out_w, top + out_h))
