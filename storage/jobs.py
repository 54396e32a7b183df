"""The durable job queue (docs/architecture.md §3 steps 2, 4 and 6).

A job is enqueued in the same transaction as the thing that causes it, so "acknowledged" always
implies "queued". Workers claim jobs with a lease: on PostgreSQL with
``SELECT ... FOR UPDATE SKIP LOCKED`` so that workers on several hosts never take the same job;
on SQLite the single-writer ``BEGIN IMMEDIATE`` gives the same exclusion. A worker that dies
leaves a running job whose lease expires, and the next claim takes it again: at-least-once
execution, which the job handlers make idempotent (deterministic UIDs, unique result rows).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from storage.db import Database
from storage.index import insert_ignore
from storage.models import Job, JobState, utcnow


@dataclass(frozen=True)
class ClaimedJob:
    """A detached snapshot of a claimed job; the worker reports back by id."""

    id: int
    kind: str
    instance_pk: int | None
    payload: dict[str, Any]
    attempts: int


def enqueue(
    session: Session,
    kind: str,
    dedup_key: str,
    *,
    instance_pk: int | None = None,
    payload: dict[str, Any] | None = None,
    run_after: dt.datetime | None = None,
    priority: int = 0,
) -> None:
    """Queue a job unless one with *dedup_key* already exists (idempotent).

    *priority*: lower runs first among the runnable jobs of the kinds a worker claims."""
    now = utcnow()
    insert_ignore(
        session,
        Job,
        {
            "kind": kind,
            "dedup_key": dedup_key,
            "instance_pk": instance_pk,
            "payload": payload or {},
            "state": JobState.PENDING,
            "priority": priority,
            "attempts": 0,
            "run_after": run_after or now,
            "created_at": now,
            "updated_at": now,
        },
        ["dedup_key"],
    )


def rearm(session: Session, kind: str, dedup_key: str, run_after: dt.datetime, *, payload: dict[str, Any] | None = None) -> None:
    """Make sure the job *dedup_key* runs (again) at *run_after* — a debounced trigger.

    Called repeatedly (one call per event, e.g. per image result of a study), it coalesces into
    one run after the last call. A pending job is pushed back to *run_after*; a finished one is
    revived; a running one keeps running and is marked to run again when it completes
    (``rerun_after``), so an event that happens while the job works is never lost.
    """
    insert_ignore(
        session,
        Job,
        {
            "kind": kind,
            "dedup_key": dedup_key,
            "payload": payload or {},
            "state": JobState.PENDING,
            "priority": 0,
            "attempts": 0,
            "run_after": run_after,
            "created_at": utcnow(),
            "updated_at": utcnow(),
        },
        ["dedup_key"],
    )
    job = session.execute(select(Job).where(Job.dedup_key == dedup_key).with_for_update()).scalar_one()
    if job.state == JobState.RUNNING:
        job.rerun_after = run_after
    else:
        job.state = JobState.PENDING
        job.attempts = 0
        job.run_after = run_after
        job.last_error = None


def requeue(session: Session, dedup_key: str) -> bool:
    """Put an existing job back to pending (e.g. its input was replaced); False when there is none.

    A worker running it at this moment loses its lease: its :func:`complete` / :func:`holds`
    then fail and it rolls back what it made of the old input (the row is locked meanwhile)."""
    job = session.execute(select(Job).where(Job.dedup_key == dedup_key).with_for_update()).scalar_one_or_none()
    if job is None:
        return False
    job.state = JobState.PENDING
    job.attempts = 0
    job.run_after = utcnow()
    job.lease_expires_at = None
    job.locked_by = None
    job.last_error = None
    job.rerun_after = None
    return True


#: A job that may run now: pending and due (``run_after`` not after ``due``, which is the current
#: time unless a claim asks only for jobs overdue by some margin), or running under a lease that
#: expired.
_RUNNABLE = and_(
    Job.kind.in_(bindparam("kinds", expanding=True)),
    or_(
        and_(Job.state == JobState.PENDING, Job.run_after <= bindparam("due")),
        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < bindparam("now")),
    ),
)
_ANY_RUNNABLE = select(Job.id).where(_RUNNABLE).limit(1)
_MOST_URGENT = (
    select(Job).where(_RUNNABLE).order_by(Job.priority, Job.run_after, Job.id).limit(1).with_for_update(skip_locked=True)
)


def claim(
    database: Database, kinds: Iterable[str], worker_id: str, lease: dt.timedelta, *, overdue_by: dt.timedelta | None = None
) -> ClaimedJob | None:
    """Take the most urgent runnable job of *kinds* (lowest priority, then oldest), or one whose
    previous holder's lease expired.

    With *overdue_by*, only a pending job that has been due for at least that long is taken (a
    kind that gives way to more urgent work still runs once it has waited that long, see
    :class:`storage.runtime.GivesWay`).

    On SQLite a read-only look comes first: a write transaction takes the database's one write
    lock, and every idle poll and every wake-up that another worker answered first would
    otherwise queue behind (and hold up) the transactions doing real work."""
    now = utcnow()
    parameters = {"kinds": list(kinds), "now": now, "due": now if overdue_by is None else now - overdue_by}
    if database.is_sqlite:
        with database.read_session() as session:
            if session.execute(_ANY_RUNNABLE, parameters).first() is None:
                return None
    with database.session() as session:
        job = session.execute(_MOST_URGENT, parameters).scalar_one_or_none()
        if job is None:
            return None
        job.state = JobState.RUNNING
        job.attempts += 1
        job.locked_by = worker_id
        job.lease_expires_at = now + lease
        return ClaimedJob(job.id, job.kind, job.instance_pk, dict(job.payload), job.attempts)


def any_runnable(database: Database, kinds: Iterable[str]) -> bool:
    """Whether a job of *kinds* could be claimed now (a read-only look, no lock taken)."""
    now = utcnow()
    with database.read_session() as session:
        return session.execute(_ANY_RUNNABLE, {"kinds": list(kinds), "now": now, "due": now}).first() is not None


def complete(session: Session, job_id: int, worker_id: str) -> bool:
    """Mark done in the caller's transaction (together with the job's result rows).

    Returns False when the lease was lost to another worker meanwhile; the caller must then
    roll back, because the other worker owns the job now.
    """
    if not holds(session, job_id, worker_id):
        return False
    job = session.get(Job, job_id)
    assert job is not None
    job.lease_expires_at = None
    job.last_error = None
    job.locked_by = None
    if job.rerun_after is not None:  # re-armed while it ran: run once more, later
        job.state = JobState.PENDING
        job.attempts = 0
        job.run_after = job.rerun_after
        job.rerun_after = None
    else:
        job.state = JobState.DONE
    return True


def holds(session: Session, job_id: int, worker_id: str) -> bool:
    """True when *worker_id* still holds the lease of *job_id* (row locked for the transaction).

    A handler that commits part of its work before completing the job checks this inside that
    transaction, so a worker that lost its lease never commits results beside the new holder."""
    job = session.get(Job, job_id, with_for_update=True)
    return job is not None and job.locked_by == worker_id and job.state == JobState.RUNNING


def renew(database: Database, job_id: int, worker_id: str, lease: dt.timedelta) -> bool:
    """Extend the lease of a job that *worker_id* is running to *lease* from now, in its own short
    transaction: the heartbeat of :class:`storage.runtime.LeaseKeeper` while the job runs.

    Only a holder may renew (same ``locked_by``, still running): False when the job was taken
    over after the lease expired, requeued, or completed meanwhile — then nothing changes, and a
    new holder's lease is never extended by the old one."""
    with database.session() as session:
        renewed = session.connection().execute(
            update(Job)
            .where(Job.id == job_id, Job.locked_by == worker_id, Job.state == JobState.RUNNING)
            .values(lease_expires_at=utcnow() + lease)
        )
        return renewed.rowcount == 1


def backoff_delay(attempt: int, *, base: float = 2.0, cap: float = 600.0) -> float:
    """Exponential backoff with "equal jitter" (seconds) for retry number *attempt* (1-based):
    between half and all of ``min(cap, base * 2**(attempt-1))``. The jitter spreads a herd of
    retries; the lower half-bound makes the retry *window* predictable — with the delivery defaults
    (2 s, cap 300 s, 20 attempts) a peer may be down for at least ~30 minutes before anything is
    dead-lettered, where full jitter could exhaust the attempts in a few minutes by bad luck."""
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    return random.uniform(ceiling / 2, ceiling)


def fail(
    database: Database,
    job_id: int,
    worker_id: str,
    error: str,
    *,
    permanent: bool,
    max_attempts: int,
    backoff_base: float = 2.0,
    backoff_cap: float = 600.0,
) -> str:
    """Record a failed attempt: retry later with backoff, or dead-letter. Returns the new state."""
    with database.session() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.locked_by != worker_id:
            return "lost"
        job.last_error = error[:4000]
        job.lease_expires_at = None
        job.locked_by = None
        if job.rerun_after is not None and not permanent:
            job.rerun_after = None  # the retry below runs it again anyway
        if permanent or job.attempts >= max_attempts:
            job.state = JobState.FAILED
        else:
            job.state = JobState.PENDING
            delay = backoff_delay(job.attempts, base=backoff_base, cap=backoff_cap)
            job.run_after = utcnow() + dt.timedelta(seconds=delay)
        return job.state


def worker_identity(name: str) -> str:
    """``name@host:pid:thread``: who holds a job; :func:`release_orphans` parses it back."""
    return f"{name}@{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def release_orphans(database: Database, host: str, is_alive: Callable[[int], bool]) -> int:
    """Return to the queue the running jobs that a dead process on *host* was holding.

    Leases make a crashed worker's jobs runnable again eventually (on any host); on restart we
    need not wait for them: a worker id names its host and process (``name@host:pid:thread``),
    and a job held by a process of this host that no longer exists cannot be in progress.
    """
    released = 0
    with database.session() as session:
        # Locked (PostgreSQL): a job that a worker on another host takes over between our read and
        # our write must not be reset under its new holder; one being claimed right now is skipped.
        running = session.execute(
            select(Job).where(Job.state == JobState.RUNNING).with_for_update(skip_locked=True)
        ).scalars().all()
        for job in running:
            holder_host, pid = _holder(job.locked_by)
            if holder_host == host and pid is not None and not is_alive(pid):
                job.state = JobState.PENDING
                if job.rerun_after is not None:
                    job.rerun_after = None
                job.run_after = utcnow()
                job.lease_expires_at = None
                job.locked_by = None
                released += 1
    return released


def _holder(locked_by: str | None) -> tuple[str | None, int | None]:
    """Parse ``name@host:pid:thread`` (see :func:`worker_identity`)."""
    if not locked_by or "@" not in locked_by:
        return None, None
    parts = locked_by.split("@", 1)[1].split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        return None, None
    return parts[0], int(parts[1])


def retry_failed(session: Session, job_ids: Iterable[int] | None = None) -> int:
    """Operator action: put dead-lettered jobs back in the queue."""
    query = select(Job).where(Job.state == JobState.FAILED)
    if job_ids is not None:
        query = query.where(Job.id.in_(list(job_ids)))
    count = 0
    for job in session.execute(query).scalars():
        job.state = JobState.PENDING
        job.attempts = 0
        job.run_after = utcnow()
        job.last_error = None
        count += 1
    return count
