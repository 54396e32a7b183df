"""Typed audit events in the shape of DICOM PS3.15 Annex A.5 (itself RFC 3881 / IHE ATNA).

One event = who (active participants), what (event ID, type, action), when, where (network
access points, audit source), on what (participant objects: patient, study, instances), and the
outcome. The same content exports as DICOM audit XML and as FHIR AuditEvent (IHE BALP), so the
fields mirror the shared structure rather than any one serialisation.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Code:
    """A coded value (code, coding scheme designator, meaning), e.g. ("110100", "DCM", ...)."""

    code: str
    system: str
    display: str


class EventId:
    """PS3.15 A.5.3 event IDs (CID 400 "Audit Event ID")."""

    APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
    AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
    BEGIN_TRANSFERRING = Code("110102", "DCM", "Begin Transferring DICOM Instances")
    INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
    EXPORT = Code("110106", "DCM", "Export")
    IMPORT = Code("110107", "DCM", "Import")
    NETWORK_ENTRY = Code("110108", "DCM", "Network Entry")
    ORDER_RECORD = Code("110109", "DCM", "Order Record")
    PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
    QUERY = Code("110112", "DCM", "Query")
    SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
    USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")


class EventType:
    """PS3.15 A.5.3 event type codes (CID 401-403) we use."""

    APPLICATION_START = Code("110120", "DCM", "Application Start")
    APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
    LOGIN = Code("110122", "DCM", "Login")
    LOGOUT = Code("110123", "DCM", "Logout")
    NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
    USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
    OBJECT_SECURITY_ATTRIBUTES_CHANGED = Code("110135", "DCM", "Object Security Attributes Changed")


class RoleId:
    """CID 402 "Audit Active Participant Role ID Code"."""

    APPLICATION = Code("110150", "DCM", "Application")
    APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
    DESTINATION = Code("110152", "DCM", "Destination Role ID")
    SOURCE = Code("110153", "DCM", "Source Role ID")


class Action(enum.StrEnum):
    """EventActionCode (RFC 3881): Create, Read, Update, Delete, Execute."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator (RFC 3881 / PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class NetworkAccessPointType(enum.IntEnum):
    MACHINE_NAME = 1
    IP_ADDRESS = 2


@dataclass(frozen=True)
class ActiveParticipant:
    user_id: str
    user_is_requestor: bool
    alternative_user_id: str | None = None
    user_name: str | None = None
    role_id: Code | None = None
    network_access_point_id: str | None = None
    network_access_point_type: NetworkAccessPointType | None = None


@dataclass(frozen=True)
class ParticipantObject:
    """What the event was about (RFC 3881 ParticipantObjectIdentification).

    ``type_code`` 1 = person, 2 = system object; ``role`` 1 = patient, 3 = report, 24 = query.
    ``id_type`` is a Code: ("2", "RFC-3881", "Patient Number"), ("110180", "DCM", "Study
    Instance UID"), ("110181", "DCM", "SOP Class UID"), ("110182", "DCM", "Node ID") ...
    """

    object_id: str
    id_type: Code
    type_code: int
    role: int | None = None
    name: str | None = None
    query: str | None = None  # base64 of the query dataset, for Query events
    details: dict[str, str] = field(default_factory=dict)
    sop_classes: dict[str, int] = field(default_factory=dict)  # SOP Class UID -> instance count
    instances: tuple[str, ...] = ()


class ObjectIdType:
    PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
    STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
    SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
    NODE_ID = Code("110182", "DCM", "Node ID")


@dataclass(frozen=True)
class AuditSource:
    source_id: str
    enterprise_site_id: str | None = None
    type_code: int = 4  # RFC 3881: "Application Server process tier"


@dataclass(frozen=True)
class AuditEvent:
    event_id: Code
    action: Action
    outcome: Outcome
    occurred_at: dt.datetime
    source: AuditSource
    participants: tuple[ActiveParticipant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[Code, ...] = ()
    outcome_description: str | None = None

    def __post_init__(self) -> None:
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")
        if not self.participants:
            raise ValueError("participants: an audit event needs at least one active participant")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the stored and hashed form of the event.

        Written out field by field: ``dataclasses.asdict`` deep-copies through ``copy.deepcopy``
        and cost more than sealing the record (a test keeps the two equal, field for field).
        """
        return {
            "event_id": _code(self.event_id),
            "action": self.action.value,
            "outcome": int(self.outcome),
            "occurred_at": self.occurred_at.astimezone(dt.UTC).isoformat(),
            "source": {"source_id": self.source.source_id, "enterprise_site_id": self.source.enterprise_site_id,
                       "type_code": self.source.type_code},
            "participants": [_participant(p) for p in self.participants],
            "objects": [_object(o) for o in self.objects],
            "event_types": [_code(c) for c in self.event_types],
            "outcome_description": self.outcome_description,
        }


def _code(code: Code) -> dict[str, str]:
    return {"code": code.code, "system": code.system, "display": code.display}


def _participant(participant: ActiveParticipant) -> dict[str, Any]:
    nap = participant.network_access_point_type
    return {
        "user_id": participant.user_id,
        "user_is_requestor": participant.user_is_requestor,
        "alternative_user_id": participant.alternative_user_id,
        "user_name": participant.user_name,
        "role_id": None if participant.role_id is None else _code(participant.role_id),
        "network_access_point_id": participant.network_access_point_id,
        "network_access_point_type": None if nap is None else int(nap),
    }


def _object(item: ParticipantObject) -> dict[str, Any]:
    return {
        "object_id": item.object_id,
        "id_type": _code(item.id_type),
        "type_code": item.type_code,
        "role": item.role,
        "name": item.name,
        "query": item.query,
        "details": dict(item.details),
        "sop_classes": dict(item.sop_classes),
        "instances": list(item.instances),
    }
