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
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, JPEGBaseline8Bit

from inference.example_dicom import wrap_radiograph
from inference.training.pixel_shifts import PIXEL_SHIFTS, U8, PixelShift


@dataclass(frozen=True)
class Shift:
    """One condition: a name for tables, what it does, and the image -> data set function."""

    name: str
    description: str
    make: Callable[[U8, int], Dataset]


def _wrap(pixels: U8) -> Dataset:
    return wrap_radiograph(pixels)


def _wrapped(shift: PixelShift) -> Shift:
    """A pixel shift as the 8-bit CR data set that carries its result."""
    return Shift(shift.name, shift.description, lambda p, i: _wrap(shift.apply(p, i)))


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
    *(_wrapped(shift) for shift in PIXEL_SHIFTS),
    Shift("jpeg_q50", "JPEG baseline quality 50 (Pillow/libjpeg), decoded by the gateway", _jpeg(50)),
    Shift("12bit_512_no_window", "512x512 12-bit (bicubic up), no VOI window: gateway percentile window", _large_no_window(512)),
    Shift(
        "j2k_20to1_12bit_512",
        "512x512 12-bit, JPEG 2000 lossy 20:1 (OpenJPEG encoder), gateway J2K decode",
        _j2k_large(512, 20.0),
    ),
)
