"""The indexing map (storage/metadata.py) on attacker-controlled headers: a value that is not
valid for its VR (PS3.5 §6.2) is indexed as absent, never stored (issue "Keep every promise under
attack and faults", rows 12 and 13)."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from storage.metadata import extract_metadata, is_valid_value


@pytest.mark.parametrize(
    ("vr", "value", "valid"),
    [
        ("DA", "19230405", True),
        ("DA", "05/04/1923", False),
        ("DA", "19231340", False),  # the pattern matches, the date does not exist
        ("DA", "", True),
        ("DA", None, True),
        ("TM", "185059", True),
        ("TM", "185059.123456", True),
        ("TM", "185059\x08\x00P\x00SH\n\x00ACC7774242", False),
        ("TM", "256000", False),
        ("DT", "20230405185059+0100", True),
        ("DT", "2023-04-05", False),
        ("CS", "M", True),
        ("CS", "m", False),
        ("SH", "ACC5551212", True),
        ("SH", "ACC\x00555", False),  # control characters are not in SH's repertoire
        ("SH", "A" * 17, False),
        ("SH", "ESC\x1b$B", True),  # ESC is allowed (ISO 2022 code extensions)
        ("LO", "x" * 64, True),
        ("LO", "x" * 65, False),
        ("LT", "line one\r\nline two", True),
        ("LT", "bell\x07", False),
        ("PN", "Doe^Jane", True),
        ("PN", "A=B=C=D", False),
        ("PN", "Doe\x00Jane", False),
        ("DS", "1.5", True),
        ("IS", "12", True),
        ("IS", "twelve", False),
        ("US", 512, True),
        ("US", -1, False),
        ("DA", ["19230405", "bad"], False),
        ("DA", ["19230405", "19240101"], True),
    ],
)
def test_is_valid_value(vr: str, value: object, valid: bool) -> None:
    assert is_valid_value(vr, value) is valid


@pytest.fixture(scope="module")
def header() -> Dataset:
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length", "ignore:The number of PN")
@pytest.mark.parametrize(
    ("keyword", "value", "field"),
    [
        ("PatientBirthDate", "05/04/1923", "patient_birth_date"),
        ("StudyDate", "2023-04-05", "study_date"),
        ("StudyTime", "185059\x08\x00P\x00SH\n\x00ACC7774242", "study_time"),
        ("AccessionNumber", "ACC\x00555", "accession_number"),
        ("AccessionNumber", "A" * 17, "accession_number"),
        ("PatientSex", "m", "patient_sex"),
        ("PatientName", "A=B=C=D", "patient_name"),
    ],
)
def test_invalid_values_are_indexed_as_absent(header: Dataset, keyword: str, value: str, field: str) -> None:
    bad = copy.deepcopy(header)
    setattr(bad, keyword, value)
    meta = extract_metadata(bad)
    assert getattr(meta, field) is None
    assert meta.patient_id == str(header.PatientID)  # the rest of the header still indexes


def test_valid_values_are_indexed(header: Dataset) -> None:
    meta = extract_metadata(header)
    assert meta.patient_birth_date == str(header.PatientBirthDate)
    assert meta.study_time == str(header.StudyTime)
    assert meta.accession_number == str(header.AccessionNumber)
    assert meta.modality == "CR" and meta.body_part_examined == "CHEST"
