"""The MLLP listener's application side: orders and ADT in, one ACK out per message (docs/hl7.md).

For each frame (:class:`InboundService.handle`):

1. parse it (:func:`hl7.messages.parse_inbound`); a message we cannot use gets AE or AR with an
   ERR segment (HL7 v2.5.1 2.9.2 original-mode acknowledgement) and changes nothing;
2. check the sender: MSH-3/MSH-4 must be a configured ``[[hl7.peers]]`` entry, connecting from its
   ``host`` when one is set and, when it has a ``certificate_sha256``, over TLS with the client
   certificate of that fingerprint — otherwise AR and a Security Alert in the audit log;
3. a message already acknowledged (same MSH-3, MSH-4, MSH-10) gets the *same* ACK again and
   changes nothing (a sender that lost our ACK resends; HL7 v2.5.1 2.10.1);
4. apply it in one transaction with its ACK and audit record: an order is stored or updated
   (matched to its study by accession, whichever arrives first), an ADT^A08 updates the patient's
   demographics, an ADT^A40 moves the prior patient's studies and orders to the surviving one; the
   studies concerned are re-published (FHIR);
5. answer AA only after that commit. When the database cannot commit (down, locked), no ACK is
   sent and the connection is closed: the sender retries, nothing is half-stored, no AA lies.

Application logs name message types, ACK codes and error positions, never field values.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import structlog
from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audit.alert_throttle import AlertThrottle
from audit.builders import security_alert
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
from audit.store import append as append_audit
from audit.store import append_many
from conf.network import host_addresses, normalise_address
from conf.settings import Hl7Peer, Hl7Settings
from hl7.group_commit import GroupCommit
from hl7.messages import (
    ErrorCode,
    Hl7MessageError,
    Inbound,
    MessageHeader,
    OrderMessage,
    PatientIdentity,
    PatientMerge,
    PatientUpdate,
    build_ack,
    parse_inbound,
)
from hl7.mllp import ConnectionInfo, FrameError
from hl7.tls import HandshakeError
from storage.db import Database
from storage.models import Hl7InboundMessage, ImagingOrder, Patient, Study, utcnow
from storage.study_results import schedule_study_changed

log = structlog.get_logger(__name__)

#: ORC-1 order control codes that end an order (HL7 v2.5.1 table 0119): cancel, discontinue.
_CANCELLING = {"CA", "OC", "CR", "DC", "OD", "DR"}


class SenderNotAllowedError(Hl7MessageError):
    """MSH-3/MSH-4 (or the connecting host) is not a configured peer."""


#: Why a sender was refused (the ERR text of the AR, and the Security Alert's description).
NOT_A_PEER = "the sending application/facility is not allowed to send to this gateway (from this host)"
WRONG_CERTIFICATE = "the sending application/facility did not present the TLS client certificate configured for it"


class SenderPolicy:
    """Deny by default: the sending application and facility (MSH-3, MSH-4) must be a configured
    peer, connecting from its ``host`` when one is set (an IP or a name, resolved once at start)
    and, when its ``certificate_sha256`` is set, over TLS with a client certificate of that
    SHA-256 fingerprint (IHE ATNA node authentication bound to the HL7 identity: another holder
    of a certificate from the same CA cannot send in this peer's name)."""

    def __init__(self, peers: Sequence[Hl7Peer]) -> None:
        self._peers = [
            (p.sending_application, p.sending_facility, host_addresses(p.host) if p.host is not None else None,
             p.certificate_sha256)
            for p in peers
        ]

    def refusal(self, header: MessageHeader, address: str, certificate_sha256: str | None = None) -> str | None:
        """None when some peer entry allows this message; otherwise why not (:data:`NOT_A_PEER`,
        or :data:`WRONG_CERTIFICATE` when the entries that name the sender and its host all ask
        for a client certificate it did not present)."""
        address = normalise_address(address)
        wrong_certificate = False
        for application, facility, addresses, fingerprint in self._peers:
            if application != header.sending_application or facility != header.sending_facility:
                continue
            if addresses is not None and address not in addresses:
                continue
            if fingerprint is None or fingerprint == certificate_sha256:
                return None
            wrong_certificate = True
        return WRONG_CERTIFICATE if wrong_certificate else NOT_A_PEER

    def allows(self, header: MessageHeader, address: str, certificate_sha256: str | None = None) -> bool:
        return self.refusal(header, address, certificate_sha256) is None


class InboundService:
    """The handler :class:`hl7.mllp.MllpServer` calls for each frame."""

    def __init__(self, database: Database, audit_source: AuditSource, settings: Hl7Settings) -> None:
        self._db = database
        self._audit_source = audit_source
        self._settings = settings
        self._senders = SenderPolicy(settings.peers)
        #: Refusals are answered every time; their Security Alerts are throttled per (address,
        #: kind), so a flood of refused messages or handshakes cannot flood the hash-chained log.
        self._alert_throttle = AlertThrottle()
        self._commits: GroupCommit[_Accepted, str] = GroupCommit(self._apply_batch, self._apply_one)

    # -- the MLLP callbacks ---------------------------------------------------------------------

    def handle(self, payload: bytes, info: ConnectionInfo) -> bytes:
        now = utcnow()
        try:
            message = parse_inbound(payload, processing_ids=tuple(self._settings.processing_ids))
        except Hl7MessageError as error:
            return self._refuse(error, info, now)
        header = message.header
        why = self._senders.refusal(header, info.peer_host, info.certificate_sha256)
        if why is not None:
            refusal = SenderNotAllowedError(
                why, ack_code="AR", hl7_error_code=ErrorCode.APPLICATION_INTERNAL_ERROR, header=header,
            )
            return self._refuse(refusal, info, now)
        return self._commits.submit(_Accepted(message, info, now)).encode("utf-8")

    def on_frame_error(self, error: FrameError, info: ConnectionInfo) -> bytes | None:
        """A framing error (junk, truncated or oversized frame): AR without a control id to echo."""
        log.warning("hl7.frame_error", reason=error.reason, peer=info.peer_host, connection=info.connection_id)
        refusal = Hl7MessageError(f"MLLP framing error: {error.reason}", ack_code="AR",
                                  hl7_error_code=ErrorCode.APPLICATION_INTERNAL_ERROR)
        try:
            self._audit_received(None, info, "AR", utcnow(), refusal)
        except Exception:  # noqa: BLE001 - the refusal stands even if its audit record could not be written
            log.error("hl7.audit_failed", peer=info.peer_host)
        if error.too_large:
            self.on_limit_breach(info.peer_host, "max_message_bytes",
                                 f"an MLLP frame over {self._settings.max_message_bytes} bytes")
        return self._ack(None, "AR", utcnow(), refusal).encode("utf-8")

    def on_connection_refused(self, address: str) -> None:
        """A connection refused for ``max_connections`` (the listener closed it)."""
        self.on_limit_breach(address, "max_connections", f"more than {self._settings.max_connections} connections")

    def on_limit_breach(self, address: str, kind: str, what: str) -> None:
        """A limit broken by *address*: a PS3.15 Security Alert (Use of Restricted Function), at most
        one per (address, kind) a minute with the count since the last (the refusal itself is
        answered every time by the caller)."""
        breach = self._alert_throttle.breach(address, kind)
        if breach is None:
            return
        try:
            with self._db.session() as session:
                append_audit(session, security_alert(
                    self._audit_source, event_type=EventType.USE_OF_RESTRICTED_FUNCTION,
                    reporter_ae=self._settings.sending_application, offender_id=address, offender_host=address,
                    description=breach.describe(f"HL7 {kind} limit: {what}"), when=utcnow(),
                ))
        except Exception:  # noqa: BLE001 - the refusal stands even if the audit store is down
            log.error("hl7.audit_failed", peer=address)

    def on_tls_auth_failure(self, address: str, error: HandshakeError) -> None:
        """A TLS peer failed node authentication on the listener (no client certificate when
        ``require_client_cert``, or one our CA did not sign): PS3.15 A.5.3.11 Security Alert,
        event type Node Authentication (DCM 110126). No HL7 was read: the offender is its address."""
        breach = self._alert_throttle.breach(address, "tls")
        if breach is None:
            return
        try:
            with self._db.session() as session:
                append_audit(session, security_alert(
                    self._audit_source, event_type=EventType.NODE_AUTHENTICATION,
                    reporter_ae=self._settings.sending_application, offender_id=address, offender_host=address,
                    description=breach.describe(
                        f"HL7 MLLP TLS node authentication failed: {error.failure.value} ({error.detail})")[:1000],
                    when=utcnow(),
                ))
        except Exception:  # noqa: BLE001 - the connection is refused either way
            log.error("hl7.audit_failed", peer=address)

    # -- refusals ----------------------------------------------------------------------------

    def _ack(self, header: MessageHeader | None, code: str, now: dt.datetime, error: Hl7MessageError | None = None) -> str:
        control = f"A{uuid.uuid4().hex[:19]}"  # unique per ACK (MSH-10 is at most 20 characters in v2.5.1)
        return build_ack(
            header, code,  # type: ignore[arg-type]
            sending_application=self._settings.sending_application, sending_facility=self._settings.sending_facility,
            control_id=control, now=now, error=error,
        )

    def _refuse(self, error: Hl7MessageError, info: ConnectionInfo, now: dt.datetime) -> bytes:
        header = error.header
        log.warning(
            "hl7.message_refused", ack=error.ack_code, code=int(error.hl7_error_code),
            location=str(error.error_location) if error.error_location else None,
            type=f"{header.message_type}^{header.trigger_event}" if header else None, peer=info.peer_host,
            reason=str(error)[:200],
        )
        try:
            with self._db.session() as session:
                self._audit_received(session, info, error.ack_code, now, error, header)
                breach = (self._alert_throttle.breach(info.peer_host, "sender")
                          if isinstance(error, SenderNotAllowedError) else None)
                if breach is not None:
                    append_audit(session, security_alert(
                        self._audit_source, event_type=EventType.NODE_AUTHENTICATION,
                        reporter_ae=self._settings.sending_application,
                        offender_id=f"{header.sending_application}@{header.sending_facility}" if header else "unknown",
                        offender_host=info.peer_host, when=now,
                        description=breach.describe("HL7 sender without its TLS client certificate"
                                                    if str(error) == WRONG_CERTIFICATE else "HL7 sender not allowed"),
                    ))
        except Exception:  # noqa: BLE001 - the refusal stands even if its audit record could not be written
            log.error("hl7.audit_failed", peer=info.peer_host)
        return self._ack(header, error.ack_code, now, error).encode("utf-8")

    # -- accepted messages -------------------------------------------------------------------

    def _apply_one(self, accepted: _Accepted) -> str:
        """One message in its own transaction (no other message arrived meanwhile, or its batch failed)."""
        try:
            return self._apply_batch([accepted])[0]
        except IntegrityError:
            # The same message through another process at once (PostgreSQL): it committed; answer as it did.
            with self._db.read_session() as session:
                known = _acknowledged(session.connection(), accepted.message.header)
            if known is None:
                raise
            return known

    def _apply_batch(self, batch: Sequence[_Accepted]) -> list[str]:
        """Apply *batch* in one transaction with its message log rows and audit records; the ACKs
        (AA, or the earlier ACK of a control id already answered) are valid once this returns.

        The statements are per batch, not per message: one lookup of the control ids, the orders
        of each run of consecutive orders read, inserted and updated together, one log insert and
        one audit append. ADT messages are applied one by one, in their place in the run."""
        acks: list[str] = []
        fresh: list[tuple[_Accepted, str]] = []
        duplicates: list[_Accepted] = []
        with self._db.session() as session:
            connection = session.connection()
            answered = _acknowledged_many(connection, [accepted.message.header for accepted in batch])
            for accepted in batch:
                key = _control_key(accepted.message.header)
                known = answered.get(key)
                if known is None:  # new; a copy later in the batch gets the same ACK
                    known = answered[key] = self._ack(accepted.message.header, "AA", accepted.now)
                    fresh.append((accepted, known))
                else:
                    duplicates.append(accepted)
                acks.append(known)
            studies = self._apply_messages(session, connection, [accepted for accepted, _ in fresh])
            logged: list[dict[str, object]] = []
            events: list[AuditEvent] = []
            for (accepted, ack), touched in zip(fresh, studies, strict=True):
                header = accepted.message.header
                application, facility, control_id = _control_key(header)
                for study_pk, study_uid in touched:
                    schedule_study_changed(session, study_pk, study_uid)
                logged.append({
                    "sending_application": application, "sending_facility": facility, "control_id": control_id,
                    "message_type": f"{header.message_type}^{header.trigger_event}"[:16],
                    "ack_code": "AA", "ack": ack, "received_at": accepted.now,
                })
                event, action = ((EventId.ORDER_RECORD, Action.CREATE) if isinstance(accepted.message, OrderMessage)
                                 else (EventId.PATIENT_RECORD, Action.UPDATE))
                events += [self._received_event(accepted.info, "AA", accepted.now, None, header),
                           self._record_event(accepted.message, accepted.info, event, action, accepted.now)]
            if logged:
                connection.execute(_LOG_MESSAGES, logged)
            # One chain-head lock for all records (PS3.15 Import + Order/Patient Record per message).
            append_many(session, events)
        for accepted in duplicates:
            log.info("hl7.duplicate", type=_kind(accepted.message.header), peer=accepted.info.peer_host)
        for (accepted, _), touched in zip(fresh, studies, strict=True):
            log.info("hl7.message_accepted", type=_kind(accepted.message.header), studies=len(touched),
                     peer=accepted.info.peer_host, batch=len(batch))
        return acks

    @staticmethod
    def _apply_messages(session: Session, connection: Connection, messages: Sequence[_Accepted]) -> list[Studies]:
        """Apply *messages* in arrival order; for each, the studies it concerns (to re-publish)."""
        touched: list[Studies] = []
        orders: list[tuple[OrderMessage, dt.datetime]] = []
        for accepted in [*messages, None]:
            message = None if accepted is None else accepted.message
            if isinstance(message, OrderMessage) and accepted is not None:
                orders.append((message, accepted.now))
                continue
            if orders:  # a run of orders ends here
                touched += _store_orders(connection, orders)
                orders = []
            if isinstance(message, PatientMerge):
                touched.append(_merge_patients(session, message))
            elif isinstance(message, PatientUpdate):
                touched.append(_update_patient(session, message))
        return touched

    # -- audit -------------------------------------------------------------------------------

    def _participants(self, info: ConnectionInfo, header: MessageHeader | None) -> tuple[ActiveParticipant, ...]:
        sender = f"{header.sending_application}@{header.sending_facility}" if header else "unknown"
        return (
            ActiveParticipant(user_id=sender, user_is_requestor=True, role_id=RoleId.SOURCE,
                              network_access_point_id=info.peer_host,
                              network_access_point_type=NetworkAccessPointType.IP_ADDRESS),
            ActiveParticipant(user_id=self._audit_source.source_id, user_is_requestor=False, role_id=RoleId.DESTINATION),
        )

    def _audit_received(
        self, session: Session | None, info: ConnectionInfo, ack_code: str, now: dt.datetime,
        error: Hl7MessageError | None, header: MessageHeader | None = None,
    ) -> None:
        event = self._received_event(info, ack_code, now, error, header)
        if session is None:
            with self._db.session() as own:
                append_audit(own, event)
        else:
            append_audit(session, event)

    def _received_event(
        self, info: ConnectionInfo, ack_code: str, now: dt.datetime, error: Hl7MessageError | None,
        header: MessageHeader | None,
    ) -> AuditEvent:
        """PS3.15 A.5.3.7 Import: a message arrived; its ACK code and (for a refusal) why."""
        kind = f"{header.message_type}^{header.trigger_event}" if header else "unreadable"
        description = f"HL7 {kind} received; ACK {ack_code}" + (f": {error}" if error else "")
        return AuditEvent(
            event_id=EventId.IMPORT, action=Action.CREATE,
            outcome=Outcome.SUCCESS if ack_code == "AA" else Outcome.MINOR_FAILURE,
            outcome_description=description[:1000], occurred_at=now, source=self._audit_source,
            participants=self._participants(info, header),
            objects=(ParticipantObject(object_id=header.control_id if header else "-", id_type=_MESSAGE_ID, type_code=2,
                                       details={"MessageType": kind, "AckCode": ack_code}),),
        )

    def _record_event(self, message: Inbound, info: ConnectionInfo, event_id: Code, action: Action,
                      now: dt.datetime) -> AuditEvent:
        """PS3.15 A.5.3.9 Order Record / A.5.3.10 Patient Record: what the message changed, for whom."""
        patient = message.patient
        objects = [ParticipantObject(object_id=patient.patient_id, id_type=ObjectIdType.PATIENT_NUMBER, type_code=1,
                                     role=1, name=patient.name)]
        if isinstance(message, OrderMessage):
            objects.append(ParticipantObject(
                object_id=message.accession_number, id_type=_ACCESSION, type_code=2, role=20,
                details={"PlacerOrderNumber": message.placer_order_number or "", "OrderControl": message.order_control},
            ))
        return AuditEvent(
            event_id=event_id, action=action, outcome=Outcome.SUCCESS, occurred_at=now, source=self._audit_source,
            participants=self._participants(info, message.header), objects=tuple(objects),
            outcome_description=f"HL7 {message.header.message_type}^{message.header.trigger_event} applied",
        )


#: Participant object id types for an HL7 message (MSH-10) and an accession number.
_MESSAGE_ID = Code("HL7-MSG", "urn:hl7:v2", "HL7 Message Control ID")
_ACCESSION = Code("ACSN", "http://terminology.hl7.org/CodeSystem/v2-0203", "Accession ID")


@dataclass(frozen=True)
class _Accepted:
    """A parsed message from an allowed sender, waiting for its transaction."""

    message: Inbound
    info: ConnectionInfo
    now: dt.datetime


# The statements of the order path, built once (building them per message cost more than running them).
_MESSAGES = cast(Table, Hl7InboundMessage.__table__)
_ORDERS = cast(Table, ImagingOrder.__table__)
_STUDIES = cast(Table, Study.__table__)
_FIND_ACKS = select(
    _MESSAGES.c.sending_application, _MESSAGES.c.sending_facility, _MESSAGES.c.control_id, _MESSAGES.c.ack
).where(_MESSAGES.c.control_id.in_(bindparam("control_ids", expanding=True)))
_LOG_MESSAGES = insert(_MESSAGES)
_FIND_ORDERS = select(
    _ORDERS.c.id, _ORDERS.c.placer_namespace, _ORDERS.c.placer_order_number, _ORDERS.c.filler_order_number
).where(_ORDERS.c.placer_order_number.in_(bindparam("placers", expanding=True))).with_for_update()
_INSERT_ORDERS = insert(_ORDERS)
_UPDATE_ORDERS = _ORDERS.update().where(_ORDERS.c.id == bindparam("order_pk"))
_STUDIES_WITH_ACCESSIONS = select(_STUDIES.c.id, _STUDIES.c.study_instance_uid, _STUDIES.c.accession_number).where(
    _STUDIES.c.accession_number.in_(bindparam("accessions", expanding=True))
)

#: The studies a message concerns: (primary key, Study Instance UID).
Studies = list[tuple[int, str]]
ControlKey = tuple[str, str, str]


def _kind(header: MessageHeader) -> str:
    return f"{header.message_type}^{header.trigger_event}"


def _control_key(header: MessageHeader) -> ControlKey:
    """What identifies a message (HL7 v2.5.1 2.10.1), cut to its columns."""
    return header.sending_application[:64], header.sending_facility[:64], header.control_id[:199]


def _acknowledged_many(connection: Connection, headers: Sequence[MessageHeader]) -> dict[ControlKey, str]:
    """The ACKs already sent for any of *headers*' messages, by control key."""
    keys = {_control_key(header) for header in headers}
    acks: dict[ControlKey, str] = {}
    for application, facility, control_id, ack in connection.execute(
        _FIND_ACKS, {"control_ids": sorted({control_id for _, _, control_id in keys})}
    ):
        if (application, facility, control_id) in keys:
            acks[(application, facility, control_id)] = ack
    return acks


def _acknowledged(connection: Connection, header: MessageHeader) -> str | None:
    return _acknowledged_many(connection, [header]).get(_control_key(header))


def _placer_key(order: OrderMessage) -> tuple[str, str]:
    """Orders are kept by placer order number within its namespace; by accession when there is none."""
    if order.placer_order_number:
        return (order.placer_namespace or "")[:64], order.placer_order_number[:64]
    return "accession", order.accession_number[:64]


def _order_values(order: OrderMessage, now: dt.datetime) -> dict[str, object]:
    """The columns an order message sets (all but its key, filler number and first arrival)."""
    procedure = order.requested_procedure
    patient = order.patient
    # A UID has at most 64 characters (DICOM PS3.5 9.1): a longer value names no study; cut, it would name another.
    uid = order.study_instance_uid
    return {
        "accession_number": order.accession_number[:64],
        "order_control": order.order_control[:8],
        "status": "cancelled" if order.order_control in _CANCELLING else "active",
        "patient_id": patient.patient_id[:64], "patient_issuer": (patient.issuer or "")[:64],
        "patient_name": _pn_column(patient.name), "birth_date": patient.birth_date, "sex": patient.sex,
        "procedure_code": procedure.code[:64] if procedure and procedure.code else None,
        "procedure_system": procedure.system[:64] if procedure and procedure.system else None,
        "procedure_text": procedure.text[:200] if procedure and procedure.text else None,
        "ordering_provider": _pn_column(order.ordering_provider),
        "priority": (order.priority or "")[:16] or None,
        "study_instance_uid": uid if uid is not None and len(uid) <= 64 else None,
        "sending_application": order.header.sending_application[:64],
        "sending_facility": order.header.sending_facility[:64],
        "message_type": _kind(order.header)[:16],
        "updated_at": now,
    }


def _store_orders(connection: Connection, orders: Sequence[tuple[OrderMessage, dt.datetime]]) -> list[Studies]:
    """Insert or update *orders* (each with its arrival time, in arrival order: a later message for
    the same order wins, an absent filler order number keeps the known one); for each, the studies
    with its accession."""
    keys = [_placer_key(order) for order, _ in orders]
    wanted = set(keys)
    known = {
        (row.placer_namespace, row.placer_order_number): row
        for row in connection.execute(_FIND_ORDERS, {"placers": sorted({placer for _, placer in wanted})})
        if (row.placer_namespace, row.placer_order_number) in wanted
    }
    final: dict[tuple[str, str], dict[str, object]] = {}
    first_seen: dict[tuple[str, str], dt.datetime] = {}
    for (order, now), key in zip(orders, keys, strict=True):
        before = final.get(key)
        earlier_filler = before["filler_order_number"] if before else (known[key].filler_order_number if key in known else None)
        final[key] = {**_order_values(order, now),
                      "filler_order_number": (order.filler_order_number or "")[:64] or earlier_filler}
        first_seen.setdefault(key, now)
    inserts = [{**values, "placer_namespace": key[0], "placer_order_number": key[1], "received_at": first_seen[key]}
               for key, values in final.items() if key not in known]
    updates = [{**values, "order_pk": known[key].id} for key, values in final.items() if key in known]
    if inserts:
        connection.execute(_INSERT_ORDERS, inserts)
    if updates:
        connection.execute(_UPDATE_ORDERS, updates)
    studies: dict[str, Studies] = {}
    accessions = sorted({order.accession_number for order, _ in orders})
    for pk, uid, accession in connection.execute(_STUDIES_WITH_ACCESSIONS, {"accessions": accessions}):
        studies.setdefault(accession, []).append((pk, uid))
    return [studies.get(order.accession_number, []) for order, _ in orders]


def _patients(session: Session, identity: PatientIdentity | tuple[str, str | None]) -> list[Patient]:
    patient_id, issuer = (identity.patient_id, identity.issuer) if isinstance(identity, PatientIdentity) else identity
    query = select(Patient).where(Patient.patient_id == patient_id)
    if issuer:
        query = query.where(Patient.issuer == issuer)
    return list(session.execute(query).scalars())


def _studies_of(session: Session, patients: Sequence[Patient]) -> list[tuple[int, str]]:
    if not patients:
        return []
    return [(pk, uid) for pk, uid in session.execute(
        select(Study.id, Study.study_instance_uid).where(Study.patient_pk.in_([p.id for p in patients]))
    ).all()]


def _pn_column(name: str | None) -> str | None:
    """A person name cut to its column (VARCHAR(324), the DICOM PN limit; PostgreSQL refuses longer values)."""
    return name[:324] if name else None


def _refresh_demographics(patient: Patient, identity: PatientIdentity) -> None:
    """ADT wins over the DICOM headers for name, birth date and sex; an absent value erases nothing."""
    if identity.name:
        patient.name = _pn_column(identity.name)
    if identity.birth_date:
        patient.birth_date = identity.birth_date[:8]
    if identity.sex:
        patient.sex = identity.sex[:16]


def _update_patient(session: Session, message: PatientUpdate) -> list[tuple[int, str]]:
    """ADT^A08/A31: new demographics for the patient (and its open orders); its studies re-publish."""
    patients = _patients(session, message.patient)
    for patient in patients:
        _refresh_demographics(patient, message.patient)
    _update_orders_of(session, message.patient.patient_id, message.patient.issuer, message.patient)
    return _studies_of(session, patients)


def _update_orders_of(session: Session, patient_id: str, issuer: str | None, identity: PatientIdentity) -> None:
    query = update(ImagingOrder).where(ImagingOrder.patient_id == patient_id)
    if issuer:
        query = query.where(ImagingOrder.patient_issuer == issuer)
    values: dict[str, object] = {"patient_id": identity.patient_id[:64]}
    if identity.issuer:  # absent: the order keeps the issuer it has (an absent value erases nothing)
        values["patient_issuer"] = identity.issuer[:64]
    if identity.name:
        values["patient_name"] = _pn_column(identity.name)
    if identity.birth_date:
        values["birth_date"] = identity.birth_date
    if identity.sex:
        values["sex"] = identity.sex
    session.execute(query.values(**values))


def _merge_patients(session: Session, message: PatientMerge) -> list[tuple[int, str]]:
    """ADT^A40: the prior patient's studies and orders now belong to the surviving patient.

    The surviving patient is created from PID when the gateway has not seen it. The prior patient
    row stays (with no studies): the received DICOM files still carry its id and are never
    rewritten (docs/hl7.md, "ADT")."""
    prior = _patients(session, (message.prior_patient_id, message.prior_issuer))
    surviving = _patients(session, message.patient)
    if surviving:
        target = surviving[0]
    elif prior:
        target = Patient(patient_id=message.patient.patient_id[:64], issuer=(message.patient.issuer or "")[:64])
        session.add(target)
        session.flush()
    else:
        _update_orders_of(session, message.prior_patient_id, message.prior_issuer, message.patient)
        return []
    _refresh_demographics(target, message.patient)
    moved = _studies_of(session, [p for p in prior if p.id != target.id])
    if moved:
        session.execute(update(Study).where(Study.id.in_([pk for pk, _ in moved])).values(patient_pk=target.id))
    _update_orders_of(session, message.prior_patient_id, message.prior_issuer, message.patient)
    return moved + _studies_of(session, [target])
