"""FHIR R4 search parameters (fhir_api.search_params): the registry, index extraction from realistic
resources, parsing of query strings (strict and lenient), and the SQL semantics executed for real on
SQLite (every case) and PostgreSQL (all of them again in one test)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session

from conf.errors import InvalidInputError
from fhir_api.search_params import (
    MAX_DATE,
    MAX_VALUE_LENGTH,
    MIN_DATE,
    SEARCH_PARAMS,
    Filter,
    Include,
    IndexEntry,
    SearchRequest,
    SortKey,
    date_range,
    extract_index,
    filter_clause,
    normalise,
    parse_date,
    parse_search,
    sort_columns,
    sort_date,
)
from storage.models import Base, FhirResource, FhirResourceVersion, FhirSearchIndex


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]


def parse(resource_type: str, query: str, *, strict: bool = True, default_count: int = 20, max_count: int = 100) -> SearchRequest:
    pairs = parse_qsl(query, keep_blank_values=True)
    return parse_search(resource_type, pairs, strict=strict, default_count=default_count, max_count=max_count)


# ----------------------------------------------------------------------------------------- registry

EXPECTED_PARAMS = {
    "Patient": {"identifier", "name", "family", "given", "birthdate", "gender"},
    "ImagingStudy": {"identifier", "patient", "subject", "started", "status", "modality", "bodysite", "basedon"},
    "Device": {"identifier", "device-name", "manufacturer", "status"},
    "Observation": {
        "identifier",
        "patient",
        "subject",
        "status",
        "code",
        "category",
        "date",
        "device",
        "derived-from",
        "part-of",
        "value-concept",
    },
    "DiagnosticReport": {
        "identifier",
        "patient",
        "subject",
        "status",
        "code",
        "category",
        "date",
        "issued",
        "result",
        "performer",
        "conclusion",
        "imaging-study",
        "based-on",
    },
    "ServiceRequest": {"identifier", "patient", "subject", "status", "intent", "code", "category", "priority", "authored"},
    "Subscription": {"status", "type", "url", "criteria"},
}


def test_registry_has_the_params_of_each_type_and_the_common_ones() -> None:
    assert set(SEARCH_PARAMS) == set(EXPECTED_PARAMS)
    for resource_type, names in EXPECTED_PARAMS.items():
        assert set(SEARCH_PARAMS[resource_type]) == names | {"_id", "_lastUpdated"}
        assert SEARCH_PARAMS[resource_type]["_id"].type == "token"
        assert SEARCH_PARAMS[resource_type]["_lastUpdated"].type == "date"
        for name, definition in SEARCH_PARAMS[resource_type].items():
            assert definition.name == name
            assert definition.expression.startswith((resource_type, f"({resource_type}"))
            assert definition.documentation
            assert bool(definition.targets) == (definition.type == "reference"), name


@pytest.mark.parametrize(
    ("resource_type", "name", "type_", "expression", "targets"),
    [
        ("DiagnosticReport", "conclusion", "token", "DiagnosticReport.conclusionCode", ()),
        ("DiagnosticReport", "patient", "reference", "DiagnosticReport.subject.where(resolve() is Patient)", ("Patient",)),
        ("DiagnosticReport", "result", "reference", "DiagnosticReport.result", ("Observation",)),
        ("DiagnosticReport", "imaging-study", "reference", "DiagnosticReport.imagingStudy", ("ImagingStudy",)),
        ("Observation", "value-concept", "token", "(Observation.value as CodeableConcept)", ()),
        ("Observation", "date", "date", "Observation.effective", ()),
        ("ImagingStudy", "bodysite", "token", "ImagingStudy.series.bodySite", ()),
        ("Device", "device-name", "string", "Device.deviceName.name | Device.type.coding.display | Device.type.text", ()),
        ("Subscription", "type", "token", "Subscription.channel.type", ()),
        ("Subscription", "url", "uri", "Subscription.channel.endpoint", ()),
        ("Subscription", "criteria", "string", "Subscription.criteria", ()),
    ],
)
def test_registry_definitions_follow_r4(
    resource_type: str, name: str, type_: str, expression: str, targets: tuple[str, ...]
) -> None:
    definition = SEARCH_PARAMS[resource_type][name]
    assert (definition.type, definition.expression) == (type_, expression)
    if targets:
        assert definition.targets == targets


def test_imaging_study_param_is_documented_as_ours() -> None:
    assert "Not an R4 standard search parameter" in SEARCH_PARAMS["DiagnosticReport"]["imaging-study"].documentation


# ----------------------------------------------------------------------------------- realistic FHIR

STUDY_UID = "1.2.826.0.1.3680043.8.498.11"
DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"

PATIENT = {
    "resourceType": "Patient",
    "id": "pat-abc",
    "meta": {"versionId": "1", "lastUpdated": "2026-11-28T06:20:31.512Z"},
    "identifier": [{"system": "urn:oid:1.2.3.4", "value": "PID-0001"}],
    "name": [{"use": "official", "family": "Müller", "given": ["José", "Ana  María"], "text": "José Ana María MÜLLER"}],
    "gender": "female",
    "birthDate": "1956-02",
}

IMAGING_STUDY = {
    "resourceType": "ImagingStudy",
    "id": STUDY_UID,
    "identifier": [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
        {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": "ACC-0042",
        },
    ],
    "status": "available",
    "subject": {"reference": "Patient/pat-abc"},
    "started": "2026-11-28T07:10:00+01:00",
    "numberOfSeries": 2,
    "series": [
        {
            "uid": "1.2.826.0.1.3680043.8.498.12",
            "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"},
            "bodySite": {"system": "http://snomed.info/sct", "code": "51185008", "display": "Thorax"},
            "instance": [{"uid": "1.2.826.0.1.3680043.8.498.13", "sopClass": {"code": "urn:oid:1.2.840.10008.5.1.4.1.1.1"}}],
        },
        {
            "uid": "1.2.826.0.1.3680043.8.498.14",
            "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "SR"},
        },
    ],
}

OBSERVATION = {
    "resourceType": "Observation",
    "id": "obs-a",
    "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.15"}],
    "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}],
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}]},
    "subject": {"reference": "Patient/pat-abc"},
    "effectivePeriod": {"start": "2026-11-28T07:10:00+01:00"},
    "device": {"reference": f"Device/{DEVICE_UID}", "display": "Pneumo test model 1.0.0"},
    "derivedFrom": [{"reference": f"ImagingStudy/{STUDY_UID}"}],
    "partOf": [{"reference": f"ImagingStudy/{STUDY_UID}"}],
    "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "52101004", "display": "Present"}]},
    "component": [
        {
            "code": {"text": "Probability of pneumonia"},
            "valueQuantity": {"value": 83, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        }
    ],
}

DIAGNOSTIC_REPORT = {
    "resourceType": "DiagnosticReport",
    "id": STUDY_UID,
    "identifier": [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
        {"system": "http://hospital.example/accession", "value": "ACC-0042"},
    ],
    "status": "final",
    "category": [
        {
            "coding": [
                {"system": "http://loinc.org", "code": "LP29684-5", "display": "Radiology"},
                {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"},
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}]},
    "subject": {"reference": "Patient/pat-abc"},
    "effectiveDateTime": "2026-11-28T07:15:00+01:00",
    "issued": "2026-11-28T06:20:31.512Z",
    "performer": [{"reference": "Organization/org-1"}],
    "result": [
        {"reference": "Observation/obs-a"},
        {"reference": "https://pneumo.example/fhir/Observation/obs-b/_history/3"},
        {"reference": "#contained-1"},
    ],
    "imagingStudy": [{"reference": f"ImagingStudy/{STUDY_UID}"}],
    "conclusion": "AI: pneumonia 83 % (Pneumo test model 1.0.0)",
    "conclusionCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}]}],
}


def rows(entries: list[IndexEntry]) -> list[tuple[Any, ...]]:
    return [(e.param, e.system, e.value, e.low, e.high) for e in entries]


def test_extract_diagnostic_report() -> None:
    assert rows(extract_index("DiagnosticReport", DIAGNOSTIC_REPORT)) == [
        ("identifier", "urn:dicom:uid", f"urn:oid:{STUDY_UID}", None, None),
        ("identifier", "http://hospital.example/accession", "ACC-0042", None, None),
        ("patient", None, "Patient/pat-abc", None, None),
        ("subject", None, "Patient/pat-abc", None, None),
        ("status", None, "final", None, None),
        ("code", "http://loinc.org", "18748-4", None, None),
        ("category", "http://loinc.org", "LP29684-5", None, None),
        ("category", "http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", None, None),
        ("date", None, None, utc(2026, 11, 28, 6, 15), utc(2026, 11, 28, 6, 15, 1)),
        ("issued", None, None, utc(2026, 11, 28, 6, 20, 31, 512000), utc(2026, 11, 28, 6, 20, 31, 513000)),
        ("result", None, "Observation/obs-a", None, None),
        ("result", None, "Observation/obs-b", None, None),  # absolute and versioned: Type/id
        ("performer", None, "Organization/org-1", None, None),
        ("conclusion", "http://snomed.info/sct", "233604007", None, None),
        ("imaging-study", None, f"ImagingStudy/{STUDY_UID}", None, None),
    ]
    assert sort_date("DiagnosticReport", DIAGNOSTIC_REPORT) == utc(2026, 11, 28, 6, 15)


def test_extract_observation() -> None:
    assert rows(extract_index("Observation", OBSERVATION)) == [
        ("identifier", "urn:dicom:uid", "urn:oid:1.2.826.0.1.3680043.8.498.15", None, None),
        ("patient", None, "Patient/pat-abc", None, None),
        ("subject", None, "Patient/pat-abc", None, None),
        ("status", None, "final", None, None),
        ("code", "http://snomed.info/sct", "233604007", None, None),
        ("category", "http://terminology.hl7.org/CodeSystem/observation-category", "imaging", None, None),
        ("date", None, None, utc(2026, 11, 28, 6, 10), MAX_DATE),  # a Period without end: open above
        ("device", None, f"Device/{DEVICE_UID}", None, None),
        ("derived-from", None, f"ImagingStudy/{STUDY_UID}", None, None),
        ("part-of", None, f"ImagingStudy/{STUDY_UID}", None, None),
        ("value-concept", "http://snomed.info/sct", "52101004", None, None),
    ]
    assert sort_date("Observation", OBSERVATION) == utc(2026, 11, 28, 6, 10)


def test_extract_patient_names_are_normalised() -> None:
    assert rows(extract_index("Patient", PATIENT)) == [
        ("identifier", "urn:oid:1.2.3.4", "PID-0001", None, None),
        ("name", None, "muller", None, None),
        ("name", None, "jose", None, None),
        ("name", None, "ana maria", None, None),
        ("name", None, "jose ana maria muller", None, None),
        ("family", None, "muller", None, None),
        ("given", None, "jose", None, None),
        ("given", None, "ana maria", None, None),
        ("birthdate", None, None, utc(1956, 2, 1), utc(1956, 3, 1)),
        ("gender", None, "female", None, None),
    ]
    assert sort_date("Patient", PATIENT) is None


def test_extract_imaging_study() -> None:
    assert rows(extract_index("ImagingStudy", IMAGING_STUDY)) == [
        ("identifier", "urn:dicom:uid", f"urn:oid:{STUDY_UID}", None, None),
        ("identifier", None, "ACC-0042", None, None),  # an Identifier without system
        ("patient", None, "Patient/pat-abc", None, None),
        ("subject", None, "Patient/pat-abc", None, None),
        ("started", None, None, utc(2026, 11, 28, 6, 10), utc(2026, 11, 28, 6, 10, 1)),
        ("status", None, "available", None, None),
        ("modality", "http://dicom.nema.org/resources/ontology/DCM", "CR", None, None),
        ("modality", "http://dicom.nema.org/resources/ontology/DCM", "SR", None, None),
        ("bodysite", "http://snomed.info/sct", "51185008", None, None),
    ]
    assert sort_date("ImagingStudy", IMAGING_STUDY) == utc(2026, 11, 28, 6, 10)


def test_extract_edge_cases() -> None:
    group_subject = {**OBSERVATION, "subject": {"reference": "Group/g-1"}}
    params = [e.param for e in extract_index("Observation", group_subject)]
    assert "patient" not in params and "subject" in params  # patient only when the subject is a Patient
    long = {"resourceType": "Device", "id": "d", "identifier": [{"system": "s" * 300, "value": "v" * 300}]}
    [entry] = extract_index("Device", long)
    assert (len(entry.system or ""), len(entry.value or "")) == (MAX_VALUE_LENGTH, MAX_VALUE_LENGTH)
    bad_date = {"resourceType": "Patient", "id": "p", "birthDate": "28/11/1956"}
    assert extract_index("Patient", bad_date) == []  # skipped, not fatal
    period = {"resourceType": "Observation", "id": "o", "effectivePeriod": {"end": "2024-03"}}
    assert rows(extract_index("Observation", period)) == [("date", None, None, MIN_DATE, utc(2024, 4, 1))]
    assert extract_index("AuditEvent", {"resourceType": "AuditEvent"}) == []
    subscription = {
        "resourceType": "Subscription",
        "status": "active",
        "criteria": "DiagnosticReport?status=final",
        "channel": {"type": "rest-hook", "endpoint": "https://ehr.example/Hook"},
    }
    assert rows(extract_index("Subscription", subscription)) == [
        ("status", None, "active", None, None),
        ("type", None, "rest-hook", None, None),
        ("url", None, "https://ehr.example/Hook", None, None),  # uri: as written
        ("criteria", None, "diagnosticreport?status=final", None, None),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Müller", "muller"),
        ("  José   Ana\tMaría ", "jose ana maria"),
        ("ÅNGSTRÖM", "angstrom"),
        ("Straße", "strasse"),  # case-folded
        ("ﬁle", "file"),  # NFKD compatibility decomposition
        ("", ""),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


# -------------------------------------------------------------------------------------------- dates


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("2024", utc(2024, 1, 1), utc(2025, 1, 1)),
        ("2024-12", utc(2024, 12, 1), utc(2025, 1, 1)),
        ("2024-02", utc(2024, 2, 1), utc(2024, 3, 1)),
        ("2024-02-29", utc(2024, 2, 29), utc(2024, 3, 1)),
        ("2024-03-05T10:00+01:00", utc(2024, 3, 5, 9, 0), utc(2024, 3, 5, 9, 1)),
        ("2024-03-05T10:00:00+01:00", utc(2024, 3, 5, 9, 0), utc(2024, 3, 5, 9, 0, 1)),
        ("2024-03-05T10:00:00 01:00", utc(2024, 3, 5, 9, 0), utc(2024, 3, 5, 9, 0, 1)),  # '+' decoded as a space
        ("2024-03-05T23:30:00-02:00", utc(2024, 3, 6, 1, 30), utc(2024, 3, 6, 1, 30, 1)),
        ("2024-03-05T10:00:00Z", utc(2024, 3, 5, 10), utc(2024, 3, 5, 10, 0, 1)),
        ("2024-03-05T10:00:00", utc(2024, 3, 5, 10), utc(2024, 3, 5, 10, 0, 1)),  # no zone: UTC
        ("2024-03-05T10:00:00.5Z", utc(2024, 3, 5, 10, 0, 0, 500000), utc(2024, 3, 5, 10, 0, 0, 600000)),
        ("2024-03-05T10:00:00.123456789Z", utc(2024, 3, 5, 10, 0, 0, 123456), utc(2024, 3, 5, 10, 0, 0, 123457)),
        ("9999", utc(9999, 1, 1), MAX_DATE),
        ("9999-12-31", utc(9999, 12, 31), MAX_DATE),
    ],
)
def test_parse_date_ranges(text: str, low: dt.datetime, high: dt.datetime) -> None:
    assert parse_date(text) == (low, high)


@pytest.mark.parametrize(
    "text",
    [
        "24",
        "2024-3",
        "2024-13",
        "2024-02-30",
        "2024-03-05T10",
        "2024-03-05T25:00Z",
        "2024-03-05T10:00+15:00",
        "0000",
        "2024-03-05 10:00",
        "2024-03-05T10:00:00+0100",
        "yesterday",
        "",
    ],
)
def test_parse_date_rejects(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_date(text)


# ------------------------------------------------------------------------------------------ parsing

V = tuple[Any, ...]


def simplified(filters: tuple[Filter, ...]) -> list[tuple[str, str | None, list[V]]]:
    out = []
    for f in filters:
        values: list[V] = []
        for v in f.values:
            values.append((v.prefix, v.low, v.high) if f.type == "date" and f.modifier != "missing" else (v.system, v.value))
        out.append((f.param, f.modifier, values))
    return out


@pytest.mark.parametrize(
    ("resource_type", "query", "expected"),
    [
        ("DiagnosticReport", "status=final", [("status", None, [(None, "final")])]),
        ("DiagnosticReport", "code=http://loinc.org|18748-4", [("code", None, [("http://loinc.org", "18748-4")])]),
        ("DiagnosticReport", "code=|18748-4", [("code", None, [("", "18748-4")])]),
        ("DiagnosticReport", "code=http://loinc.org|", [("code", None, [("http://loinc.org", None)])]),
        ("DiagnosticReport", "code=a,b", [("code", None, [(None, "a"), (None, "b")])]),
        ("DiagnosticReport", "code=a,,b,", [("code", None, [(None, "a"), (None, "b")])]),
        ("DiagnosticReport", "code=a\\,b", [("code", None, [(None, "a,b")])]),
        ("DiagnosticReport", "code=s\\|x|a\\|b", [("code", None, [("s|x", "a|b")])]),
        ("DiagnosticReport", "code=x\\\\y,z\\$", [("code", None, [(None, "x\\y"), (None, "z$")])]),
        ("DiagnosticReport", "code:not=final", [("code", "not", [(None, "final")])]),
        ("DiagnosticReport", "status:missing=true", [("status", "missing", [(None, "true")])]),
        ("DiagnosticReport", "date:missing=false", [("date", "missing", [(None, "false")])]),
        ("DiagnosticReport", "subject=Patient/p1", [("subject", None, [(None, "Patient/p1")])]),
        ("DiagnosticReport", "subject=p1", [("subject", None, [(None, "p1")])]),  # several targets: expanded in SQL
        ("DiagnosticReport", "patient=p1", [("patient", None, [(None, "Patient/p1")])]),
        ("DiagnosticReport", "result=o1", [("result", None, [(None, "Observation/o1")])]),
        ("DiagnosticReport", "subject:Patient=p1", [("subject", "Patient", [(None, "Patient/p1")])]),
        ("DiagnosticReport", "subject=https://ehr.example/fhir/Patient/p1", [("subject", None, [(None, "Patient/p1")])]),
        ("DiagnosticReport", "subject=Patient/p1/_history/3", [("subject", None, [(None, "Patient/p1")])]),
        ("DiagnosticReport", "subject=urn:uuid:0f1e", [("subject", None, [(None, "urn:uuid:0f1e")])]),
        ("DiagnosticReport", "date=2024", [("date", None, [("eq", utc(2024, 1, 1), utc(2025, 1, 1))])]),
        (
            "DiagnosticReport",
            "date=ge2024-03-05T10:00:00%2B01:00",
            [("date", None, [("ge", utc(2024, 3, 5, 9), utc(2024, 3, 5, 9, 0, 1))])],
        ),
        ("DiagnosticReport", "date=lt2024-03-05T10:00", [("date", None, [("lt", utc(2024, 3, 5, 10), utc(2024, 3, 5, 10, 1))])]),
        ("DiagnosticReport", "issued=sa2024-12", [("issued", None, [("sa", utc(2024, 12, 1), utc(2025, 1, 1))])]),
        (
            "DiagnosticReport",
            "date=ge2024&date=le2025",
            [
                ("date", None, [("ge", utc(2024, 1, 1), utc(2025, 1, 1))]),
                ("date", None, [("le", utc(2025, 1, 1), utc(2026, 1, 1))]),
            ],
        ),
        (
            "DiagnosticReport",
            "date=eq2024,ap2025-06",
            [("date", None, [("eq", utc(2024, 1, 1), utc(2025, 1, 1)), ("ap", utc(2025, 6, 1), utc(2025, 7, 1))])],
        ),
        ("DiagnosticReport", "_id=abc,def", [("_id", None, [(None, "abc"), (None, "def")])]),
        ("DiagnosticReport", "_lastUpdated=gt2024-01-01", [("_lastUpdated", None, [("gt", utc(2024, 1, 1), utc(2024, 1, 2))])]),
        ("Patient", "name=Jos%C3%A9", [("name", None, [(None, "jose")])]),
        ("Patient", "name=++Ana+++MAR%C3%8DA+", [("name", None, [(None, "ana maria")])]),
        ("Patient", "family:exact=M%C3%BCller", [("family", "exact", [(None, "muller")])]),
        ("Patient", "given:contains=an", [("given", "contains", [(None, "an")])]),
        ("Patient", "name=+++", []),  # nothing left after normalisation: ignored
        (
            "Patient",
            "gender=female&birthdate=1956",
            [
                ("gender", None, [(None, "female")]),
                ("birthdate", None, [("eq", utc(1956, 1, 1), utc(1957, 1, 1))]),
            ],
        ),
        ("Subscription", "url=https://ehr.example/Hook", [("url", None, [(None, "https://ehr.example/Hook")])]),
        ("Subscription", "type=rest-hook", [("type", None, [(None, "rest-hook")])]),
        ("DiagnosticReport", "_format=json&_pretty=true&code=x", [("code", None, [(None, "x")])]),
        ("DiagnosticReport", "code=&date=", []),  # empty parameters are ignored
    ],
)
def test_parse_filters(resource_type: str, query: str, expected: list[Any]) -> None:
    for strict in (True, False):
        request = parse(resource_type, query, strict=strict)
        assert simplified(request.filters) == expected
        assert request.warnings == ()


@pytest.mark.parametrize(
    "query",
    [
        "date=2024-13",
        "date=2024-03-05T10",
        "date=24-03-05",
        "date=xx2024",
        "date=ge",
        "date=2024-02-30",
        "date=GE2024",
        "_lastUpdated=yesterday",
        "_count=abc",
        "_count=-1",
        "_count=1.5",
        "_count=%2B5",
        "status:missing=maybe",
        "code=a|b|c",
        "code=|",
        "code=a\\b",
        "code=a\\",
        "subject=a/b/c",
        "subject=Patient/",
        "subject:Patient=Patient/1",
        "code:below=x",
        "code:text=x",
        "date:exact=2024",
        "subject:Practitioner=1",
        "status:contains=x",
        "_summary=bogus",
        "_total=maybe",
        "_elements=a.b",
        "_include=DiagnosticReport",
        "_include=DiagnosticReport:",
        "_sort=-",
    ],
)
def test_invalid_values_are_errors_even_when_lenient(query: str) -> None:
    with pytest.raises(InvalidInputError):
        parse("DiagnosticReport", query, strict=True)
    with pytest.raises(InvalidInputError):
        parse("DiagnosticReport", query, strict=False)


@pytest.mark.parametrize(
    ("resource_type", "query", "survivor"),
    [
        ("DiagnosticReport", "foo=bar&status=final", "status"),
        ("DiagnosticReport", "name:exact=x&status=final", "status"),
        ("DiagnosticReport", "subject.name=x&status=final", "status"),  # chaining
        ("DiagnosticReport", "subject:Patient.name=x&status=final", "status"),
        ("DiagnosticReport", "_has:Observation:derived-from:code=x&status=final", "status"),
        ("DiagnosticReport", "_tag=x&status=final", "status"),
        ("DiagnosticReport", "_text=pneumonia&status=final", "status"),
        ("DiagnosticReport", "_sort=issued&status=final", "status"),
        ("Patient", "_sort=date&gender=male", "gender"),
        ("DiagnosticReport", "_include=DiagnosticReport:status&status=final", "status"),
        ("DiagnosticReport", "_include=DiagnosticReport:*&status=final", "status"),
        ("DiagnosticReport", "_include:iterate=Observation:device&status=final", "status"),
        ("DiagnosticReport", "_include:recurse=DiagnosticReport:result&status=final", "status"),
        ("DiagnosticReport", "_include=Observation:device&status=final", "status"),  # source must be the searched type
        ("DiagnosticReport", "_include=DiagnosticReport:result:Patient&status=final", "status"),
        ("DiagnosticReport", "_include=Nope:result&status=final", "status"),
        ("DiagnosticReport", "_revinclude=Observation:device&status=final", "status"),  # Device, not DiagnosticReport
        ("ImagingStudy", "_revinclude=Observation:derived-from:Observation&status=available", "status"),
        ("DiagnosticReport", "_summary=true&status=final", "status"),
        ("DiagnosticReport", "_summary=text&status=final", "status"),
        ("DiagnosticReport", "_summary=data&status=final", "status"),
        ("DiagnosticReport", "_count=5&_count=6&status=final", "status"),
        ("DiagnosticReport", "_count:exact=5&status=final", "status"),
    ],
)
def test_unknown_or_unsupported_strict_error_lenient_warning(resource_type: str, query: str, survivor: str) -> None:
    with pytest.raises(InvalidInputError):
        parse(resource_type, query, strict=True)
    request = parse(resource_type, query, strict=False)
    assert [f.param for f in request.filters] == [survivor]
    assert len(request.warnings) == 1 and request.warnings[0].endswith("ignored")
    assert (request.sort, request.includes, request.revincludes, request.summary) == ((), (), (), None)


def test_lenient_count_keeps_the_first() -> None:
    assert parse("DiagnosticReport", "_count=5&_count=6", strict=False).count == 5


def test_unknown_resource_type() -> None:
    with pytest.raises(InvalidInputError):
        parse("Practitioner", "name=x")


@pytest.mark.parametrize(
    ("resource_type", "query", "includes", "revincludes"),
    [
        ("DiagnosticReport", "_include=DiagnosticReport:result", [Include("DiagnosticReport", "result")], []),
        (
            "DiagnosticReport",
            "_include=DiagnosticReport:subject:Patient&_include=DiagnosticReport:imaging-study"
            "&_include=DiagnosticReport:subject:Patient",
            [Include("DiagnosticReport", "subject", "Patient"), Include("DiagnosticReport", "imaging-study")],
            [],
        ),
        ("Observation", "_include=Observation:device", [Include("Observation", "device")], []),
        ("ImagingStudy", "_revinclude=Observation:derived-from", [], [Include("Observation", "derived-from")]),
        (
            "ImagingStudy",
            "_revinclude=DiagnosticReport:imaging-study:ImagingStudy&_revinclude=Observation:part-of",
            [],
            [Include("DiagnosticReport", "imaging-study", "ImagingStudy"), Include("Observation", "part-of")],
        ),
        ("Patient", "_revinclude=DiagnosticReport:patient", [], [Include("DiagnosticReport", "patient")]),
        ("Device", "_revinclude=Observation:device:Device", [], [Include("Observation", "device", "Device")]),
    ],
)
def test_includes(resource_type: str, query: str, includes: list[Include], revincludes: list[Include]) -> None:
    request = parse(resource_type, query)
    assert (list(request.includes), list(request.revincludes), request.filters) == (includes, revincludes, ())


@pytest.mark.parametrize(
    ("resource_type", "query", "expected"),
    [
        ("DiagnosticReport", "_sort=-date,_id", (SortKey("date", True), SortKey("_id", False))),
        ("DiagnosticReport", "_sort=date,-date,,_lastUpdated", (SortKey("date", False), SortKey("_lastUpdated", False))),
        ("Observation", "_sort=-_lastUpdated", (SortKey("_lastUpdated", True),)),
        ("ImagingStudy", "_sort=started", (SortKey("started", False),)),
        ("Patient", "_sort=_id", (SortKey("_id", False),)),
    ],
)
def test_sort(resource_type: str, query: str, expected: tuple[SortKey, ...]) -> None:
    assert parse(resource_type, query).sort == expected


def test_sort_lenient_keeps_the_supported_keys() -> None:
    request = parse("ImagingStudy", "_sort=date,-started", strict=False)
    assert request.sort == (SortKey("started", True),) and len(request.warnings) == 1


@pytest.mark.parametrize(
    ("query", "default_count", "max_count", "count"),
    [
        ("", 20, 100, 20),
        ("_count=5", 20, 100, 5),
        ("_count=0", 20, 100, 0),  # total only
        ("_count=500", 20, 100, 100),  # bounded
        ("_count=100", 20, 100, 100),
        ("", 300, 100, 100),
    ],
)
def test_count_bounds(query: str, default_count: int, max_count: int, count: int) -> None:
    assert parse("Patient", query, default_count=default_count, max_count=max_count).count == count


def test_result_parameters() -> None:
    request = parse(
        "DiagnosticReport", "_summary=count&_elements=identifier,status,,status&_cursor=eyJpZCI6IDQyfQ.x-y_z&_total=accurate"
    )
    assert (request.summary, request.elements, request.cursor, request.total) == (
        "count",
        ("identifier", "status"),
        "eyJpZCI6IDQyfQ.x-y_z",
        "accurate",
    )
    assert parse("DiagnosticReport", "_summary=false").summary is None
    for total in ("none", "estimate", "accurate"):
        assert parse("DiagnosticReport", f"_total={total}").total == total


def test_sort_columns() -> None:
    columns = sort_columns("DiagnosticReport", [SortKey("date", True), SortKey("_id"), SortKey("_lastUpdated", True)])
    assert [(str(column), descending) for column, descending in columns] == [
        ("fhir_resource.sort_date", True),
        ("fhir_resource.logical_id", False),
        ("fhir_resource.last_updated", True),
    ]
    assert [str(c) for c, _ in sort_columns("ImagingStudy", [SortKey("started")])] == ["fhir_resource.sort_date"]
    with pytest.raises(InvalidInputError):
        sort_columns("Patient", [SortKey("date")])


# ---------------------------------------------------------------------------------- SQL semantics

# Patients, one per birth date precision (and one without): the date grid below reads across them.
BIRTH_DATES = {"p-year": "2024", "p-month": "2024-03", "p-day": "2024-03-05", "p-day2": "2024-03-06", "p-feb": "2024-02-29"}


def _patient(pid: str, family: str, given: list[str], **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": pid, "name": [{"family": family, "given": given}], **extra}
    if pid in BIRTH_DATES:
        resource["birthDate"] = BIRTH_DATES[pid]
    return resource


def _report(rid: str, effective: str | None, subject: str | None, status: str, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        **extra,
    }
    if subject is not None:
        resource["subject"] = {"reference": subject}
    if effective is not None:
        resource["effectiveDateTime"] = effective
    return resource


def _observation(oid: str, value_code: str, **extra: Any) -> dict[str, Any]:
    return {
        **OBSERVATION,
        "id": oid,
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": value_code}]},
        **extra,
    }


T0 = utc(2024, 6, 1)
RESOURCES: list[tuple[dict[str, Any], dt.datetime]] = [
    (_patient("p-year", "Müller", ["José"], gender="female", identifier=[{"system": "urn:oid:1.2.3", "value": "A1"}]), T0),
    (_patient("p-month", "Muller", ["Jo"], gender="male", identifier=[{"system": "urn:oid:1.2.4", "value": "A1"}]), T0),
    (_patient("p-day", "100% real", ["a_b"], gender="other", identifier=[{"value": "A1"}]), T0),
    (_patient("p-day2", "100 percent", ["axb"], identifier=[{"system": "urn:oid:1.2.3", "value": "B2"}]), T0),
    (_patient("p-feb", "O'Brien", ["Seán", "AC/DC"], identifier=[{"system": "urn:oid:1.2.3", "value": "a,b"}]), T0),
    (_patient("p-none", "Back\\slash", ["Zoë"]), T0),
    # Reports: r1 a second, r2 a second the next day in UTC, r3 midnight UTC, r4 a whole day, r5 no date.
    (
        _report(
            "r1",
            "2024-03-05T10:00:00+01:00",
            "Patient/p-year",
            "final",
            result=[{"reference": "Observation/o1"}],
            imagingStudy=[{"reference": "ImagingStudy/1.2.3"}],
        ),
        utc(2024, 3, 5, 9),
    ),
    (_report("r2", "2024-03-05T23:30:00-02:00", "Patient/p-month", "preliminary"), utc(2024, 3, 5, 9, 0, 0, 500000)),
    (_report("r3", "2024-03-05T00:00:00Z", "Group/g1", "final"), utc(2024, 3, 6)),
    (_report("r4", "2024-03-05", "https://other.example/fhir/Patient/p-year", "amended"), utc(2024, 1, 1)),
    (_report("r5", None, None, "registered"), utc(2025, 6, 1, 12)),
    (
        _observation(
            "o1",
            "52101004",
            derivedFrom=[{"reference": "ImagingStudy/1.2.3"}],
            partOf=[{"reference": "ImagingStudy/1.2.3"}],
        ),
        T0,
    ),
    (_observation("o2", "2667000", derivedFrom=[{"reference": "ImagingStudy/9.9"}], partOf=[]), T0),
    (
        {
            "resourceType": "Device",
            "id": DEVICE_UID,
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{DEVICE_UID}"}, {"value": "X" * 250}],
            "status": "active",
            "manufacturer": "Pneumo Gateway tests",
            "deviceName": [{"name": "Pneumo test model", "type": "model-name"}],
            "type": {"text": "AI pneumonia classifier"},
        },
        T0,
    ),
    (
        {
            "resourceType": "Subscription",
            "id": "sub-1",
            "status": "active",
            "criteria": "DiagnosticReport?status=final",
            "channel": {"type": "rest-hook", "endpoint": "https://ehr.example/hook"},
        },
        T0,
    ),
]

PATIENTS = ["p-year", "p-month", "p-day", "p-day2", "p-feb", "p-none"]
REPORTS = ["r1", "r2", "r3", "r4", "r5"]

# birthdate query -> matches among (2024, 2024-03, 2024-03-05, 2024-03-06, 2024-02-29), x = match.
BIRTHDATE_GRID = [
    ("2024-03-05", "..x.."),
    ("eq2024-03", ".xxx."),
    ("2024", "xxxxx"),
    ("ne2024-03-05", "xx.xx"),
    ("gt2024-03-05", "xx.x."),
    ("lt2024-03-05", "xx..x"),
    ("ge2024-03-05", "xxxx."),
    ("le2024-03-05", "xxx.x"),
    ("sa2024-03-05", "...x."),
    ("eb2024-03-05", "....x"),
    ("ap2024-03-05", "xxxx."),
    ("gt2024", "....."),
    ("ge2024", "xxxxx"),
    ("lt2024", "....."),
    ("le2024", "xxxxx"),
    ("ne2024", "....."),
    ("eb2025", "xxxxx"),
    ("sa2023", "xxxxx"),
    ("lt2024-03", "x...x"),
    ("sa2024-02", ".xxx."),
    ("eb2024-03", "....x"),
    ("le2024-02", "x...x"),
    ("2024-02-29", "....x"),
    ("2024-03-05T12:00Z", "....."),
    ("gt2024-03-05T12:00Z", "xxxx."),
    ("lt2024-03-05T12:00Z", "xxx.x"),
]

# DiagnosticReport date query -> matches among r1 [03-05T09:00:00Z, +1 s), r2 [03-06T01:30:00Z, +1 s),
# r3 [03-05T00:00:00Z, +1 s), r4 [03-05, 03-06); r5 has no date and never matches.
REPORT_DATE_GRID = [
    ("2024-03-05", "x.xx"),
    ("2024-03-05T10:00%2B01:00", "x..."),
    ("2024-03-05T10:00:00+01:00", "x..."),  # an unencoded '+' arrives as a space
    ("2024-03-05T09:00:00Z", "x..."),
    ("2024-03-05T09:00:00.000Z", "...."),  # a millisecond cannot contain r1's second
    ("gt2024-03-05T09:00:00Z", ".x.x"),
    ("lt2024-03-05T10:00", "x.xx"),
    ("sa2024-03-05", ".x.."),
    ("eb2024-03-06", "x.xx"),
    ("2024-03-05T23:30:00-02:00", ".x.."),
    ("ge2024-03-05T09:00:00Z", "xx.x"),
    ("le2024-03-05T09:00:00Z", "x.xx"),
    ("ne2024-03-05", ".x.."),
    ("ap2024-03-05T09:00:00Z", "xxxx"),
    ("ap2024-03-07", ".x.."),
    ("ge2024-03-06T01:30:00.5Z", ".x.."),
]


def _expand(grid: list[tuple[str, str]], ids: list[str], param: str) -> list[tuple[str, str, bool]]:
    return [(rid, f"{param}={query}", mark == "x") for query, marks in grid for rid, mark in zip(ids, marks, strict=True)]


BIRTHDATE_CASES = _expand(BIRTHDATE_GRID, list(BIRTH_DATES), "birthdate")
REPORT_DATE_CASES = _expand(REPORT_DATE_GRID, REPORTS[:4], "date")

# (resource type, query, ids in result order: sorted by id unless the query sorts).
SEARCH_CASES: list[tuple[str, str, list[str]]] = [
    # tokens
    ("Patient", "identifier=A1", ["p-year", "p-month", "p-day"]),
    ("Patient", "identifier=urn:oid:1.2.3|A1", ["p-year"]),
    ("Patient", "identifier=|A1", ["p-day"]),
    ("Patient", "identifier=urn:oid:1.2.3|", ["p-year", "p-day2", "p-feb"]),
    ("Patient", "identifier=urn:oid:1.2.3|A1,urn:oid:1.2.4|A1", ["p-year", "p-month"]),
    ("Patient", "identifier=a\\,b", ["p-feb"]),
    ("Patient", "identifier=a,b", []),
    ("Patient", "identifier:not=A1", ["p-day2", "p-feb", "p-none"]),  # :not includes resources without a value
    ("Patient", "identifier:missing=true", ["p-none"]),
    ("Patient", "identifier:missing=false", ["p-year", "p-month", "p-day", "p-day2", "p-feb"]),
    ("Patient", "identifier=A1&birthdate=2024-03", ["p-month", "p-day"]),
    ("Patient", "gender=female,male", ["p-year", "p-month"]),
    ("Patient", "gender:missing=true", ["p-day2", "p-feb", "p-none"]),
    ("Patient", "birthdate:missing=true", ["p-none"]),
    ("Patient", "_id=p-year,p-day,nope", ["p-year", "p-day"]),
    ("Patient", "_id:not=p-year", ["p-month", "p-day", "p-day2", "p-feb", "p-none"]),
    ("Patient", "_id=sys|p-year", []),
    ("Patient", "_id:missing=false", PATIENTS),
    ("Patient", "_id:missing=true", []),
    ("DiagnosticReport", "status=final", ["r1", "r3"]),
    ("DiagnosticReport", "code=http://loinc.org|18748-4&status:not=final", ["r2", "r4", "r5"]),
    ("Observation", "value-concept=http://snomed.info/sct|52101004", ["o1"]),
    ("Observation", "code:not=http://snomed.info/sct|233604007", []),
    ("Device", "identifier=" + "X" * 250, [DEVICE_UID]),  # truncated alike in the index and the query
    ("Device", "identifier=urn:ietf:rfc:3986|urn:oid:" + DEVICE_UID, [DEVICE_UID]),
    ("Subscription", "status=active&type=rest-hook", ["sub-1"]),
    # strings
    ("Patient", "name=muller", ["p-year", "p-month"]),
    ("Patient", "family=M%C3%9CL", ["p-year", "p-month"]),
    ("Patient", "family:exact=muller", ["p-year", "p-month"]),
    ("Patient", "family:exact=mull", []),
    ("Patient", "given=jo", ["p-year", "p-month"]),
    ("Patient", "given:exact=jo", ["p-month"]),
    ("Patient", "name:contains=ULL", ["p-year", "p-month"]),
    ("Patient", "family=100%25", ["p-day"]),  # '%' is no wildcard
    ("Patient", "given=a_b", ["p-day"]),  # nor is '_'
    ("Patient", "name:contains=%25", ["p-day"]),
    ("Patient", "given=ac/", ["p-feb"]),  # nor the LIKE escape character
    ("Patient", "family=back\\\\s", ["p-none"]),
    ("Patient", "given=zoe,sean", ["p-feb", "p-none"]),
    ("Patient", "name=o'b", ["p-feb"]),
    ("Device", "device-name=pneumo", [DEVICE_UID]),
    ("Device", "device-name=AI+pneu", [DEVICE_UID]),
    ("Device", "device-name:contains=classif&manufacturer=pneumo+gateway", [DEVICE_UID]),
    ("Subscription", "criteria=diagnosticreport", ["sub-1"]),
    # uri
    ("Subscription", "url=https://ehr.example/hook", ["sub-1"]),
    ("Subscription", "url=https://ehr.example", []),
    ("Subscription", "url:missing=false", ["sub-1"]),
    # references
    ("DiagnosticReport", "patient=p-year", ["r1", "r4"]),
    ("DiagnosticReport", "patient=Patient/p-year", ["r1", "r4"]),
    ("DiagnosticReport", "patient=http://elsewhere.example/fhir/Patient/p-year", ["r1", "r4"]),
    ("DiagnosticReport", "patient=g1", []),
    ("DiagnosticReport", "subject=p-year", ["r1", "r4"]),  # a bare id on a multi-target parameter
    ("DiagnosticReport", "subject=g1", ["r3"]),
    ("DiagnosticReport", "subject=Group/g1,Patient/p-month", ["r2", "r3"]),
    ("DiagnosticReport", "subject:Patient=p-year", ["r1", "r4"]),
    ("DiagnosticReport", "subject:Group=g1", ["r3"]),
    ("DiagnosticReport", "subject:Patient=g1", []),
    ("DiagnosticReport", "subject=Patient/p-year/_history/2", ["r1", "r4"]),
    ("DiagnosticReport", "subject=urn:uuid:abc", []),
    ("DiagnosticReport", "subject:missing=true", ["r5"]),
    ("DiagnosticReport", "result=o1", ["r1"]),
    ("DiagnosticReport", "result=Observation/o1", ["r1"]),
    ("DiagnosticReport", "imaging-study=1.2.3", ["r1"]),
    ("Observation", "derived-from=ImagingStudy/1.2.3", ["o1"]),
    ("Observation", "derived-from=1.2.3", ["o1"]),
    ("Observation", "part-of:missing=true", ["o2"]),
    ("Observation", "device=" + DEVICE_UID, ["o1", "o2"]),
    ("Observation", "device:Device=" + DEVICE_UID + "&patient=pat-abc", ["o1", "o2"]),
    # dates: OR within a parameter, AND across, :missing
    ("DiagnosticReport", "date=2024-03-05T09:00:00Z,sa2024-03-05", ["r1", "r2"]),
    ("DiagnosticReport", "date=ge2024-03-05&date=lt2024-03-05T05:00Z", ["r3", "r4"]),
    ("DiagnosticReport", "date:missing=true", ["r5"]),
    ("DiagnosticReport", "date:missing=false", ["r1", "r2", "r3", "r4"]),
    # _lastUpdated (an instant): r1 03-05T09:00, r2 03-05T09:00:00.5, r3 03-06T00:00, r4 01-01, r5 2025-06-01
    ("DiagnosticReport", "_lastUpdated=2024-03-05", ["r1", "r2"]),
    ("DiagnosticReport", "_lastUpdated=2024-03-05T09:00:00Z", ["r1", "r2"]),
    ("DiagnosticReport", "_lastUpdated=gt2024-03-05", ["r3", "r5"]),
    ("DiagnosticReport", "_lastUpdated=lt2024-03-05T09:00:00Z", ["r4"]),
    ("DiagnosticReport", "_lastUpdated=le2024-03-05T09:00:00Z", ["r1", "r2", "r4"]),
    ("DiagnosticReport", "_lastUpdated=ge2024-03-05T09:00:00.5Z", ["r2", "r3", "r5"]),
    ("DiagnosticReport", "_lastUpdated=sa2024-03-05", ["r3", "r5"]),
    ("DiagnosticReport", "_lastUpdated=eb2024-03-06", ["r1", "r2", "r4"]),
    ("DiagnosticReport", "_lastUpdated=ne2024-03-05", ["r3", "r4", "r5"]),
    ("DiagnosticReport", "_lastUpdated=ap2024-03-04", ["r1", "r2"]),
    ("DiagnosticReport", "_lastUpdated=ge2024-03-05&_lastUpdated=lt2024-03-06", ["r1", "r2"]),
    # sorting (fhir_resource.id breaks ties: r3 and r4 both start at 03-05T00:00Z)
    ("DiagnosticReport", "date:missing=false&_sort=date", ["r3", "r4", "r1", "r2"]),
    ("DiagnosticReport", "date:missing=false&_sort=-date", ["r2", "r1", "r3", "r4"]),
    ("DiagnosticReport", "_sort=-_lastUpdated", ["r5", "r3", "r2", "r1", "r4"]),
    ("Patient", "_sort=-_id&gender:missing=false", ["p-year", "p-month", "p-day"]),
]


def _store(session: Session, resource: dict[str, Any], last_updated: dt.datetime) -> None:
    resource_type = resource["resourceType"]
    own_date = date_range(resource_type, resource)  # as fhir_api.store.put fills the row
    row = FhirResource(
        resource_type=resource_type,
        logical_id=resource["id"],
        version_id=1,
        last_updated=last_updated,
        sort_date=own_date[0] if own_date else None,
        sort_date_high=own_date[1] if own_date else None,
        study_uid=None,
        digest="0" * 64,
        content=json.dumps(resource),
    )
    session.add(row)
    session.flush()
    for entry in extract_index(resource_type, resource):
        session.add(
            FhirSearchIndex(
                resource_pk=row.id,
                resource_type=resource_type,
                param=entry.param,
                system=entry.system,
                value=entry.value,
                low=entry.low,
                high=entry.high,
            )
        )


def _populate(engine: Engine) -> None:
    Base.metadata.create_all(engine, tables=[FhirResource.__table__, FhirResourceVersion.__table__, FhirSearchIndex.__table__])
    with Session(engine) as session, session.begin():
        for resource, last_updated in RESOURCES:
            _store(session, resource, last_updated)


def _search(engine: Engine, resource_type: str, query: str) -> list[str]:
    request = parse(resource_type, query)
    statement = select(FhirResource.logical_id).where(
        FhirResource.resource_type == resource_type, *(filter_clause(resource_type, f) for f in request.filters)
    )
    columns = sort_columns(resource_type, request.sort)
    statement = statement.order_by(*(c.desc() if descending else c.asc() for c, descending in columns), FhirResource.id)
    with Session(engine) as session:
        found = list(session.scalars(statement))
    return found if request.sort else sorted(found, key=_order)


def _order(logical_id: str) -> int:
    return [resource["id"] for resource, _ in RESOURCES].index(logical_id)


@pytest.fixture(scope="module")
def sqlite_engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    _populate(engine)
    yield engine
    engine.dispose()


@pytest.mark.parametrize(("resource_id", "query", "matches"), BIRTHDATE_CASES)
def test_birthdate_prefixes_against_partial_dates(sqlite_engine: Engine, resource_id: str, query: str, matches: bool) -> None:
    assert (resource_id in _search(sqlite_engine, "Patient", query)) is matches, f"{BIRTH_DATES[resource_id]} vs {query}"


@pytest.mark.parametrize(("resource_id", "query", "matches"), REPORT_DATE_CASES)
def test_report_date_prefixes_against_date_times(sqlite_engine: Engine, resource_id: str, query: str, matches: bool) -> None:
    found = _search(sqlite_engine, "DiagnosticReport", query)
    assert (resource_id in found) is matches
    assert "r5" not in found  # no date: no prefix matches it, ne included


@pytest.mark.parametrize(("resource_type", "query", "expected"), SEARCH_CASES)
def test_search(sqlite_engine: Engine, resource_type: str, query: str, expected: list[str]) -> None:
    assert _search(sqlite_engine, resource_type, query) == expected


def test_filters_are_correlated_exists_subqueries() -> None:
    """Index parameters are EXISTS subqueries; the resource's own date reads the row's columns."""
    request = parse("DiagnosticReport", "status=final&subject=Patient/p1&date=ge2024&issued=ge2024")
    statement = select(FhirResource.id).where(*(filter_clause("DiagnosticReport", f) for f in request.filters))
    sql = str(statement.compile(compile_kwargs={"literal_binds": True}))
    assert sql.count("EXISTS (SELECT") == 3
    assert sql.count("fhir_search_index.resource_pk = fhir_resource.id") == 3
    assert "fhir_resource.sort_date >= '2024-01-01 00:00:00+00:00' OR fhir_resource.sort_date_high >" in sql
    assert "fhir_search_index.resource_type = 'DiagnosticReport' AND fhir_search_index.param = 'status'" in sql
    assert sql.count("FROM fhir_resource") == 1  # correlated, not a cross join in the subqueries


@pytest.mark.postgres
def test_semantics_on_postgresql(postgres_url: str) -> None:
    """Every SQL case again on PostgreSQL (its own schema), and the indexes the EXISTS subqueries use."""
    engine = create_engine(postgres_url)
    try:
        _populate(engine)
        failures = []
        for resource_id, query, matches in BIRTHDATE_CASES:
            if (resource_id in _search(engine, "Patient", query)) is not matches:
                failures.append(("Patient", query, resource_id, matches))
        for resource_id, query, matches in REPORT_DATE_CASES:
            if (resource_id in _search(engine, "DiagnosticReport", query)) is not matches:
                failures.append(("DiagnosticReport", query, resource_id, matches))
        for resource_type, query, expected in SEARCH_CASES:
            found = _search(engine, resource_type, query)
            if found != expected:
                failures.append((resource_type, query, found, expected))
        assert failures == []

        with engine.connect() as connection:
            connection.execute(text("ANALYZE"))
            connection.execute(text("SET enable_seqscan = off"))
            # Tiny tables make the two fhir_search indexes cost the same: either is the point, a seq scan is not.
            for query, index in (("status=final", "ix_fhir_search_"), ("date=sa2024-03-05", "ix_fhir_resource_type_date"),
                                 ("issued=sa2024-03-05", "ix_fhir_search_"), ("subject=Patient/p-year", "ix_fhir_search_")):
                request = parse("DiagnosticReport", query)
                statement = select(FhirResource.id).where(
                    FhirResource.resource_type == "DiagnosticReport", filter_clause("DiagnosticReport", request.filters[0])
                )
                compiled = statement.compile(engine, compile_kwargs={"literal_binds": True})
                plan = "\n".join(row[0] for row in connection.execute(text(f"EXPLAIN {compiled}")))
                assert f"using {index}" in plan and "Seq Scan on fhir_search_index" not in plan, plan
    finally:
        engine.dispose()


def test_a_search_has_bounded_criteria() -> None:
    """One request may not tie up the database with hundreds of sub-queries (found by the OpenAPI fuzz test)."""
    parse_search("DiagnosticReport", [("status", "final")] * 20, strict=True, default_count=20, max_count=100)
    with pytest.raises(InvalidInputError, match="too many search criteria"):
        parse_search("DiagnosticReport", [("status", "final")] * 21, strict=True, default_count=20, max_count=100)
    with pytest.raises(InvalidInputError, match="too many search criteria"):
        parse_search("DiagnosticReport", [("status", ",".join(["final"] * 101))], strict=False, default_count=20, max_count=100)
