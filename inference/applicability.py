"""Does the classifier apply to this instance? (docs/architecture.md §3 step 3)

The model was trained on frontal chest radiographs, so it is only run on single-frame monochrome
CR/DX images of the chest. Everything else is stored and marked not applicable — a normal
outcome with a human-readable reason, never an error to the sender.

Works on header attributes only, so it can run on a dataset read with ``stop_before_pixels``
(the pixel data is not decoded). Attributes used: General Series Modality and Body Part Examined
(PS3.3 C.7.3.1), DX Series Presentation Intent Type (C.8.11.1), DX Positioning / CR Series View
Position (C.8.11.5, C.8.1.1), Image Pixel (C.7.6.3), Multi-frame Number of Frames (C.7.6.6).

Sanity limits on the Image Pixel module (Rows, Columns, Bits Allocated, Bits Stored): the model
squashes any image to its input size, so a 1×1-pixel "chest radiograph" would otherwise be
classified — and an SR with a finding sent to the PACS. No chest radiograph is that small
(detectors and CR plates are 35–43 cm at 0.1–0.2 mm pixels: 1760–4300 pixels a side), none is a
thin strip (aspect ratio 14×17 in = 1.2), and none has 1-bit pixels. The smallest side accepted
by default is the bundled model's input size (224): a smaller image would be enlarged, and the
model would judge detail that is not there; the training images themselves were 224 a side, so a
radiograph downsized to that (a teaching file, a de-identified export) is still judged. An image
outside these
limits is not what the model was validated on, so it is not applicable, and the reason names the
rule (the ``[inference]`` setting of the same name, docs/configuration.md). The upper bound on
the side also caps what one decode may allocate (8192² 16-bit pixels = 128 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from conf.settings import InferenceSettings

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True, slots=True)
class ApplicabilityRules:
    """Settings of the applicability check; the defaults describe the bundled chest model.

    ``body_parts`` OR ``view_positions``: Body Part Examined is type 3 and often empty, so a
    frontal View Position (AP/PA) stands in for it when it is absent. When Body Part Examined is
    present it decides (an EXTREMITY taken AP is not a chest). ``reject_other_views``: a
    View Position that is present and not in ``view_positions`` (e.g. LL, a lateral chest) makes
    the image not applicable even when the body part is CHEST — the model is for frontal views.
    """

    modalities: frozenset[str] = frozenset({"CR", "DX"})
    body_parts: frozenset[str] = frozenset({"CHEST"})
    view_positions: frozenset[str] = frozenset({"AP", "PA"})
    photometric_interpretations: frozenset[str] = frozenset({"MONOCHROME1", "MONOCHROME2"})
    require_single_frame: bool = True
    dx_for_presentation_only: bool = True
    reject_other_views: bool = True
    require_pixel_data: bool = True
    #: Smallest accepted Rows and Columns (PS3.3 C.7.6.3); see the module docstring.
    min_image_side: int = 224
    #: Largest accepted Rows and Columns.
    max_image_side: int = 8192
    #: Largest accepted ratio of the longer side to the shorter.
    max_aspect_ratio: float = 2.0
    #: Smallest accepted Bits Stored (0028,0101); Bits Allocated must be 8 or 16 and hold it.
    min_bits_stored: int = 8

    def __post_init__(self) -> None:
        """Validate the limits when built (docs/architecture.md §6.3), naming the argument."""
        if not 1 <= self.min_image_side <= self.max_image_side:
            raise ValueError(
                f'Arguments "min_image_side" ({self.min_image_side}) and "max_image_side" '
                f"({self.max_image_side}) must satisfy 1 <= min <= max."
            )
        if not self.max_aspect_ratio >= 1.0:
            raise ValueError(f'Argument "max_aspect_ratio" must be >= 1, got {self.max_aspect_ratio!r}.')
        if not 1 <= self.min_bits_stored <= 16:
            raise ValueError(f'Argument "min_bits_stored" must be within [1, 16], got {self.min_bits_stored!r}.')


def rules_from_settings(settings: InferenceSettings) -> ApplicabilityRules:
    """The default rules with the ``[inference]`` sanity limits (docs/configuration.md) applied."""
    return ApplicabilityRules(
        min_image_side=settings.min_image_side,
        max_image_side=settings.max_image_side,
        max_aspect_ratio=settings.max_aspect_ratio,
        min_bits_stored=settings.min_bits_stored,
    )


@dataclass(frozen=True, slots=True)
class Applicability:
    """The verdict: ``reason`` is None when applicable, else one sentence without PHI."""

    applicable: bool
    reason: str | None = None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().upper()


def _int(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute, or None when absent or not an integer (a malformed header)."""
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _geometry(dataset: Dataset, rules: ApplicabilityRules) -> Applicability | None:
    """The sanity limits on the Image Pixel module (PS3.3 C.7.6.3): None when within them."""
    rows, columns = _int(dataset, "Rows"), _int(dataset, "Columns")
    if rows is None or columns is None:
        return _no("no image: Rows/Columns absent or not integers (Image Pixel module, PS3.3 C.7.6.3)")
    size = f"{rows}x{columns} pixels"
    if min(rows, columns) < rules.min_image_side:
        return _no(f"image too small: {size}, below {rules.min_image_side} a side (rule min_image_side)")
    if max(rows, columns) > rules.max_image_side:
        return _no(f"image too large: {size}, above {rules.max_image_side} a side (rule max_image_side)")
    ratio = max(rows, columns) / min(rows, columns)
    if ratio > rules.max_aspect_ratio:
        return _no(
            f"image is not radiograph-shaped: {size}, aspect ratio {ratio:.2f} above "
            f"{rules.max_aspect_ratio:g} (rule max_aspect_ratio)"
        )
    allocated, stored = _int(dataset, "BitsAllocated"), _int(dataset, "BitsStored")
    if allocated is not None and allocated not in (8, 16):
        return _no(f"Bits Allocated {allocated} is not 8 or 16 (Image Pixel module, PS3.3 C.7.6.3)")
    if stored is not None and not rules.min_bits_stored <= stored <= (allocated or 16):
        return _no(
            f"Bits Stored {stored} is outside [{rules.min_bits_stored}, {allocated or 16}] (rule min_bits_stored)"
        )
    return None


def _frames(ds: Dataset) -> int | None:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _no(reason: str) -> Applicability:
    return Applicability(applicable=False, reason=reason)


def _names(values: frozenset[str]) -> str:
    return ", ".join(sorted(values))


def assess(
    dataset: Dataset,
    rules: ApplicabilityRules | None = None,
    *,
    pixels_loaded: bool = False,
) -> Applicability:
    """Apply *rules* (default :class:`ApplicabilityRules`) to the header of *dataset*.

    ``pixels_loaded``: the dataset was read completely, so an absent Pixel Data element really
    means there is none. With ``stop_before_pixels`` Pixel Data is never in the dataset; then only
    the Image Pixel module attributes (Rows, Columns) are required.
    """
    rules = rules or ApplicabilityRules()
    modality = _text(dataset, "Modality")
    if modality not in rules.modalities:
        return _no(f"modality {modality or '(absent)'} is not one of {_names(rules.modalities)}")
    if rules.require_pixel_data:
        if not dataset.get("Rows") or not dataset.get("Columns"):
            return _no("no image: Rows/Columns absent (Image Pixel module, PS3.3 C.7.6.3)")
        present = [k for k in _PIXEL_KEYWORDS if k in dataset]
        if "FloatPixelData" in present or "DoubleFloatPixelData" in present:
            return _no("float pixel data is not a radiograph")
        if pixels_loaded and ("PixelData" not in dataset or not dataset.PixelData):
            return _no("no pixel data (7FE0,0010)")
    if dataset.get("Rows") is not None or dataset.get("Columns") is not None or rules.require_pixel_data:
        limits = _geometry(dataset, rules)
        if limits is not None:
            return limits
    photometric = _text(dataset, "PhotometricInterpretation")
    samples = dataset.get("SamplesPerPixel", 1)
    if photometric not in rules.photometric_interpretations or (samples not in (None, "", 1)):
        return _no(
            f"photometric interpretation {photometric or '(absent)'} is not one of "
            f"{_names(rules.photometric_interpretations)} (colour or unsupported image)"
        )
    if rules.require_single_frame:
        frames = _frames(dataset)
        if frames != 1:
            return _no(f"multi-frame image ({frames if frames is not None else 'invalid'} frames)")
    if modality == "DX" and rules.dx_for_presentation_only:
        intent = _text(dataset, "PresentationIntentType")
        if intent and intent != "FOR PRESENTATION":
            return _no(f"DX image is {intent}, not FOR PRESENTATION (PS3.3 C.8.11.1)")
    body_part = _text(dataset, "BodyPartExamined")
    view = _text(dataset, "ViewPosition")
    if body_part:
        if body_part not in rules.body_parts:
            return _no(f"body part {body_part} is not {_names(rules.body_parts)}")
    elif view not in rules.view_positions:
        return _no(
            f"body part absent and view position {view or '(absent)'} is not one of "
            f"{_names(rules.view_positions)}"
        )
    if view and rules.reject_other_views and view not in rules.view_positions:
        return _no(f"view position {view} is not frontal ({_names(rules.view_positions)})")
    return Applicability(applicable=True)
