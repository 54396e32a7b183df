"""DICOM image -> model input tensor (and a display image), as pure functions.

The pipeline follows the DICOM grayscale presentation chain, PS3.4 N.2 / PS3.3 C.11:

1. **decode** the stored values (PS3.3 C.7.6.3 Image Pixel: Bits Stored, Pixel Representation;
   every transfer syntax pydicom's pixel backends and the pylibjpeg plugins handle);
2. **reduce** the resolution to about twice the model input *before* any per-pixel arithmetic,
   by block averaging (area resampling) — windowing a 3.6 Mpx radiograph costs more than the whole
   network, while the model sees 224 x 224; JPEG 2000 is decoded at 1/2^r resolution directly from
   the wavelet levels, which is both faster and an anti-aliased reduction (ISO 15444-1 Annex F);
3. **Modality LUT** (PS3.3 C.11.1: Rescale Slope/Intercept or the Modality LUT Sequence);
4. **VOI LUT** (PS3.3 C.11.2: the VOI LUT Sequence, else the first Window Center/Width with its
   VOI LUT Function); when the image carries neither, an image of at most 8 bits stored is taken
   as display-ready (its whole stored range maps linearly onto the display range), a deeper one
   gets a robust percentile window placed where the training images have their percentiles —
   see :func:`stored_range` and :func:`limits_for_targets`;
5. **MONOCHROME1 inversion** (PS3.3 C.7.6.3.1.2) so the output is always MONOCHROME2
   (white = dense), the orientation the model was trained in;
6. **squash** to the manifest's height x width with an area (box) filter.

All linear stages commute with averaging, so reducing first changes results only by the
resampling itself. Non-linear LUTs (LUT sequences, sigmoid) are applied to the reduced values;
that is the same approximation every viewer makes when it displays a radiograph zoomed out.
"""

from __future__ import annotations

import io
import math
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from inference.errors import CorruptPixelDataError, MissingPixelDataError, UnsupportedImageError
from inference.manifest import PreprocessingSpec

FloatArray = npt.NDArray[np.float32]

#: Transfer syntaxes whose codestream is JPEG 2000 Part 1 / Part 15 (PS3.5 A.4.4, A.4.11).
JPEG2000_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: The display values the two percentiles of a percentile window map to: those of the training
#: images (Kermany JPEGs: median 0.5th percentile 0, median 99.5th percentile 207 of 255).
PERCENTILE_DISPLAY_TARGETS: tuple[float, float] = (0.0, 207 / 255)
#: Images of at most this many bits stored and without any VOI are display-ready: see :func:`stored_range`.
DISPLAY_READY_BITS = 8
DEFAULT_DISPLAY_MAX_SIDE = 1024
#: Reduce to at least this multiple of the model input before the final area resize.
DEFAULT_OVERSAMPLE = 2
# Percentiles are estimated on at most about this many pixels (a strided subsample): the window
# is a robust statistic, a quarter-million samples do not make it more robust.
_PERCENTILE_SAMPLES = 1 << 16


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI window in modality units (PS3.3 C.11.2.1.2) and its VOI LUT Function."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True, slots=True, eq=False)
class PreprocessResult:
    """Model input and, when asked for, a display image; both MONOCHROME2 floats in [0, 1].

    ``tensor`` is float32 [height, width]; ``display`` float32 with longest side <= the requested
    maximum, aspect ratio kept. ``timings_ms`` has ``decode`` (pixel decoding) and ``preprocess``
    (everything after). ``decode_factor`` is the resolution reduction applied by the decoder
    (1 = full resolution; 4 = JPEG 2000 decoded at 1/4 size). ``window_source`` says which VOI
    stage was used: ``"voi_lut"``, ``"window"``, ``"stored_range"`` or ``"percentile"``.
    """

    tensor: FloatArray
    display: FloatArray | None
    timings_ms: Mapping[str, float]
    decode_factor: int
    window_source: str
    source_shape: tuple[int, int] = field(default=(0, 0))


# --------------------------------------------------------------------------- validation


def check_image(ds: Dataset) -> None:
    """Refuse anything that is not one frame of monochrome pixel data (PS3.3 C.7.6.3).

    Raises :class:`MissingPixelDataError` or :class:`UnsupportedImageError`.
    """
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedImageError("float/double float pixel data is not a radiograph")
    if "PixelData" not in ds or ds.PixelData is None or len(ds.PixelData) == 0:
        raise MissingPixelDataError("the dataset has no Pixel Data (7FE0,0010)")
    if "Rows" not in ds or "Columns" not in ds or not ds.Rows or not ds.Columns:
        raise UnsupportedImageError("Rows/Columns missing: not an image (PS3.3 C.7.6.3)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric not in MONOCHROME:
        raise UnsupportedImageError(
            f"not a monochrome image (Photometric Interpretation {photometric or 'absent'}, "
            f"Samples per Pixel {samples})"
        )
    frames = _number_of_frames(ds)
    if frames != 1:
        raise UnsupportedImageError(f"multi-frame image ({frames} frames); one frame expected")


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        return int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


# --------------------------------------------------------------------------- reduction planning


def reduction_factor(size: tuple[int, int], minimum: tuple[int, int]) -> int:
    """Largest integer factor f with ``size // f >= minimum`` on both axes (at least 1)."""
    f = min(size[0] // max(minimum[0], 1), size[1] // max(minimum[1], 1))
    return max(1, f)


def j2k_reduce_level(size: tuple[int, int], minimum: tuple[int, int], levels: int) -> int:
    """Largest r <= *levels* with ``ceil(size / 2**r) >= minimum`` on both axes.

    ISO 15444-1 B.5: resolution level r of an image has ceil(size / 2^r) samples (origin 0).
    """
    r = 0
    while r < levels:
        nxt = 1 << (r + 1)
        if -(-size[0] // nxt) < minimum[0] or -(-size[1] // nxt) < minimum[1]:
            break
        r += 1
    return r


def display_factor(size: tuple[int, int], max_side: int) -> int:
    """Smallest integer factor bringing the longest side to <= *max_side*."""
    return max(1, -(-max(size) // max_side))


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class _J2KHeader:
    width: int
    height: int
    x_offset: int
    y_offset: int
    components: int
    precision: int
    signed: bool
    levels: int


def _parse_j2k_header(codestream: bytes) -> _J2KHeader | None:
    """Read SIZ and COD from a raw J2K codestream main header (ISO 15444-1 A.5.1, A.6.1).

    Returns None when the frame is not a bare codestream (e.g. a JP2 wrapper) or is unreadable;
    the caller then uses the full-resolution decoder.
    """
    if codestream[:4] != b"\xff\x4f\xff\x51":
        return None
    pos = 2
    siz: tuple[int, ...] | None = None
    levels: int | None = None
    try:
        while pos + 4 <= len(codestream):
            marker, length = struct.unpack_from(">HH", codestream, pos)
            if marker == 0xFF90:  # SOT: end of the main header
                break
            if marker == 0xFF51:
                siz = struct.unpack_from(">HIIIIIIIIHBBB", codestream, pos + 4)
            elif marker == 0xFF52:
                levels = codestream[pos + 9]
            pos += 2 + length
    except struct.error:
        return None
    if siz is None or levels is None:
        return None
    ssiz = siz[10]
    return _J2KHeader(
        width=siz[1],
        height=siz[2],
        x_offset=siz[3],
        y_offset=siz[4],
        components=siz[9],
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=levels,
    )


def _reduced_extent(full: int, offset: int, r: int) -> int:
    step = 1 << r
    return -(-full // step) - (-(-offset // step))


def decode_j2k_reduced(codestream: bytes, r: int) -> tuple[npt.NDArray[Any], int] | None:
    """Decode resolution level *r* (1/2^r size) of a single-component unsigned J2K codestream.

    Returns (stored values, r actually used): r is capped at the codestream's number of
    decomposition levels (COD, ISO 15444-1 A.6.1).

    pylibjpeg-openjpeg 2.6 exposes no reduce parameter, Pillow's OpenJPEG binding does. Pillow
    computes the reduced size by rounding instead of ISO 15444-1 B.5's ceiling, which makes the
    decode fail for sizes like 1841/4, so the tile size is set here from the codestream header.
    Pillow scales samples to the full 8/16-bit range (left shift by 8/16 - precision); that is
    undone so values are the stored values. Returns None when this path cannot be used (signed
    or multi-component data, JP2 wrapper); the caller falls back to pydicom.
    """
    header = _parse_j2k_header(codestream)
    if header is None or header.components != 1 or header.signed or header.precision > 16:
        return None
    r = min(r, header.levels)
    width = _reduced_extent(header.width, header.x_offset, r)
    height = _reduced_extent(header.height, header.y_offset, r)
    try:
        image = Image.open(io.BytesIO(codestream))
        if r:
            tile = image.tile[0]
            args = tile.args
            if not isinstance(args, tuple) or len(args) != 5:
                return None
            image._size = (width, height)  # noqa: SLF001 - see docstring
            image.tile = [
                ImageFile._Tile(  # noqa: SLF001
                    tile.codec_name, (0, 0, width, height), tile.offset,
                    (args[0], r, args[2], args[3], args[4]),
                )
            ]
        image.load()
        arr = np.asarray(image)
    except (OSError, ValueError, SyntaxError, AttributeError, IndexError):
        return None
    if arr.shape != (height, width):
        return None
    shift = (8 if arr.dtype == np.uint8 else 16) - header.precision
    return (arr >> shift if shift > 0 else arr), r


def decode(ds: Dataset, j2k_reduce: int = 0) -> tuple[npt.NDArray[Any], int]:
    """Decode the single frame; returns (stored values, resolution factor applied).

    Stored values are signed/unsigned per Pixel Representation with Bits Stored honoured (pydicom
    masks and sign-extends, PS3.5 8.1.1). For JPEG 2000 with ``j2k_reduce > 0`` the decoder
    returns resolution level ``j2k_reduce`` (factor ``2**j2k_reduce``) when it can.
    Raises :class:`CorruptPixelDataError` for any decoding failure.
    """
    file_meta = getattr(ds, "file_meta", None)
    tsuid = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    if j2k_reduce > 0 and tsuid in JPEG2000_SYNTAXES and int(ds.get("PixelRepresentation", 0)) == 0:
        try:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types for bad items
            raise CorruptPixelDataError(
                f"cannot read the encapsulated JPEG 2000 frame: {type(exc).__name__}: {exc}"
            ) from exc
        reduced = decode_j2k_reduced(frame, j2k_reduce)
        if reduced is not None:
            return reduced[0], 1 << reduced[1]
    try:
        arr = pixel_array(ds)
    except Exception as exc:  # noqa: BLE001 - decoders raise anything from ValueError to RuntimeError
        name = UID(tsuid).name if tsuid else "unknown transfer syntax"
        raise CorruptPixelDataError(
            f"cannot decode Pixel Data ({name}): {type(exc).__name__}: {exc}"
        ) from exc
    if arr.ndim != 2:
        raise UnsupportedImageError(
            f"decoded pixel data has shape {arr.shape}; one 2-D frame expected"
        )
    return arr, 1


# --------------------------------------------------------------------------- pixel arithmetic


def block_mean(arr: npt.NDArray[Any], factor: int) -> FloatArray:
    """Area-downsample by an integer *factor* (mean of factor x factor blocks), as float32.

    The output has ceil(size / factor) samples per axis; a trailing partial block is the mean of
    the pixels it has. That is the same sampling grid as a JPEG 2000 resolution level
    (ISO 15444-1 B.5), so reduced-resolution J2K decoding and this function agree on geometry.
    Separable: f row-slab additions (contiguous rows) then f strided column additions on an
    array f times smaller — ~2.5x faster than f^2 strided views or reshape().mean(), no float64.
    float32 sums of 16-bit samples are exact up to factor 16.
    """
    if factor <= 1:
        return np.asarray(arr, dtype=np.float32)
    rows, cols = arr.shape[0], arr.shape[1]
    out_r, out_c = -(-rows // factor), -(-cols // factor)
    row_sums = np.zeros((out_r, cols), dtype=np.float32)
    for i in range(min(factor, rows)):
        slab = arr[i::factor]
        row_sums[: slab.shape[0]] += slab
    out = np.zeros((out_r, out_c), dtype=np.float32)
    for j in range(min(factor, cols)):
        column = row_sums[:, j::factor]
        out[:, : column.shape[1]] += column
    row_count = np.full(out_r, factor, dtype=np.float32)
    col_count = np.full(out_c, factor, dtype=np.float32)
    row_count[-1] = rows - (out_r - 1) * factor
    col_count[-1] = cols - (out_c - 1) * factor
    if row_count[-1] == factor and col_count[-1] == factor:
        out *= np.float32(1.0 / (factor * factor))
    else:
        out /= np.outer(row_count, col_count)
    return out


def modality_values(arr: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[Any]:
    """Apply the Modality LUT stage (PS3.3 C.11.1) to stored values (possibly area-averaged).

    Rescale Slope/Intercept is linear and applied to floats. A Modality LUT Sequence is a table
    lookup, so averaged values are rounded to the nearest stored value first. Both via pydicom.
    """
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(np.rint(arr).astype(np.int64), ds)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        return arr
    s = float(slope) if slope not in (None, "") else 1.0
    b = float(intercept) if intercept not in (None, "") else 0.0
    if s == 1.0 and b == 0.0:
        return arr
    return np.asarray(arr, dtype=np.float32) * np.float32(s) + np.float32(b)


def first_window(ds: Dataset) -> Window | None:
    """The first Window Center/Width pair and VOI LUT Function (PS3.3 C.11.2.1.2), if usable."""
    center = ds.get("WindowCenter")
    width = ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    try:
        c = float(center[0] if _is_multi(center) else center)
        w = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in {"LINEAR", "LINEAR_EXACT", "SIGMOID"}:
        function = "LINEAR"
    if not math.isfinite(c) or not math.isfinite(w) or w <= 0 or (function == "LINEAR" and w < 1):
        return None
    return Window(center=c, width=w, function=function)


def _is_multi(value: object) -> bool:
    return not isinstance(value, (str, bytes, int, float)) and hasattr(value, "__getitem__")


def apply_window(values: npt.NDArray[Any], window: Window) -> FloatArray:
    """Window modality values into [0, 1] per PS3.3 C.11.2.1.2 (LINEAR) and C.11.2.1.3.

    The standard maps onto an output range [y_min, y_max]; here that range is [0, 1] directly,
    which is the model's input range, so no second rescale is needed.
    """
    x = np.asarray(values, dtype=np.float32)
    c, w = np.float32(window.center), np.float32(window.width)
    if window.function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(np.float32(-4.0) * (x - c) / w))
        return np.asarray(out, dtype=np.float32)
    if window.function == "LINEAR_EXACT":
        out = (x - c) / w + np.float32(0.5)
    elif w <= 1:
        out = (x > c - np.float32(0.5)).astype(np.float32)
    else:  # LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5), clamped
        out = (x - (c - np.float32(0.5))) / (w - np.float32(1.0)) + np.float32(0.5)
    return np.asarray(np.clip(out, 0.0, 1.0, out=out), dtype=np.float32)


def apply_voi_lut_sequence(values: npt.NDArray[Any], ds: Dataset) -> FloatArray:
    """Apply the first VOI LUT Sequence item (PS3.3 C.11.2.1.1) and scale its output to [0, 1].

    The lookup is pydicom's; the output is normalised by the LUT's own minimum and maximum entry
    (read by probing the LUT over its input domain), since the LUT Descriptor's bit depth is
    unreliable in real data.
    """
    item = ds.VOILUTSequence[0]
    descriptor = item.LUTDescriptor
    entries = int(descriptor[0]) or 65536
    first = int(descriptor[1])
    lookup = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True)
    domain = apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), ds, prefer_lut=True)
    lo, hi = float(np.min(domain)), float(np.max(domain))
    if hi <= lo:
        return np.zeros(np.shape(values), dtype=np.float32)
    out = (np.asarray(lookup, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def percentile_window(
    values: npt.NDArray[Any], percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> tuple[float, float]:
    """Robust (low, high) display limits: the given percentiles of the values.

    Used only when the image carries no VOI (PS3.3 C.11.2 makes it optional for CR): the tails
    (collimator edges, markers, burned-in text) would otherwise compress the lung contrast.
    """
    flat = np.asarray(values).ravel()
    step = max(1, flat.size // _PERCENTILE_SAMPLES)
    lo, hi = np.percentile(flat[::step], percentiles)
    return float(lo), float(hi)


def limits_for_targets(
    percentile_limits: tuple[float, float], targets: tuple[float, float] = PERCENTILE_DISPLAY_TARGETS
) -> tuple[float, float]:
    """Display limits that put the two percentile values at *targets* instead of at 0 and 1.

    Why: stretching an image so that its 99.5th percentile is white renders it brighter than
    every training image (whose 99.5th percentile sits at 207 of 255 in the median); the model
    then sees a contrast shift it was not trained on (model 1.1.0 on 12-bit images without a
    window: EXPERIMENTS.md). Mapping the percentiles where the training images have theirs keeps
    the presented intensities in the training distribution; the brightest 0.5 % still reach 1.
    """
    lo, hi = percentile_limits
    (t0, t1) = targets
    scale = (hi - lo) / (t1 - t0)
    return lo - t0 * scale, lo + (1.0 - t0) * scale


def stored_range(ds: Dataset) -> tuple[float, float]:
    """Display limits for an image without any VOI: every value its stored bits can hold.

    Used for images of at most :data:`DISPLAY_READY_BITS` bits stored. Why not the percentile
    window there: an 8-bit radiograph that carries no VOI is in practice already a display
    rendering (a secondary capture, a digitised or exported film, a modality's 8-bit output), and
    the model was trained on exactly such 8-bit renderings. Stretching them to their own 0.5/99.5
    percentiles changes the contrast of a typical training image by about a quarter (its 99.5th
    percentile is near 208 of 255) and cost model 1.1.0 4.5 points of sensitivity on its
    validation split (0.934 -> 0.890; docs/model.md). Deeper images use only part of their range,
    so for them the percentile window stays. The limits pass through the Modality LUT stage like
    the pixel values.
    """
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
    ends = np.asarray(modality_values(np.array([low, high], dtype=np.float32), ds), dtype=np.float64)
    return float(ends.min()), float(ends.max())


def apply_limits(values: npt.NDArray[Any], low: float, high: float) -> FloatArray:
    """Linearly map [low, high] onto [0, 1], clamped; a flat image maps to zeros."""
    x = np.asarray(values, dtype=np.float32)
    if high <= low:
        return np.zeros(x.shape, dtype=np.float32)
    out = (x - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def to_monochrome2(windowed: FloatArray, photometric: str) -> FloatArray:
    """Invert MONOCHROME1 (minimum = white, PS3.3 C.7.6.3.1.2) so white always means dense."""
    if photometric.strip().upper() == "MONOCHROME1":
        return np.float32(1.0) - windowed
    return windowed


def resize_squash(image: FloatArray, height: int, width: int) -> FloatArray:
    """Resize to exactly height x width ignoring aspect ratio (the manifest's ``squash``).

    Box (area) filter when shrinking both axes — an exact area average; bilinear otherwise
    (Pillow's filters are anti-aliased in either case).
    """
    if image.shape == (height, width):
        return np.ascontiguousarray(image, dtype=np.float32)
    shrinking = image.shape[0] >= height and image.shape[1] >= width
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    out = np.asarray(pil.resize((width, height), resample=resample), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True, slots=True)
class _Voi:
    source: str
    window: Window | None = None
    limits: tuple[float, float] | None = None


def _choose_voi(ds: Dataset, values: npt.NDArray[Any], percentiles: tuple[float, float]) -> _Voi:
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        return _Voi("voi_lut")
    window = first_window(ds)
    if window is not None:
        return _Voi("window", window=window)
    if int(ds.BitsStored) <= DISPLAY_READY_BITS:
        return _Voi("stored_range", limits=stored_range(ds))
    return _Voi("percentile", limits=limits_for_targets(percentile_window(values, percentiles)))


def _present(values: npt.NDArray[Any], ds: Dataset, voi: _Voi, photometric: str) -> FloatArray:
    if voi.source == "voi_lut":
        windowed = apply_voi_lut_sequence(values, ds)
    elif voi.window is not None:
        windowed = apply_window(values, voi.window)
    else:
        assert voi.limits is not None
        windowed = apply_limits(values, *voi.limits)
    return to_monochrome2(windowed, photometric)


def preprocess(
    ds: Dataset,
    spec: PreprocessingSpec,
    *,
    display_max_side: int | None = None,
    oversample: int = DEFAULT_OVERSAMPLE,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> PreprocessResult:
    """Turn one DICOM image into the model tensor (and optionally a display image).

    One decode serves both outputs: the decoder reduction is planned for the more demanding of
    the two, then each output is block-averaged from the decoded array. The VOI window is chosen
    once (on the tensor-scale values) and used for both, so the display shows what the model saw.

    Raises :class:`UnsupportedImageError`, :class:`MissingPixelDataError` or
    :class:`CorruptPixelDataError`.
    """
    check_image(ds)
    t0 = time.perf_counter()
    size = (int(ds.Rows), int(ds.Columns))
    minimum = (spec.height * oversample, spec.width * oversample)
    r = j2k_reduce_level(size, minimum, levels=32)
    if display_max_side:
        # a J2K level is a power of two no larger than the display's own reduction factor
        r = min(r, int(math.log2(display_factor(size, display_max_side))))
    decoded, factor = decode(ds, j2k_reduce=r)
    t1 = time.perf_counter()

    photometric = str(ds.PhotometricInterpretation)
    decoded_size = (decoded.shape[0], decoded.shape[1])
    small = modality_values(block_mean(decoded, reduction_factor(decoded_size, minimum)), ds)
    voi = _choose_voi(ds, small, percentiles)
    tensor = resize_squash(_present(small, ds, voi, photometric), spec.height, spec.width)
    display: FloatArray | None = None
    if display_max_side:
        residual = display_factor(decoded_size, display_max_side)
        display = _present(modality_values(block_mean(decoded, residual), ds), ds, voi, photometric)
        display = np.ascontiguousarray(display, dtype=np.float32)
    t2 = time.perf_counter()
    return PreprocessResult(
        tensor=tensor,
        display=display,
        timings_ms=MappingProxyType({"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}),
        decode_factor=factor,
        window_source=voi.source,
        source_shape=size,
    )


def prepare_tensor(ds: Dataset, spec: PreprocessingSpec) -> PreprocessResult:
    """The model input only (the fast path the worker uses)."""
    return preprocess(ds, spec)


def display_image(
    ds: Dataset, spec: PreprocessingSpec, max_side: int = DEFAULT_DISPLAY_MAX_SIDE
) -> FloatArray:
    """A MONOCHROME2 [0, 1] image with longest side <= *max_side*, windowed like the tensor.

    For the Secondary Capture summary (heat map overlay); same code path as the tensor.
    """
    result = preprocess(ds, spec, display_max_side=max_side)
    assert result.display is not None
    return result.display
