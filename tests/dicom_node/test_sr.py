"""Tests for the AI result SR (TID 1500, IHE AIR) and the AiResult domain object.

Built from a real CR chest PA (pydicom-data RG1_UNCR.dcm), checked with the same tools a PACS
vendor would use: dciodvfy (dicom3tools) for IOD conformance and dsrdump (DCMTK) for SR parsing.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.ai_result import AiResult, AiResultError
from dicom_node.sr import (
    COMPREHENSIVE_3D_SR_SOP_CLASS_UID,
    SrBuildError,
    SrParseError,
    build_ai_sr,
    read_ai_sr,
)
from storage.uids import derive_uid

DCIODVFY = shutil.which("dciodvfy")
DSRDUMP = shutil.which("dsrdump")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
needs_dsrdump = pytest.mark.skipif(DSRDUMP is None, reason="dsrdump (DCMTK) is not installed")

COPIED_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)
COMPLETED = datetime.datetime(2026, 11, 28, 5, 0, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def source() -> Dataset:
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "pydicom-data sample RG1_UNCR.dcm is missing"
    return pydicom.dcmread(path)


def make_result(**overrides: Any) -> AiResult:
    values: dict[str, Any] = {
        "probability": 0.8734,
        "threshold": 0.5,
        "model_id": "pneumo-densenet121",
        "model_name": "PneumoNet",
        "model_version": "1.2.0",
        "manufacturer": "Pneumo Gateway project",
        "device_uid": "2.25.123456789012345678901234567890",
        "intended_use": "Research use only; not for diagnostic use.",
        "completed_at": COMPLETED,
    }
    values.update(overrides)
    return AiResult(**values)


def write(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_lines(path: Path) -> list[str]:
    """Run dciodvfy; print everything it says (warnings stay visible), return the lines."""
    assert DCIODVFY is not None
    completed = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (completed.stdout + completed.stderr).splitlines()
    print(f"dciodvfy {path.name}:", *lines, sep="\n  ")
    return lines


# ------------------------------------------------------------------------------ AiResult


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"probability": -0.01}, "probability"),
        ({"probability": 1.0001}, "probability"),
        ({"probability": float("nan")}, "probability"),
        ({"probability": True}, "probability"),
        ({"probability": "0.5"}, "probability"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"model_id": ""}, "model_id"),
        ({"model_name": "x" * 65}, "model_name"),
        ({"model_name": "Pneumo\\Net"}, "model_name"),
        ({"model_version": " 1.2"}, "model_version"),
        ({"manufacturer": "ACME\n"}, "manufacturer"),
        ({"device_uid": "1.2.03"}, "device_uid"),
        ({"device_uid": "not-a-uid"}, "device_uid"),
        ({"intended_use": "   "}, "intended_use"),
        ({"intended_use": "x" * 1025}, "intended_use"),
        ({"cam": np.zeros((4,), dtype=np.float32)}, "cam"),
        ({"cam": np.zeros((4, 4), dtype=np.int16)}, "cam"),
        ({"cam": np.full((4, 4), np.nan, dtype=np.float32)}, "cam"),
        ({"cam": [[0.0]]}, "cam"),
        ({"completed_at": "2026-11-28"}, "completed_at"),
        (
            {"started_at": COMPLETED + datetime.timedelta(seconds=1), "completed_at": COMPLETED},
            "completed_at",
        ),
    ],
)
def test_ai_result_rejects_bad_arguments_naming_them(overrides: dict[str, Any], argument: str) -> None:
    with pytest.raises(AiResultError, match=f'"{argument}"'):
        make_result(**overrides)


@pytest.mark.parametrize(
    ("probability", "present"), [(0.0, False), (0.4999, False), (0.5, True), (1.0, True)]
)
def test_ai_result_present_is_derived_from_threshold(probability: float, present: bool) -> None:
    assert make_result(probability=probability).present is present


def test_ai_result_is_frozen_and_owns_a_read_only_cam() -> None:
    cam = np.ones((3, 3), dtype=np.float64)
    result = make_result(cam=cam)
    cam[0, 0] = 5.0
    assert result.cam is not None and result.cam.dtype == np.float32
    assert result.cam[0, 0] == 1.0
    assert not result.cam.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.probability = 0.1  # type: ignore[misc]
    init_values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.init}
    with pytest.raises(TypeError):  # "present" is derived, never passed
        AiResult(present=True, **init_values)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------- SR content


@pytest.mark.parametrize("probability", [0.0, 0.3, 0.5, 0.8734, 1.0])
def test_sr_is_valid_parses_and_round_trips(source: Dataset, tmp_path: Path, probability: float) -> None:
    result = make_result(probability=probability)
    path = write(build_ai_sr(source, result, institution_name="General Hospital"), tmp_path / "sr.dcm")

    content = read_ai_sr(pydicom.dcmread(path))
    assert len(content.findings) == 1
    finding = content.findings[0]
    assert finding.present is result.present
    assert finding.probability_percent == pytest.approx(probability * 100.0, abs=1e-6)
    assert finding.algorithm_name == "PneumoNet"
    assert finding.algorithm_version == "1.2.0"
    assert "threshold=0.5" in finding.algorithm_parameters
    assert finding.source_sop_class_uid == source.SOPClassUID
    assert finding.source_sop_instance_uid == source.SOPInstanceUID
    assert content.device_observer_uid == result.device_uid
    assert content.study_instance_uid == source.StudyInstanceUID

    if DCIODVFY is not None:
        errors = [line for line in dciodvfy_lines(path) if "Error" in line]
        assert errors == []
    if DSRDUMP is not None:
        dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60, check=False)
        assert dump.returncode == 0, dump.stderr
        text = dump.stdout
        assert '(233604007,SCT,"Pneumonia")' in text
        expected = '(52101004,SCT,"Present")' if result.present else '(272519000,SCT,"Absent")'
        assert f'CODE:(,,"Pneumonia")={expected}' in text
        assert '"Certainty of Finding")="' in text and '(%,UCUM,"Percent")' in text
        assert '(363679005,SCT,"Imaging procedure")' in text  # Procedure Reported, CID 100
        assert 'INFERRED FROM SCOORD' in text or 'SCOORD:' in text
        assert '(121007,DCM,"Device")' in text


@needs_dciodvfy
def test_sr_from_source_missing_type2_attributes_is_still_valid(source: Dataset, tmp_path: Path) -> None:
    sparse = copy.deepcopy(source)
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        delattr(sparse, keyword)
    sr = build_ai_sr(sparse, make_result())
    assert "PatientName" in sr and not sr.PatientName
    assert "AccessionNumber" in sr and not sr.AccessionNumber
    errors = [line for line in dciodvfy_lines(write(sr, tmp_path / "sparse.dcm")) if "Error" in line]
    assert errors == []


def test_sr_header_follows_design(source: Dataset) -> None:
    result = make_result()
    sr = build_ai_sr(
        source, result, institution_name="General Hospital", series_number=9911, instance_number=3
    )
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR_SOP_CLASS_UID
    assert sr.Modality == "SR"
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9911, 3)
    assert sr.SeriesInstanceUID == derive_uid(
        "sr-series", source.StudyInstanceUID, "pneumo-densenet121", "1.2.0"
    )
    assert sr.SOPInstanceUID == derive_uid("sr", source.SOPInstanceUID, "pneumo-densenet121", "1.2.0")
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.InstitutionName == "General Hospital"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert [c.CodeValue for c in sr.PerformedProcedureCodeSequence] == ["399208008"]

    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence[0].StudyInstanceUID == source.StudyInstanceUID
    series = evidence[0].ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    (equipment,) = sr.ContributingEquipmentSequence
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert equipment.Manufacturer == "Pneumo Gateway project"
    assert equipment.ManufacturerModelName == "PneumoNet"
    assert equipment.SoftwareVersions == "1.2.0"
    assert equipment.DeviceUID == result.device_uid

    # The source is EDT (-0400): an aware timestamp is written in the source's offset.
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20261128", "010000")
    assert sr.TimezoneOffsetFromUTC == "-0400"
    assert str(sr.InstanceCreationDate) == str(sr.ContentDate)


def test_sr_copies_patient_and_study_attributes(source: Dataset) -> None:
    with_issuer = copy.deepcopy(source)
    with_issuer.IssuerOfPatientID = "HOSP-MRN"
    sr = build_ai_sr(with_issuer, make_result())
    for keyword in (*COPIED_ATTRIBUTES, "IssuerOfPatientID"):
        assert sr[keyword].value == with_issuer[keyword].value, keyword
    assert "PixelData" not in sr


def test_sr_is_deterministic_and_model_version_changes_uids(source: Dataset, tmp_path: Path) -> None:
    first = write(build_ai_sr(source, make_result()), tmp_path / "a.dcm").read_bytes()
    again = write(build_ai_sr(source, make_result()), tmp_path / "b.dcm").read_bytes()
    assert first == again

    base = build_ai_sr(source, make_result())
    newer = build_ai_sr(source, make_result(model_version="1.3.0"))
    assert newer.SOPInstanceUID != base.SOPInstanceUID
    assert newer.SeriesInstanceUID != base.SeriesInstanceUID

    other_image = copy.deepcopy(source)
    other_image.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    sibling = build_ai_sr(other_image, make_result())
    assert sibling.SOPInstanceUID != base.SOPInstanceUID
    assert sibling.SeriesInstanceUID == base.SeriesInstanceUID  # same study, same model: same series


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ds: delattr(ds, "SOPInstanceUID"), "SOPInstanceUID"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2.abc"), "StudyInstanceUID"),
        (lambda ds: delattr(ds, "Rows"), "Rows"),
    ],
)
def test_sr_refuses_unreferenceable_source(source: Dataset, edit: Any, message: str) -> None:
    broken = copy.deepcopy(source)
    edit(broken)
    with pytest.raises(SrBuildError, match=message):
        build_ai_sr(broken, make_result())


def test_sr_refuses_bad_numbers_and_result(source: Dataset) -> None:
    with pytest.raises(SrBuildError, match="series_number"):
        build_ai_sr(source, make_result(), series_number=0)
    with pytest.raises(SrBuildError, match="result"):
        build_ai_sr(source, {"probability": 0.5})  # type: ignore[arg-type]


def test_read_ai_sr_rejects_other_objects(source: Dataset) -> None:
    with pytest.raises(SrParseError):
        read_ai_sr(source)


# ------------------------------------------------------------------- invalid source values


@pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length", "ignore:The string")
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientBirthDate", "05/04/1923"),  # not a DA (PS3.5 §6.2): highdicom's DA() raises
        ("PatientBirthDate", "19231340"),  # matches the DA pattern, is no date
        ("StudyDate", "2023-01-01"),
        ("StudyTime", "185059\x08\x00P\x00SH\n\x00ACC7774242"),  # a length that swallowed elements
        ("PatientSex", "X"),  # not an Enumerated Value (PS3.3 C.7.1.1): highdicom refuses it
        ("AccessionNumber", "ACC\x00555"),  # control character in SH
        ("AccessionNumber", "A" * 17),  # longer than SH allows
    ],
)
def test_invalid_source_values_are_written_empty_not_fatal(
    source: Dataset, tmp_path: Path, keyword: str, value: str
) -> None:
    """Issue row 12: a bad demographic value must not stop the report of a valid image.

    The value is written empty (all of these are Type 2, PS3.5 §7.4.3), in the SR and the SC.
    """
    from dicom_node.summary_image import build_summary_image

    bad = copy.deepcopy(source)
    setattr(bad, keyword, value)
    sr = build_ai_sr(bad, make_result())
    assert keyword in sr and sr[keyword].value in ("", None)
    back = pydicom.dcmread(write(sr, tmp_path / "sr.dcm"))
    assert back[keyword].value in ("", None) and back.PatientID == source.PatientID
    assert read_ai_sr(back).findings[0].source_sop_instance_uid == source.SOPInstanceUID
    sc = build_summary_image(bad, np.full((256, 256), 0.5, dtype=np.float32), make_result())
    assert keyword in sc and sc[keyword].value in ("", None)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_invalid_values_are_dropped_inside_sequences_too(source: Dataset) -> None:
    from dicom_node.sr import evidence_header

    bad = copy.deepcopy(source)
    item = Dataset()
    item.PatientID, item.IssuerOfPatientID, item.PatientBirthDate = "OTHER-1", "HOSP", "05/04/1923"
    bad.OtherPatientIDsSequence = [item]
    header = evidence_header(bad)
    copied = header.OtherPatientIDsSequence[0]
    assert copied.PatientID == "OTHER-1" and "PatientBirthDate" not in copied
    assert "PixelData" not in header and "PatientBirthDate" in header


def test_any_other_highdicom_refusal_is_a_build_error_without_the_value(
    source: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal of the source (InvalidInputError: a verdict), not a crash the job retries."""
    import highdicom

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise ValueError("Unable to convert '05/04/1923' to 'DA' object")

    monkeypatch.setattr(highdicom.sr, "Comprehensive3DSR", refuse)
    with pytest.raises(SrBuildError, match="highdicom refused the source header") as raised:
        build_ai_sr(source, make_result())
    assert "1923" not in str(raised.value)


# ----------------------------------------------------------------------------------- time zones


@pytest.fixture()
def system_tz(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set the process's TZ (as a site would) and restore it afterwards."""
    import time

    def use(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield use
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("tz", "date", "time", "offset"),
    [
        ("America/New_York", "20261128", "000000", "-0500"),  # 05:00 UTC, EST
        ("Europe/Berlin", "20261128", "060000", "+0100"),
        ("Asia/Kolkata", "20261128", "103000", "+0530"),
        ("UTC", "20261128", "050000", "+0000"),
    ],
)
def test_source_without_offset_gets_local_time_and_offset(
    source: Dataset, system_tz: Any, tz: str, date: str, time: str, offset: str
) -> None:
    """UTC wall-clock time used to be written as if local, with no offset (issue 13 item 3)."""
    system_tz(tz)
    untagged = copy.deepcopy(source)
    untagged.pop("TimezoneOffsetFromUTC", None)
    sr = build_ai_sr(untagged, make_result())
    assert (str(sr.ContentDate), str(sr.ContentTime)[:6], sr.TimezoneOffsetFromUTC) == (date, time, offset)
    assert (str(sr.InstanceCreationDate), str(sr.InstanceCreationTime)[:6]) == (date, time)


def test_summer_time_and_configured_site_zone(source: Dataset, system_tz: Any) -> None:
    from zoneinfo import ZoneInfo

    system_tz("America/New_York")
    untagged = copy.deepcopy(source)
    untagged.pop("TimezoneOffsetFromUTC", None)
    july = make_result(completed_at=datetime.datetime(2026, 7, 1, 2, 3, tzinfo=datetime.UTC))
    sr = build_ai_sr(untagged, july)
    assert (str(sr.ContentDate), str(sr.ContentTime)[:6], sr.TimezoneOffsetFromUTC) == ("20260630", "220300", "-0400")
    site = build_ai_sr(untagged, july, site_zone=ZoneInfo("Australia/Adelaide"))
    assert (str(site.ContentTime)[:6], site.TimezoneOffsetFromUTC) == ("113300", "+0930")


def test_source_offset_wins_over_the_site_zone(source: Dataset, system_tz: Any) -> None:
    system_tz("America/New_York")
    tagged = copy.deepcopy(source)
    tagged.TimezoneOffsetFromUTC = "+0900"
    sr = build_ai_sr(tagged, make_result())
    assert (str(sr.ContentTime)[:6], sr.TimezoneOffsetFromUTC) == ("140000", "+0900")
