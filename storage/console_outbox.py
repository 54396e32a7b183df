"""The console's outbox page: deliveries newest first, one page at a time.

Why beside :func:`storage.outbox.list_deliveries` and not instead of it: ``pneumo deliveries list``
wants every delivery, oldest first, as the documented JSON; the console wants the newest fifty of
hundreds of thousands, keyset-paged on the job id, each with how its attempts went and which
study it belongs to (a link to the study page). One delivery with all its attempts stays
:func:`storage.outbox.show_delivery`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from conf.errors import InvalidInputError
from storage.job_kinds import DELIVER_JOB
from storage.models import DeliveryAttempt, DeliveryOutcome, Instance, Job, Series, Study, StudyResult
from storage.outbox import STUDY_RESULT_SUBJECT_PREFIX
from storage.study_browser import MAX_PAGE


@dataclass(frozen=True)
class DeliveryRow:
    """One delivery (a ``deliver`` job) as the outbox page lists it.

    ``attempts``: how often a worker took it up (the job's count); ``attempts_recorded``/
    ``failed_attempts``: the attempt history's rows; ``last_attempt_at``/``last_peer_status``:
    the latest of them; ``last_error``: the job's last error text (operators only: it may quote the
    peer). ``study_instance_uid``: the study its subject belongs to, when that is still known."""

    id: int
    state: str
    channel: str
    destination: str
    subject: str
    attempts: int
    attempts_recorded: int
    failed_attempts: int
    last_attempt_at: dt.datetime | None
    last_peer_status: str | None
    last_error: str | None
    run_after: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    study_instance_uid: str | None


def list_deliveries_page(
    session: Session, *, state: str | None = None, channel: str | None = None, limit: int = 50,
    after_id: int | None = None,
) -> tuple[list[DeliveryRow], int | None]:
    """Deliveries newest first (by job id), optionally of one state and/or channel.

    *after_id*: the second value returned for the previous page (the next page starts below it);
    returns (rows, the *after_id* of the next page or None on the last page)."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError(f"page size must be between 1 and {MAX_PAGE}")
    query = select(Job).where(Job.kind == DELIVER_JOB)
    if state is not None:
        query = query.where(Job.state == state)
    if channel is not None:
        query = query.where(Job.payload["channel"].as_string() == channel)
    if after_id is not None:
        query = query.where(Job.id < after_id)
    jobs = list(session.execute(query.order_by(Job.id.desc()).limit(limit + 1)).scalars())
    more = len(jobs) > limit
    jobs = jobs[:limit]
    history = _attempts(session, [job.id for job in jobs])
    studies = _studies(session, jobs)
    rows = []
    for job in jobs:
        recorded, failed, last_at, last_status = history.get(job.id, (0, 0, None, None))
        rows.append(
            DeliveryRow(
                id=job.id, state=job.state, channel=str(job.payload.get("channel", "")),
                destination=str(job.payload.get("destination", "")), subject=str(job.payload.get("subject", "")),
                attempts=job.attempts, attempts_recorded=recorded, failed_attempts=failed, last_attempt_at=last_at,
                last_peer_status=last_status, last_error=job.last_error, run_after=job.run_after,
                created_at=job.created_at, updated_at=job.updated_at, study_instance_uid=studies.get(job.id),
            )
        )
    return rows, (rows[-1].id if more and rows else None)


def _attempts(
    session: Session, job_pks: Sequence[int]
) -> dict[int, tuple[int, int, dt.datetime | None, str | None]]:
    """Per job: attempts recorded, failed ones, and the latest one's finish time and peer status."""
    if not job_pks:
        return {}
    counts = {
        job_pk: (int(total), int(failed or 0), last)
        for job_pk, total, failed, last in session.execute(
            select(
                DeliveryAttempt.job_pk, func.count(),
                func.count().filter(DeliveryAttempt.outcome == DeliveryOutcome.FAILED.value),
                func.max(DeliveryAttempt.id),
            )
            .where(DeliveryAttempt.job_pk.in_(job_pks))
            .group_by(DeliveryAttempt.job_pk)
        )
    }
    latest = {
        attempt_pk: (finished, status)
        for attempt_pk, finished, status in session.execute(
            select(DeliveryAttempt.id, DeliveryAttempt.finished_at, DeliveryAttempt.peer_status)
            .where(DeliveryAttempt.id.in_([last for _, _, last in counts.values()]))
        )
    }
    return {
        job_pk: (total, failed, *latest.get(last, (None, None)))
        for job_pk, (total, failed, last) in counts.items()
    }


def _studies(session: Session, jobs: Sequence[Job]) -> dict[int, str]:
    """The Study Instance UID each job's subject belongs to (a generated object, a study result)."""
    found: dict[int, str] = {}
    by_instance: dict[int, list[int]] = {}
    by_result: dict[int, list[int]] = {}
    for job in jobs:
        subject = str(job.payload.get("subject", ""))
        if job.instance_pk is not None:
            by_instance.setdefault(job.instance_pk, []).append(job.id)
        elif subject.startswith(STUDY_RESULT_SUBJECT_PREFIX) and subject[len(STUDY_RESULT_SUBJECT_PREFIX):].isdigit():
            by_result.setdefault(int(subject[len(STUDY_RESULT_SUBJECT_PREFIX):]), []).append(job.id)
    queries = []
    if by_instance:
        queries.append((
            select(Instance.id, Study.study_instance_uid)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Instance.id.in_(list(by_instance))),
            by_instance,
        ))
    if by_result:
        queries.append((
            select(StudyResult.id, Study.study_instance_uid)
            .join(Study, StudyResult.study_pk == Study.id)
            .where(StudyResult.id.in_(list(by_result))),
            by_result,
        ))
    for query, owners in queries:
        for pk, uid in session.execute(query):
            for job_id in owners[pk]:
                found[job_id] = uid
    return found
