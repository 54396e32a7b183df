"""C-FIND matching (PS3.4 C.2.2.2) and retrieve selection over the index, tables of identifiers,
on SQLite and PostgreSQL (the ``database`` fixture runs both)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from pynetdicom.dsutils import decode

from storage.db import Database
from storage.index import add_instance
from storage.metadata import extract_metadata
from storage.query import QueryError, find, parse_query, parse_retrieve, retrieve_matches, wildcard_regex

# Query values are not stored values: wildcards and ranges trip pydicom's VR validation warnings.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

CR, CT, MR = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass(frozen=True)
class Archive:
    """UIDs of the fixture index: three patients, three studies, five series."""

    s1: str
    s2: str
    s3: str
    s1_cr: str
    s1_sr: str
    instances: dict[str, list[str]]  # series UID -> SOP Instance UIDs


def _add(database: Database, origin: str = "received", **attrs: Any) -> str:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = generate_uid()
    meta = extract_metadata(ds)
    with database.session() as session:
        add_instance(
            session, meta, transfer_syntax_uid="1.2.840.10008.1.2.1", relative_path=f"{ds.SOPInstanceUID}.dcm",
            size=1, sha256="0" * 64, origin=origin, calling_ae="T",
        )
    return str(ds.SOPInstanceUID)


@pytest.fixture
def archive(database: Database) -> Archive:
    s1, s2, s3 = generate_uid(), generate_uid(), generate_uid()
    s1_cr, s1_sr, s2_ct, s3_mr = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    p1 = {"PatientID": "P1", "PatientName": "Doe^Jane", "PatientSex": "F", "PatientBirthDate": "19700101"}
    s1_attrs = {**p1, "StudyInstanceUID": s1, "StudyDate": "20040315", "StudyTime": "101500",
                "AccessionNumber": "ACC1", "StudyDescription": "Chest PA", "StudyID": "7"}
    instances: dict[str, list[str]] = {}
    instances[s1_cr] = [
        _add(database, **s1_attrs, SeriesInstanceUID=s1_cr, Modality="CR", SOPClassUID=CR, SeriesNumber=1,
             BodyPartExamined="CHEST", InstanceNumber=n)
        for n in (1, 2)
    ]
    instances[s1_sr] = [
        _add(database, "generated", **s1_attrs, SeriesInstanceUID=s1_sr, Modality="SR",
             SOPClassUID=COMPREHENSIVE_3D_SR, SeriesNumber=99)
    ]
    instances[s2_ct] = [
        _add(database, PatientID="P2", PatientName="Müller^Hans", StudyInstanceUID=s2, StudyDate="20041231",
             StudyTime="235900", StudyDescription="Abdomen", SeriesInstanceUID=s2_ct, Modality="CT", SOPClassUID=CT)
    ]
    instances[s3_mr] = [
        _add(database, PatientID="P3", PatientName="doe^john", StudyInstanceUID=s3, StudyDate="20050101",
             SeriesInstanceUID=s3_mr, Modality="MR", SOPClassUID=MR)
    ]
    return Archive(s1, s2, s3, s1_cr, s1_sr, instances)


def _identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _with_raw(ds: Dataset, tag: int, vr: str, value: str) -> Dataset:
    """Add an element decoded from bytes, as off the wire: invalid values are kept as text."""
    encoded = value.encode("ascii") + (b" " if len(value) % 2 else b"")
    raw = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(encoded)) + encoded
    ds.update(decode(DicomBytesIO(raw), False, True))
    return ds


def _find(database: Database, identifier: Dataset) -> list[Dataset]:
    with database.read_session() as session:
        return list(find(session, identifier, retrieve_ae_title="PNEUMO"))


STUDY_CASES: list[tuple[dict[str, Any], set[str]]] = [
    ({}, {"s1", "s2", "s3"}),  # no matching keys: every study
    ({"StudyInstanceUID": ""}, {"s1", "s2", "s3"}),  # universal matching
    ({"PatientName": "*"}, {"s1", "s2", "s3"}),  # a lone "*" is universal
    ({"PatientName": "doe*"}, {"s1", "s3"}),  # PN: case-insensitive wildcard
    ({"PatientName": "DOE^JANE"}, {"s1"}),  # PN: case-insensitive single value
    ({"PatientName": "m?ller*"}, {"s2"}),  # "?" matches one (non-ASCII) character
    ({"PatientID": "P?"}, {"s1", "s2", "s3"}),
    ({"PatientID": "p1"}, set()),  # LO: case-sensitive
    ({"StudyDescription": "chest*"}, set()),
    ({"StudyDescription": "Chest*"}, {"s1"}),
    ({"StudyDescription": "Chest PA"}, {"s1"}),
    ({"AccessionNumber": "ACC1"}, {"s1"}),
    ({"StudyDate": "20040101-"}, {"s1", "s2", "s3"}),
    ({"StudyDate": "-20041231"}, {"s1", "s2"}),
    ({"StudyDate": "20040301-20040331"}, {"s1"}),
    ({"StudyDate": "20041231"}, {"s2"}),
    ({"StudyTime": "1000-1100"}, {"s1"}),
    ({"StudyTime": "-23"}, {"s1", "s2"}),  # "23" as upper bound means up to 23:59:59
    ({"StudyTime": "10"}, {"s1"}),  # a single time matches the span of its precision
    ({"StudyInstanceUID": ["s1", "s3"]}, {"s1", "s3"}),  # list of UID matching
    ({"ModalitiesInStudy": "CT"}, {"s2"}),
    ({"ModalitiesInStudy": "SR"}, {"s1"}),  # our generated report is part of the study
    ({"ModalitiesInStudy": ["MR", "CT"]}, {"s2", "s3"}),
    ({"PatientName": "doe*", "StudyDate": "2005*"}, None),  # wildcard in a date: refused
    ({"PatientName": "doe*", "StudyDate": "20050101-"}, {"s3"}),  # keys combine with AND
    ({"Modality": "CT"}, {"s1", "s2", "s3"}),  # series key at study level: ignored (lenient)
]


def _resolve(archive: Archive, value: Any) -> Any:
    names = {"s1": archive.s1, "s2": archive.s2, "s3": archive.s3}
    if isinstance(value, list):
        return [names.get(v, v) for v in value]
    return names.get(value, value)


@pytest.mark.parametrize(("keys", "expected"), STUDY_CASES)
def test_study_level_matching(database: Database, archive: Archive, keys: dict[str, Any], expected: set[str] | None) -> None:
    identifier = _identifier("STUDY", **{"StudyInstanceUID": "", **{k: _resolve(archive, v) for k, v in keys.items()}})
    if expected is None:
        with pytest.raises(QueryError):
            _find(database, identifier)
        return
    found = {str(r.StudyInstanceUID) for r in _find(database, identifier)}
    assert found == {_resolve(archive, name) for name in expected}


def test_study_response_fills_requested_keys_and_counts(database: Database, archive: Archive) -> None:
    identifier = _identifier(
        "STUDY", StudyInstanceUID=archive.s1, PatientName="", PatientID="", StudyDate="", AccessionNumber="",
        ModalitiesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
        SOPClassesInStudy="", SeriesInstanceUID="", StationName="",
    )
    [response] = _find(database, identifier)
    assert response.QueryRetrieveLevel == "STUDY" and response.RetrieveAETitle == "PNEUMO"
    assert str(response.PatientName) == "Doe^Jane" and response.PatientID == "P1"
    assert response.StudyDate == "20040315" and response.AccessionNumber == "ACC1"
    assert list(response.ModalitiesInStudy) == ["CR", "SR"]
    assert int(response.NumberOfStudyRelatedSeries) == 2
    assert int(response.NumberOfStudyRelatedInstances) == 3
    assert set(response.SOPClassesInStudy) == {CR, COMPREHENSIVE_3D_SR}
    assert response.SeriesInstanceUID in ("", None)  # lower level key: returned empty
    assert "StationName" in response and not response.StationName  # unsupported key: empty
    assert "SpecificCharacterSet" not in response  # all ASCII: default repertoire


def test_non_ascii_response_declares_utf8(database: Database, archive: Archive) -> None:
    [response] = _find(database, _identifier("STUDY", StudyInstanceUID=archive.s2, PatientName=""))
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert str(response.PatientName) == "Müller^Hans"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"StudyInstanceUID": "s1"}, {"s1_cr", "s1_sr"}),
        ({"StudyInstanceUID": "s1", "Modality": "SR"}, {"s1_sr"}),
        ({"Modality": "C?"}, {"s1_cr", "s2_ct"}),
        ({"StudyInstanceUID": "s1", "SeriesNumber": "99"}, {"s1_sr"}),
        ({"PatientID": "P3"}, {"s3_mr"}),  # a study-level key at series level (extended)
    ],
)
def test_series_level_matching(database: Database, archive: Archive, keys: dict[str, Any], expected: set[str]) -> None:
    series_names = {"s1_cr": archive.s1_cr, "s1_sr": archive.s1_sr}
    identifier = _identifier(
        "SERIES", SeriesInstanceUID="", NumberOfSeriesRelatedInstances="",
        **{k: _resolve(archive, v) for k, v in keys.items()},
    )
    responses = _find(database, identifier)
    found = {str(r.SeriesInstanceUID) for r in responses}
    by_name = {name: series_names.get(name) for name in expected}
    modality_of = {uid: name for name, uid in by_name.items() if uid}
    assert len(found) == len(expected)
    for response in responses:
        if str(response.SeriesInstanceUID) in modality_of:
            name = modality_of[str(response.SeriesInstanceUID)]
            assert int(response.NumberOfSeriesRelatedInstances) == len(archive.instances[series_names[name]])


def test_image_level_with_uid_list(database: Database, archive: Archive) -> None:
    wanted = archive.instances[archive.s1_cr]
    identifier = _identifier(
        "IMAGE", StudyInstanceUID=archive.s1, SeriesInstanceUID=archive.s1_cr, SOPInstanceUID=wanted,
        SOPClassUID="", InstanceNumber="",
    )
    responses = _find(database, identifier)
    assert sorted(str(r.SOPInstanceUID) for r in responses) == sorted(wanted)
    assert {str(r.SOPClassUID) for r in responses} == {CR}
    assert sorted(int(r.InstanceNumber) for r in responses) == [1, 2]


@pytest.mark.parametrize(
    ("level", "tag", "vr", "value"),
    [
        ("PATIENT", 0x00100020, "LO", ""),  # not a Study Root level
        ("", 0x0020000D, "UI", ""),
        ("STUDY", 0x0020000D, "UI", "1.2.*"),  # no wildcards in UIDs
        ("STUDY", 0x00080020, "DA", "2004-01-01-2005"),
        ("SERIES", 0x00200011, "IS", "one"),
    ],
)
def test_unusable_identifiers_are_refused(level: str, tag: int, vr: str, value: str) -> None:
    with pytest.raises(QueryError):
        parse_query(_with_raw(_identifier(level), tag, vr, value))


def test_retrieve_selects_every_instance_of_the_study_including_generated(database: Database, archive: Archive) -> None:
    with database.read_session() as session:
        matches = retrieve_matches(session, _identifier("STUDY", StudyInstanceUID=[archive.s1, archive.s3]))
    expected = {*archive.instances[archive.s1_cr], *archive.instances[archive.s1_sr]}
    assert {m.sop_instance_uid for m in matches if m.study_instance_uid == archive.s1} == expected
    assert {m.study_instance_uid for m in matches} == {archive.s1, archive.s3}
    sr = next(m for m in matches if m.sop_class_uid == COMPREHENSIVE_3D_SR)
    assert sr.patient_id == "P1" and sr.accession_number == "ACC1" and sr.path.endswith(".dcm")


def test_retrieve_needs_the_unique_key_of_its_level() -> None:
    with pytest.raises(QueryError):
        parse_retrieve(_identifier("STUDY", PatientID="P1"))  # would otherwise move a whole patient
    with pytest.raises(QueryError):
        parse_retrieve(_identifier("SERIES", StudyInstanceUID="1.2.3"))
    assert parse_retrieve(_identifier("IMAGE", SOPInstanceUID=["1.2.3", "1.2.4"])).unique_values == {
        "SOPInstanceUID": ("1.2.3", "1.2.4")
    }


@pytest.mark.parametrize(
    ("value", "insensitive", "expected"),
    [
        ("ab*", False, "^ab.*$"),
        ("a?c", False, "^a.c$"),
        ("a.b^c", False, "^a\\.b\\^c$"),
        ("Do*", True, "^[dD][oO].*$"),
        ("1 2", False, "^1\\ 2$"),
    ],
)
def test_wildcard_regex(value: str, insensitive: bool, expected: str) -> None:
    assert wildcard_regex(value, case_insensitive=insensitive) == expected
