"""Applicability rules on real samples and on tables of synthetic headers."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from conf.settings import InferenceSettings
from inference.applicability import Applicability, ApplicabilityRules, assess, rules_from_settings


def _header(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def test_chest_pa_cr_is_applicable() -> None:
    assert assess(_header("RG1_UNCR.dcm")) == Applicability(applicable=True, reason=None)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("RG3_UNCR.dcm", "body part EXTREMITY"),  # CR, View Position AP, but not a chest
        ("MR2_UNCR.dcm", "modality MR"),
        ("US1_UNCR.dcm", "modality US"),
        ("CT_small.dcm", "modality CT"),
    ],
)
def test_real_samples_not_applicable(name: str, fragment: str) -> None:
    verdict = assess(_header(name))
    assert not verdict.applicable
    assert verdict.reason is not None and fragment in verdict.reason


def _ds(**attrs: object) -> Dataset:
    ds = Dataset()
    base: dict[str, object] = {
        "Modality": "DX",
        "BodyPartExamined": "CHEST",
        "ViewPosition": "PA",
        "PhotometricInterpretation": "MONOCHROME2",
        "SamplesPerPixel": 1,
        "Rows": 2048,
        "Columns": 2048,
        "PresentationIntentType": "FOR PRESENTATION",
    }
    base.update(attrs)
    for key, value in base.items():
        if value is not None:
            setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("attrs", "fragment"),
    [
        ({}, None),
        ({"Modality": "CR", "PresentationIntentType": None}, None),
        ({"PresentationIntentType": None}, None),
        ({"BodyPartExamined": None, "ViewPosition": "AP"}, None),
        ({"ViewPosition": None}, None),
        ({"BodyPartExamined": "CHEST "}, None),
        ({"PhotometricInterpretation": "MONOCHROME1"}, None),
        ({"NumberOfFrames": 1}, None),
        ({"Modality": "MG"}, "modality MG"),
        ({"Modality": None}, "modality (absent)"),
        ({"PresentationIntentType": "FOR PROCESSING"}, "FOR PROCESSING"),
        ({"BodyPartExamined": "ABDOMEN"}, "body part ABDOMEN"),
        ({"BodyPartExamined": None, "ViewPosition": None}, "view position (absent)"),
        ({"BodyPartExamined": None, "ViewPosition": "LL"}, "view position LL"),
        ({"ViewPosition": "LL"}, "not frontal"),
        ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "RGB"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "PALETTE COLOR"),
        ({"NumberOfFrames": 3}, "multi-frame"),
        ({"Rows": None}, "Rows/Columns"),
        # Sanity limits of the Image Pixel module (issue row 14: a 1x1 DX chest was classified).
        ({"Rows": 1, "Columns": 1}, "image too small: 1x1 pixels, below 224 a side (rule min_image_side)"),
        ({"Rows": 223}, "rule min_image_side"),
        ({"Rows": 224, "Columns": 224}, None),
        ({"Rows": 256, "Columns": 256}, None),
        ({"Columns": 8193}, "rule max_image_side"),
        ({"Rows": 8192, "Columns": 8192}, None),
        ({"Rows": 600, "Columns": 2048}, "aspect ratio 3.41 above 2 (rule max_aspect_ratio)"),
        ({"Rows": 1024, "Columns": 2048}, None),
        ({"BitsAllocated": 16, "BitsStored": 12}, None),
        ({"BitsAllocated": 8, "BitsStored": 8}, None),
        ({"BitsAllocated": 1, "BitsStored": 1}, "Bits Allocated 1 is not 8 or 16"),
        ({"BitsAllocated": 32, "BitsStored": 32}, "Bits Allocated 32"),
        ({"BitsAllocated": 16, "BitsStored": 4}, "Bits Stored 4 is outside [8, 16] (rule min_bits_stored)"),
        ({"BitsAllocated": 8, "BitsStored": 12}, "Bits Stored 12 is outside [8, 8]"),
    ],
)
def test_rule_table(attrs: dict[str, object], fragment: str | None) -> None:
    verdict = assess(_ds(**attrs))
    if fragment is None:
        assert verdict == Applicability(True, None)
    else:
        assert not verdict.applicable
        assert verdict.reason is not None and fragment in verdict.reason


def test_missing_pixel_data_only_known_after_full_read() -> None:
    ds = _ds()
    assert assess(ds).applicable  # a stop_before_pixels header cannot tell
    verdict = assess(ds, pixels_loaded=True)
    assert not verdict.applicable and "pixel data" in (verdict.reason or "")


def test_rules_are_configurable() -> None:
    ds = _ds(BodyPartExamined="THORAX")
    assert not assess(ds).applicable
    rules = ApplicabilityRules(body_parts=frozenset({"CHEST", "THORAX"}))
    assert assess(ds, rules).applicable
    assert assess(_ds(PresentationIntentType="FOR PROCESSING"),
                  ApplicabilityRules(dx_for_presentation_only=False)).applicable
    assert assess(_ds(ViewPosition="LL"), ApplicabilityRules(reject_other_views=False)).applicable
    assert assess(_ds(Modality="MG"), ApplicabilityRules(modalities=frozenset({"MG"}))).applicable


def test_size_limits_come_from_settings() -> None:
    """The ``[inference]`` keys (docs/configuration.md) set the sanity limits."""
    small = _ds(Rows=128, Columns=128)
    assert not assess(small, rules_from_settings(InferenceSettings())).applicable
    relaxed = rules_from_settings(InferenceSettings(min_image_side=64, max_aspect_ratio=4.0, min_bits_stored=1))
    assert assess(small, relaxed).applicable
    assert assess(_ds(Rows=600, Columns=2048), relaxed).applicable
    assert assess(_ds(BitsAllocated=8, BitsStored=1), relaxed).applicable
    assert not assess(_ds(Rows=600, Columns=2048), ApplicabilityRules(max_aspect_ratio=3.0)).applicable


@pytest.mark.parametrize(
    ("limits", "argument"),
    [
        ({"min_image_side": 0}, "min_image_side"),
        ({"min_image_side": 512, "max_image_side": 256}, "max_image_side"),
        ({"max_aspect_ratio": 0.5}, "max_aspect_ratio"),
        ({"max_aspect_ratio": float("nan")}, "max_aspect_ratio"),
        ({"min_bits_stored": 17}, "min_bits_stored"),
    ],
)
def test_rules_validate_their_limits(limits: dict[str, float], argument: str) -> None:
    with pytest.raises(ValueError, match=f'"{argument}"'):
        ApplicabilityRules(**limits)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Invalid value length")
def test_non_integer_rows_is_not_an_image() -> None:
    ds = _ds()
    ds.add_new(0x00280010, "US", b"\x01")  # odd-length US: not an integer (malformed header)
    verdict = assess(ds)
    assert not verdict.applicable and "Rows/Columns" in (verdict.reason or "")
