"""Stored DICOM images as PNG for the browser: the summary image and thumbnails of what we received.

A browser cannot show DICOM; a PNG rendered on request (never cached on disk: it is PHI) can.
The stored file is read through :meth:`storage.filestore.FileStore.open`, so an encrypted store
is decrypted and authenticated first. Greyscale images get their modality and VOI LUT (or a
min/max window when they carry none), MONOCHROME1 is inverted; colour images (the summary image
is RGB) are shown as stored. The result is scaled down to at most *max_size* pixels a side.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from conf.errors import InvalidInputError
from storage.filestore import FileStore


def _greyscale(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0)
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return (scaled * 255.0 + 0.5).astype(np.uint8)


def render_png(store: FileStore, relative_path: str, *, max_size: int = 1024) -> bytes:
    """The stored instance's first frame as PNG bytes; :class:`InvalidInputError` when it has no
    pixels that can be shown (an SR, an unsupported compression)."""
    with store.open(relative_path) as handle:
        ds = pydicom.dcmread(handle)
    if "PixelData" not in ds:
        raise InvalidInputError("this object has no image")
    try:
        pixels = ds.pixel_array
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        raise InvalidInputError(f"the image cannot be decoded here ({type(exc).__name__})") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        image = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB")
    else:
        image = Image.fromarray(_greyscale(ds, pixels), mode="L")
    image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
