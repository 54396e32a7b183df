"""Does the classifier apply to this instance? (docs/architecture.md §3 step 3)

The model was trained on frontal chest radiographs, so it is only run on single-frame monochrome
CR/DX images of the chest. Everything else is stored and marked not applicable — a normal
outcome with a human-readable reason, never an error to the sender.

Works on header attributes only, so it can run on a dataset read with ``stop_before_pixels``
(the pixel data is not decoded). Attributes used: General Series Modality and Body Part Examined
(PS3.3 C.7.3.1), DX Series Presentation Intent Type (C.8.11.1), DX Positioning / CR Series View
Position (C.8.11.5, C.8.1.1), Image Pixel (C.7.6.3), Multi-frame Number of Frames (C.7.6.6).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

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
