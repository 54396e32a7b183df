"""Audit records of FHIR reads and searches, written in batches (docs/fhir.md, "Audit").

Every read, vread, history and search is audited (PS3.15 A.5.3 / IHE BALP): who (the token's
client id and the caller's address), what (the interaction, the resource type, the ids returned,
the patients they are about), the query (for a search), when, the outcome. The audit log is one
hash chain, so every append serialises on its head: one transaction per request would cap the API
at the database's commit rate. Requests therefore hand their record to :class:`AuditTrail`,
which appends whatever has accumulated in one transaction, at most ``flush_seconds`` later.

A request's record is queued before its response is sent; the queue is flushed on shutdown. A
crash can lose the records of the last ``flush_seconds`` of reads — the trade-off every
high-volume audit repository makes (IHE ATNA sends over syslog, with the same exposure) — and
never the records of anything the gateway *did* (those are in the transaction of the action).
If the queue fills (the database is down), requests wait for room rather than go unaudited.
"""

from __future__ import annotations

import base64
import datetime as dt
import queue
import threading
from collections.abc import Iterable, Sequence

import structlog
from sqlalchemy.exc import SQLAlchemyError

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
from audit.store import append_many
from storage.db import Database

log = structlog.get_logger(__name__)

#: RFC 3881 participant object id type for a FHIR resource reference (IHE BALP uses the reference).
FHIR_RESOURCE = Code("FHIR", "urn:ihe:iti:balp", "FHIR resource reference")


def fhir_access_event(
    source: AuditSource,
    *,
    client_id: str,
    client_address: str | None,
    interaction: str,
    resource_type: str,
    returned: Sequence[str],
    patients: Iterable[str],
    query: str | None,
    outcome: Outcome,
    when: dt.datetime,
    description: str | None = None,
) -> AuditEvent:
    """One FHIR access: a search is a PS3.15 Query (110112, action E, the query string base64 in
    the query object); a read, vread or history a Patient Record access (110110, action R)."""
    search = interaction == "search"
    objects: list[ParticipantObject] = []
    if search:
        objects.append(
            ParticipantObject(
                object_id=resource_type, id_type=FHIR_RESOURCE, type_code=2, role=24,
                query=base64.b64encode((query or "").encode("utf-8")).decode("ascii"),
                details={"interaction": interaction},
            )
        )
    objects.extend(
        ParticipantObject(object_id=ref, id_type=FHIR_RESOURCE, type_code=2, role=3, details={"interaction": interaction})
        for ref in list(returned)[:100]
    )
    objects.extend(
        ParticipantObject(object_id=ref, id_type=ObjectIdType.PATIENT_NUMBER, type_code=1, role=1)
        for ref in sorted(set(patients))[:100]
    )
    return AuditEvent(
        event_id=EventId.QUERY if search else EventId.PATIENT_RECORD,
        action=Action.EXECUTE if search else Action.READ,
        outcome=outcome,
        outcome_description=description,
        occurred_at=when,
        source=source,
        participants=(
            ActiveParticipant(
                user_id=client_id, user_is_requestor=True, network_access_point_id=client_address,
                network_access_point_type=NetworkAccessPointType.IP_ADDRESS if client_address else None,
            ),
            ActiveParticipant(user_id=source.source_id, user_is_requestor=False, role_id=RoleId.APPLICATION),
        ),
        objects=tuple(objects),
    )


def refused_access_event(
    source: AuditSource, *, status: int, client_address: str | None, path: str, reason: str, when: dt.datetime
) -> AuditEvent:
    """A refused FHIR request: 401 is a failed User Authentication (PS3.15 A.5.3.13, event type Login,
    110122), 403 a Security Alert "Use of Restricted Function" (A.5.3.11, 110132). The path names
    the resource type (never a query string: it may hold PHI)."""
    caller = ActiveParticipant(
        user_id=client_address or "unknown", user_is_requestor=True, network_access_point_id=client_address,
        network_access_point_type=NetworkAccessPointType.IP_ADDRESS if client_address else None,
    )
    us = ActiveParticipant(user_id=source.source_id, user_is_requestor=False, role_id=RoleId.APPLICATION)
    return AuditEvent(
        event_id=EventId.USER_AUTHENTICATION if status == 401 else EventId.SECURITY_ALERT,
        event_types=(EventType.LOGIN if status == 401 else EventType.USE_OF_RESTRICTED_FUNCTION,),
        action=Action.EXECUTE,
        outcome=Outcome.MINOR_FAILURE,
        outcome_description=f"HTTP {status} on {path}: {reason}"[:500],
        occurred_at=when,
        source=source,
        participants=(caller, us),
    )


class AuditTrail:
    """A bounded queue of audit events and the thread that appends them in batches."""

    def __init__(self, database: Database, *, flush_seconds: float = 0.2, max_batch: int = 500, capacity: int = 20000) -> None:
        self._db = database
        self._flush_seconds = flush_seconds
        self._max_batch = max_batch
        self._queue: queue.Queue[AuditEvent] = queue.Queue(maxsize=capacity)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fhir-audit", daemon=True)
            self._thread.start()

    def record(self, event: AuditEvent) -> None:
        """Queue *event*; blocks while the queue is full (never drops a record)."""
        if self._thread is None:  # not started (a test, a CLI): write at once
            self._write([event])
            return
        self._queue.put(event)

    def flush(self) -> None:
        """Write everything queued so far (also called by the thread, and at stop)."""
        with self._lock:
            pending = self._queue.qsize()  # not more: records put back after a failed write wait for the next flush
            while pending > 0:
                batch: list[AuditEvent] = []
                while len(batch) < min(self._max_batch, pending):
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not batch:
                    return
                pending -= len(batch)
                self._write(batch)

    def _write(self, batch: list[AuditEvent]) -> None:
        for attempt in range(5):
            try:
                with self._db.session() as session:
                    append_many(session, batch)
                return
            except SQLAlchemyError as exc:
                log.error("fhir.audit_write_failed", error=exc.__class__.__name__, events=len(batch), attempt=attempt + 1)
                self._stop.wait(min(2.0 * (attempt + 1), 5.0))
        # The database refused five times: keep the records for the next flush instead of losing them.
        for event in batch:
            self._queue.put(event)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_seconds):
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()
