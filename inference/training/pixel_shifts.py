"""Acquisition shifts that change the picture itself: an 8-bit image -> another 8-bit image.

Why a module of its own: these are what a different site, machine or workflow does to the
*pixels* (exposure and processing, detector resolution and sharpness, noise, collimation and
framing, burned-in annotations). :mod:`inference.training.shifts` wraps each of them as the DICOM
data set such a site would send (and adds the shifts that exist only in DICOM: lossy transfer
syntaxes, a 12-bit image without a VOI window). Cross-validation (``train --oof-shifts``) applies
them in memory to the out-of-fold images, on machines that have no DICOM stack (a GPU box), so
the pure-pixel part must not import pydicom. Each shift is deterministic for an image index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter, ImageFont

U8 = npt.NDArray[np.uint8]
SEED = 20261130


@dataclass(frozen=True)
class PixelShift:
    """One condition: a name for tables, what it does, and the (pixels, image index) -> pixels function."""

    name: str
    description: str
    apply: Callable[[U8, int], U8]


def rng_for(index: int) -> np.random.Generator:
    """The random stream of image *index* (the same image gets the same noise in every run)."""
    return np.random.default_rng([SEED, index])


def to_u8(values: npt.NDArray[np.floating]) -> U8:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _photometric(fn: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]) -> Callable[[U8, int], U8]:
    def apply(pixels: U8, _index: int) -> U8:
        return to_u8(255.0 * np.clip(fn(pixels.astype(np.float64) / 255.0), 0.0, 1.0))

    return apply


def _contrast(factor: float) -> Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]:
    return lambda x: (x - x.mean()) * factor + x.mean()


def _resample(size: int) -> Callable[[U8, int], U8]:
    """Down to *size* (area filter), back up to the original (bilinear): a coarser detector."""

    def apply(pixels: U8, _index: int) -> U8:
        image = Image.fromarray(pixels)
        small = image.resize((size, size), Image.Resampling.BOX)
        return np.asarray(small.resize(image.size, Image.Resampling.BILINEAR), dtype=np.uint8)

    return apply


def _blur(sigma: float) -> Callable[[U8, int], U8]:
    def apply(pixels: U8, _index: int) -> U8:
        return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.uint8)

    return apply


def _noise(sigma: float) -> Callable[[U8, int], U8]:
    def apply(pixels: U8, index: int) -> U8:
        return to_u8(pixels.astype(np.float64) + rng_for(index).normal(0.0, sigma * 255.0, pixels.shape))

    return apply


def _crop(fraction: float) -> Callable[[U8, int], U8]:
    """Keep the central *fraction* of each side (tighter collimation), resized back."""

    def apply(pixels: U8, _index: int) -> U8:
        h, w = pixels.shape
        dy, dx = int(round(h * (1 - fraction) / 2)), int(round(w * (1 - fraction) / 2))
        inner = Image.fromarray(pixels[dy : h - dy, dx : w - dx])
        return np.asarray(inner.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)

    return apply


def _border(fraction: float) -> Callable[[U8, int], U8]:
    """A black frame of *fraction* of each side around the shrunken image (wider field, collimator edge)."""

    def apply(pixels: U8, _index: int) -> U8:
        h, w = pixels.shape
        ih, iw = int(round(h * (1 - 2 * fraction))), int(round(w * (1 - 2 * fraction)))
        inner = np.asarray(Image.fromarray(pixels).resize((iw, ih), Image.Resampling.BOX), dtype=np.uint8)
        out = np.zeros_like(pixels)
        top, left = (h - ih) // 2, (w - iw) // 2
        out[top : top + ih, left : left + iw] = inner
        return out

    return apply


def _text(pixels: U8, index: int) -> U8:
    """White burned-in annotations: a laterality marker, a site label and a date/time line."""
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    rng = rng_for(index)
    draw.text((6, 6), "R", fill=255, font=font)
    draw.text((140, 6), "PORTABLE", fill=255, font=font)
    month, day, minute = (int(v) for v in rng.integers(0, 9, size=3))
    draw.text((6, 200), f"2026-0{1 + month}-1{day} 09:3{minute}", fill=255, font=font)
    return np.asarray(image, dtype=np.uint8)


PIXEL_SHIFTS: tuple[PixelShift, ...] = (
    PixelShift("clean", "8-bit 224x224 CR, VOI window 0-255 (the training pixels)", lambda p, _i: p),
    PixelShift("brighter", "exposure: +0.10 added to every pixel (display units)", _photometric(lambda x: x + 0.10)),
    PixelShift("darker", "exposure: -0.10 added to every pixel", _photometric(lambda x: x - 0.10)),
    PixelShift("low_contrast", "contrast x0.7 about the image mean", _photometric(_contrast(0.7))),
    PixelShift("high_contrast", "contrast x1.3 about the image mean", _photometric(_contrast(1.3))),
    PixelShift("gamma_0.67", "gamma 0.67 (x**0.67: lifted mid-tones)", _photometric(lambda x: x**0.67)),
    PixelShift("gamma_1.5", "gamma 1.5 (x**1.5: darker mid-tones)", _photometric(lambda x: x**1.5)),
    PixelShift("low_resolution", "down to 112x112 (area) and back up (bilinear)", _resample(112)),
    PixelShift("blur", "Gaussian blur sigma 1.5 px", _blur(1.5)),
    PixelShift("noise", "additive Gaussian noise sigma 0.04 (display units), per-image seed", _noise(0.04)),
    PixelShift("crop_85", "central 85% of each side kept (tighter collimation), resized back", _crop(0.85)),
    PixelShift("border_10", "image shrunk to 80% inside a black border of 10% per side", _border(0.10)),
    PixelShift("burned_in_text", "white burned-in text: marker, 'PORTABLE', a date line", _text),
)
