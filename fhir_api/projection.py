"""The ``study-changed`` job: publish a study as FHIR resources (docs/fhir.md, "How resources are made").

Whenever a study's images or results change (an image result, a study result version, a summary
image), :func:`storage.study_results.schedule_study_changed` re-arms this job for the study. It
reads the study's facts (:mod:`fhir_api.facts_loader`), maps them to resources with the pure
mappers (:mod:`fhir_api.resources`) and stores each one whose content changed as a new version
(:func:`fhir_api.store.put`) — Patient, ServiceRequest (the HL7 orders of its accession, also
re-published when an order or ADT message arrives), ImagingStudy, Device, one Observation per
analysed image and the study's DiagnosticReport — then queues a notification for every active Subscription the
new version matches (:mod:`fhir_api.subscriptions`), in one transaction: a resource version
exists if and only if its notifications are queued. Reading and mapping come before, in a read
transaction (see :class:`StudyProjectionHandler`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.orm import Session

from conf.errors import LeaseLostError
from fhir_api import resources, store
from fhir_api.facts_loader import StudyView, load_study_view
from fhir_api.store import StoredResource
from fhir_api.subscriptions import queue_notifications
from storage import jobs
from storage.db import Database
from storage.jobs import ClaimedJob
from storage.models import utcnow

log = structlog.get_logger(__name__)


def study_resources(view: StudyView) -> Iterator[dict[str, Any]]:
    """Every resource that describes the study, referenced ones before those that refer to them."""
    yield resources.patient(view.study.patient)
    for order in view.study.orders:
        yield resources.service_request(order, view.study)
    yield resources.imaging_study(view.study)
    for model in view.models:
        yield resources.device(model)
    for finding in view.findings:
        yield resources.observation(finding, view.study)
    if view.report is not None:
        yield resources.diagnostic_report(view.report)


@dataclass(frozen=True)
class Publication:
    """What a study's publication would store: each resource whose content differs from the
    current version, with its content digest."""

    study_uid: str
    pending: list[tuple[dict[str, Any], str]]


def plan_publication(session: Session, study_pk: int) -> Publication:
    """Read the study and map it; keep the resources whose content is not what is published."""
    view = load_study_view(session, study_pk)
    bodies = list(study_resources(view))
    current = store.current_digests(session, [(str(b["resourceType"]), str(b["id"])) for b in bodies])
    pending = []
    for body in bodies:
        digest = store.content_digest(body)
        if current.get((str(body["resourceType"]), str(body["id"]))) != digest:
            pending.append((body, digest))  # else put would find the same and store nothing
    return Publication(view.study.study_instance_uid, pending)


def store_publication(session: Session, publication: Publication) -> tuple[list[StoredResource], int]:
    """Store the planned resources as new versions (each re-checked under its row lock) and queue
    their notifications; returns the new versions and the notifications queued."""
    now = utcnow()
    changed: list[StoredResource] = []
    for body, digest in publication.pending:
        shared = body["resourceType"] in ("Patient", "Device", "ServiceRequest")
        stored = store.put(session, body, study_uid=None if shared else publication.study_uid, now=now, digest=digest)
        if stored is not None:
            changed.append(stored)
    return changed, queue_notifications(session, changed)


def publish_study(session: Session, study_pk: int) -> tuple[list[StoredResource], int]:
    """Plan and store in one transaction (``pneumo fhir republish``, tests)."""
    return store_publication(session, plan_publication(session, study_pk))


class StudyProjectionHandler:
    """Handler of ``study-changed`` jobs (registered by the composition root)."""

    def __init__(self, database: Database, *, on_notifications_queued: Callable[[], None] | None = None) -> None:
        self._db = database
        self._on_queued = on_notifications_queued or (lambda: None)

    def __call__(self, job: ClaimedJob, worker_id: str) -> None:
        """Read and map the study in a read transaction, then store what changed in a short write
        transaction. Why two: on SQLite the write transaction holds the database's one write lock,
        and reading and mapping a study took longer than storing it (~13 + 6 of ~40 ms), time in
        which every C-STORE's commit waited. A change to the study committed in between re-arms
        this job (it runs again, :func:`storage.jobs.rearm`), so what is published catches up."""
        study_pk = int(job.payload.get("study_pk", 0))
        with self._db.read_session() as session:
            publication = plan_publication(session, study_pk)
        with self._db.session() as session:
            if not jobs.holds(session, job.id, worker_id):
                raise LeaseLostError()
            changed, queued = store_publication(session, publication)
            if not jobs.complete(session, job.id, worker_id):
                raise LeaseLostError()
        if changed:
            log.info("fhir.published", resources=len(changed), notifications=queued,
                     types=sorted({c.resource_type for c in changed}))
        if queued:
            self._on_queued()
