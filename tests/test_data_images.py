"""Stage 0's image decoding: the fast path (libjpeg-turbo) against the Pillow path, same
pixels and same rows; every accepted format recognised and decoded; broken images refused
with readable, exact reasons (issue 11, item 6)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from datakit import encode, picture
from PIL import Image

from serveless.data import jpeg
from serveless.data.images import ImageDecodeError, preprocess, sniff_image
from serveless.data.jpeg import FastPathRefused, dct_scale, exif_orientation, preprocess_jpeg
from serveless.data.samples import synthetic_photo

TOLERANCE = 0.05  # normalised units: about 3 grey levels of 255


def _photo(w: int, h: int, seed: int = 3) -> Image.Image:
    """A photo-like image of any size (synthetic_photo tiles are at most 1024 wide)."""
    base = synthetic_photo(seed, (min(w, 600), min(h, 450)))
    return base if base.size == (w, h) else base.resize((w, h), Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=save.pop("quality", 90), **save)
    return buf.getvalue()


def _both(data: bytes, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(fast path, Pillow path); the fast path must serve the image, not fall back."""
    size = kw.pop("size", 224)
    out_hw = (size, size) if isinstance(size, int) else size
    resize = kw.pop("resize", round(max(out_hw) * 256 / 224))
    mean, std = kw.pop("mean", jpeg_mean()), kw.pop("std", jpeg_std())
    fast = preprocess_jpeg(data, out_hw, resize, mean, std, 10**8)  # raises if it refuses
    np.testing.assert_array_equal(fast, preprocess(data, size, resize, mean=mean, std=std))
    slow = preprocess(data, size, resize, mean=mean, std=std, fast=False)
    return fast, slow


def jpeg_mean() -> tuple[float, ...]:
    return (0.485, 0.456, 0.406)


def jpeg_std() -> tuple[float, ...]:
    return (0.229, 0.224, 0.225)


@pytest.mark.parametrize("w,h,k", [
    (120, 90, 1),      # smaller than the target: upsampled
    (320, 240, 1),
    (341, 256, 1),     # already at the resize target: a plain crop, no resampling
    (500, 375, 1),     # the sample photos' size
    (375, 500, 1),     # portrait
    (1200, 900, 2),    # at least twice the target: decoded at 1/2 in the DCT domain
    (2400, 1800, 4),
    (2200, 4400, 8),
])
def test_fast_path_matches_pillow_on_sizes(w, h, k):
    assert dct_scale(w, h, 256) == k
    data = _jpeg(_photo(w, h))
    with Image.open(io.BytesIO(data)) as img:  # the same scale as Pillow's draft()
        scale = 256 / min(w, h)
        img.draft("RGB", (int(w * scale + 0.5), int(h * scale + 0.5)))
        assert img.size == (-(-w // k), -(-h // k))
    fast, slow = _both(data)
    assert fast.shape == slow.shape == (3, 224, 224) and fast.dtype == np.float32
    assert float(np.abs(fast - slow).max()) <= TOLERANCE


def test_fast_path_matches_pillow_on_grayscale_progressive_and_subsampling():
    photo = _photo(640, 480)
    for data in (_jpeg(photo.convert("L")), _jpeg(photo, progressive=True),
                 _jpeg(photo, subsampling=0), _jpeg(photo.convert("L"), progressive=True),
                 _jpeg(_photo(1300, 1000), progressive=True)):
        fast, slow = _both(data)
        assert float(np.abs(fast - slow).max()) <= TOLERANCE
    gray = _both(_jpeg(photo.convert("L")))[0]
    # grey: every channel is the same pixel under its own mean/std
    m, s = np.array(jpeg_mean()), np.array(jpeg_std())
    np.testing.assert_allclose((gray[0] * s[0] + m[0]), (gray[2] * s[2] + m[2]), atol=1e-5)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("w,h", [(520, 380), (1100, 700)])
def test_fast_path_applies_exif_orientation_like_pillow(orientation, w, h):
    img = _photo(w, h, seed=orientation)
    exif = Image.Exif()
    exif[jpeg.ORIENTATION_TAG] = orientation
    data = _jpeg(img, exif=exif.tobytes())
    assert exif_orientation(data) == orientation
    fast, slow = _both(data, size=(200, 160))  # non-square, so a wrong turn shows
    assert float(np.abs(fast - slow).max()) <= TOLERANCE
    if orientation != 1:  # the turn matters: the unturned image is far from it
        unturned = preprocess(_jpeg(img), (200, 160))
        assert float(np.abs(unturned - fast).max()) > 10 * TOLERANCE


def test_other_preprocessing_parameters_are_honoured():
    data = _jpeg(_photo(700, 500))
    fast, slow = _both(data, size=(299, 299), resize=342, mean=(0.5, 0.5, 0.5),
                       std=(0.5, 0.5, 0.5))
    assert fast.shape == (3, 299, 299)
    assert float(np.abs(fast - slow).max()) <= TOLERANCE * 0.5 / 0.229  # std 0.5: units grow
    assert -1.0 <= fast.min() and fast.max() <= 1.0
    whole, whole_slow = _both(data, size=224, resize=224)  # the crop is the whole short side
    assert float(np.abs(whole - whole_slow).max()) <= TOLERANCE
    raw, raw_slow = _both(data, size=(64, 48), resize=64, mean=(0, 0, 0), std=(1, 1, 1))
    assert raw.shape == (3, 64, 48) and 0.0 <= raw.min() and raw.max() <= 1.0
    assert float(np.abs(raw - raw_slow).max()) <= 2 / 255


def test_exif_orientation_reader():
    img = _photo(64, 48)
    assert exif_orientation(_jpeg(img)) == 1
    for order in ("big", "little"):
        exif = Image.Exif()
        exif[jpeg.ORIENTATION_TAG] = 6
        exif[0x010F] = "camera maker"  # another tag before or after it
        data = _jpeg(img, exif=exif.tobytes())
        assert exif_orientation(data) == 6, order
    assert exif_orientation(b"\xff\xd8\xff\xe1\x00\x08Exif\x00\x00") == 1  # torn segment
    assert exif_orientation(b"\xff\xd8") == 1


def _cmyk_jpeg() -> bytes:
    return _jpeg(_photo(400, 300).convert("CMYK"))


def _jpeg_with_junk() -> bytes:
    """Stray bytes before the start of scan: libjpeg warns (the fast path is strict and
    refuses), Pillow decodes it."""
    data = _jpeg(_photo(400, 300))
    sos = data.index(b"\xff\xda")
    return data[:sos] + b"\x00\x01\x02" + data[sos:]


def test_jpegs_the_fast_path_refuses_are_served_by_pillow():
    for data in (_cmyk_jpeg(), _jpeg_with_junk()):
        with pytest.raises(FastPathRefused):
            preprocess_jpeg(data, (224, 224), 256, jpeg_mean(), jpeg_std(), 10**8)
        x = preprocess(data)
        assert x.shape == (3, 224, 224) and np.isfinite(x).all() and float(x.std()) > 0.1
        np.testing.assert_array_equal(x, preprocess(data, fast=False))  # Pillow served it
    png = io.BytesIO()
    _photo(300, 200).save(png, "PNG")
    with pytest.raises(FastPathRefused):
        preprocess_jpeg(png.getvalue(), (224, 224), 256, jpeg_mean(), jpeg_std(), 10**8)


def test_preprocess_writes_into_the_given_row():
    data = _jpeg(_photo(500, 375))
    batch = np.full((2, 3, 224, 224), 7.0, np.float32)
    preprocess(data, out=batch[1])
    np.testing.assert_array_equal(batch[1], preprocess(data))
    assert (batch[0] == 7.0).all()


# -- every accepted format decodes; broken images get readable, exact reasons ---------------


LOSSLESS = {"PNG": {}, "BMP": {}, "TIFF": {}, "WebP": {"lossless": True}}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WebP", "BMP", "TIFF", "GIF"])
def test_each_accepted_format_is_recognised_and_decodes(fmt):
    img = picture(1, (64, 48))
    data = encode(img, fmt.upper(), **LOSSLESS.get(fmt, {}))
    assert sniff_image(data[:16]) == fmt
    x = preprocess(data, 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    reference = preprocess(encode(img, "PNG"), 32)
    if fmt in LOSSLESS:  # the same pixels, so the same tensor
        np.testing.assert_array_equal(x, reference)
    else:  # lossy JPEG, 256-colour GIF: close to the original
        assert np.abs(x - reference).mean() < 0.1


def test_gif_uses_its_first_frame():
    first, second = picture(1, (40, 30)), picture(2, (40, 30))
    data = encode(first, "GIF", save_all=True, append_images=[second])
    np.testing.assert_array_equal(preprocess(data, 16), preprocess(encode(first, "GIF"), 16))


@pytest.mark.parametrize("data, message", [
    (b"", "empty file (0 bytes)"),
    (b"hello, this is text, not a picture", "not an image (unrecognised format)"),
    (encode(picture(3), "JPEG")[:300], "truncated JPEG file (the image data ends early)"),
    (encode(picture(3), "PNG")[:200], "truncated PNG file (the image data ends early)"),
    (b"\xff\xd8\xff" + b"junk" * 5, "corrupt JPEG file (its header cannot be read)"),
])
def test_broken_images_say_why_exactly(data, message):
    with pytest.raises(ImageDecodeError) as exc:
        preprocess(data, 16)
    assert str(exc.value) == message
    assert "BytesIO" not in str(exc.value)


# -- in a job: stage 0 decodes on the function's vCPUs, and refused JPEGs still get rows ------


@pytest.mark.e2e
def test_refused_jpegs_get_prediction_rows_and_decode_threads_agree(tmp_path):
    import onnx
    import onnxruntime as ort
    from helpers import rows_of, tiny_conv_classifier

    from serveless.backends.local import LocalBackend
    from serveless.data.records import Example, write_record
    from serveless.driver.prepare import prepare_job
    from serveless.driver.scheduler import run_job
    from serveless.store import Store

    png = io.BytesIO()
    _photo(300, 200).save(png, "PNG")
    examples = [Example(_jpeg(_photo(300 + 20 * i, 240, seed=i)), f"ok{i}.jpg", 0)
                for i in range(9)]
    examples.insert(2, Example(_cmyk_jpeg(), "cmyk.jpg", 1))
    examples.insert(5, Example(_jpeg_with_junk(), "junk.jpg", 1))
    examples.insert(7, Example(png.getvalue(), "photo.png", 1))
    examples.insert(8, Example(examples[0].encoded[:2000], "truncated.jpg", 1))
    (tmp_path / "recs").mkdir()
    with open(tmp_path / "recs" / "mixed.tfrecord", "wb") as f:
        write_record(f, examples)
    model = tiny_conv_classifier()
    onnx.save(model, tmp_path / "tiny.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probs = {}
    for memory in ("1769", "3538"):  # 1 and 2 vCPUs: one decode thread, then two
        store = Store(str(tmp_path / f"store-{memory}"))
        spec = prepare_job(store, "mixed", str(tmp_path / "tiny.onnx"), cuts="r1",
                           memory=memory, micro_batch=4, records=str(tmp_path / "recs"))
        with LocalBackend() as backend:
            result = run_job(store, spec, backend, concurrency=1, progress=False)
        rows = {r["filename"]: r for r in rows_of(store, "mixed")}
        assert len(rows) == len(examples) and result.image_errors == 1
        assert rows["truncated.jpg"]["error"] and rows["truncated.jpg"]["top5"] is None
        for ex in examples:
            row = rows[ex.filename]
            if ex.filename == "truncated.jpg":
                continue
            assert row["error"] is None and len(row["top5"]) == 5, ex.filename
            (p,) = sess.run(None, {"img": preprocess(ex.encoded, (32, 32))[None]})
            np.testing.assert_allclose(p[0][row["top5"]], row["probs"], atol=1e-5)
        probs[memory] = {k: r["probs"] for k, r in rows.items()}
    assert probs["1769"] == probs["3538"]


def test_function_max_pixels_is_the_images_limit():
    """The protocol keeps its own copy so that stages past 0 do not import Pillow."""
    from serveless.data import images
    from serveless.runtime import protocol

    assert protocol.MAX_PIXELS == images.MAX_PIXELS
