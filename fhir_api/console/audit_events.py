"""The audit records the console writes (PS3.15 A.5.3): sign-in and sign-out, every view of
patient data, every search that lists patients.

A console user is a person, so the requesting participant is their IdP subject (``user_id``) with
their display name (``user_name``) and browser address; the gateway is the second participant,
as in the FHIR API's records (:mod:`fhir_api.audit_trail`).
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable

from audit.builders import patient_object, study_object
from audit.events import (
    Action,
    ActiveParticipant,
    AuditEvent,
    AuditSource,
    EventId,
    EventType,
    NetworkAccessPointType,
    Outcome,
    ParticipantObject,
    RoleId,
)
from audit.export import URI_ID_TYPE
from fhir_api.console.session import ConsoleUser

#: The query object of a studies-list record: the page (with its filters in the record's query).
STUDIES_PAGE = "urn:pneumo-gateway:console:studies"


def _participants(source: AuditSource, user_id: str, user_name: str | None, address: str | None) -> tuple[ActiveParticipant, ...]:
    return (
        ActiveParticipant(
            user_id=user_id, user_name=user_name, user_is_requestor=True, network_access_point_id=address,
            network_access_point_type=NetworkAccessPointType.IP_ADDRESS if address else None,
        ),
        ActiveParticipant(user_id=source.source_id, user_is_requestor=False, role_id=RoleId.APPLICATION),
    )


def sign_in(
    source: AuditSource, *, user_id: str, user_name: str | None, address: str | None, when: dt.datetime,
    outcome: Outcome, detail: str, logout: bool = False,
) -> AuditEvent:
    """A.5.3.13 User Authentication: a console sign-in (success or refusal) or sign-out."""
    return AuditEvent(
        event_id=EventId.USER_AUTHENTICATION,
        event_types=(EventType.LOGOUT if logout else EventType.LOGIN,),
        action=Action.EXECUTE,
        outcome=outcome,
        outcome_description=f"console: {detail}"[:500],
        occurred_at=when,
        source=source,
        participants=_participants(source, user_id, user_name, address),
    )


def study_viewed(
    source: AuditSource, user: ConsoleUser, *, address: str | None, when: dt.datetime, study_uid: str,
    patient_id: str | None, patient_name: str | None, what: str,
) -> AuditEvent:
    """A.5.3.8 Patient Record, Action R: the user opened a study's page (or its SR, summary image, report)."""
    objects: list[ParticipantObject] = [study_object(study_uid, {})]
    if patient_id:
        objects.append(patient_object(patient_id, patient_name))
    return AuditEvent(
        event_id=EventId.PATIENT_RECORD,
        action=Action.READ,
        outcome=Outcome.SUCCESS,
        outcome_description=f"console: {what}"[:500],
        occurred_at=when,
        source=source,
        participants=_participants(source, user.subject, user.name, address),
        objects=tuple(objects),
    )


def studies_listed(
    source: AuditSource, user: ConsoleUser, *, address: str | None, when: dt.datetime, query: str, patients: Iterable[str],
) -> AuditEvent:
    """A.5.3.10 Query, Action E: a studies page (it shows patient names and ids); the patients listed."""
    objects = [ParticipantObject(
        object_id=STUDIES_PAGE, id_type=URI_ID_TYPE, type_code=2, role=24,
        query=base64.b64encode(query.encode("utf-8")).decode("ascii"),
    )]
    objects.extend(patient_object(patient, None) for patient in sorted(set(patients))[:100])
    return AuditEvent(
        event_id=EventId.QUERY,
        action=Action.EXECUTE,
        outcome=Outcome.SUCCESS,
        outcome_description="console: studies list",
        occurred_at=when,
        source=source,
        participants=_participants(source, user.subject, user.name, address),
        objects=tuple(objects),
    )
