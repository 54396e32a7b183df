"""audit.fhir_audit_event: every event kind the gateway emits maps to a valid FHIR R4 AuditEvent
(parsed by fhir.resources), with the IHE BALP / DICOM mapping checked field by field."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

from audit.fhir_audit_event import DCM, to_fhir
from tests.audit.event_corpus import STUDY, WHEN, all_events

RECORDED = dt.datetime(2026, 11, 30, 10, 15, 31, tzinfo=dt.UTC)
EVENTS = all_events()


def _event(name: str) -> dict[str, Any]:
    return next(e for n, e in EVENTS if n == name).to_dict()


@pytest.mark.parametrize(("name", "event"), EVENTS, ids=[name for name, _ in EVENTS])
def test_every_event_kind_is_a_valid_r4_audit_event(name: str, event: Any) -> None:
    stored = event.to_dict()
    resource = to_fhir(7, RECORDED, stored, patient_reference=lambda pid: f"Patient/pat-{pid.lower()}")
    parsed = FhirAuditEvent.model_validate(resource)
    assert parsed.id == "7"
    assert parsed.type.code == stored["event_id"]["code"] and parsed.type.system == DCM
    assert parsed.action == stored["action"]
    assert parsed.outcome == str(stored["outcome"])
    assert parsed.recorded == RECORDED
    assert parsed.period.start == WHEN
    assert [a.who.identifier.value for a in parsed.agent] == [p["user_id"] for p in stored["participants"]]
    assert [a.requestor for a in parsed.agent] == [p["user_is_requestor"] for p in stored["participants"]]
    assert len(parsed.entity or []) == len(stored["objects"])
    assert [c.code for c in parsed.subtype or []] == [c["code"] for c in stored["event_types"]]


@pytest.mark.parametrize(("outcome", "expected"), [(0, "0"), (4, "4"), (8, "8"), (12, "12")])
def test_outcome_indicator_maps_one_to_one(outcome: int, expected: str) -> None:
    stored = _event("dicom-received") | {"outcome": outcome}
    assert to_fhir(1, RECORDED, stored)["outcome"] == expected


def test_dicom_transfer_agents_network_and_roles() -> None:
    resource = to_fhir(1, RECORDED, _event("dicom-received"))
    sender, receiver = resource["agent"]
    assert sender["type"]["coding"][0]["code"] == "110153" and sender["requestor"] is True
    assert sender["network"] == {"address": "10.0.0.5", "type": "2"}
    assert sender["altId"] == "AETITLES=MODALITY"
    assert receiver["type"]["coding"][0]["code"] == "110152" and "network" not in receiver
    assert resource["source"]["observer"]["display"] == "PNEUMO" and resource["source"]["site"] == "HOSPITAL"


def test_patient_entity_references_the_fhir_patient_only_when_known() -> None:
    stored = _event("dicom-received")
    known = to_fhir(1, RECORDED, stored, patient_reference=lambda pid: "Patient/pat-x" if pid == "PHI4711" else None)
    patient = known["entity"][1]
    assert patient["what"] == {"reference": "Patient/pat-x", "identifier": {"value": "PHI4711"}}
    assert patient["type"]["code"] == "1" and patient["role"]["code"] == "1"
    assert patient["name"] == "EVERYMAN^ADAM"
    unknown = to_fhir(1, RECORDED, stored, patient_reference=lambda pid: None)
    assert unknown["entity"][1]["what"]["identifier"]["value"] == "PHI4711"
    assert "reference" not in unknown["entity"][1]["what"]


def test_study_entity_is_a_dicom_uid_with_its_instances() -> None:
    study = to_fhir(1, RECORDED, _event("dicom-received"))["entity"][0]
    assert study["what"]["identifier"]["system"] == "urn:dicom:uid"
    assert study["what"]["identifier"]["value"] == f"urn:oid:{STUDY}"
    details = {(d["type"], d["valueString"]) for d in study["detail"]}
    assert ("Accession Number", "ACC-77") in details
    assert ("SOPInstanceUID", f"{STUDY}.1.1") in details


def test_fhir_search_keeps_its_query_and_references() -> None:
    resource = to_fhir(1, RECORDED, _event("fhir-search"))
    query, report, patient = resource["entity"]
    assert base64.b64decode(query["query"]).decode() == "patient=Patient/pat-abc&date=ge2026"
    assert query["role"]["code"] == "24" and "what" not in query
    assert report["what"] == {"reference": f"DiagnosticReport/{STUDY}/_history/1"}
    assert patient["what"] == {"reference": "Patient/pat-abc"}


def test_an_invalid_resource_is_rejected_by_the_validator() -> None:
    resource = to_fhir(1, RECORDED, _event("dicom-received"))
    resource["outcome"] = 0  # R4: a code (string); the mapping must not emit numbers
    resource["agent"][0]["requestor"] = "maybe"
    with pytest.raises(ValueError):
        FhirAuditEvent.model_validate(resource)
