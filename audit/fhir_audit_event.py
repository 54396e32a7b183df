"""Stored audit records as FHIR R4 AuditEvent resources, in the IHE BALP shape.

:func:`to_fhir` is a pure function from one stored record (sequence number, time sealed, the event
dict of ``audit_record.event``) to an AuditEvent resource dict. It follows the FHIR R4 mapping of
DICOM PS3.15 A.5 audit messages (AuditEvent "Mappings": DICOM) and IHE Basic Audit Log Patterns
(BALP) 1.1:

* ``type`` = the DICOM Event ID (CID 400, system DCM), ``subtype`` = the Event Type Codes;
  ``action`` = EventActionCode; ``period`` and ``recorded``: when it happened and when it was
  sealed into the log; ``outcome`` = EventOutcomeIndicator ("0", "4", "8", "12"), ``outcomeDesc``.
* ``agent[]`` per ActiveParticipant: ``type`` = its RoleIDCode, ``who.identifier.value`` =
  UserID, ``altId`` = AlternativeUserID, ``name`` = UserName, ``requestor`` = UserIsRequestor,
  ``network`` = NetworkAccessPointID and type (1 machine name, 2 IP address).
* ``source``: ``observer`` = AuditSourceID, ``site`` = AuditEnterpriseSiteID, ``type`` from
  security-source-type.
* ``entity[]`` per ParticipantObject: ``type`` (audit-entity-type 1 Person / 2 System Object),
  ``role`` (object-role, e.g. 1 Patient, 3 Report, 24 Query). A patient is ``what`` = a reference to
  the FHIR Patient when the caller can name one (*patient_reference*, supplied by the FHIR API,
  which knows how Patient ids are made), else ``what.identifier`` = the Patient ID. A study is
  ``what.identifier`` (system ``urn:dicom:uid``, value ``urn:oid:<Study Instance UID>``), with its
  SOP classes, instance UIDs and accession number as ``detail`` entries. A FHIR resource accessed is
  ``what.reference`` (versioned, as read). A query carries ``query`` (base64, as recorded).

The resource ``id`` is the record's sequence number: stable, and the order of the log.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ACTION_DISPLAY = {"C": "Create", "R": "Read/View/Print", "U": "Update", "D": "Delete", "E": "Execute"}
ENTITY_TYPE_DISPLAY = {1: "Person", 2: "System Object", 3: "Organization", 4: "Other"}
OBJECT_ROLE_DISPLAY = {1: "Patient", 2: "Location", 3: "Report", 4: "Domain Resource", 5: "Master file", 6: "User",
                       7: "List", 8: "Doctor", 9: "Subscriber", 10: "Guarantor", 11: "Security User Entity",
                       12: "Security User Group", 13: "Security Resource", 14: "Security Granularity Definition",
                       15: "Practitioner", 16: "Data Destination", 17: "Data Repository", 18: "Schedule",
                       19: "Customer", 20: "Job", 21: "Job Stream", 22: "Table", 23: "Routing Criteria", 24: "Query"}
SOURCE_TYPE_DISPLAY = {1: "User Device", 2: "Data Interface", 3: "Web Server", 4: "Application Server",
                       5: "Database Server", 6: "Security Server", 7: "Network Device", 8: "Network Router", 9: "Other"}
#: Coding systems of the stored codes that are not URIs (PS3.16 designators and RFC 3881 tables).
_SYSTEMS = {"DCM": DCM, "RFC-3881": "urn:ietf:rfc:3881"}
#: Participant object ID types with a meaning here (PS3.15 A.5.3, audit/events.py ObjectIdType).
PATIENT_NUMBER = ("2", "RFC-3881")
STUDY_INSTANCE_UID = ("110180", "DCM")
FHIR_RESOURCE = ("FHIR", "urn:ihe:iti:balp")

#: Given a Patient ID as recorded, the FHIR reference ("Patient/<id>") of that patient, or None.
PatientReference = Callable[[str], str | None]


def coding_system(system: str) -> str:
    """The FHIR system URI of a stored coding scheme designator (URIs pass through)."""
    if system in _SYSTEMS:
        return _SYSTEMS[system]
    return system if ":" in system else f"urn:pneumo-gateway:coding-scheme:{system}"


def _coding(code: Mapping[str, Any]) -> dict[str, str]:
    coding = {"system": coding_system(str(code.get("system", ""))), "code": str(code.get("code", ""))}
    if code.get("display"):
        coding["display"] = str(code["display"])
    return coding


def _instant(value: dt.datetime) -> str:
    when = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat()


def _occurred(event: Mapping[str, Any], recorded_at: dt.datetime) -> str:
    occurred = event.get("occurred_at")
    if isinstance(occurred, str):
        try:
            return _instant(dt.datetime.fromisoformat(occurred))
        except ValueError:
            pass
    return _instant(recorded_at)


def _agent(participant: Mapping[str, Any]) -> dict[str, Any]:
    agent: dict[str, Any] = {}
    role = participant.get("role_id")
    if role:
        agent["type"] = {"coding": [_coding(role)]}
    agent["who"] = {"identifier": {"value": str(participant.get("user_id") or "unknown")}}
    if participant.get("alternative_user_id"):
        agent["altId"] = str(participant["alternative_user_id"])
    if participant.get("user_name"):
        agent["name"] = str(participant["user_name"])
    agent["requestor"] = bool(participant.get("user_is_requestor"))
    address = participant.get("network_access_point_id")
    if address:
        network: dict[str, str] = {"address": str(address)}
        if participant.get("network_access_point_type") is not None:
            network["type"] = str(participant["network_access_point_type"])
        agent["network"] = network
    return agent


def _is(code: Mapping[str, Any], expected: tuple[str, str]) -> bool:
    return (code.get("code"), code.get("system")) == expected


def _entity(item: Mapping[str, Any], patient_reference: PatientReference | None) -> dict[str, Any]:
    id_type: Mapping[str, Any] = item.get("id_type") or {}
    object_id = str(item.get("object_id", ""))
    entity: dict[str, Any] = {}
    if item.get("query") is not None:
        entity["description"] = object_id  # the resource type or SOP Class queried; the query says the rest
    elif _is(id_type, FHIR_RESOURCE) and "/" in object_id:
        entity["what"] = {"reference": object_id}
    elif _is(id_type, PATIENT_NUMBER) and object_id.startswith("Patient/"):
        entity["what"] = {"reference": object_id}
    elif _is(id_type, PATIENT_NUMBER) and patient_reference is not None and (found := patient_reference(object_id)):
        entity["what"] = {"reference": found, "identifier": {"value": object_id}}
    elif _is(id_type, STUDY_INSTANCE_UID):
        entity["what"] = {"identifier": {"type": {"coding": [_coding(id_type)]}, "system": "urn:dicom:uid",
                                         "value": f"urn:oid:{object_id}"}}
    else:
        entity["what"] = {"identifier": {"type": {"coding": [_coding(id_type)]}, "value": object_id}}
    type_code = item.get("type_code")
    if type_code in ENTITY_TYPE_DISPLAY:
        entity["type"] = {"system": ENTITY_TYPE, "code": str(type_code), "display": ENTITY_TYPE_DISPLAY[type_code]}
    role = item.get("role")
    if role in OBJECT_ROLE_DISPLAY:
        entity["role"] = {"system": OBJECT_ROLE, "code": str(role), "display": OBJECT_ROLE_DISPLAY[role]}
    if item.get("name"):
        entity["name"] = str(item["name"])
    if item.get("query") is not None:
        entity["query"] = str(item["query"])
    details: list[dict[str, str]] = [{"type": str(k), "valueString": str(v)} for k, v in (item.get("details") or {}).items()]
    details += [{"type": "SOPClass", "valueString": f"{uid} ({count} instances)"}
                for uid, count in sorted((item.get("sop_classes") or {}).items())]
    details += [{"type": "SOPInstanceUID", "valueString": str(uid)} for uid in item.get("instances") or ()]
    if details:
        entity["detail"] = details
    return entity


def to_fhir(
    seq: int, recorded_at: dt.datetime, event: Mapping[str, Any], *, patient_reference: PatientReference | None = None
) -> dict[str, Any]:
    """The FHIR R4 AuditEvent of stored record *seq* (see the module docstring)."""
    occurred = _occurred(event, recorded_at)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(seq),
        "meta": {"versionId": "1", "lastUpdated": _instant(recorded_at)},
        "type": _coding(event["event_id"]),
    }
    subtypes = [_coding(code) for code in event.get("event_types") or ()]
    if subtypes:
        resource["subtype"] = subtypes
    if event.get("action") in ACTION_DISPLAY:
        resource["action"] = event["action"]
    resource["period"] = {"start": occurred, "end": occurred}
    resource["recorded"] = _instant(recorded_at)
    resource["outcome"] = str(int(event.get("outcome", 0)))
    if event.get("outcome_description"):
        resource["outcomeDesc"] = str(event["outcome_description"])
    resource["agent"] = [_agent(p) for p in event.get("participants") or ()]
    source: Mapping[str, Any] = event.get("source") or {}
    fhir_source: dict[str, Any] = {}
    if source.get("enterprise_site_id"):
        fhir_source["site"] = str(source["enterprise_site_id"])
    fhir_source["observer"] = {"display": str(source.get("source_id") or "unknown"),
                               "identifier": {"value": str(source.get("source_id") or "unknown")}}
    type_code = source.get("type_code")
    if type_code in SOURCE_TYPE_DISPLAY:
        fhir_source["type"] = [{"system": SOURCE_TYPE, "code": str(type_code), "display": SOURCE_TYPE_DISPLAY[type_code]}]
    resource["source"] = fhir_source
    entities = [_entity(item, patient_reference) for item in event.get("objects") or ()]
    if entities:
        resource["entity"] = entities
    return resource
