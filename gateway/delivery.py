"""The outbox: delivering our result objects (SR, Secondary Capture) to the configured PACS.

DESIGN.md §3 steps 5-6. A delivery is a :class:`~storage.models.Job` of kind ``deliver``, one per
(destination, SOP Instance UID), enqueued by :func:`enqueue_deliveries` in the same transaction
that stores the object, so "the report exists" always implies "its deliveries are queued". The
generic :class:`~gateway.worker.JobWorker` claims them, and :class:`DeliveryHandler` sends one
with the Storage SCU, records the attempt (:class:`~storage.models.DeliveryAttempt`) and the
audit record, and marks the job done — all in one transaction. Failures are retried with
exponential backoff and dead-lettered after ``delivery.max_attempts`` (``storage.jobs.fail``);
``pneumo deliveries retry`` puts dead letters back.

Why a report is never lost and never duplicated, across restarts (the exactly-once argument):

* Not lost: the job row commits with the report; a job leaves the queue only as ``done`` (in the
  transaction that records a Success/Warning C-STORE response) or ``failed`` (visible, retryable).
  A worker that crashes mid-send leaves the job ``running`` with a lease; when the lease expires
  the next claim takes it again.
* Not duplicated: the crash window is between the peer's C-STORE response and our commit; the
  retry then sends the same object again. Our SR/SC SOP Instance UIDs are deterministic (derived
  from the source SOP Instance UID and the model id/version, ``dicom_node.sr``), so the PACS
  receives the *same* SOP Instance UID a second time, which a Storage SCP treats as the same
  instance (PS3.3 C.12.1.1.1, PS3.5 §9: the SOP Instance UID identifies the instance; archives
  keep or overwrite one copy), never as a second report. Transcoding keeps the UID too. Delivery
  is at-least-once on the wire and exactly-once in the PACS's index.
"""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass

import structlog
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from audit.builders import application, instances_transferred
from audit.events import Action, AuditEvent, AuditSource, Outcome, RoleId
from audit.store import append as append_audit
from conf.settings import DicomDestination, Settings
from dicom_node.storage_scu import DeliveryError, DeliveryRejectedError, SendResult, send_instance
from gateway.worker import LeaseLostError, PermanentJobError
from storage import jobs
from storage.db import Database
from storage.filestore import FileStore, FileStoreError
from storage.jobs import ClaimedJob
from storage.models import DeliveryAttempt, DeliveryOutcome, Instance, Patient, Series, Study, utcnow

log = structlog.get_logger(__name__)

DELIVER_JOB = "deliver"


def delivery_job_key(destination_name: str, sop_instance_uid: str) -> str:
    """One delivery per destination and instance: re-enqueueing the same pair is a no-op."""
    return f"{DELIVER_JOB}:{destination_name}:{sop_instance_uid}"


def enqueue_deliveries(session: Session, instance: Instance, destinations: list[DicomDestination]) -> None:
    """Queue *instance* for every destination, inside the caller's transaction (the one that
    stores the instance), so a committed report always has its deliveries committed with it."""
    if not destinations:
        return
    if instance.id is None:
        session.flush()
    for destination in destinations:
        jobs.enqueue(
            session,
            DELIVER_JOB,
            delivery_job_key(destination.name, instance.sop_instance_uid),
            instance_pk=instance.id,
            payload={"destination": destination.name},
        )


@dataclass(frozen=True)
class _Target:
    """What a delivery needs to know about its instance, read before the association opens."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str
    study_uid: str
    accession: str | None
    patient_id: str
    patient_name: str | None


class DeliveryHandler:
    """Job handler for ``deliver`` jobs (see the module docstring for the guarantees).

    Each attempt, successful or not, leaves a :class:`DeliveryAttempt` row and a PS3.15 A.5.3.5
    "DICOM Instances Transferred" audit record (us as Source, the PACS as Destination, Action R:
    an existing instance read and sent). A success commits both together with ``jobs.complete``;
    a failure commits them in their own transaction and then raises, so the worker's backoff
    bookkeeping (``jobs.fail``) runs after the evidence is safe.
    """

    def __init__(
        self,
        runtime_database: Database,
        store: FileStore,
        settings: Settings,
        audit_source: AuditSource,
        *,
        local_host: str | None = None,
    ) -> None:
        self._db = runtime_database
        self._store = store
        self._destinations = {d.name: d for d in settings.dicom.destinations}
        self._calling_ae = settings.delivery.calling_ae_title or settings.dicom.ae_title
        self._timeout = settings.delivery.timeout_seconds
        self._max_attempts = settings.delivery.max_attempts
        self._audit_source = audit_source
        self._host = local_host or socket.gethostname()

    def __call__(self, job: ClaimedJob, worker_id: str) -> None:
        started = utcnow()
        name = str(job.payload.get("destination", ""))
        target = self._load_target(job)
        destination = self._destinations.get(name)
        if destination is None:
            error = DeliveryRejectedError(f"destination {name!r} is not configured (dicom.destinations)")
            self._record_failure(job, target, name, None, started, error)
            raise PermanentJobError(str(error))
        try:
            path = self._store.absolute(target.path)
            result = send_instance(path, destination, self._calling_ae, self._timeout)
        except FileStoreError as exc:
            error = DeliveryRejectedError(f"stored file path is invalid: {exc.strerror}")
            self._record_failure(job, target, name, destination, started, error)
            raise PermanentJobError(str(error)) from exc
        except DeliveryError as exc:
            self._record_failure(job, target, name, destination, started, exc)
            if exc.transient:
                raise
            raise PermanentJobError(str(exc)) from exc
        self._record_success(job, worker_id, target, destination, started, result)

    # -- steps -------------------------------------------------------------------------------

    def _load_target(self, job: ClaimedJob) -> _Target:
        if job.instance_pk is None:
            raise PermanentJobError("delivery job has no instance")
        with self._db.read_session() as session:
            row = session.execute(
                select(Instance, Study.study_instance_uid, Study.accession_number, Patient.patient_id, Patient.name)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
                .where(Instance.id == job.instance_pk)
            ).one_or_none()
        if row is None:
            raise PermanentJobError("the instance to deliver is no longer in the store index")
        instance, study_uid, accession, patient_id, patient_name = row
        return _Target(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            path=instance.path,
            study_uid=study_uid,
            accession=accession,
            patient_id=patient_id,
            patient_name=patient_name,
        )

    def _record_success(
        self,
        job: ClaimedJob,
        worker_id: str,
        target: _Target,
        destination: DicomDestination,
        started: dt.datetime,
        result: SendResult,
    ) -> None:
        finished = utcnow()
        note = None
        if result.warning:
            note = f"stored with warning status 0x{result.status:04X}"
            if result.error_comment:
                note += f": {result.error_comment}"
        with self._db.session() as session:
            session.add(
                DeliveryAttempt(
                    job_pk=job.id,
                    attempt=job.attempts,
                    destination=destination.name[:64],
                    sop_instance_uid=target.sop_instance_uid,
                    started_at=started,
                    finished_at=finished,
                    outcome=DeliveryOutcome.DELIVERED,
                    dimse_status=result.status,
                    error=note,
                )
            )
            append_audit(session, self._event(target, destination.ae_title, destination.host, Outcome.SUCCESS, finished, note))
            if not jobs.complete(session, job.id, worker_id):
                # Another worker owns the job now and will send it again (same UID: harmless).
                raise LeaseLostError()
        log.info(
            "delivery.delivered",
            destination=destination.name,
            status=f"0x{result.status:04X}",
            attempt=job.attempts,
            transcoded=result.transcoded,
        )

    def _record_failure(
        self,
        job: ClaimedJob,
        target: _Target,
        name: str,
        destination: DicomDestination | None,
        started: dt.datetime,
        error: DeliveryError,
    ) -> None:
        """Commit the attempt and its audit record before the job is rescheduled or dead-lettered.

        PS3.15 A.5.1 EventOutcomeIndicator: 4 (minor failure, "action restarted") while a retry
        will follow; 8 (serious failure, "action terminated") when this was the last attempt.
        """
        finished = utcnow()
        final = not error.transient or job.attempts >= self._max_attempts
        outcome = Outcome.SERIOUS_FAILURE if final else Outcome.MINOR_FAILURE
        message = str(error)[:4000]
        try:
            with self._db.session() as session:
                session.add(
                    DeliveryAttempt(
                        job_pk=job.id,
                        attempt=job.attempts,
                        destination=name[:64],
                        sop_instance_uid=target.sop_instance_uid,
                        started_at=started,
                        finished_at=finished,
                        outcome=DeliveryOutcome.FAILED,
                        dimse_status=error.dimse_status,
                        error=message,
                    )
                )
                ae_title = destination.ae_title if destination is not None else name[:64] or "UNKNOWN"
                host = destination.host if destination is not None else None
                append_audit(session, self._event(target, ae_title, host, outcome, finished, message[:500]))
        except SQLAlchemyError as exc:
            # The job's own failure bookkeeping follows; losing this row only loses history.
            log.error("delivery.attempt_not_recorded", error=exc.__class__.__name__)
        log.warning(
            "delivery.failed",
            destination=name,
            transient=error.transient,
            final=final,
            attempt=job.attempts,
            status=None if error.dimse_status is None else f"0x{error.dimse_status:04X}",
            detail=message[:200],
        )

    def _event(
        self,
        target: _Target,
        destination_ae: str,
        destination_host: str | None,
        outcome: Outcome,
        when: dt.datetime,
        description: str | None,
    ) -> AuditEvent:
        """PS3.15 A.5.3.5 DICOM Instances Transferred, from us (Source) to the PACS (Destination)."""
        return instances_transferred(
            self._audit_source,
            action=Action.READ,
            outcome=outcome,
            source_participant=application(
                self._audit_source, self._calling_ae, self._host, requestor=True, role=RoleId.SOURCE
            ),
            destination_participant=application(
                self._audit_source, destination_ae, destination_host, requestor=False, role=RoleId.DESTINATION
            ),
            study_uid=target.study_uid,
            sop_classes={target.sop_class_uid: 1},
            instances=(target.sop_instance_uid,),
            patient_id=target.patient_id,
            patient_name=target.patient_name,
            accession=target.accession,
            when=when,
            description=description,
        )
