"""Builders for the audit events the gateway emits (PS3.15 A.5.3.x), one function per message
type so that every part records the same event the same way."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from audit.events import (
    Action,
    ActiveParticipant,
    AuditEvent,
    AuditSource,
    Code,
    EventId,
    EventType,
    NetworkAccessPointType,
    ObjectIdType,
    Outcome,
    ParticipantObject,
    RoleId,
)


def _nap_type(address: str | None) -> NetworkAccessPointType | None:
    if not address:
        return None
    stripped = address.strip("[]")
    looks_ip = stripped.replace(".", "").isdigit() or ":" in stripped
    return NetworkAccessPointType.IP_ADDRESS if looks_ip else NetworkAccessPointType.MACHINE_NAME


def application(
    source: AuditSource, ae_title: str, host: str | None, *, requestor: bool, role: Code | None = RoleId.APPLICATION
) -> ActiveParticipant:
    return ActiveParticipant(
        user_id=ae_title,
        alternative_user_id=f"AETITLES={ae_title}",
        user_is_requestor=requestor,
        role_id=role,
        network_access_point_id=host,
        network_access_point_type=_nap_type(host),
    )


def patient_object(patient_id: str, patient_name: str | None) -> ParticipantObject:
    return ParticipantObject(
        object_id=patient_id, id_type=ObjectIdType.PATIENT_NUMBER, type_code=1, role=1, name=patient_name
    )


def study_object(
    study_uid: str, sop_classes: dict[str, int], instances: Sequence[str] = (), accession: str | None = None
) -> ParticipantObject:
    details = {"Accession Number": accession} if accession else {}
    return ParticipantObject(
        object_id=study_uid,
        id_type=ObjectIdType.STUDY_INSTANCE_UID,
        type_code=2,
        role=3,
        sop_classes=dict(sop_classes),
        instances=tuple(instances),
        details=details,
    )


def application_activity(
    source: AuditSource, *, started: bool, process_name: str, host: str | None, when: dt.datetime, user: str | None = None,
    description: str | None = None,
) -> AuditEvent:
    """A.5.3.1 Application Activity: the gateway started or stopped (*description*: e.g. the
    fingerprint of the configuration it started with, conf/fingerprint.py)."""
    participants = [ActiveParticipant(user_id=process_name, user_is_requestor=False, role_id=RoleId.APPLICATION,
                                      network_access_point_id=host, network_access_point_type=_nap_type(host))]
    if user:
        participants.append(ActiveParticipant(user_id=user, user_is_requestor=True, role_id=RoleId.APPLICATION_LAUNCHER))
    return AuditEvent(
        event_id=EventId.APPLICATION_ACTIVITY,
        event_types=(EventType.APPLICATION_START if started else EventType.APPLICATION_STOP,),
        action=Action.EXECUTE,
        outcome=Outcome.SUCCESS,
        outcome_description=description,
        occurred_at=when,
        source=source,
        participants=tuple(participants),
    )


def security_alert(
    source: AuditSource,
    *,
    event_type: Code,
    reporter_ae: str,
    offender_id: str,
    offender_host: str | None,
    description: str,
    when: dt.datetime,
    outcome: Outcome = Outcome.MINOR_FAILURE,
) -> AuditEvent:
    """A.5.3.11 Security Alert, e.g. an association attempt from an unknown node."""
    return AuditEvent(
        event_id=EventId.SECURITY_ALERT,
        event_types=(event_type,),
        action=Action.EXECUTE,
        outcome=outcome,
        outcome_description=description,
        occurred_at=when,
        source=source,
        participants=(
            ActiveParticipant(user_id=reporter_ae, user_is_requestor=False, role_id=RoleId.APPLICATION),
            ActiveParticipant(
                user_id=offender_id,
                user_is_requestor=True,
                network_access_point_id=offender_host,
                network_access_point_type=_nap_type(offender_host),
            ),
        ),
        objects=(
            ParticipantObject(
                object_id=offender_host or offender_id,
                id_type=ObjectIdType.NODE_ID,
                type_code=2,
                details={"Alert Description": description},
            ),
        ),
    )


def instances_transferred(
    source: AuditSource,
    *,
    action: Action,
    outcome: Outcome,
    source_participant: ActiveParticipant,
    destination_participant: ActiveParticipant,
    study_uid: str,
    sop_classes: dict[str, int],
    instances: Iterable[str],
    patient_id: str,
    patient_name: str | None,
    when: dt.datetime,
    description: str | None = None,
    accession: str | None = None,
    other_participants: Sequence[ActiveParticipant] = (),
) -> AuditEvent:
    """A.5.3.5 DICOM Instances Transferred (C = first receipt, U = replaced, R = re-sent).

    *other_participants*: e.g. the C-MOVE requestor, who is neither source nor destination."""
    return AuditEvent(
        event_id=EventId.INSTANCES_TRANSFERRED,
        action=action,
        outcome=outcome,
        outcome_description=description,
        occurred_at=when,
        source=source,
        participants=(source_participant, destination_participant, *other_participants),
        objects=(study_object(study_uid, sop_classes, tuple(instances), accession), patient_object(patient_id, patient_name)),
    )


def ai_processing(
    source: AuditSource,
    *,
    application_id: str,
    action: Action,
    outcome: Outcome,
    study_uid: str,
    sop_classes: dict[str, int],
    instances: Iterable[str],
    patient_id: str,
    patient_name: str | None,
    description: str,
    when: dt.datetime,
    accession: str | None = None,
) -> AuditEvent:
    """A.5.3.4 DICOM Instances Accessed: the classifier read an image (Action R) and, when it
    produced a report, created the SR/SC objects (Action C) listed as instances."""
    return AuditEvent(
        event_id=EventId.INSTANCES_ACCESSED,
        action=action,
        outcome=outcome,
        outcome_description=description,
        occurred_at=when,
        source=source,
        participants=(
            ActiveParticipant(user_id=application_id, user_is_requestor=True, role_id=RoleId.APPLICATION),
        ),
        objects=(study_object(study_uid, sop_classes, tuple(instances), accession), patient_object(patient_id, patient_name)),
    )


def query(
    source: AuditSource,
    *,
    requestor: ActiveParticipant,
    responder: ActiveParticipant,
    sop_class_uid: str,
    query_base64: str,
    transfer_syntax_uid: str,
    outcome: Outcome,
    when: dt.datetime,
    patient_id: str | None = None,
    description: str | None = None,
) -> AuditEvent:
    """A.5.3.12 Query: a C-FIND was received (Action E).

    The participant object is the SOP Class queried (ID type 110181, role 3 "Report") carrying
    the query identifier itself, base64-encoded, with the transfer syntax it is encoded in as
    the "TransferSyntax" detail, so that an auditor can decode exactly what was asked. When the
    query names one patient, the patient is recorded too.
    """
    objects = [
        ParticipantObject(
            object_id=sop_class_uid,
            id_type=ObjectIdType.SOP_CLASS_UID,
            type_code=2,
            role=3,
            query=query_base64,
            details={"TransferSyntax": transfer_syntax_uid},
        )
    ]
    if patient_id:
        objects.append(patient_object(patient_id, None))
    return AuditEvent(
        event_id=EventId.QUERY,
        action=Action.EXECUTE,
        outcome=outcome,
        outcome_description=description,
        occurred_at=when,
        source=source,
        participants=(requestor, responder),
        objects=tuple(objects),
    )


def begin_transferring(
    source: AuditSource,
    *,
    source_participant: ActiveParticipant,
    destination_participant: ActiveParticipant,
    study_uid: str,
    sop_classes: dict[str, int],
    instances: Iterable[str],
    patient_id: str,
    patient_name: str | None,
    when: dt.datetime,
    accession: str | None = None,
    other_participants: Sequence[ActiveParticipant] = (),
) -> AuditEvent:
    """A.5.3.2 Begin Transferring DICOM Instances (Action E): written before the first C-STORE
    sub-operation of a C-MOVE / C-GET, so a transfer that dies half-way still left a trace;
    :func:`instances_transferred` records how it ended."""
    return AuditEvent(
        event_id=EventId.BEGIN_TRANSFERRING,
        action=Action.EXECUTE,
        outcome=Outcome.SUCCESS,
        occurred_at=when,
        source=source,
        participants=(source_participant, destination_participant, *other_participants),
        objects=(study_object(study_uid, sop_classes, tuple(instances), accession), patient_object(patient_id, patient_name)),
    )


#: A private code (PS3.16 §8.2: designators starting "99" are local) for an operator action on
#: the outbox; PS3.15 CID 401 has no event type for "re-queue a failed delivery".
OPERATOR_RETRY = Code("DELIVERY-RETRY", "99PNEUMO", "Operator re-queued deliveries")


def operator_action(
    source: AuditSource, *, operator: str | None, host: str | None, when: dt.datetime, description: str
) -> AuditEvent:
    """A.5.3.1 Application Activity (Action E) for an operator's command that changes what the
    gateway will do, e.g. ``pneumo deliveries retry``: who asked, from where, and what."""
    return AuditEvent(
        event_id=EventId.APPLICATION_ACTIVITY,
        event_types=(OPERATOR_RETRY,),
        action=Action.EXECUTE,
        outcome=Outcome.SUCCESS,
        outcome_description=description,
        occurred_at=when,
        source=source,
        participants=(
            ActiveParticipant(
                user_id=operator or "unknown", user_is_requestor=True, role_id=RoleId.APPLICATION_LAUNCHER,
                network_access_point_id=host, network_access_point_type=_nap_type(host),
            ),
        ),
    )


def dicom_transfer(
    source: AuditSource,
    *,
    action: Action,
    outcome: Outcome,
    sender: tuple[str, str | None],
    receiver: tuple[str, str | None],
    sender_is_requestor: bool,
    study_uid: str,
    sop_classes: dict[str, int],
    instances: Iterable[str],
    patient_id: str,
    patient_name: str | None,
    when: dt.datetime,
    description: str | None = None,
    accession: str | None = None,
) -> AuditEvent:
    """A.5.3.5 DICOM Instances Transferred between two AEs given as (AE title, host): the one way
    every C-STORE we receive or send is recorded (ingest, refusals, deliveries)."""
    return instances_transferred(
        source,
        action=action,
        outcome=outcome,
        source_participant=application(source, sender[0], sender[1], requestor=sender_is_requestor, role=RoleId.SOURCE),
        destination_participant=application(
            source, receiver[0], receiver[1], requestor=not sender_is_requestor, role=RoleId.DESTINATION
        ),
        study_uid=study_uid,
        sop_classes=sop_classes,
        instances=instances,
        patient_id=patient_id,
        patient_name=patient_name,
        when=when,
        description=description,
        accession=accession,
    )
