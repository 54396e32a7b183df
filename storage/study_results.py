"""Study results: one answer per study for the EHR (docs/sr.md, "Study results").

The EHR thinks in orders and studies: a FHIR DiagnosticReport and an HL7 ORU^R01 describe one
study (one accession), not one image. When a study has been quiet for
``results.study_stable_seconds`` (no new image result), its image results are aggregated by
:func:`aggregate` into a new version of its :class:`~storage.models.StudyResult`; images that
arrive later make another version (``amended``). A study in which nothing could be analysed gets
a result too (``not-analysed``, with the reasons), so "negative" and "not looked at" are never
confused.

Every image result (re-)arms the study's ``study-result`` job (:func:`schedule_study_result`),
a debounced trigger (:func:`storage.jobs.rearm`). The job looks again later when images of the
study still wait for analysis, and makes no new version when nothing changed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from audit.builders import ai_processing
from audit.events import Action, AuditSource, Outcome
from audit.store import append as append_audit
from conf.errors import LeaseLostError, NotFoundError
from storage import jobs
from storage.db import Database
from storage.job_kinds import (
    INFER_JOB,
    STUDY_CHANGED_JOB,
    STUDY_RESULT_JOB,
    infer_job_key,
    study_changed_key,
    study_result_key,
)
from storage.jobs import ClaimedJob
from storage.models import (
    InferenceResult,
    Instance,
    InstanceOrigin,
    Job,
    JobState,
    Patient,
    ResultStatus,
    Series,
    Study,
    StudyResult,
    StudyStatus,
    utcnow,
)
from storage.outbox import Fanout
from storage.runtime import Waker

#: The labels of a study result (the study's verdict, whatever the image model calls its classes).
POSITIVE_LABEL = "PNEUMONIA"
NEGATIVE_LABEL = "NORMAL"

log = structlog.get_logger(__name__)

#: The aggregation rule, named in every study result's audit record and in docs/sr.md.
RULE = "positive when any analysed frontal image is positive at its model's threshold; the probability is the deciding image's"


#: How long a study's ``study-changed`` job waits for more changes: the images of one study are
#: analysed within a second or two of each other, so a burst is published once, not per image.
STUDY_CHANGED_DEBOUNCE_SECONDS = 1.0


def schedule_study_result(session: Session, study_pk: int, study_instance_uid: str, stable_seconds: float) -> None:
    """(Re-)arm the study's result job to run once the study has been quiet for *stable_seconds*
    (and publish the image result now: the EHR sees a preliminary report while it waits)."""
    jobs.rearm(
        session,
        STUDY_RESULT_JOB,
        study_result_key(study_instance_uid),
        utcnow() + dt.timedelta(seconds=stable_seconds),
        payload={"study_pk": study_pk},
    )
    schedule_study_changed(session, study_pk, study_instance_uid)


def schedule_study_changed(
    session: Session, study_pk: int, study_instance_uid: str, delay_seconds: float = STUDY_CHANGED_DEBOUNCE_SECONDS
) -> None:
    """(Re-)arm the study's ``study-changed`` job: what is published about it is out of date."""
    jobs.rearm(
        session,
        STUDY_CHANGED_JOB,
        study_changed_key(study_instance_uid),
        utcnow() + dt.timedelta(seconds=delay_seconds),
        payload={"study_pk": study_pk},
    )


def schedule_rejudgement(session: Session, instance: Instance, study_pks: Sequence[int]) -> None:
    """An image was replaced with other content (``dicom.on_conflict = "replace"``): judge it
    again and re-derive what was said about its study — in the caller's transaction, the one
    that commits the replacement, so that an acknowledged replacement is always re-judged.

    * its ``infer`` job goes back to pending (the same model version judges the new revision;
      a worker judging the old content right now loses its lease and rolls back);
    * each study in *study_pks* (the instance's study, and the one it left if it moved) gets
      its ``study-result`` job armed now: until the new result exists the image counts as
      waiting (:func:`image_outcomes` counts only results of the current revision), and once it
      does, a new study result version (``amended``) is fanned out to every study-result route;
      ``study-changed`` is armed with it, so the FHIR projection follows.

    The new result's SR and summary image get new SOP Instance UIDs (derived from the revision,
    :func:`storage.image_results.revised_uid`) and so new deliveries on every object route.
    """
    key = infer_job_key(instance.sop_instance_uid)
    if not jobs.requeue(session, key):
        jobs.enqueue(session, INFER_JOB, key, instance_pk=instance.id)
    for study_pk in dict.fromkeys(study_pks):
        study = session.get(Study, study_pk)
        if study is not None:
            schedule_study_result(session, study.id, study.study_instance_uid, 0.0)


@dataclass(frozen=True)
class ImageOutcome:
    """Where one received image of a study stands (the input of :func:`aggregate`)."""

    instance_pk: int
    result_pk: int | None = None
    status: str | None = None  # a ResultStatus, or None while there is no result
    reason: str | None = None
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    model_id: str | None = None
    model_version: str | None = None
    waiting: bool = False  # no result yet, and its analysis is still queued or running


@dataclass(frozen=True)
class StudyAggregate:
    """A study result before it is stored (the output of :func:`aggregate`)."""

    status: StudyStatus
    images: int
    analysed: int
    label: str | None = None
    probability: float | None = None
    threshold: float | None = None
    deciding_result_pk: int | None = None
    model_id: str | None = None
    model_version: str | None = None
    reasons: list[dict[str, Any]] = field(default_factory=list)
    basis: str = ""


def _is_positive(image: ImageOutcome) -> bool:
    return image.probability is not None and image.threshold is not None and image.probability >= image.threshold


def _not_analysed_reason(image: ImageOutcome) -> str:
    if image.status == ResultStatus.NOT_APPLICABLE:
        return f"not applicable: {image.reason}" if image.reason else "not applicable"
    if image.status == ResultStatus.FAILED:
        return f"analysis failed: {image.reason}" if image.reason else "analysis failed"
    return "analysis failed: no result recorded"


def basis_digest(images: Sequence[ImageOutcome]) -> str:
    """What a version was made from: the same images with the same results give the same digest."""
    parts = sorted(f"{i.instance_pk}:{i.result_pk}:{i.status}" for i in images)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def aggregate(images: Sequence[ImageOutcome], *, amends: bool) -> StudyAggregate:
    """The study result of *images* (pure; the rule is :data:`RULE`).

    * ``analysed`` images are those with an ``ok`` result; the study is PNEUMONIA when any of
      them is positive at its model's threshold, else NORMAL. The deciding image is the positive
      image with the highest probability, or the highest probability overall when none is
      positive; its probability, threshold and model are the study's.
    * no analysed image: ``not-analysed``, with every reason and how many images it applies to.
    * *amends*: an earlier version exists, so this one is ``amended`` (unless not analysed).
    """
    analysed = [i for i in images if i.status == ResultStatus.OK and i.probability is not None]
    reasons = Counter(_not_analysed_reason(i) for i in images if i not in analysed)
    reason_list = [{"reason": text, "images": count} for text, count in sorted(reasons.items(), key=lambda r: (-r[1], r[0]))]
    basis = basis_digest(images)
    if not analysed:
        return StudyAggregate(StudyStatus.NOT_ANALYSED, len(images), 0, reasons=reason_list, basis=basis)
    positives = [i for i in analysed if _is_positive(i)]
    deciding = max(positives or analysed, key=lambda i: (i.probability or 0.0, -i.instance_pk))
    return StudyAggregate(
        status=StudyStatus.AMENDED if amends else StudyStatus.FINAL,
        images=len(images),
        analysed=len(analysed),
        label=POSITIVE_LABEL if positives else NEGATIVE_LABEL,
        probability=deciding.probability,
        threshold=deciding.threshold,
        deciding_result_pk=deciding.result_pk,
        model_id=deciding.model_id,
        model_version=deciding.model_version,
        reasons=reason_list,
        basis=basis,
    )


def image_outcomes(session: Session, study_pk: int) -> list[ImageOutcome]:
    """Every received instance of the study with its newest image result (or why it has none).

    Only results of the instance's current revision count: a replaced image whose new content
    is not judged yet is waiting, not described by what was said about its old content."""
    revisions: dict[int, int] = {
        instance_pk: revision
        for instance_pk, revision in session.execute(
            select(Instance.id, Instance.revision)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study_pk, Instance.origin == InstanceOrigin.RECEIVED)
            .order_by(Instance.id)
        )
    }
    instances = list(revisions)
    if not instances:
        return []
    results: dict[int, InferenceResult] = {}
    for row in session.execute(
        select(InferenceResult).where(InferenceResult.instance_pk.in_(instances)).order_by(InferenceResult.id)
    ).scalars():
        if row.source_revision == revisions[row.instance_pk]:
            results[row.instance_pk] = row  # the newest wins
    job_states: dict[int | None, str] = dict(
        session.execute(
            select(Job.instance_pk, Job.state).where(Job.instance_pk.in_(instances), Job.kind == INFER_JOB)
        ).all()
    )
    failures = dict(
        session.execute(
            select(Job.instance_pk, Job.last_error).where(
                Job.instance_pk.in_(instances), Job.kind == INFER_JOB, Job.state == JobState.FAILED
            )
        ).all()
    )
    outcomes = []
    for pk in instances:
        result = results.get(pk)
        if result is not None:
            outcomes.append(
                ImageOutcome(
                    pk, result.id, result.status, result.reason, result.probability, result.label,
                    result.threshold, result.model_id, result.model_version,
                )
            )
        elif pk in failures:
            first_line = (failures[pk] or "").splitlines()[0][:300] if failures[pk] else None
            outcomes.append(ImageOutcome(pk, status=ResultStatus.FAILED, reason=first_line))
        else:
            outcomes.append(ImageOutcome(pk, waiting=job_states.get(pk) in (JobState.PENDING, JobState.RUNNING)))
    return outcomes


def current_result(session: Session, study_pk: int) -> StudyResult | None:
    return session.execute(
        select(StudyResult).where(StudyResult.study_pk == study_pk).order_by(StudyResult.version.desc()).limit(1)
    ).scalar_one_or_none()


class StudyResultHandler:
    """The ``study-result`` job: aggregate, store a new version when something changed, fan out."""

    def __init__(
        self,
        database: Database,
        fanout: Fanout,
        audit_source: AuditSource,
        *,
        application_id: str,
        stable_seconds: float,
        on_deliveries_queued: Waker | None = None,
    ) -> None:
        self._db = database
        self._fanout = fanout
        self._audit_source = audit_source
        self._application_id = application_id
        self._stable = stable_seconds
        self._on_deliveries_queued = on_deliveries_queued or (lambda: None)

    def __call__(self, job: ClaimedJob, worker_id: str) -> None:
        study_pk = int(job.payload.get("study_pk", 0))
        queued = 0
        with self._db.session() as session:
            if not jobs.holds(session, job.id, worker_id):
                raise LeaseLostError()
            study = session.get(Study, study_pk)
            if study is None:
                raise NotFoundError(f"study {study_pk} is not in the index")
            images = image_outcomes(session, study_pk)
            if any(i.waiting for i in images):
                # Some images still wait for the classifier: look again after another quiet period
                # (their own results re-arm this job too; this covers one that never comes).
                schedule_study_result(session, study_pk, study.study_instance_uid, self._stable)
            elif images:
                queued = self._record(session, study, images)
            if not jobs.complete(session, job.id, worker_id):
                raise LeaseLostError()
        if queued:
            self._on_deliveries_queued()

    def _record(self, session: Session, study: Study, images: list[ImageOutcome]) -> int:
        latest = current_result(session, study.id)
        result = aggregate(images, amends=latest is not None)
        if latest is not None and latest.basis == result.basis:
            return 0
        row = StudyResult(
            study_pk=study.id,
            version=(latest.version + 1) if latest is not None else 1,
            status=result.status,
            label=result.label,
            probability=result.probability,
            threshold=result.threshold,
            images=result.images,
            analysed=result.analysed,
            reasons=result.reasons,
            deciding_result_pk=result.deciding_result_pk,
            model_id=result.model_id,
            model_version=result.model_version,
            basis=result.basis,
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        queued = self._fanout.study_result(session, row.id)
        schedule_study_changed(session, study.id, study.study_instance_uid, 0.0)
        patient = session.get(Patient, study.patient_pk)
        summary = (
            f"study result v{row.version} {row.status}: {row.label or '-'}"
            + (f" p={row.probability:.4f}" if row.probability is not None else "")
            + f"; {row.analysed} of {row.images} images analysed"
        )
        append_audit(
            session,
            ai_processing(
                self._audit_source,
                application_id=self._application_id,
                action=Action.CREATE,
                outcome=Outcome.SUCCESS,
                study_uid=study.study_instance_uid,
                sop_classes={},
                instances=(),
                patient_id=patient.patient_id if patient else "",
                patient_name=patient.name if patient else None,
                accession=study.accession_number,
                description=summary[:1000],
                when=row.created_at,
            ),
        )
        log.info("study.result", status=str(row.status), version=row.version, label=row.label,
                 analysed=row.analysed, images=row.images)
        return queued


def list_studies(session: Session) -> list[dict[str, Any]]:
    """``pneumo studies``: one entry per study that has received images, with its current result."""
    counts = dict(
        session.execute(
            select(Series.study_pk, func.count(Instance.id))
            .join(Instance, Instance.series_pk == Series.id)
            .where(Instance.origin == InstanceOrigin.RECEIVED)
            .group_by(Series.study_pk)
        ).all()
    )
    latest_version = (
        select(StudyResult.study_pk, func.max(StudyResult.version).label("version")).group_by(StudyResult.study_pk).subquery()
    )
    current = {
        row.study_pk: row
        for row in session.execute(
            select(StudyResult).join(
                latest_version,
                (StudyResult.study_pk == latest_version.c.study_pk) & (StudyResult.version == latest_version.c.version),
            )
        ).scalars()
    }
    studies = session.execute(select(Study).where(Study.id.in_(list(counts))).order_by(Study.id)).scalars()
    rows = []
    for study in studies:
        result = current.get(study.id)
        rows.append(
            {
                "study_instance_uid": study.study_instance_uid,
                "accession_number": study.accession_number,
                "status": result.status if result is not None else StudyStatus.PENDING.value,
                "label": result.label if result is not None else None,
                "probability": None if result is None or result.probability is None else round(result.probability, 6),
                "threshold": None if result is None else result.threshold,
                "images": counts.get(study.id, 0),
                "analysed": result.analysed if result is not None else 0,
                "reasons": result.reasons if result is not None else [],
                "version": result.version if result is not None else 0,
                "model": None if result is None or result.model_id is None
                else {"id": result.model_id, "version": result.model_version},
                "updated_at": None if result is None else result.created_at.isoformat(),
            }
        )
    return rows
