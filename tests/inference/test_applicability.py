"""Applicability rules on real samples and on tables of synthetic headers."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from inference.applicability import Applicability, ApplicabilityRules, assess


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
