"""Tables of cases for the pure FHIR mappers (fhir_api/resources.py).

Every resource a test produces goes through :func:`checked`: it must survive a JSON round trip,
parse again with the fhir.resources R4B model of its type (and dump back to the same dict), have
no empty element, carry no ``meta`` (the projection adds it), and reference only the resources we
serve with valid logical ids. The codes are compared with the DICOM SR's own constants and with
pydicom's copy of PS3.16, so the FHIR side cannot drift from what the SR says.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import re
from typing import Any

import pytest
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from pydicom.sr.codedict import codes

from dicom_node import sr
from fhir_api import ids
from fhir_api.facts import (
    ImageFinding,
    InstanceFacts,
    ModelFacts,
    PatientFacts,
    ReportFacts,
    ReportStatus,
    SeriesFacts,
    StudyFacts,
)
from fhir_api.resources import (
    date_time,
    device,
    diagnostic_report,
    imaging_study,
    observation,
    operation_outcome,
    patient,
)

ROOT = "1.2.826.0.1.3680043.8.498"
STUDY_UID = f"{ROOT}.1.20240105.1"
CR_SERIES_UID = f"{ROOT}.2.1"
LATERAL_SERIES_UID = f"{ROOT}.2.2"
SR_SERIES_UID = f"{ROOT}.2.3"
SC_SERIES_UID = f"{ROOT}.2.4"
IMAGE_UIDS = (f"{ROOT}.3.1", f"{ROOT}.3.2", f"{ROOT}.3.3")
LATERAL_UID = f"{ROOT}.3.9"
SR_UIDS = (f"{ROOT}.4.1", f"{ROOT}.4.2")
SC_UID = f"{ROOT}.5.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

SCT = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"

ANALYSED_AT = dt.datetime(2024, 1, 5, 9, 41, 7, 250000, tzinfo=dt.UTC)
ISSUED = dt.datetime(2024, 1, 5, 9, 45, tzinfo=dt.UTC)

MODELS = {
    "Patient": Patient,
    "Device": Device,
    "ImagingStudy": ImagingStudy,
    "Observation": Observation,
    "DiagnosticReport": DiagnosticReport,
    "OperationOutcome": OperationOutcome,
}
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
SERVED = ("Patient", "Device", "ImagingStudy", "Observation", "DiagnosticReport")


# -- facts --------------------------------------------------------------------------------------


def make_model(**changes: Any) -> ModelFacts:
    model = ModelFacts(
        model_id="pneumo-densenet121",
        name="PneumoNet",
        version="1.2.0",
        manufacturer="Pneumo Gateway Project",
        device_uid=f"{ROOT}.9.1",
        intended_use="Adult frontal chest radiographs (CR/DX, PA or AP); decision support only",
        threshold=0.5,
    )
    return dataclasses.replace(model, **changes)


def make_patient(**changes: Any) -> PatientFacts:
    facts = PatientFacts(
        patient_id="MRN-004711",
        issuer="1.2.826.0.1.3680043.8.498.100",
        name="Doe^Jane^Quinn^Dr.^PhD",
        birth_date="19800229",
        sex="F",
    )
    return dataclasses.replace(facts, **changes)


def make_study(**changes: Any) -> StudyFacts:
    series = (
        SeriesFacts(
            series_instance_uid=CR_SERIES_UID,
            modality="CR",
            number=1,
            body_part="CHEST",
            description="Chest PA",
            instances=tuple(InstanceFacts(uid, CR_IMAGE_STORAGE, n) for n, uid in enumerate(IMAGE_UIDS[:2], start=1)),
        ),
        SeriesFacts(
            series_instance_uid=LATERAL_SERIES_UID,
            modality="DX",
            number=2,
            body_part="CHEST",
            description="Chest lateral",
            instances=(InstanceFacts(LATERAL_UID, DX_IMAGE_STORAGE, 1),),
        ),
        SeriesFacts(
            series_instance_uid=SR_SERIES_UID,
            modality="SR",
            number=9001,
            description="AI pneumonia result (SR)",
            instances=tuple(InstanceFacts(uid, COMPREHENSIVE_3D_SR, n) for n, uid in enumerate(SR_UIDS, start=1)),
        ),
        SeriesFacts(
            series_instance_uid=SC_SERIES_UID,
            modality="OT",
            number=9002,
            description="AI pneumonia summary",
            instances=(InstanceFacts(SC_UID, SECONDARY_CAPTURE, 1),),
        ),
    )
    study = StudyFacts(
        study_instance_uid=STUDY_UID,
        patient=make_patient(),
        accession_number="ACC20240105-17",
        study_id="17",
        study_date="20240105",
        study_time="093012.5",
        description="XR CHEST PA AND LATERAL",
        referring_physician="House^Gregory^^Dr.",
        series=series,
    )
    return dataclasses.replace(study, **changes)


def make_finding(**changes: Any) -> ImageFinding:
    finding = ImageFinding(
        source_sop_instance_uid=IMAGE_UIDS[0],
        source_series_instance_uid=CR_SERIES_UID,
        probability=0.8734,
        label="PNEUMONIA",
        threshold=0.5,
        model=make_model(),
        analysed_at=ANALYSED_AT,
        sr_sop_instance_uid=SR_UIDS[0],
    )
    return dataclasses.replace(finding, **changes)


FINDINGS = (
    make_finding(),
    make_finding(source_sop_instance_uid=IMAGE_UIDS[1], probability=0.2141, label="NORMAL", sr_sop_instance_uid=SR_UIDS[1]),
)


def make_report(status: ReportStatus, **changes: Any) -> ReportFacts:
    report = ReportFacts(
        study=make_study(),
        status=status,
        issued=ISSUED,
        images=3,
        analysed=2,
        label="PNEUMONIA",
        probability=0.8734,
        threshold=0.5,
        model=make_model(),
        findings=FINDINGS,
        reasons=({"reason": "not a frontal view", "images": 1},),
        result_version=1,
        sr_sop_instance_uids=SR_UIDS,
    )
    return dataclasses.replace(report, **changes)


# -- the check every produced resource goes through ---------------------------------------------


def _walk(value: Any, path: str = "") -> list[tuple[str, Any]]:
    found = [(path, value)]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _walk(item, f"{path}[{index}]")
    return found


def checked(resource: dict[str, Any], resource_type: str) -> dict[str, Any]:
    """Assert that *resource* is a valid, JSON-ready FHIR R4 resource of *resource_type*; return it."""
    assert resource["resourceType"] == resource_type
    assert json.loads(json.dumps(resource)) == resource, "not plain JSON"
    model = MODELS[resource_type]
    assert model.model_validate(resource).model_dump(mode="json", exclude_none=True) == resource
    assert "meta" not in resource
    if resource_type != "OperationOutcome":
        assert ID_RE.match(resource["id"]), resource["id"]
    for path, value in _walk(resource):
        assert value is not None, path
        assert value != "" and value != [] and value != {}, f"empty element at {path}"
        if isinstance(value, str):
            assert value == value.strip(), f"untrimmed string at {path}"
        if path.endswith(".reference"):
            kind, _, logical_id = value.partition("/")
            assert kind in SERVED and ID_RE.match(logical_id), f"bad reference {value!r} at {path}"
    return resource


def codings(concept: dict[str, Any]) -> list[tuple[str, str]]:
    return [(coding["system"], coding["code"]) for coding in concept["coding"]]


# -- the codes are the SR's codes ---------------------------------------------------------------


def test_codes_match_the_dicom_sr_and_ps3_16() -> None:
    obs = checked(observation(make_finding(), make_study()), "Observation")
    assert codings(obs["code"]) == [(SCT, sr.PNEUMONIA.value)]
    assert codings(obs["valueCodeableConcept"]) == [(SCT, sr.PRESENT.value)]
    absent = checked(observation(make_finding(probability=0.1), make_study()), "Observation")
    assert codings(absent["valueCodeableConcept"]) == [(SCT, sr.ABSENT.value)]
    assert absent["valueCodeableConcept"]["coding"][0]["display"] == sr.ABSENT.meaning
    component = obs["component"][0]
    assert codings(component["code"]) == [(DCM, sr.CERTAINTY_OF_FINDING.value)]
    assert component["code"]["coding"][0]["display"] == sr.CERTAINTY_OF_FINDING.meaning
    assert component["valueQuantity"]["code"] == sr.PERCENT.value
    # Body Part Examined CHEST: PS3.16 CID 4031 "Common Anatomic Regions" (pydicom's copy of it).
    assert codings(obs["bodySite"]) == [(SCT, codes.SCT.Chest.value)]
    assert obs["bodySite"]["coding"][0]["display"] == codes.SCT.Chest.meaning
    assert codes.SCT.Chest.value == "816094009"


# -- DA / TM -> dateTime ------------------------------------------------------------------------

PLUS_ONE = dt.timezone(dt.timedelta(hours=1))
MINUS_0330 = dt.timezone(-dt.timedelta(hours=3, minutes=30))


@pytest.mark.parametrize(
    ("date", "time", "tz", "expected"),
    [
        ("20240105", None, None, "2024-01-05"),
        ("20240105", "0930", None, "2024-01-05"),  # no zone known: the date alone, never a guessed zone
        ("20240105", "093012.5", None, "2024-01-05"),
        ("20240105", "0930", PLUS_ONE, "2024-01-05T09:30:00+01:00"),
        ("20240105", "09", PLUS_ONE, "2024-01-05T09:00:00+01:00"),
        ("20240105", "093012", dt.UTC, "2024-01-05T09:30:12+00:00"),
        ("20240105", "093012.5", dt.UTC, "2024-01-05T09:30:12.5+00:00"),
        ("20240105", "093012.123456", MINUS_0330, "2024-01-05T09:30:12.123456-03:30"),
        ("20240105", "09:30:12", PLUS_ONE, "2024-01-05T09:30:12+01:00"),  # ACR-NEMA TM
        ("20240105", " 0930 ", PLUS_ONE, "2024-01-05T09:30:00+01:00"),
        ("20241231", "235960", dt.UTC, "2024-12-31T23:59:60+00:00"),  # leap second, legal in both
        ("20240105", "2400", PLUS_ONE, "2024-01-05"),  # impossible time: the date alone
        ("20240105", "0960", PLUS_ONE, "2024-01-05"),
        ("20240105", "9", PLUS_ONE, "2024-01-05"),
        ("20240105", "0930123", PLUS_ONE, "2024-01-05"),
        ("20240105", "", PLUS_ONE, "2024-01-05"),
        ("1980.02.29", None, None, "1980-02-29"),  # ACR-NEMA DA
        ("20240230", "0930", PLUS_ONE, None),  # impossible date
        ("2024010", None, None, None),
        ("00000101", None, None, None),
        ("", None, None, None),
        (None, "0930", PLUS_ONE, None),
        (None, None, None, None),
    ],
)
def test_date_time(date: str | None, time: str | None, tz: dt.tzinfo | None, expected: str | None) -> None:
    assert date_time(date, time, tz=tz) == expected
    if expected is not None:  # and it is a FHIR dateTime (the model raises on one that is not)
        Observation.model_validate(
            {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "effectiveDateTime": expected}
        )


def test_date_time_with_a_named_zone_uses_the_offset_of_that_day() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    assert date_time("20240105", "0930", tz=berlin) == "2024-01-05T09:30:00+01:00"
    assert date_time("20240705", "0930", tz=berlin) == "2024-07-05T09:30:00+02:00"


# -- Patient ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pn", "expected"),
    [
        ("Doe^Jane", {"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}),
        (
            "Doe^Jane^Quinn^Dr.^PhD",
            {"text": "Dr. Jane Quinn Doe PhD", "family": "Doe", "given": ["Jane", "Quinn"], "prefix": ["Dr."], "suffix": ["PhD"]},
        ),
        ("Doe", {"text": "Doe", "family": "Doe"}),
        ("^Jane", {"text": "Jane", "given": ["Jane"]}),
        ("Doe^^^^Jr.", {"text": "Doe Jr.", "family": "Doe", "suffix": ["Jr."]}),
        (" Doe ^ Jane ", {"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", {"text": "Tarou Yamada", "family": "Yamada", "given": ["Tarou"]}),
        ("Doe^Jane\\Roe^Richard", {"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}),  # first value only
        ("Doe^Jane^^^^Extra", {"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}),  # 5 components only
        ("=山田^太郎", None),  # no alphabetic group
        ("^^^^", None),
        ("", None),
        (None, None),
    ],
)
def test_patient_name_from_pn(pn: str | None, expected: dict[str, Any] | None) -> None:
    resource = checked(patient(make_patient(name=pn)), "Patient")
    if expected is None:
        assert "name" not in resource
    else:
        assert resource["name"] == [expected]


@pytest.mark.parametrize(
    ("sex", "expected"),
    [
        ("M", "male"),
        ("F", "female"),
        ("O", "other"),
        (" F ", "female"),
        ("U", "unknown"),
        ("X", "unknown"),
        ("", None),
        (None, None),
    ],
)
def test_patient_gender(sex: str | None, expected: str | None) -> None:
    resource = checked(patient(make_patient(sex=sex)), "Patient")
    assert resource.get("gender") == expected


@pytest.mark.parametrize(
    ("issuer", "system", "assigner"),
    [
        ("1.2.826.0.1.3680043.8.498.100", "urn:oid:1.2.826.0.1.3680043.8.498.100", None),
        (" 2.16.840.1.113883.3.72 ", "urn:oid:2.16.840.1.113883.3.72", None),
        ("urn:oid:1.2.826.0.1.3680043.8.498.100", "urn:oid:1.2.826.0.1.3680043.8.498.100", None),
        ("http://hospital.example.org/fhir/mrn", "http://hospital.example.org/fhir/mrn", None),
        ("urn:uuid:0f5e6c3e-5e1c-4b5e-9d6a-5f7a2b7e2c11", "urn:uuid:0f5e6c3e-5e1c-4b5e-9d6a-5f7a2b7e2c11", None),
        ("ST_MARYS", None, "ST_MARYS"),
        ("HOSP:NORTH", None, "HOSP:NORTH"),  # a colon does not make a name a URI
        ("01.2.3", None, "01.2.3"),  # not an OID (leading zero)
        ("3.1.4", None, "3.1.4"),  # not an OID (root arc 0-2)
        ("", None, None),
    ],
)
def test_patient_identifier_system_from_issuer(issuer: str, system: str | None, assigner: str | None) -> None:
    resource = checked(patient(make_patient(issuer=issuer)), "Patient")
    (identifier,) = resource["identifier"]
    assert identifier["value"] == "MRN-004711"
    assert codings(identifier["type"]) == [(V2_0203, "MR")]
    assert identifier.get("system") == system
    assert identifier.get("assigner") == ({"display": assigner} if assigner else None)
    assert resource["id"] == ids.patient_id(make_patient(issuer=issuer))


@pytest.mark.parametrize(
    ("da", "expected"),
    [("19800229", "1980-02-29"), ("19810229", None), ("19801301", None), ("1980", None), ("", None), (None, None)],
)
def test_patient_birth_date(da: str | None, expected: str | None) -> None:
    resource = checked(patient(make_patient(birth_date=da)), "Patient")
    assert resource.get("birthDate") == expected


def test_patient_without_a_patient_id_has_no_identifier() -> None:
    resource = checked(patient(PatientFacts(patient_id="")), "Patient")
    assert set(resource) == {"resourceType", "id"}


# -- Device -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "percent"), [(0.5, 50), (0.35, 35), (0.4275, 42.75)])
def test_device(threshold: float, percent: float) -> None:
    model = make_model(threshold=threshold)
    resource = checked(device(model), "Device")
    assert resource["id"] == model.device_uid == ids.device_id(model)
    assert resource["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{model.device_uid}"}]
    assert resource["status"] == "active"
    assert resource["manufacturer"] == "Pneumo Gateway Project"
    assert {(name["name"], name["type"]) for name in resource["deviceName"]} == {
        ("PneumoNet", "manufacturer-name"),
        ("PneumoNet", "model-name"),
    }
    assert resource["version"] == [{"value": "1.2.0"}]
    assert resource["type"] == {"text": "AI/ML software (pneumonia classifier)"}
    assert resource["property"][0]["valueQuantity"] == [{"value": percent, "unit": "%", "system": UCUM, "code": "%"}]
    notes = [note["text"] for note in resource["note"]]
    assert f"Intended use: {model.intended_use}" in notes
    assert f"Decision threshold: pneumonia present at or above {percent:g} %" in notes


# -- ImagingStudy -------------------------------------------------------------------------------


def test_imaging_study_includes_every_series_ours_too() -> None:
    resource = checked(imaging_study(make_study()), "ImagingStudy")
    assert resource["id"] == STUDY_UID
    assert resource["status"] == "available"
    assert resource["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
        {"type": {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]}, "value": "ACC20240105-17"},
    ]
    assert resource["subject"] == {"reference": f"Patient/{ids.patient_id(make_patient())}"}
    assert resource["started"] == "2024-01-05"  # TM without a zone: the date only
    assert resource["referrer"] == {"display": "Dr. Gregory House"}
    assert [(m["code"], m.get("display")) for m in resource["modality"]] == [
        ("CR", "Computed Radiography"),
        ("DX", "Digital Radiography"),
        ("SR", "Structured Report Document"),
        ("OT", "Other"),
    ]
    assert resource["numberOfSeries"] == 4
    assert resource["numberOfInstances"] == 6
    assert resource["description"] == "XR CHEST PA AND LATERAL"
    assert [s["uid"] for s in resource["series"]] == [CR_SERIES_UID, LATERAL_SERIES_UID, SR_SERIES_UID, SC_SERIES_UID]
    cr, _, sr_series, sc_series = resource["series"]
    assert cr["number"] == 1 and cr["numberOfInstances"] == 2 and cr["description"] == "Chest PA"
    assert cr["modality"] == {"system": DCM, "code": "CR", "display": "Computed Radiography"}
    assert cr["bodySite"] == {"system": SCT, "code": "816094009", "display": "Chest"}
    assert cr["instance"][0] == {
        "uid": IMAGE_UIDS[0],
        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{CR_IMAGE_STORAGE}"},
        "number": 1,
    }
    assert [i["uid"] for i in sr_series["instance"]] == list(SR_UIDS)
    assert sr_series["instance"][0]["sopClass"]["code"] == f"urn:oid:{COMPREHENSIVE_3D_SR}"
    assert "bodySite" not in sr_series
    assert sc_series["instance"][0]["sopClass"]["code"] == f"urn:oid:{SECONDARY_CAPTURE}"


@pytest.mark.parametrize(
    ("series", "modality", "number", "body_site"),
    [
        (SeriesFacts(f"{ROOT}.2.7", modality="DX", number=3, body_part="CHEST"), "DX", 3, "816094009"),
        (SeriesFacts(f"{ROOT}.2.7", modality="dx", number=0, body_part="chest"), "DX", 0, "816094009"),
        (SeriesFacts(f"{ROOT}.2.7", modality="CR", number=-4, body_part="SKULL"), "CR", None, None),  # IS may be < 0
        (SeriesFacts(f"{ROOT}.2.7", modality=None, number=None, body_part=None), "OT", None, None),  # modality is 1..1
        (SeriesFacts(f"{ROOT}.2.7", modality=" ", body_part=""), "OT", None, None),
        (SeriesFacts(f"{ROOT}.2.7", modality="XC"), "XC", None, None),  # no display known, code still sent
    ],
)
def test_imaging_study_series(series: SeriesFacts, modality: str, number: int | None, body_site: str | None) -> None:
    resource = checked(imaging_study(make_study(series=(series,))), "ImagingStudy")
    (entry,) = resource["series"]
    assert entry["modality"]["system"] == DCM and entry["modality"]["code"] == modality
    assert [m["code"] for m in resource["modality"]] == [modality]
    assert entry.get("number") == number
    assert entry.get("bodySite", {}).get("code") == body_site
    assert entry["numberOfInstances"] == 0 and "instance" not in entry


def test_imaging_study_minimal() -> None:
    study = StudyFacts(study_instance_uid=STUDY_UID, patient=make_patient())
    resource = checked(imaging_study(study), "ImagingStudy")
    assert resource["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}]
    for absent in ("started", "modality", "series", "referrer", "description"):
        assert absent not in resource
    assert resource["numberOfSeries"] == 0 and resource["numberOfInstances"] == 0


# -- Observation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probability", "threshold", "value_code", "percent", "operating_point"),
    [
        (0.8734, 0.5, "52101004", 87.34, "50"),
        (0.5, 0.5, "52101004", 50, "50"),  # at the threshold: present (probability >= threshold)
        (0.49999, 0.5, "272519000", 50, "50"),  # rounds to 50.0 % for display, still absent
        (0.0, 0.35, "272519000", 0, "35"),
        (1.0, 0.35, "52101004", 100, "35"),
        (0.123456, 0.125, "272519000", 12.35, "12.5"),
    ],
)
def test_observation_present_absent(
    probability: float, threshold: float, value_code: str, percent: float, operating_point: str
) -> None:
    finding = make_finding(probability=probability, threshold=threshold)
    resource = checked(observation(finding, make_study()), "Observation")
    assert codings(resource["valueCodeableConcept"]) == [(SCT, value_code)]
    assert resource["component"][0]["valueQuantity"] == {"value": percent, "unit": "%", "system": UCUM, "code": "%"}
    assert resource["method"]["text"] == f"AI pneumonia classifier PneumoNet 1.2.0; positive at or above {operating_point} %"


def test_observation_shape() -> None:
    finding = make_finding()
    resource = checked(observation(finding, make_study()), "Observation")
    study_ref = {"reference": f"ImagingStudy/{STUDY_UID}"}
    assert resource["id"] == ids.observation_id(finding)
    assert resource["status"] == "final"
    assert resource["category"] == [
        {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging", "display": "Imaging"}
            ]
        }
    ]
    assert resource["subject"] == {"reference": f"Patient/{ids.patient_id(make_patient())}"}
    assert resource["effectiveDateTime"] == "2024-01-05"
    assert resource["issued"] == "2024-01-05T09:41:07.250000Z"
    assert resource["device"] == {"reference": f"Device/{ROOT}.9.1", "display": "PneumoNet 1.2.0"}
    assert resource["derivedFrom"] == [study_ref] and resource["partOf"] == [study_ref]
    assert resource["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{SR_UIDS[0]}"}]
    notes = [note["text"] for note in resource["note"]]
    assert notes == [
        f"Intended use: {finding.model.intended_use}",
        f"Source image: SOP Instance UID {IMAGE_UIDS[0]} (series {CR_SERIES_UID})",
    ]


@pytest.mark.parametrize(
    ("study_date", "study_time", "effective"),
    [
        ("20240105", "093012.5", "2024-01-05"),
        ("20240105", None, "2024-01-05"),
        (None, "093012", "2024-01-05T09:41:07.250000Z"),  # no study date: when the model looked
        ("20241341", None, "2024-01-05T09:41:07.250000Z"),
    ],
)
def test_observation_effective(study_date: str | None, study_time: str | None, effective: str) -> None:
    study = make_study(study_date=study_date, study_time=study_time)
    resource = checked(observation(make_finding(), study), "Observation")
    assert resource["effectiveDateTime"] == effective


def test_observation_without_sr_has_no_identifier_and_keeps_the_zone_as_utc() -> None:
    analysed = dt.datetime(2024, 1, 5, 10, 41, 7, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    resource = checked(observation(make_finding(sr_sop_instance_uid=None, analysed_at=analysed), make_study()), "Observation")
    assert "identifier" not in resource
    assert resource["issued"] == "2024-01-05T09:41:07Z"


def test_observation_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="analysed_at"):
        observation(make_finding(analysed_at=dt.datetime(2024, 1, 5, 9, 41)), make_study())


def test_observation_ids_differ_per_image_and_model_version() -> None:
    first = observation(make_finding(), make_study())["id"]
    assert observation(make_finding(), make_study())["id"] == first  # deterministic
    assert observation(make_finding(source_sop_instance_uid=IMAGE_UIDS[1]), make_study())["id"] != first
    assert observation(make_finding(model=make_model(version="1.3.0")), make_study())["id"] != first


# -- DiagnosticReport ---------------------------------------------------------------------------

MODEL_TEXT = "AI pneumonia classifier PneumoNet 1.2.0"
PNEUMONIA_BODY = (
    f"{MODEL_TEXT}: pneumonia PRESENT (deciding image probability 87.34 %, threshold 50 %); "
    "2 of 3 images analysed; not analysed: not a frontal view (1 image)"
)
OBSERVATION_REFS = [f"Observation/{ids.observation_id(finding)}" for finding in FINDINGS]


@pytest.mark.parametrize(
    ("facts", "status", "conclusion", "conclusion_codes", "results"),
    [
        pytest.param(
            make_report(ReportStatus.REGISTERED, analysed=0, label=None, probability=None, threshold=None, model=None,
                        findings=(), reasons=(), result_version=0, sr_sop_instance_uids=()),
            "registered", "Images received (3 images); analysis pending", [], [], id="registered",
        ),
        pytest.param(
            make_report(ReportStatus.REGISTERED, images=1, analysed=0, label=None, probability=None, threshold=None,
                        model=None, findings=(), reasons=(), result_version=0, sr_sop_instance_uids=()),
            "registered", "Images received (1 image); analysis pending", [], [], id="registered-one",
        ),
        pytest.param(
            make_report(ReportStatus.REGISTERED, images=0, analysed=0, label=None, probability=None, threshold=None,
                        model=None, findings=(), reasons=(), result_version=0, sr_sop_instance_uids=()),
            "registered", "Images received; analysis pending", [], [], id="registered-count-unknown",
        ),
        pytest.param(
            make_report(ReportStatus.PRELIMINARY, analysed=1, findings=FINDINGS[:1], reasons=(), result_version=0,
                        sr_sop_instance_uids=SR_UIDS[:1]),
            "preliminary",
            f"Preliminary: study still open; {MODEL_TEXT}: pneumonia PRESENT (deciding image probability 87.34 %, "
            "threshold 50 %); 1 of 3 images analysed",
            ["233604007"], OBSERVATION_REFS[:1], id="preliminary",
        ),
        pytest.param(
            make_report(ReportStatus.FINAL), "final", PNEUMONIA_BODY, ["233604007"], OBSERVATION_REFS, id="final-present",
        ),
        pytest.param(
            make_report(ReportStatus.FINAL, label="NORMAL", probability=0.2141, images=2, reasons=()),
            "final",
            f"{MODEL_TEXT}: pneumonia ABSENT (deciding image probability 21.41 %, threshold 50 %); 2 of 2 images analysed",
            [], OBSERVATION_REFS, id="final-absent",
        ),
        pytest.param(
            make_report(ReportStatus.AMENDED, result_version=2), "amended", f"Amended: {PNEUMONIA_BODY}", ["233604007"],
            OBSERVATION_REFS, id="amended",
        ),
        pytest.param(
            make_report(ReportStatus.CANCELLED, analysed=0, label=None, probability=None, threshold=None, model=None,
                        findings=(), sr_sop_instance_uids=(),
                        reasons=({"reason": "not a frontal view", "images": 2}, {"reason": "patient under 18", "images": 1})),
            "cancelled", "Not analysed: not a frontal view (2 images); patient under 18 (1 image)", [], [], id="cancelled",
        ),
        pytest.param(
            make_report(ReportStatus.CANCELLED, analysed=0, label=None, probability=None, threshold=None, model=None,
                        findings=(), sr_sop_instance_uids=(), reasons=()),
            "cancelled", "Not analysed", [], [], id="cancelled-no-reason",
        ),
    ],
)  # fmt: skip
def test_diagnostic_report_by_status(
    facts: ReportFacts, status: str, conclusion: str, conclusion_codes: list[str], results: list[str]
) -> None:
    resource = checked(diagnostic_report(facts), "DiagnosticReport")
    assert resource["status"] == status
    assert resource["conclusion"] == conclusion
    assert [code for concept in resource.get("conclusionCode", []) for _, code in codings(concept)] == conclusion_codes
    assert [ref["reference"] for ref in resource.get("result", [])] == results
    assert "performer" not in resource  # R4 performer cannot reference a Device
    # the conclusion is also a text/plain presentedForm; each SR is an application/dicom one
    *dicom_forms, text_form = resource["presentedForm"]
    assert text_form["contentType"] == "text/plain; charset=utf-8"
    assert base64.b64decode(text_form["data"]).decode("utf-8") == conclusion
    assert [form["url"] for form in dicom_forms] == [f"Binary/{uid}" for uid in facts.sr_sop_instance_uids]
    assert all(form["contentType"] == "application/dicom" for form in dicom_forms)


def test_diagnostic_report_us_core_elements() -> None:
    resource = checked(diagnostic_report(make_report(ReportStatus.FINAL)), "DiagnosticReport")
    assert resource["id"] == STUDY_UID == ids.diagnostic_report_id(STUDY_UID)
    assert [codings(concept) for concept in resource["category"]] == [[(LOINC, "LP29684-5")], [(V2_0074, "RAD")]]
    assert codings(resource["code"]) == [(LOINC, "18748-4")]
    assert resource["code"]["coding"][0]["display"] == "Diagnostic imaging study"
    assert resource["subject"] == {"reference": f"Patient/{ids.patient_id(make_patient())}"}
    assert resource["effectiveDateTime"] == "2024-01-05"
    assert resource["issued"] == "2024-01-05T09:45:00Z"
    assert resource["imagingStudy"] == [{"reference": f"ImagingStudy/{STUDY_UID}"}]
    assert resource["identifier"] == [
        {"type": {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]}, "value": "ACC20240105-17"}
    ]
    assert [form.get("title") for form in resource["presentedForm"]] == [
        "AI pneumonia result (DICOM SR)",
        "AI pneumonia result (DICOM SR)",
        "Conclusion",
    ]


@pytest.mark.parametrize(
    ("accession", "study_date", "identifier", "effective"),
    [
        ("ACC-1", "20240105", True, "2024-01-05"),
        (None, "20240105", False, "2024-01-05"),
        ("  ", None, False, "2024-01-05T09:45:00Z"),  # no study date: effective is the issue time
    ],
)
def test_diagnostic_report_identifier_and_effective(
    accession: str | None, study_date: str | None, identifier: bool, effective: str
) -> None:
    study = make_study(accession_number=accession, study_date=study_date)
    resource = checked(diagnostic_report(make_report(ReportStatus.FINAL, study=study)), "DiagnosticReport")
    assert ("identifier" in resource) is identifier
    assert resource["effectiveDateTime"] == effective


@pytest.mark.parametrize("status", [ReportStatus.REGISTERED, ReportStatus.CANCELLED])
def test_diagnostic_report_cites_results_only_when_reported(status: ReportStatus) -> None:
    """The status decides: a registered or cancelled report never cites an Observation, nor codes a conclusion."""
    resource = checked(diagnostic_report(make_report(status)), "DiagnosticReport")
    assert "result" not in resource and "conclusionCode" not in resource


def test_diagnostic_report_without_model_or_numbers_still_reads() -> None:
    facts = make_report(ReportStatus.FINAL, model=None, probability=None, threshold=None, reasons=({"reason": "unreadable"},))
    resource = checked(diagnostic_report(facts), "DiagnosticReport")
    assert resource["conclusion"] == (
        "AI pneumonia classifier: pneumonia PRESENT; 2 of 3 images analysed; not analysed: unreadable"
    )


def test_diagnostic_report_refuses_a_naive_issue_time() -> None:
    with pytest.raises(ValueError, match="issued"):
        diagnostic_report(make_report(ReportStatus.FINAL, issued=dt.datetime(2024, 1, 5, 9, 45)))


# -- OperationOutcome ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issues", "expected"),
    [
        (
            [("error", "not-found", "DiagnosticReport/1.2.3 is not known")],
            [{"severity": "error", "code": "not-found", "diagnostics": "DiagnosticReport/1.2.3 is not known"}],
        ),
        (
            [("fatal", "exception", "internal error"), ("warning", "processing", "")],
            [
                {"severity": "fatal", "code": "exception", "diagnostics": "internal error"},
                {"severity": "warning", "code": "processing"},
            ],
        ),
        ([("information", "informational", "ok")], [{"severity": "information", "code": "informational", "diagnostics": "ok"}]),
        ([("error", "security", "token expired")], [{"severity": "error", "code": "security", "diagnostics": "token expired"}]),
    ],
)
def test_operation_outcome(issues: list[tuple[str, str, str]], expected: list[dict[str, str]]) -> None:
    resource = checked(operation_outcome(issues), "OperationOutcome")
    assert resource == {"resourceType": "OperationOutcome", "issue": expected}


@pytest.mark.parametrize(
    ("issues", "message"),
    [
        ([], "at least one"),
        ([("critical", "exception", "x")], "issue-severity"),
        ([("error", "not_found", "x")], "issue-type"),
        ([("Error", "not-found", "x")], "issue-severity"),
    ],
)
def test_operation_outcome_refuses_codes_outside_the_value_sets(issues: list[tuple[str, str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        operation_outcome(issues)
