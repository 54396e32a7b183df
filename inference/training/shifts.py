"""Simulated acquisition shifts: an 8-bit training image -> the DICOM data set a different site,
machine or workflow would have sent.

Why these: they are what differs between hospitals and between the Kermany images and a PACS's
images — exposure and processing (brightness, contrast, gamma), detector resolution and
sharpness, noise, collimation and framing (crop, borders), burned-in annotations, and lossy
compression done by the PACS (JPEG baseline, JPEG 2000 — decoded by the gateway's real decoders),
and a full-size 12-bit image without a VOI window (the gateway's percentile window then decides
the contrast). Each shift is deterministic for an image index, so a run is reproducible.
Every function returns a data set that :func:`inference.preprocess.preprocess` decodes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, JPEGBaseline8Bit

from inference.example_dicom import wrap_radiograph

U8 = npt.NDArray[np.uint8]
SEED = 20261130


@dataclass(frozen=True)
class Shift:
    """One condition: a name for tables, what it does, and the image -> data set function."""

    name: str
    description: str
    make: Callable[[U8, int], Dataset]


def _rng(index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, index])


def _to_u8(values: npt.NDArray[np.floating]) -> U8:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _wrap(pixels: U8) -> Dataset:
    return wrap_radiograph(pixels)


def _photometric(fn: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]) -> Callable[[U8, int], Dataset]:
    def make(pixels: U8, _index: int) -> Dataset:
        return _wrap(_to_u8(255.0 * np.clip(fn(pixels.astype(np.float64) / 255.0), 0.0, 1.0)))

    return make


def _contrast(factor: float) -> Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]:
    return lambda x: (x - x.mean()) * factor + x.mean()


def _resample(pixels: U8, size: int) -> U8:
    """Down to *size* (area filter), back up to the original (bilinear): a coarser detector."""
    image = Image.fromarray(pixels)
    small = image.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small.resize(image.size, Image.Resampling.BILINEAR), dtype=np.uint8)


def _blur(sigma: float) -> Callable[[U8, int], Dataset]:
    def make(pixels: U8, _index: int) -> Dataset:
        return _wrap(np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.uint8))

    return make


def _noise(sigma: float) -> Callable[[U8, int], Dataset]:
    def make(pixels: U8, index: int) -> Dataset:
        return _wrap(_to_u8(pixels.astype(np.float64) + _rng(index).normal(0.0, sigma * 255.0, pixels.shape)))

    return make


def _crop(fraction: float) -> Callable[[U8, int], Dataset]:
    """Keep the central *fraction* of each side (tighter collimation), resized back."""

    def make(pixels: U8, _index: int) -> Dataset:
        h, w = pixels.shape
        dy, dx = int(round(h * (1 - fraction) / 2)), int(round(w * (1 - fraction) / 2))
        inner = Image.fromarray(pixels[dy : h - dy, dx : w - dx])
        return _wrap(np.asarray(inner.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8))

    return make


def _border(fraction: float) -> Callable[[U8, int], Dataset]:
    """A black frame of *fraction* of each side around the shrunken image (wider field, collimator edge)."""

    def make(pixels: U8, _index: int) -> Dataset:
        h, w = pixels.shape
        ih, iw = int(round(h * (1 - 2 * fraction))), int(round(w * (1 - 2 * fraction)))
        inner = np.asarray(Image.fromarray(pixels).resize((iw, ih), Image.Resampling.BOX), dtype=np.uint8)
        out = np.zeros_like(pixels)
        top, left = (h - ih) // 2, (w - iw) // 2
        out[top : top + ih, left : left + iw] = inner
        return _wrap(out)

    return make


def _text(pixels: U8, index: int) -> Dataset:
    """White burned-in annotations: a laterality marker, a site label and a date/time line."""
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    rng = _rng(index)
    draw.text((6, 6), "R", fill=255, font=font)
    draw.text((140, 6), "PORTABLE", fill=255, font=font)
    month, day, minute = (int(v) for v in rng.integers(0, 9, size=3))
    draw.text((6, 200), f"2026-0{1 + month}-1{day} 09:3{minute}", fill=255, font=font)
    return _wrap(np.asarray(image, dtype=np.uint8))


def _jpeg(quality: int) -> Callable[[U8, int], Dataset]:
    """JPEG baseline (Pillow's libjpeg encoder) in the JPEG Baseline transfer syntax (PS3.5 A.4.1)."""

    def make(pixels: U8, _index: int) -> Dataset:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        ds = _wrap(pixels)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        return ds

    return make


def _large_12bit(pixels: U8, size: int) -> npt.NDArray[np.uint16]:
    """A *size*² 12-bit image (bicubic upsampling of the 8-bit one): a detector-sized radiograph."""
    image = Image.fromarray(pixels.astype(np.float32) * (4095.0 / 255.0), mode="F")
    big = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    return np.clip(np.rint(big), 0, 4095).astype(np.uint16)


def _large_no_window(size: int) -> Callable[[U8, int], Dataset]:
    def make(pixels: U8, _index: int) -> Dataset:
        return wrap_radiograph(_large_12bit(pixels, size), bits_stored=12, window=False)

    return make


def _j2k_large(size: int, ratio: float) -> Callable[[U8, int], Dataset]:
    """12-bit *size*² image, JPEG 2000 lossy at *ratio*:1 (OpenJPEG through pydicom), windowed."""

    def make(pixels: U8, _index: int) -> Dataset:
        ds = wrap_radiograph(_large_12bit(pixels, size), bits_stored=12)
        ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[ratio])
        return ds

    return make


SHIFTS: tuple[Shift, ...] = (
    Shift("clean", "8-bit 224x224 CR, VOI window 0-255 (the training pixels)", lambda p, _i: _wrap(p)),
    Shift("brighter", "exposure: +0.10 added to every pixel (display units)", _photometric(lambda x: x + 0.10)),
    Shift("darker", "exposure: -0.10 added to every pixel", _photometric(lambda x: x - 0.10)),
    Shift("low_contrast", "contrast x0.7 about the image mean", _photometric(_contrast(0.7))),
    Shift("high_contrast", "contrast x1.3 about the image mean", _photometric(_contrast(1.3))),
    Shift("gamma_0.67", "gamma 0.67 (x**0.67: lifted mid-tones)", _photometric(lambda x: x**0.67)),
    Shift("gamma_1.5", "gamma 1.5 (x**1.5: darker mid-tones)", _photometric(lambda x: x**1.5)),
    Shift("low_resolution", "down to 112x112 (area) and back up (bilinear)", lambda p, _i: _wrap(_resample(p, 112))),
    Shift("blur", "Gaussian blur sigma 1.5 px", _blur(1.5)),
    Shift("noise", "additive Gaussian noise sigma 0.04 (display units), per-image seed", _noise(0.04)),
    Shift("crop_85", "central 85% of each side kept (tighter collimation), resized back", _crop(0.85)),
    Shift("border_10", "image shrunk to 80% inside a black border of 10% per side", _border(0.10)),
    Shift("burned_in_text", "white burned-in text: marker, 'PORTABLE', a date line", _text),
    Shift("jpeg_q50", "JPEG baseline quality 50 (Pillow/libjpeg), decoded by the gateway", _jpeg(50)),
    Shift("12bit_512_no_window", "512x512 12-bit (bicubic up), no VOI window: gateway percentile window", _large_no_window(512)),
    Shift(
        "j2k_20to1_12bit_512",
        "512x512 12-bit, JPEG 2000 lossy 20:1 (OpenJPEG encoder), gateway J2K decode",
        _j2k_large(512, 20.0),
    ),
)
