"""The channel-neutral outbox: every result we send anywhere is a delivery (docs/delivery.md).

A delivery is a :class:`~storage.models.Job` of kind ``deliver`` whose payload names a
**channel** (``dicom`` now; ``hl7`` and ``fhir-subscription`` next), a **destination** (a name
configured for that channel) and a **subject** (what it carries: a SOP Instance UID on the
``dicom`` channel, a study result on the others). It is enqueued in the same transaction that
stores the subject, so "the result exists" always implies "its deliveries are queued".

Which channels and destinations a result fans out to is decided by the composition root from
settings (:class:`Fanout`); how a channel sends is a :class:`ChannelSender` of its part. This
module holds what is common to all of them: enqueueing, the one ``deliver`` job handler, the
attempt history (:class:`~storage.models.DeliveryAttempt`) and its audit records, and the
operator's view (list, show, retry — retries audited too).

Exactly-once, whatever the channel: a delivery leaves the queue only as ``done`` (in the
transaction that records the peer's acceptance) or ``failed`` (visible, retryable). The crash
window between the peer's acceptance and our commit re-sends the same subject under the same
identity (deterministic SOP Instance UID, the same HL7 message control id), which the peer
recognises as the same object: at-least-once on the wire, exactly-once in the peer's records.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from audit.builders import operator_action
from audit.events import AuditEvent, AuditSource, Outcome
from audit.store import append as append_audit
from conf.errors import LeaseLostError, NotFoundError, PneumoError
from storage import jobs
from storage.db import Database
from storage.job_kinds import DELIVER_JOB, delivery_key
from storage.jobs import ClaimedJob
from storage.models import DeliveryAttempt, DeliveryOutcome, Instance, Job, JobState, utcnow
from storage.tracing import NOOP_TRACER, AttributeValue, Tracer, traceparent_of, with_traceparent

log = structlog.get_logger(__name__)

class Channel(enum.StrEnum):
    DICOM = "dicom"
    HL7 = "hl7"
    FHIR_SUBSCRIPTION = "fhir-subscription"


@dataclass(frozen=True)
class Route:
    """One place a kind of result goes: a channel and a destination name configured for it."""

    channel: str
    destination: str


class DeliveryPriority(enum.IntEnum):
    """Which deliveries go first when the outbox has a backlog (lower first)."""

    REPORT = 0  # what a clinician reads: the SR, the study result
    PICTURE = 10  # the summary image: a convenience copy of the same result


def enqueue_delivery(
    session: Session, route: Route, subject: str, *, instance_pk: int | None = None,
    priority: DeliveryPriority = DeliveryPriority.REPORT, traceparent: str | None = None,
) -> None:
    """Queue *subject* for *route* inside the caller's transaction (the one storing the subject).

    *traceparent*: the span that made the subject; the ``deliver.<channel>`` span continues its
    trace (:mod:`storage.tracing`)."""
    jobs.enqueue(
        session,
        DELIVER_JOB,
        delivery_key(route.channel, route.destination, subject),
        instance_pk=instance_pk,
        payload=with_traceparent(
            {"channel": route.channel, "destination": route.destination, "subject": subject}, traceparent
        ),
        priority=priority,
    )


#: The subject of a study result's deliveries (the HL7 and FHIR channels): ``study-result/<pk>``.
STUDY_RESULT_SUBJECT_PREFIX = "study-result/"


class Fanout:
    """Where each kind of result goes, wired by the composition root from settings.

    ``objects``: our generated DICOM instances (SR, summary image), sent per instance.
    ``study_results``: each new version of a study result (HL7 ORU, FHIR notifications).
    """

    def __init__(self, *, objects: Sequence[Route] = (), study_results: Sequence[Route] = ()) -> None:
        self.object_routes = tuple(objects)
        self.study_result_routes = tuple(study_results)

    def generated_instance(
        self, session: Session, instance: Instance, priority: DeliveryPriority = DeliveryPriority.REPORT,
        *, traceparent: str | None = None,
    ) -> int:
        """Queue *instance* on every object route; returns how many deliveries were queued."""
        if not self.object_routes:
            return 0
        if instance.id is None:
            session.flush()
        for route in self.object_routes:
            enqueue_delivery(session, route, instance.sop_instance_uid, instance_pk=instance.id, priority=priority,
                             traceparent=traceparent)
        return len(self.object_routes)

    def study_result(self, session: Session, study_result_pk: int) -> int:
        """Queue study result *study_result_pk* on every study-result route."""
        for route in self.study_result_routes:
            enqueue_delivery(session, route, f"{STUDY_RESULT_SUBJECT_PREFIX}{study_result_pk}")
        return len(self.study_result_routes)


class DeliveryFailedError(PneumoError):
    """A send that did not leave the subject at the destination.

    ``retryable``: whether a later attempt may succeed (peer unreachable, out of resources) or
    not (the peer refused this very object). ``peer_status``: what the peer answered, in the
    channel's terms (``0xA700``, ``AR``), or None when no answer came back.
    """

    def __init__(self, message: str, *, retryable: bool, peer_status: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.peer_status = peer_status


@dataclass(frozen=True)
class DeliveryItem:
    """What a channel loaded for one delivery, before sending: the subject itself (``content``,
    channel-specific) and what the audit record needs to name (study, patient, instances)."""

    subject: str
    content: Any
    study_uid: str
    patient_id: str
    patient_name: str | None = None
    accession: str | None = None
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    instances: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliveryReceipt:
    """The peer accepted the subject. ``note`` says so when it accepted with a remark."""

    peer_status: str
    note: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class ChannelSender(Protocol):
    """How one channel sends (implemented by the part that speaks its protocol)."""

    channel: str

    def has_destination(self, name: str) -> bool: ...

    def load(self, session: Session, job: ClaimedJob, subject: str) -> DeliveryItem:
        """Read what *subject* is; raise :class:`~conf.errors.NotFoundError` when it is gone."""
        ...

    def send(self, item: DeliveryItem, destination: str) -> DeliveryReceipt:
        """Send it; raise :class:`DeliveryFailedError` when the peer did not take it."""
        ...

    def audit_event(
        self, item: DeliveryItem, destination: str, outcome: Outcome, when: dt.datetime, description: str | None
    ) -> AuditEvent:
        """The channel's audit record of one attempt (PS3.15 A.5.3.5 for DICOM, Export for HL7)."""
        ...


class OutboxHandler:
    """The ``deliver`` job handler, the same for every channel.

    Each attempt, successful or not, leaves a :class:`DeliveryAttempt` row and the channel's
    audit record. A success commits both together with ``jobs.complete``; a failure commits
    them in their own transaction and then raises, so the runtime's backoff bookkeeping runs
    after the evidence is safe. PS3.15 A.5.1 EventOutcomeIndicator: 4 (minor failure, "action
    restarted") while a retry will follow; 8 (serious failure) when this was the last attempt.
    """

    def __init__(
        self, database: Database, senders: Sequence[ChannelSender], max_attempts: int, *, tracer: Tracer = NOOP_TRACER
    ) -> None:
        """*tracer*: a ``deliver.<channel>`` span per attempt, in the trace of the result it carries."""
        self._db = database
        self._senders = {s.channel: s for s in senders}
        self._max_attempts = max_attempts
        self._tracer = tracer

    def __call__(self, job: ClaimedJob, worker_id: str) -> None:
        channel = str(job.payload.get("channel", ""))
        destination = str(job.payload.get("destination", ""))
        attributes: dict[str, AttributeValue] | None = {
            "delivery.channel": channel, "delivery.destination": destination, "job.id": job.id, "job.attempt": job.attempts,
        } if self._tracer.enabled else None
        with self._tracer.span(f"deliver.{channel}", parent=traceparent_of(job.payload), attributes=attributes) as span:
            try:
                receipt = self._deliver(job, worker_id, channel, destination)
            except DeliveryFailedError as exc:
                span.set_attribute("delivery.outcome", "failed")
                span.set_attribute("delivery.retryable", exc.retryable)
                if exc.peer_status is not None:
                    span.set_attribute("delivery.peer_status", exc.peer_status)
                raise
            span.set_attribute("delivery.outcome", "delivered")
            span.set_attribute("delivery.peer_status", receipt.peer_status)

    def _deliver(self, job: ClaimedJob, worker_id: str, channel: str, destination: str) -> DeliveryReceipt:
        started = utcnow()
        subject = str(job.payload.get("subject", ""))
        sender = self._senders.get(channel)
        if sender is None:
            raise NotFoundError(f"no sender for channel {channel!r}")
        with self._db.read_session() as session:
            item = sender.load(session, job, subject)
        if not sender.has_destination(destination):
            error = DeliveryFailedError(f"{channel} destination {destination!r} is not configured", retryable=False)
            self._record_failure(job, sender, item, destination, started, error)
            raise error
        try:
            receipt = sender.send(item, destination)
        except DeliveryFailedError as exc:
            self._record_failure(job, sender, item, destination, started, exc)
            raise
        self._record_success(job, worker_id, sender, item, destination, started, receipt)
        return receipt

    def _attempt(
        self, job: ClaimedJob, sender: ChannelSender, item: DeliveryItem, destination: str, started: dt.datetime,
        finished: dt.datetime, outcome: DeliveryOutcome, peer_status: str | None, error: str | None,
    ) -> DeliveryAttempt:
        return DeliveryAttempt(
            job_pk=job.id,
            attempt=job.attempts,
            channel=sender.channel,
            destination=destination[:64],
            subject=item.subject[:200],
            started_at=started,
            finished_at=finished,
            outcome=outcome,
            peer_status=peer_status,
            error=error,
        )

    def _record_success(
        self, job: ClaimedJob, worker_id: str, sender: ChannelSender, item: DeliveryItem, destination: str,
        started: dt.datetime, receipt: DeliveryReceipt,
    ) -> None:
        finished = utcnow()
        with self._db.session() as session:
            session.add(self._attempt(job, sender, item, destination, started, finished, DeliveryOutcome.DELIVERED,
                                      receipt.peer_status, receipt.note))
            append_audit(session, sender.audit_event(item, destination, Outcome.SUCCESS, finished, receipt.note))
            if not jobs.complete(session, job.id, worker_id):
                # Another worker owns the job now and will send it again (same identity: harmless).
                raise LeaseLostError()
        log.info("delivery.delivered", channel=sender.channel, destination=destination, status=receipt.peer_status,
                 attempt=job.attempts, **dict(receipt.details))

    def _record_failure(
        self, job: ClaimedJob, sender: ChannelSender, item: DeliveryItem, destination: str, started: dt.datetime,
        error: DeliveryFailedError,
    ) -> None:
        finished = utcnow()
        final = not error.retryable or job.attempts >= self._max_attempts
        outcome = Outcome.SERIOUS_FAILURE if final else Outcome.MINOR_FAILURE
        message = str(error)[:4000]
        try:
            with self._db.session() as session:
                session.add(self._attempt(job, sender, item, destination, started, finished, DeliveryOutcome.FAILED,
                                          error.peer_status, message))
                append_audit(session, sender.audit_event(item, destination, outcome, finished, message[:500]))
        except SQLAlchemyError as exc:
            # The job's own failure bookkeeping follows; losing this row only loses history.
            log.error("delivery.attempt_not_recorded", error=exc.__class__.__name__)
        log.warning("delivery.failed", channel=sender.channel, destination=destination, retryable=error.retryable,
                    final=final, attempt=job.attempts, status=error.peer_status, detail=message[:200])


# -- the operator's view ------------------------------------------------------------------------


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _delivery_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "channel": job.payload.get("channel"),
        "destination": job.payload.get("destination"),
        "subject": job.payload.get("subject"),
        "attempts": job.attempts,
        "run_after": _iso(job.run_after),
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "last_error": job.last_error,
    }


def _attempt_dict(attempt: DeliveryAttempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "outcome": attempt.outcome,
        "peer_status": attempt.peer_status,
        "started_at": _iso(attempt.started_at),
        "finished_at": _iso(attempt.finished_at),
        "error": attempt.error,
    }


def list_deliveries(session: Session, state: str | None = None, channel: str | None = None) -> list[dict[str, Any]]:
    """Deliveries of every channel, oldest first, optionally only one state and/or channel."""
    query = select(Job).where(Job.kind == DELIVER_JOB).order_by(Job.id)
    if state is not None:
        query = query.where(Job.state == state)
    rows = [_delivery_dict(job) for job in session.execute(query).scalars()]
    return [row for row in rows if channel is None or row["channel"] == channel]


def show_delivery(session: Session, job_id: int) -> dict[str, Any] | None:
    """One delivery and all its attempts (in order), or None if there is no such delivery."""
    job = session.execute(select(Job).where(Job.id == job_id, Job.kind == DELIVER_JOB)).scalar_one_or_none()
    if job is None:
        return None
    attempts = session.execute(
        select(DeliveryAttempt).where(DeliveryAttempt.job_pk == job_id).order_by(DeliveryAttempt.started_at, DeliveryAttempt.id)
    ).scalars()
    return {**_delivery_dict(job), "attempt_history": [_attempt_dict(a) for a in attempts]}


def retry_deliveries(
    session: Session, job_ids: list[int] | None, *, audit_source: AuditSource, operator: str | None, host: str | None
) -> list[int]:
    """Re-queue dead-lettered deliveries (*job_ids*, or all when None); returns those re-queued.

    Only ``deliver`` jobs are touched (never inference jobs), and the operator's action is
    audited in the same transaction."""
    query = select(Job.id).where(Job.kind == DELIVER_JOB, Job.state == JobState.FAILED)
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    eligible = sorted(session.execute(query).scalars())
    if eligible:
        jobs.retry_failed(session, eligible)
        append_audit(
            session,
            operator_action(
                audit_source, operator=operator, host=host, when=utcnow(),
                description=f"re-queued dead-lettered deliveries {', '.join(map(str, eligible))}"[:1000],
            ),
        )
    return eligible
