"""Build the Secondary Capture "summary image": the radiograph, the heat map and a result banner.

Why a Secondary Capture at all: many PACS viewers cannot render a TID 1500 SR, but every viewer
shows an image. The SC (PS3.3 A.8.1, SOP Class 1.2.840.10008.5.1.4.1.1.7) repeats the SR's result
as burned-in text, so a radiologist sees the finding, the certainty, the model and its intended
use whatever the viewer (docs/architecture.md §4). It is secondary: the SR is the machine-readable result.

Design choices:

* The banner is drawn on a strip *above* the image, never over anatomy.
* The class activation map is min-max scaled, upsampled bilinearly, colour-mapped with a jet-like
  ramp and blended with an opacity that rises smoothly (smoothstep) from 0 at ``HEAT_START`` to
  ``HEAT_MAX_ALPHA`` at ``HEAT_FULL``: low-activation areas keep their grey values and there is no
  hard contour that could be read as a lesion edge.
* The banner is sized to the image: it starts at a font ≈ 1/45 of the width and shrinks (then
  falls back to shorter wording) until it takes at most a third of the image's height, so a
  224 px summary stays mostly picture. Probability and threshold are both percentages.
* By default the heat map is drawn only for a POSITIVE result. A min-max scaled CAM always has a
  "hottest" region, even when the model says "no pneumonia"; painting it red on a negative study
  invites reading a finding into it. ``overlay_when_negative=True`` overrides this.
* The object is uncompressed RGB (Explicit VR Little Endian), the most widely displayable form.
* UIDs are derived from the source and the model (docs/architecture.md §3 step 4) and date/times come from
  ``result.completed_at`` when set, so rebuilding gives the same object.
"""

from __future__ import annotations

import copy
import datetime
import functools
import textwrap

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom_node.ai_result import AiResult, ResultObjectError
from dicom_node.sr import (
    check_source,
    content_datetime,
    contributing_equipment_item,
    evidence_header,
    utc_offset_text,
)
from storage.uids import derive_uid

#: Largest accepted side of the display image: the SC is a summary, not a diagnostic copy.
MAX_DISPLAY_SIDE = 1024
MIN_DISPLAY_SIDE = 64
#: Scaled activation below which no colour is blended (keeps the anatomy readable) ...
HEAT_START = 0.3
#: ... and from which on the heat map has its full opacity; in between it rises smoothly.
HEAT_FULL = 0.8
#: Opacity of the heat map at maximal activation.
HEAT_MAX_ALPHA = 0.5
#: The banner takes at most this fraction of the image's rows (it is drawn above the image).
BANNER_MAX_FRACTION = 1 / 3
#: Smallest banner font (pixels): still legible on a 224 px summary.
MIN_FONT_SIZE = 9
#: PS3.16 CID 7202 "Source Image Purposes of Reference".
SOURCE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
SERIES_DESCRIPTION = "AI pneumonia summary (SC)"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
_FALLBACKS = {"\u2014": "-", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}


class SummaryImageError(ResultObjectError):
    """The display image or the source cannot produce a summary image; the message says why."""


# --------------------------------------------------------------------------------------- UIDs


def sc_series_uid(study_instance_uid: str, result: AiResult) -> str:
    """Series Instance UID of the summary series: one per study and model version."""
    return derive_uid("sc-series", study_instance_uid, result.model_id, result.model_version)


def sc_instance_uid(source_sop_instance_uid: str, result: AiResult) -> str:
    """SOP Instance UID of the summary image: a pure function of (source, model id, version)."""
    return derive_uid("sc", source_sop_instance_uid, result.model_id, result.model_version)


# ------------------------------------------------------------------------------------ pixels


def check_display_image(image: object) -> npt.NDArray[np.float32]:
    """A finite 2-D float image in [0, 1] with sides in [64, 1024], returned as float32."""
    if not isinstance(image, np.ndarray):
        raise SummaryImageError(
            f'Argument "display_image" must be a numpy array, got {type(image).__name__}.'
        )
    if image.ndim != 2:
        raise SummaryImageError(f'Argument "display_image" must be 2-D [H, W], got shape {image.shape}.')
    if not np.issubdtype(image.dtype, np.floating):
        raise SummaryImageError(f'Argument "display_image" must be floating point, got {image.dtype}.')
    if min(image.shape) < MIN_DISPLAY_SIDE or max(image.shape) > MAX_DISPLAY_SIDE:
        raise SummaryImageError(
            f'Argument "display_image" sides must be within [{MIN_DISPLAY_SIDE}, {MAX_DISPLAY_SIDE}] '
            f"pixels, got {image.shape}."
        )
    if not bool(np.all(np.isfinite(image))):
        raise SummaryImageError('Argument "display_image" must contain only finite values.')
    if float(image.min()) < 0.0 or float(image.max()) > 1.0:
        raise SummaryImageError('Argument "display_image" values must be within [0, 1] (windowed).')
    return image.astype(np.float32, copy=False)


def scale_activation(cam: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Min-max scale *cam* to [0, 1] and upsample it bilinearly to *shape* (rows, columns).

    A constant map carries no localisation, so it scales to all zeros (nothing is drawn).
    """
    low, high = float(cam.min()), float(cam.max())
    if high - low <= 1e-12:
        return np.zeros(shape, dtype=np.float32)
    scaled = ((cam - low) / (high - low)).astype(np.float32)
    resized = Image.fromarray(scaled).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0), dtype=np.float32)


#: Where jet()'s red, green and blue ramps peak, on the activation scaled by 4.
_JET_CENTRES = tuple(np.float32(c) for c in (3.0, 2.0, 1.0))


def jet(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Jet-like colour map: blue -> cyan -> yellow -> red for values in [0, 1], as [.., 3] RGB."""
    x = values[..., None] * 4.0
    centres = np.array(_JET_CENTRES, dtype=np.float32)
    colours: npt.NDArray[np.float32] = np.clip(1.5 - np.abs(x - centres), 0.0, 1.0).astype(np.float32)
    return colours


def heat_alpha(activation: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Opacity of the heat map per pixel: smoothstep from 0 (≤ HEAT_START) to HEAT_MAX_ALPHA
    (≥ HEAT_FULL), continuous with a continuous slope, so no contour appears at any level."""
    t = np.clip((activation - HEAT_START) / (HEAT_FULL - HEAT_START), 0.0, 1.0)
    alpha: npt.NDArray[np.float32] = (HEAT_MAX_ALPHA * t * t * (3.0 - 2.0 * t)).astype(np.float32)
    return alpha


def blend_heat_map(
    gray: npt.NDArray[np.float32], activation: npt.NDArray[np.float32] | None
) -> npt.NDArray[np.uint8]:
    """RGB uint8 image: *gray* with the jet-coloured *activation* blended in (see heat_alpha).

    One colour channel at a time, in place, in float32: the same arithmetic as :func:`jet` and
    ``(1 - alpha) * gray + alpha * colour`` (so the same pixels), without the full-frame
    ``[H, W, 3]`` temporaries, which made the blend ~50 ms of every positive result on a 1024 px
    image, on the worker thread that also builds the SR. A negative summary has no heat map: its
    grey values are rounded once and repeated.
    """
    grey = np.round(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)
    if activation is None:
        return np.repeat(grey[..., None], 3, axis=2)
    alpha = heat_alpha(activation)
    kept = (1.0 - alpha) * gray
    x = activation * 4.0
    channel = np.empty_like(x)
    rgb = np.empty((*gray.shape, 3), dtype=np.uint8)
    for index, centre in enumerate(_JET_CENTRES):
        np.subtract(x, centre, out=channel)
        np.abs(channel, out=channel)
        np.subtract(np.float32(1.5), channel, out=channel)
        np.clip(channel, 0.0, 1.0, out=channel)  # jet()'s value of this channel
        channel *= alpha
        channel += kept
        np.clip(channel, 0.0, 1.0, out=channel)
        channel *= 255.0
        np.round(channel, out=channel)
        rgb[..., index] = channel
    return rgb


# ------------------------------------------------------------------------------------ banner


def _intended_use(result: AiResult) -> str:
    use = result.intended_use.strip()
    if "research" in use.lower() and NOT_FOR_DIAGNOSTIC_USE.lower() not in use.lower():
        use = f"{NOT_FOR_DIAGNOSTIC_USE} \u2014 {use}"
    return use


def _verdict(result: AiResult) -> str:
    """The result in one unit: "87.3% (POSITIVE at threshold 50.0%)"."""
    verdict = "POSITIVE" if result.present else "NEGATIVE"
    return f"{result.probability_percent:.1f}% ({verdict} at threshold {result.threshold * 100:.1f}%)"


def banner_lines(result: AiResult, heat_map_drawn: bool) -> list[str]:
    """The banner text as logical lines (result, then overlay note), before wrapping.

    The intended use is always shown; a research-only model also gets "NOT FOR DIAGNOSTIC USE"
    unless the statement already says so, because burned-in text is all some viewers will show.
    """
    head = f"AI: pneumonia {_verdict(result)} \u2014 {result.model_name} {result.model_version}"
    if result.cam is None:
        overlay = "No heat map available."
    elif heat_map_drawn:
        overlay = "Colour overlay: model attention (class activation map), not a lesion outline."
    else:
        overlay = "No heat map shown for a negative result."
    return [f"{head} \u2014 {_intended_use(result)}", overlay]


def compact_banner_lines(result: AiResult, heat_map_drawn: bool) -> list[str]:
    """Shorter wording of :func:`banner_lines` for small images (same facts, fewer words)."""
    if result.cam is None:
        overlay = "No heat map."
    elif heat_map_drawn:
        overlay = "Colour = model attention, not a lesion outline."
    else:
        overlay = "No heat map (negative)."
    return [
        f"AI pneumonia {_verdict(result)}",
        f"{result.model_name} {result.model_version} \u2014 {_intended_use(result)}",
        overlay,
    ]


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at *size* px (loaded once per size: loading costs more than drawing)."""
    return ImageFont.load_default(size=size)


def _glyph(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, char: str) -> bytes:
    """The rendered bitmap of one character, for comparing glyphs."""
    canvas = Image.new("L", (64, 64))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, fill=255)
    return canvas.tobytes()


@functools.lru_cache(maxsize=1024)
def _has_glyph(size: int, char: str) -> bool:
    """Whether the built-in font at *size* draws *char* as something other than its missing-glyph box."""
    font = _font(size)
    return _glyph(font, char) != _glyph(font, "\uffff")


def _renderable(text: str, size: int) -> str:
    """Replace characters the font has no glyph for (they would render as boxes).

    Pillow's built-in font lacks the em dash, for one; a missing glyph renders exactly like an
    unassigned code point, which is how it is detected.
    """
    return "".join(
        char if char.isascii() or _has_glyph(size, char) else _FALLBACKS.get(char, "?") for char in text
    )


def _layout(lines: list[str], width: int, size: int) -> tuple[list[str], int]:
    """*lines* wrapped to *width* pixels at font *size*, and the banner height they need."""
    font = _font(size)
    char_width = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz0123456789") / 36.0)
    margin = max(3, size // 3)
    columns = max(10, int((width - 2 * margin) / char_width))
    wrapped: list[str] = []
    for line in lines:
        wrapped.extend(textwrap.wrap(_renderable(line, size), width=columns) or [""])
    return wrapped, 2 * margin + int(size * 1.25) * len(wrapped)


def _draw_banner(lines: list[str], width: int, size: int) -> npt.NDArray[np.uint8]:
    """Draw *lines* wrapped to *width* pixels at font *size*, white on black, as RGB uint8."""
    font = _font(size)
    wrapped, height = _layout(lines, width, size)
    margin, line_height = max(3, size // 3), int(size * 1.25)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(wrapped):
        draw.text((margin, margin + index * line_height), line, font=font, fill=(255, 255, 255))
    return np.asarray(canvas, dtype=np.uint8)


def render_banner(
    variants: list[list[str]], width: int, max_height: int | None = None
) -> npt.NDArray[np.uint8]:
    """The banner strip for an image *width* pixels wide, at most *max_height* rows when possible.

    Tries each wording in *variants* (longest first) from a font ≈ 1/45 of the width (at least
    MIN_FONT_SIZE px) down to MIN_FONT_SIZE, and keeps the first that fits; if none fits, the
    last wording at the smallest size (the text is never cut). Candidates are measured, not
    drawn: only the chosen one is.
    """
    start = max(MIN_FONT_SIZE, width // 45)
    for lines in variants:
        for size in range(start, MIN_FONT_SIZE - 1, -1):
            if max_height is None or _layout(lines, width, size)[1] <= max_height:
                return _draw_banner(lines, width, size)
    return _draw_banner(variants[-1], width, MIN_FONT_SIZE)


def compose(
    display_image: npt.NDArray[np.float32], result: AiResult, *, overlay_when_negative: bool = False
) -> npt.NDArray[np.uint8]:
    """The full summary raster: banner strip on top of the (heat-mapped) image, RGB uint8."""
    cam = result.cam if (result.present or overlay_when_negative) else None
    draw_heat = cam is not None
    rows, columns = display_image.shape
    activation = None if cam is None else scale_activation(cam, (rows, columns))
    picture = blend_heat_map(display_image, activation)
    variants = [banner_lines(result, draw_heat), compact_banner_lines(result, draw_heat)]
    banner = render_banner(variants, columns, max_height=int(rows * BANNER_MAX_FRACTION))
    return np.ascontiguousarray(np.concatenate([banner, picture], axis=0))


# --------------------------------------------------------------------------------- public API


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2:
        return None
    try:
        return (
            hd.PatientOrientationValuesBiped(value[0]).value,
            hd.PatientOrientationValuesBiped(value[1]).value,
        )
    except ValueError:
        return None


def _source_image_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_FOR_PROCESSING)]
    return item


#: Transfer syntaxes that are lossy by definition (PS3.5 Section 8.2.1 / A.4): JPEG Baseline and
#: Extended. JPEG 2000 (.91) and JPEG-LS near-lossless (.81) may be either, and say so in Lossy
#: Image Compression (0028,2110) when they were lossy, so only that attribute is trusted for them.
_LOSSY_TRANSFER_SYNTAXES = {"1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1"}


def _carry_lossy_compression(sc: Dataset, source: Dataset) -> None:
    """Lossy Image Compression of a derived image (PS3.3 C.7.6.1.1.5): once a pixel has been
    through lossy compression, every image derived from it says so, with the ratio and method
    history, and the value is never reset to "00". An uncompressed copy of a lossy source is lossy.
    """
    lossy = str(source.get("LossyImageCompression") or "").strip() == "01"
    method = source.get("LossyImageCompressionMethod")
    if not lossy:
        meta = getattr(source, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID") or "") if meta is not None else ""
        if syntax not in _LOSSY_TRANSFER_SYNTAXES:
            return
        lossy, method = True, _LOSSY_TRANSFER_SYNTAXES[syntax]
    sc.LossyImageCompression = "01"
    if "LossyImageCompressionRatio" in source and source.LossyImageCompressionRatio not in (None, ""):
        sc.LossyImageCompressionRatio = copy.deepcopy(source.LossyImageCompressionRatio)
    if method not in (None, ""):
        sc.LossyImageCompressionMethod = copy.deepcopy(method)


def build_summary_image(
    source: Dataset,
    display_image: npt.NDArray[np.floating],
    result: AiResult,
    *,
    institution_name: str | None = None,
    series_number: int = 9902,
    instance_number: int = 1,
    overlay_when_negative: bool = False,
    site_zone: datetime.tzinfo | None = None,
) -> Dataset:
    """Build the Secondary Capture summary of *result* for *source* (PS3.3 A.8.1).

    *display_image* is the source radiograph as the classifier saw it for display: MONOCHROME2
    orientation (white = dense), windowed to [0, 1], at most 1024 px a side.

    The SC joins the source's study in its own series (Modality OT), references the source in
    Source Image Sequence (PS3.3 C.7.6.1.1.4) with a Derivation Description, is marked Burned In
    Annotation YES (the banner is burned in; the conservative value for de-identification tools,
    even though the banner holds no patient identity) and carries the same single Contributing
    Equipment item as the SR. A lossy source makes a lossy summary: Lossy Image Compression "01"
    with the source's ratio and method is carried over (PS3.3 C.7.6.1.1.5). *site_zone* is the
    site's time zone for a source without Timezone Offset From UTC (None: the system's zone).

    Raises:
        SrBuildError: the source cannot be referenced.
        SummaryImageError: the display image is not usable.
    """
    if not isinstance(result, AiResult):
        raise SummaryImageError(f'Argument "result" must be an AiResult, got {type(result).__name__}.')
    check_source(source)
    for name, number in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise SummaryImageError(f'Argument "{name}" must be a positive int, got {number!r}.')
    gray = check_display_image(display_image)
    pixels = compose(gray, result, overlay_when_negative=overlay_when_negative)

    header = evidence_header(source)
    when = content_datetime(source, result, site_zone)
    orientation = _patient_orientation(header)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=sc_series_uid(header.StudyInstanceUID, result),
        series_number=series_number,
        sop_instance_uid=sc_instance_uid(header.SOPInstanceUID, result),
        instance_number=instance_number,
        manufacturer=result.manufacturer,
        patient_id=header.PatientID,
        patient_name=header.PatientName,
        patient_birth_date=header.PatientBirthDate,
        patient_sex=header.PatientSex,
        accession_number=header.AccessionNumber,
        study_id=header.StudyID,
        study_date=header.StudyDate,
        study_time=header.StudyTime,
        referring_physician_name=header.ReferringPhysicianName,
        # highdicom insists on a value for the PATIENT coordinate system; an unknown orientation
        # is written empty below, which PS3.3 C.7.6.1 (Type 2C) allows.
        patient_orientation=orientation or ("L", "F"),
        manufacturer_model_name=result.model_name,
        software_versions=result.model_version,
        series_description=SERIES_DESCRIPTION,
        institution_name=institution_name,
        specific_character_set=header.get("SpecificCharacterSet"),
        content_date=None if when is None else when.date(),
        content_time=None if when is None else when.time(),
    )
    if orientation is None:
        sc.add_new(0x00200020, "CS", None)  # Patient Orientation, Type 2C, present and empty
    sc.copy_patient_and_study_information(header)
    # General Series (PS3.3 C.7.3.1): Laterality is Type 2C for paired body parts; naming the body
    # part tells readers (and dciodvfy) that none is needed. The result only exists for chest
    # radiographs (docs/architecture.md §3 step 3), so CHEST is the fallback when the source omitted it.
    sc.BodyPartExamined = header.get("BodyPartExamined") or "CHEST"
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    sc.DerivationDescription = (
        f"Chest radiograph with {result.model_name} {result.model_version} pneumonia result "
        "burned in (class activation map overlay and text banner)"
    )
    sc.SourceImageSequence = [_source_image_item(header)]
    sc.DeviceUID = result.device_uid
    sc.ContributingEquipmentSequence = [contributing_equipment_item(result, when)]
    if when is not None:
        date, time = pydicom.valuerep.DA(when.date()), pydicom.valuerep.TM(when.time())
        sc.InstanceCreationDate, sc.InstanceCreationTime = date, time
        sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = date, time
        sc.SeriesDate, sc.SeriesTime = date, time
        if when.tzinfo is not None:
            sc.TimezoneOffsetFromUTC = utc_offset_text(when)
    _carry_lossy_compression(sc, source)
    return sc


__all__ = [
    "SummaryImageError",
    "build_summary_image",
    "sc_instance_uid",
    "sc_series_uid",
]
