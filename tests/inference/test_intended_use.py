"""The model's intended use: manifest declaration, site overrides, the age rule (issue 11)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from conf.settings import InferenceSettings, load_settings
from inference.applicability import (
    ApplicabilityRules,
    SiteRules,
    age_range_text,
    assess,
    check_age,
    resolve_rules,
    rules_from_settings,
)
from inference.errors import ApplicabilityConfigError, ModelPackageError
from inference.intended_use import FRONTAL_VIEW_CODES, IntendedUse, parse_intended_use
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from inference.patient_age import PatientAge

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "paediatric-cxr-example.dcm"
PAEDIATRIC = IntendedUse(min_age_years=1.0, max_age_years=6.0)


def _child(**attrs: object) -> Dataset:
    ds = Dataset()
    base: dict[str, object] = {
        "Modality": "CR",
        "BodyPartExamined": "CHEST",
        "ViewPosition": "AP",
        "PhotometricInterpretation": "MONOCHROME2",
        "SamplesPerPixel": 1,
        "Rows": 2048,
        "Columns": 2048,
        "BitsAllocated": 16,
        "BitsStored": 12,
        "PatientAge": "003Y",
    }
    base.update(attrs)
    for key, value in base.items():
        if value is not None:
            setattr(ds, key, value)
    return ds


# --------------------------------------------------------------------------- the manifest


def test_bundled_manifest_declares_children_of_one_to_five() -> None:
    intended = load_manifest(BUNDLED_MODEL_DIR).intended
    assert (intended.min_age_years, intended.max_age_years) == (1.0, 6.0)
    assert intended.modalities == {"CR", "DX"} and intended.body_parts == {"CHEST"}
    assert intended.view_positions == {"AP", "PA"}
    assert intended.frontal_view_codes[("SCT", "399348003")] == "AP"
    assert intended.frontal_view_codes[("SCT", "272479007")] == "PA"
    assert (intended.min_bits_stored, intended.max_bits_stored) == (8, 16)


def test_absent_declarations_mean_runtime_defaults_and_no_age_range() -> None:
    assert parse_intended_use({}) == IntendedUse()
    assert IntendedUse().frontal_view_codes == FRONTAL_VIEW_CODES


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"intended_population": []}, "'intended_population' must be an object"),
        ({"intended_population": {"min_age_years": "1"}}, "min_age_years' must be a number"),
        ({"intended_population": {"max_age_years": 200}}, "max_age_years' must be a number of years in [0, 150]"),
        ({"intended_population": {"min_age_years": 6, "max_age_years": 1}}, "min_age_years < max_age_years"),
        ({"intended_inputs": {"modalities": []}}, "'intended_inputs.modalities' must be a non-empty list"),
        ({"intended_inputs": {"min_bits_stored": 12, "max_bits_stored": 8}}, "min_bits_stored <= max_bits_stored"),
        ({"intended_inputs": {"max_bits_stored": 17}}, "'intended_inputs.max_bits_stored' must be an integer"),
        ({"intended_inputs": {"view_codes": [{"scheme": "SCT"}]}}, "view_codes' entry needs"),
    ],
)
def test_invalid_declarations_name_the_key(patch: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ModelPackageError) as info:
        parse_intended_use(patch)
    assert fragment in str(info.value)


def test_manifest_loader_rejects_a_bad_population(tmp_path: Path) -> None:
    raw = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())
    bad = copy.deepcopy(raw)
    bad["intended_population"]["max_age_years"] = "six"
    (tmp_path / "model.json").write_text(json.dumps(bad))
    (tmp_path / "model.onnx").symlink_to(BUNDLED_MODEL_DIR / "model.onnx")
    with pytest.raises(ModelPackageError, match="max_age_years"):
        load_manifest(tmp_path, verify_integrity=False)


# --------------------------------------------------------------------------- the age rule


RULES = ApplicabilityRules(min_age_years=1.0, max_age_years=6.0)


@pytest.mark.parametrize(
    ("age", "fragment"),
    [
        (PatientAge(3.0, 4.0, "Patient's Age (0010,1010)"), None),
        (PatientAge(5.0, 6.0, "Patient's Age (0010,1010)"), None),
        (PatientAge(1.0, 1.0, "Patient's Birth Date and Study Date"), None),
        (PatientAge(0.5, 0.58, "Patient's Age (0010,1010)"), "is below the model's intended age range of 1 to under 6 years"),
        (PatientAge(64.4, 64.4, "Patient's Birth Date and Study Date"), "(from Patient's Birth Date and Study Date) is above"),
        (PatientAge(6.0, 7.0, "Patient's Age (0010,1010)"), "is above the model's intended age range of 1 to under 6 years"),
        (None, "patient age unknown"),
    ],
)
def test_check_age_table(age: PatientAge | None, fragment: str | None) -> None:
    verdict = check_age(age, RULES)
    if fragment is None:
        assert verdict is None
    else:
        assert verdict is not None and not verdict.applicable
        assert verdict.reason is not None and fragment in verdict.reason


def test_unknown_age_policy_and_no_range() -> None:
    assert check_age(None, ApplicabilityRules(min_age_years=1.0, unknown_age="analyse")) is None
    assert check_age(None, ApplicabilityRules()) is None  # no range declared: age never checked
    straddles = check_age(PatientAge(5.0, 6.0, "Patient's Age (0010,1010)"), ApplicabilityRules(max_age_years=5.5))
    assert straddles is not None and "not entirely within" in (straddles.reason or "")


@pytest.mark.parametrize(
    ("low", "high", "text"),
    [(1.0, 6.0, "1 to under 6 years"), (0.5, None, "0.5 years or older"), (None, 18.0, "under 18 years")],
)
def test_age_range_text(low: float | None, high: float | None, text: str) -> None:
    assert age_range_text(low, high) == text


def test_reason_never_contains_the_age_or_birth_date() -> None:
    header = _child(PatientAge=None, PatientBirthDate="19400305", StudyDate="20040826")
    verdict = assess(header, RULES)
    assert not verdict.applicable and verdict.reason is not None
    for secret in ("1940", "19400305", "64"):
        assert secret not in verdict.reason


@pytest.mark.parametrize(
    ("attrs", "fragment"),
    [
        ({}, None),
        ({"PatientAge": "005Y"}, None),
        ({"PatientAge": "071M"}, None),
        ({"PatientAge": "072M"}, "above"),
        ({"PatientAge": "011M"}, "below"),
        ({"PatientAge": "030W"}, "below"),
        ({"PatientAge": "010D"}, "below"),
        ({"PatientAge": None, "PatientBirthDate": "20230101", "StudyDate": "20260101"}, None),
        ({"PatientAge": None, "PatientBirthDate": "20200101", "StudyDate": "20260101"}, "above"),
        ({"PatientAge": None}, "patient age unknown"),
        ({"PatientAge": "18Y"}, "patient age unknown"),  # malformed AS, no birth date
        # image-type rules come first: an adult's CT is refused for the modality
        ({"Modality": "CT", "PatientAge": "064Y"}, "modality CT"),
    ],
)
def test_assess_with_the_paediatric_rules(attrs: dict[str, object], fragment: str | None) -> None:
    verdict = assess(_child(**attrs), RULES, pixels_loaded=False)
    assert verdict.applicable is (fragment is None), verdict.reason
    if fragment is not None:
        assert verdict.reason is not None and fragment in verdict.reason


@pytest.mark.parametrize(
    ("code", "applicable", "fragment"),
    [
        (("SCT", "399348003"), True, None),  # antero-posterior
        (("SRT", "R-10214"), True, None),  # postero-anterior, legacy scheme
        (("SCT", "399198007"), False, "view position code SCT:399198007 is not one of AP, PA"),  # right lateral
    ],
)
def test_view_code_sequence_stands_in_for_view_position(code: tuple[str, str], applicable: bool, fragment: str | None) -> None:
    item = Dataset()
    item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = code[0], code[1], "view"
    ds = _child(ViewPosition=None, BodyPartExamined=None)
    ds.ViewCodeSequence = [item]
    verdict = assess(ds, RULES)
    assert verdict.applicable is applicable
    if fragment:
        assert verdict.reason is not None and fragment in verdict.reason


# --------------------------------------------------------------------------- site overrides


def test_site_rules_default_to_the_model_declaration() -> None:
    rules = SiteRules().resolve(PAEDIATRIC)
    assert (rules.min_age_years, rules.max_age_years, rules.unknown_age) == (1.0, 6.0, "not-analysed")
    assert rules.modalities == {"CR", "DX"}


def test_site_rules_override_each_declaration() -> None:
    site = SiteRules(min_age_years=0.0, max_age_years=150.0, unknown_age="analyse", modalities=frozenset({"DX"}),
                     max_bits_stored=12)
    rules = site.resolve(PAEDIATRIC)
    assert (rules.min_age_years, rules.max_age_years, rules.unknown_age) == (0.0, 150.0, "analyse")
    assert rules.modalities == {"DX"} and rules.max_bits_stored == 12
    assert resolve_rules(rules, PAEDIATRIC) is rules  # explicit rules are used as given


def test_contradicting_overrides_are_refused() -> None:
    with pytest.raises(ApplicabilityConfigError, match="min_age_years"):
        resolve_rules(SiteRules(min_age_years=7.0), PAEDIATRIC)  # at or above the model's max 6


def test_settings_expose_the_rules(tmp_path: Path) -> None:
    config = tmp_path / "pneumo.toml"
    config.write_text(
        '[inference]\nmin_age_years = 0\nmax_age_years = 18\nunknown_age = "analyse"\n'
        'modalities = ["dx"]\nview_positions = ["PA"]\nreject_other_views = false\n'
    )
    site = rules_from_settings(load_settings(config).inference)
    assert site.min_age_years == 0 and site.max_age_years == 18 and site.unknown_age == "analyse"
    assert site.modalities == {"DX"} and site.view_positions == {"PA"} and site.reject_other_views is False
    assert site.body_parts is None  # not set: the model's
    defaults = rules_from_settings(InferenceSettings())
    assert defaults == SiteRules(min_bits_stored=None)


@pytest.mark.parametrize(
    "section",
    [
        {"min_age_years": 6, "max_age_years": 1},
        {"unknown_age": "guess"},
        {"max_age_years": -1},
        {"min_bits_stored": 12, "max_bits_stored": 8},
        {"age_range": [1, 6]},  # unknown key: a typo fails loudly
    ],
)
def test_settings_reject_invalid_rules(section: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        InferenceSettings(**section)


# --------------------------------------------------------------------------- real files


def test_adult_sample_is_refused_by_the_bundled_model_rules() -> None:
    header = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    verdict = assess(header, SiteRules(), intended=load_manifest(BUNDLED_MODEL_DIR).intended)
    assert not verdict.applicable
    assert verdict.reason == (
        "patient age (from Patient's Birth Date and Study Date) is above the model's intended age range "
        "of 1 to under 6 years (rule max_age_years)"
    )


def test_shipped_example_is_inside_the_intended_use() -> None:
    header = pydicom.dcmread(EXAMPLE, stop_before_pixels=True)
    assert assess(header, SiteRules(), intended=load_manifest(BUNDLED_MODEL_DIR).intended).applicable


def test_export_writes_the_same_declaration_for_the_next_model() -> None:
    from inference.training.export import INTENDED_INPUTS, INTENDED_POPULATION

    raw = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())
    assert raw["intended_population"] == INTENDED_POPULATION and raw["intended_inputs"] == INTENDED_INPUTS
