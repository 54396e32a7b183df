"""What ``/metrics`` reads from the database: PHI-free facts about new rows, as plain queries.

Why from the database: the work is spread over processes — ``pneumo serve``, its extra DICOM
acceptors, ``pneumo worker`` processes on other hosts — that share one database but no memory.
Counters kept in each process would show only the part that happens to run where Prometheus
scrapes. The rows every process writes anyway (image results, delivery attempts, instances, the
audit log, accepted DICOM associations) already say what happened, so :mod:`storage.metrics`
tails them by primary key.

Each ``*_after`` function reads the rows with a key above a cursor (or, with *ids*, exactly those
keys), at most *limit* of them, in key order, and returns only what a metric may carry: codes, labels, sizes, durations. The
classifiers below turn the free texts they read (a not-analysed reason, an audit description)
into a small fixed set of codes; the texts themselves never leave this module, because a reason
may quote a value read from the image and a refusal may quote the sender's message.

Nothing returned names a patient, a study or an instance (tests/storage/test_metrics.py puts a
patient's name and ID in the rows and looks for them in the exposition).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from audit.events import EventId, EventType
from audit.models import AuditRecord
from storage.models import DeliveryAttempt, DicomAssociation, DicomAssociationEnd, InferenceResult, Instance, ResultStatus
from storage.status import failure_class

#: The stages :mod:`inference.pipeline` and :mod:`inference.engine` time (``timings_ms``).
STAGES = ("read", "decode", "preprocess", "infer", "total")

#: HL7 message types ``hl7`` accepts (``hl7.messages.SUPPORTED_MESSAGES``, which storage may not
#: import; a test keeps the two equal), and what an unparseable frame is recorded as.
HL7_MESSAGE_TYPES = frozenset({"ORM^O01", "OMI^O23", "ADT^A08", "ADT^A31", "ADT^A40", "unreadable"})
#: HL7 v2.5.1 Table 0008, original and enhanced mode.
HL7_ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
#: How an accepted association ended (``dicom_association.ended_by``).
ASSOCIATION_ENDS = frozenset(end.value for end in DicomAssociationEnd)

#: Label values for an audit event id (CID 400) and a Security Alert's event type (CID 401-403).
_EVENTS = {code.code: code.display for code in vars(EventId).values() if hasattr(code, "display")}
_EVENT_TYPES = {code.code: code.display for code in vars(EventType).values() if hasattr(code, "display")}
_OUTCOMES = {0: "success", 4: "minor-failure", 8: "serious-failure", 12: "major-failure"}

# (prefix of the reason text, code), first match wins: the sentences of inference.applicability
# and inference.pipeline, whose variable parts (sizes, modality, age source) are dropped here.
_NOT_APPLICABLE = (
    ("modality ", "modality"),
    ("no image:", "no-image"),
    ("float pixel data", "float-pixel-data"),
    ("no pixel data", "no-pixel-data"),
    ("image too small", "image-too-small"),
    ("image too large", "image-too-large"),
    ("image is not radiograph-shaped", "aspect-ratio"),
    ("bits allocated", "bits-allocated"),
    ("bits stored", "bits-stored"),
    ("photometric interpretation", "photometric"),
    ("multi-frame image", "multi-frame"),
    ("dx image is", "not-for-presentation"),
    ("body part absent", "view-position"),
    ("body part ", "body-part"),
    ("view position ", "view-not-frontal"),
    ("patient age unknown", "age-unknown"),
    ("patient age ", "age-out-of-range"),
)
_FAILED = (
    ("not a dicom file", "not-dicom"),
    ("unreadable dicom data set", "unreadable"),
    ("report not built", "report-not-built"),
)
_REFUSED_STATUS = re.compile(r"^refused with status (0x[0-9A-F]{4})\b")
_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def not_analysed_reason(status: str, reason: str | None) -> str:
    """The code of why an image was not analysed (``not-applicable`` / ``failed``), from the
    reason sentence stored with its result: one of a fixed set, ``other`` when none fits."""
    text = (reason or "").strip().lower()
    table = _NOT_APPLICABLE if status == ResultStatus.NOT_APPLICABLE else _FAILED
    for prefix, code in table:
        if text.startswith(prefix):
            return code
    return "other" if status == ResultStatus.NOT_APPLICABLE else "error"


def safe_label(value: str | None, known: Iterable[str] | None = None) -> str:
    """*value* when it is in *known* (or, without *known*, a short token), else ``other``: label
    values must come from a bounded set, and a peer's free text must not become a time series."""
    if value is None or value == "":
        return "none"
    if known is not None:
        return value if value in known else "other"
    return value if _LABEL.match(value) else "other"


@dataclass(frozen=True, slots=True)
class Cursors:
    """The newest key of each tailed table (0: empty)."""

    result: int = 0
    attempt: int = 0
    instance: int = 0
    audit: int = 0
    association: int = 0


@dataclass(frozen=True, slots=True)
class ResultFact:
    id: int
    status: str
    label: str | None
    reason_code: str | None
    timings_ms: dict[str, float]


@dataclass(frozen=True, slots=True)
class AttemptFact:
    id: int
    channel: str
    destination: str
    outcome: str
    failure_class: str | None
    seconds: float


@dataclass(frozen=True, slots=True)
class InstanceFact:
    id: int
    origin: str
    size: int


@dataclass(frozen=True, slots=True)
class AssociationFact:
    """One accepted DICOM association: its calling AE title (a label only once the collector has
    bounded it to the configured peers), how it ended, how long it lasted."""

    id: int
    calling_ae: str
    ended_by: str
    seconds: float


@dataclass(frozen=True, slots=True)
class AuditFact:
    """One audit record, reduced to codes: ``event``/``outcome`` always; ``event_type`` for a
    Security Alert; ``refused_status`` for a refused C-STORE; ``hl7_type``/``ack`` for an HL7 Import."""

    seq: int
    event: str
    outcome: str
    event_type: str | None = None
    refused_status: str | None = None
    hl7_type: str | None = None
    ack: str | None = None


def _keys(column: InstrumentedAttribute[int], after: int, ids: Collection[int] | None) -> ColumnElement[bool]:
    """``key > after``, or with *ids* exactly those keys (the gaps a tail re-reads, :mod:`storage.metrics`)."""
    return column.in_(list(ids)) if ids is not None else column > after


def cursors(session: Session) -> Cursors:
    """Where the tails start: the newest row of each table now (a new collector counts from here)."""
    return Cursors(
        result=session.scalar(select(func.max(InferenceResult.id))) or 0,
        attempt=session.scalar(select(func.max(DeliveryAttempt.id))) or 0,
        instance=session.scalar(select(func.max(Instance.id))) or 0,
        audit=session.scalar(select(func.max(AuditRecord.seq))) or 0,
        association=session.scalar(select(func.max(DicomAssociation.id))) or 0,
    )


def results_after(session: Session, after: int, limit: int, ids: Collection[int] | None = None) -> list[ResultFact]:
    """Image results with ``id > after``; the reason text is read only to be classified."""
    query = (
        select(InferenceResult.id, InferenceResult.status, InferenceResult.label, InferenceResult.reason,
               InferenceResult.timings_ms)
        .where(_keys(InferenceResult.id, after, ids)).order_by(InferenceResult.id).limit(limit)
    )
    facts = []
    for pk, status, label, reason, timings in session.execute(query):
        ok = status == ResultStatus.OK
        facts.append(ResultFact(
            id=int(pk), status=str(status), label=label if ok else None,
            reason_code=None if ok else not_analysed_reason(status, reason),
            timings_ms={stage: float(timings[stage]) for stage in STAGES
                        if ok and isinstance(timings, dict) and isinstance(timings.get(stage), int | float)},
        ))
    return facts


def attempts_after(session: Session, after: int, limit: int, ids: Collection[int] | None = None) -> list[AttemptFact]:
    """Delivery attempts with ``id > after``; a failure's error text only gives its class."""
    query = (
        select(DeliveryAttempt.id, DeliveryAttempt.channel, DeliveryAttempt.destination, DeliveryAttempt.outcome,
               DeliveryAttempt.peer_status, DeliveryAttempt.error, DeliveryAttempt.started_at,
               DeliveryAttempt.finished_at)
        .where(_keys(DeliveryAttempt.id, after, ids)).order_by(DeliveryAttempt.id).limit(limit)
    )
    return [
        AttemptFact(
            id=int(pk), channel=channel, destination=destination, outcome=outcome,
            failure_class=None if outcome == "delivered" else failure_class(peer_status, error),
            seconds=max(0.0, (finished - started).total_seconds()),
        )
        for pk, channel, destination, outcome, peer_status, error, started, finished in session.execute(query)
    ]


def instances_after(session: Session, after: int, limit: int, ids: Collection[int] | None = None) -> list[InstanceFact]:
    """Stored instances with ``id > after`` (received from peers, or generated: SR, summary image).
    A replaced instance keeps its row, so a replacement is not counted again here."""
    query = (
        select(Instance.id, Instance.origin, Instance.size)
        .where(_keys(Instance.id, after, ids)).order_by(Instance.id).limit(limit)
    )
    return [InstanceFact(int(pk), str(origin), int(size)) for pk, origin, size in session.execute(query)]


def associations_after(
    session: Session, after: int, limit: int, ids: Collection[int] | None = None
) -> list[AssociationFact]:
    """Accepted DICOM associations with ``id > after`` (storage/associations.py): calling AE title,
    how it ended (``other`` for a word this version does not know), duration. Not the address,
    the called AE title or the acceptor: they are for ``SELECT``, not labels."""
    query = (
        select(DicomAssociation.id, DicomAssociation.calling_ae, DicomAssociation.ended_by,
               DicomAssociation.started_at, DicomAssociation.ended_at)
        .where(_keys(DicomAssociation.id, after, ids)).order_by(DicomAssociation.id).limit(limit)
    )
    return [
        AssociationFact(id=int(pk), calling_ae=str(calling), ended_by=safe_label(ended_by, ASSOCIATION_ENDS),
                        seconds=max(0.0, (ended - started).total_seconds()))
        for pk, calling, ended_by, started, ended in session.execute(query)
    ]


def audit_after(session: Session, after: int, limit: int, ids: Collection[int] | None = None) -> list[AuditFact]:
    """Audit records with ``seq > after``, reduced to codes. The JSON fields are extracted by the
    database (``json_extract`` / ``->>``), so a scrape does not load whole events."""
    event = AuditRecord.event

    def only_for(code: str, value: ColumnElement[str]) -> ColumnElement[str | None]:
        # PostgreSQL's json type parses the text again for each extraction: extract only where used.
        return case((AuditRecord.event_id == code, value), else_=None)

    query = (
        select(
            AuditRecord.seq, AuditRecord.event_id, AuditRecord.outcome,
            only_for(EventId.INSTANCES_TRANSFERRED.code, event["action"].as_string()),
            only_for(EventId.SECURITY_ALERT.code, event[("event_types", 0, "code")].as_string()),
            only_for(EventId.INSTANCES_TRANSFERRED.code, func.substr(event["outcome_description"].as_string(), 1, 40)),
            only_for(EventId.IMPORT.code, event[("objects", 0, "details", "MessageType")].as_string()),
            only_for(EventId.IMPORT.code, event[("objects", 0, "details", "AckCode")].as_string()),
        )
        .where(_keys(AuditRecord.seq, after, ids)).order_by(AuditRecord.seq).limit(limit)
    )
    facts = []
    for seq, event_id, outcome, action, event_type, description, hl7_type, ack in session.execute(query):
        fact = AuditFact(seq=int(seq), event=_EVENTS.get(event_id, "other"), outcome=_OUTCOMES.get(int(outcome), "other"))
        if event_id == EventId.SECURITY_ALERT.code:
            fact = AuditFact(fact.seq, fact.event, fact.outcome, event_type=_EVENT_TYPES.get(event_type or "", "other"))
        elif event_id == EventId.INSTANCES_TRANSFERRED.code and action == "C" and int(outcome) != 0:
            match = _REFUSED_STATUS.match(description or "")
            fact = AuditFact(fact.seq, fact.event, fact.outcome, refused_status=match.group(1) if match else "unknown")
        elif event_id == EventId.IMPORT.code and (hl7_type is not None or ack is not None):
            fact = AuditFact(fact.seq, fact.event, fact.outcome, hl7_type=safe_label(hl7_type, HL7_MESSAGE_TYPES),
                             ack=safe_label(ack, HL7_ACK_CODES))
        facts.append(fact)
    return facts
