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

Intended use (issue 11): the modalities, body parts, views, photometric and bit-depth limits and
the **patient age range** come from the model's manifest (:mod:`inference.intended_use`), because
they describe the model; ``pneumo.toml`` ``[inference]`` may override each one
(:class:`SiteRules`, docs/configuration.md). The age is read by :mod:`inference.patient_age`
(Patient's Age, else Patient's Birth Date and the study's date). An age outside the range makes
the image not applicable; an age that cannot be established follows ``unknown_age`` — by default
``"not-analysed"``: for a model validated only on children, an unknown age is not evidence of a
child, and an adult's radiograph classified by a paediatric model gives a confident, wrong answer
(docs/model.md, "Intended use"). The reason names the rule and the DICOM source of the age, never
the age or birth date itself (it reaches the audit trail and the EHR, and must stay out of logs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from pydicom.dataset import Dataset

from conf.settings import InferenceSettings
from inference.errors import ApplicabilityConfigError
from inference.intended_use import FRONTAL_VIEW_CODES, IntendedUse
from inference.patient_age import PatientAge, patient_age

#: What to do with an image whose patient age cannot be established (docs/model.md).
UnknownAge = Literal["not-analysed", "analyse"]

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
    #: Largest accepted Bits Stored.
    max_bits_stored: int = 16
    #: View Code Sequence (0054,0220) codes standing in for an absent View Position.
    view_codes: Mapping[tuple[str, str], str] = field(default_factory=lambda: MappingProxyType(dict(FRONTAL_VIEW_CODES)))
    #: Accepted patient ages in years, ``[min_age_years, max_age_years)``; None = no bound.
    min_age_years: float | None = None
    max_age_years: float | None = None
    #: When a bound is set and the header does not give the age: "not-analysed" or "analyse".
    unknown_age: UnknownAge = "not-analysed"

    def __post_init__(self) -> None:
        """Validate the limits when built (docs/architecture.md §6.3), naming the argument."""
        if not 1 <= self.min_image_side <= self.max_image_side:
            raise ValueError(
                f'Arguments "min_image_side" ({self.min_image_side}) and "max_image_side" '
                f"({self.max_image_side}) must satisfy 1 <= min <= max."
            )
        if not self.max_aspect_ratio >= 1.0:
            raise ValueError(f'Argument "max_aspect_ratio" must be >= 1, got {self.max_aspect_ratio!r}.')
        if not 1 <= self.min_bits_stored <= self.max_bits_stored <= 16:
            raise ValueError(
                f'Arguments "min_bits_stored" ({self.min_bits_stored}) and "max_bits_stored" '
                f"({self.max_bits_stored}) must satisfy 1 <= min <= max <= 16."
            )
        for name in ("min_age_years", "max_age_years"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 150:
                raise ValueError(f'Argument "{name}" must be within [0, 150] years, got {value!r}.')
        if (
            self.min_age_years is not None
            and self.max_age_years is not None
            and not self.min_age_years < self.max_age_years
        ):
            raise ValueError(
                f'Arguments "min_age_years" ({self.min_age_years}) and "max_age_years" '
                f"({self.max_age_years}) must satisfy min < max."
            )
        if self.unknown_age not in ("not-analysed", "analyse"):
            raise ValueError(f'Argument "unknown_age" must be "not-analysed" or "analyse", got {self.unknown_age!r}.')

    @property
    def checks_age(self) -> bool:
        """Whether any age bound applies."""
        return self.min_age_years is not None or self.max_age_years is not None


@dataclass(frozen=True, slots=True)
class SiteRules:
    """The site's overrides (``pneumo.toml`` ``[inference]``) of the model's intended use.

    Every ``None`` means "as the model's manifest declares"; :meth:`resolve` merges them with a
    model's :class:`~inference.intended_use.IntendedUse` into the :class:`ApplicabilityRules` that
    are checked. Kept apart from the model so that ``pneumo infer --model OTHER`` checks OTHER's
    population, not the bundled model's.
    """

    modalities: frozenset[str] | None = None
    body_parts: frozenset[str] | None = None
    view_positions: frozenset[str] | None = None
    photometric_interpretations: frozenset[str] | None = None
    min_bits_stored: int | None = None
    max_bits_stored: int | None = None
    min_age_years: float | None = None
    max_age_years: float | None = None
    unknown_age: UnknownAge = "not-analysed"
    require_single_frame: bool = True
    dx_for_presentation_only: bool = True
    reject_other_views: bool = True
    min_image_side: int = 224
    max_image_side: int = 8192
    max_aspect_ratio: float = 2.0

    def resolve(self, intended: IntendedUse) -> ApplicabilityRules:
        """The rules to check: each override, else the model's declaration. Raises ValueError
        (naming the argument) when the combination is invalid, e.g. min age >= max age."""

        def pick(override: frozenset[str] | None, declared: frozenset[str]) -> frozenset[str]:
            return declared if override is None else override

        return ApplicabilityRules(
            modalities=pick(self.modalities, intended.modalities),
            body_parts=pick(self.body_parts, intended.body_parts),
            view_positions=pick(self.view_positions, intended.view_positions),
            photometric_interpretations=pick(self.photometric_interpretations, intended.photometric_interpretations),
            require_single_frame=self.require_single_frame,
            dx_for_presentation_only=self.dx_for_presentation_only,
            reject_other_views=self.reject_other_views,
            min_image_side=self.min_image_side,
            max_image_side=self.max_image_side,
            max_aspect_ratio=self.max_aspect_ratio,
            min_bits_stored=intended.min_bits_stored if self.min_bits_stored is None else self.min_bits_stored,
            max_bits_stored=intended.max_bits_stored if self.max_bits_stored is None else self.max_bits_stored,
            view_codes=MappingProxyType(dict(intended.frontal_view_codes)),
            min_age_years=intended.min_age_years if self.min_age_years is None else self.min_age_years,
            max_age_years=intended.max_age_years if self.max_age_years is None else self.max_age_years,
            unknown_age=self.unknown_age,
        )


def resolve_rules(rules: ApplicabilityRules | SiteRules | None, intended: IntendedUse) -> ApplicabilityRules:
    """Explicit :class:`ApplicabilityRules` as given; site overrides (or None: none) merged with
    the model's intended use. None is the safe default: exactly what the model declares."""
    if isinstance(rules, ApplicabilityRules):
        return rules
    try:
        return (rules or SiteRules()).resolve(intended)
    except ValueError as exc:
        raise ApplicabilityConfigError(f"[inference] applicability overrides do not fit the model: {exc}") from exc


def _terms(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(v.strip().upper() for v in values)


def rules_from_settings(settings: InferenceSettings) -> SiteRules:
    """The ``[inference]`` applicability keys (docs/configuration.md) as :class:`SiteRules`;
    the pipeline merges them with the loaded model's intended use."""
    return SiteRules(
        modalities=_terms(settings.modalities),
        body_parts=_terms(settings.body_parts),
        view_positions=_terms(settings.view_positions),
        photometric_interpretations=_terms(settings.photometric_interpretations),
        min_bits_stored=settings.min_bits_stored,
        max_bits_stored=settings.max_bits_stored,
        min_age_years=settings.min_age_years,
        max_age_years=settings.max_age_years,
        unknown_age=settings.unknown_age,
        require_single_frame=settings.require_single_frame,
        dx_for_presentation_only=settings.dx_for_presentation_only,
        reject_other_views=settings.reject_other_views,
        min_image_side=settings.min_image_side,
        max_image_side=settings.max_image_side,
        max_aspect_ratio=settings.max_aspect_ratio,
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
    top = min(allocated or 16, rules.max_bits_stored)
    if stored is not None and not rules.min_bits_stored <= stored <= top:
        rule = "min_bits_stored" if stored < rules.min_bits_stored else "max_bits_stored"
        if stored >= rules.min_bits_stored and stored <= rules.max_bits_stored:
            rule = "Bits Allocated"
        return _no(f"Bits Stored {stored} is outside [{rules.min_bits_stored}, {top}] (rule {rule})")
    return None


def _frames(ds: Dataset) -> int | None:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _view(dataset: Dataset, rules: ApplicabilityRules) -> str:
    """View Position (0018,5101), else the first View Code Sequence (0054,0220) item mapped by
    ``rules.view_codes`` (a code not in the map gives "code SCHEME:VALUE"); "" when neither."""
    view = _text(dataset, "ViewPosition")
    if view:
        return view
    sequence = dataset.get("ViewCodeSequence")
    if not sequence:
        return ""
    item = sequence[0]
    scheme = str(item.get("CodingSchemeDesignator", "")).strip().upper()
    value = str(item.get("CodeValue", "")).strip()
    if not value:
        return ""
    return rules.view_codes.get((scheme, value), f"code {scheme}:{value}")


def age_range_text(minimum: float | None, maximum: float | None) -> str:
    """``[1, 6)`` -> "1 to under 6 years" (pure; for reasons and documentation)."""
    if minimum is not None and maximum is not None:
        return f"{minimum:g} to under {maximum:g} years"
    if minimum is not None:
        return f"{minimum:g} years or older"
    return f"under {maximum:g} years"


def check_age(age: PatientAge | None, rules: ApplicabilityRules) -> Applicability | None:
    """The age rule alone (pure): None when it passes, else the not-applicable verdict."""
    if not rules.checks_age:
        return None
    wanted = age_range_text(rules.min_age_years, rules.max_age_years)
    if age is None:
        if rules.unknown_age == "analyse":
            return None
        return _no(
            "patient age unknown: neither Patient's Age (0010,1010) nor Patient's Birth Date (0010,0030) with a "
            f"study date gives it, and the model is intended for patients aged {wanted} (rule unknown_age)"
        )
    if age.within(rules.min_age_years, rules.max_age_years):
        return None
    if rules.min_age_years is not None and age.low < rules.min_age_years:
        where, rule = "below", "min_age_years"
    elif rules.max_age_years is not None and age.low >= rules.max_age_years:
        where, rule = "above", "max_age_years"
    else:
        where, rule = "not entirely within", "max_age_years"
    return _no(f"patient age (from {age.source}) is {where} the model's intended age range of {wanted} (rule {rule})")


def _no(reason: str) -> Applicability:
    return Applicability(applicable=False, reason=reason)


def _names(values: frozenset[str]) -> str:
    return ", ".join(sorted(values))


def assess(
    dataset: Dataset,
    rules: ApplicabilityRules | SiteRules | None = None,
    *,
    pixels_loaded: bool = False,
    intended: IntendedUse | None = None,
) -> Applicability:
    """Apply *rules* (default :class:`ApplicabilityRules`) to the header of *dataset*.

    :class:`SiteRules` are first merged with *intended* (default: the runtime's chest-radiograph
    declaration without an age range); the pipeline passes the loaded model's.

    ``pixels_loaded``: the dataset was read completely, so an absent Pixel Data element really
    means there is none. With ``stop_before_pixels`` Pixel Data is never in the dataset; then only
    the Image Pixel module attributes (Rows, Columns) are required.
    """
    if isinstance(rules, SiteRules):
        rules = resolve_rules(rules, intended or IntendedUse())
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
    view = _view(dataset, rules)
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
    age = check_age(patient_age(dataset), rules)
    if age is not None:
        return age
    return Applicability(applicable=True)
