"""What ``pneumo status`` reports: the queue, dead letters and delivery health, as plain queries.

Why here and not in the CLI: the same questions (how deep is the queue, is a destination down)
are what a monitoring probe asks, and they must give the same answer on SQLite and PostgreSQL;
pure functions of a session and a clock are table-tested on both (tests/storage/test_status.py).

Nothing returned names a patient, a study or an instance: counts, job kinds, destinations,
times, job ids and *classes* of error. Error texts are never passed on: an HL7 ACK's ERR segment
or a peer's comment may quote the message it refused (PHI); only the peer's status code (a DIMSE
status, an ACK code, an HTTP status) and our own classification are.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from storage.job_kinds import DELIVER_JOB
from storage.models import DeliveryAttempt, DeliveryOutcome, InferenceResult, Job, JobState

#: How many dead-lettered job ids :func:`dead_letters` lists (the counts are always complete).
DEAD_LETTER_IDS = 50

_EXCEPTION_CLASS = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


@dataclass(frozen=True)
class QueueDepth:
    """One job kind in the queue. ``queued``: pending (due or waiting for a retry/debounce time);
    ``due``: of those, the ones that may run now, plus running jobs whose lease expired (a dead
    worker's); ``oldest_due_at``: since when the longest-waiting of them could have run."""

    kind: str
    queued: int = 0
    due: int = 0
    running: int = 0
    dead_letter: int = 0
    oldest_due_at: dt.datetime | None = None

    def oldest_due_age_seconds(self, now: dt.datetime) -> float | None:
        return None if self.oldest_due_at is None else max(0.0, (now - self.oldest_due_at).total_seconds())


@dataclass(frozen=True)
class DestinationHealth:
    """How one destination of one channel is doing, from the outbox's attempt history.

    ``failing_streak``: failed attempts since the last success (all of them when there was none);
    ``failing_since``: the first of those; ``pending``: deliveries queued or running for it."""

    channel: str
    destination: str
    last_success_at: dt.datetime | None = None
    last_failure_at: dt.datetime | None = None
    last_failure_class: str | None = None
    last_peer_status: str | None = None
    failing_streak: int = 0
    failing_since: dt.datetime | None = None
    pending: int = 0
    dead_letter: int = 0

    def failing_for_seconds(self, now: dt.datetime) -> float | None:
        return None if self.failing_since is None else max(0.0, (now - self.failing_since).total_seconds())


@dataclass(frozen=True)
class DeadLetters:
    """Dead-lettered jobs: counts per kind (complete) and the oldest ids (at most *limit*)."""

    total: int
    by_kind: dict[str, int]
    ids: list[int]
    oldest_at: dt.datetime | None
    newest_at: dt.datetime | None


def failure_class(peer_status: str | None, error: str | None) -> str:
    """A PHI-free class for one failed delivery attempt.

    ``not-configured``: the destination is no longer in the settings (our own message);
    ``no-answer``: nothing came back (connection refused, timeout, TLS, association rejected
    before any DIMSE status); ``refused``: the peer answered with a failure status
    (``peer_status`` says which)."""
    if peer_status:
        return "refused"
    if error and "is not configured" in error:
        return "not-configured"
    return "no-answer"


def error_class(last_error: str | None) -> str:
    """The exception class a job's ``last_error`` starts with (``OSError: ...``), else ``error``:
    the text itself is never shown (a handler's message may quote what it worked on)."""
    if not last_error:
        return "error"
    match = _EXCEPTION_CLASS.match(last_error.strip())
    return match.group(1) if match else "error"


def queue_depths(session: Session, now: dt.datetime) -> list[QueueDepth]:
    """Every job kind that has queued, running or dead-lettered jobs, by kind (done ones are not counted)."""
    counts: dict[str, dict[str, int]] = {}
    by_state = select(Job.kind, Job.state, func.count()).where(Job.state != JobState.DONE).group_by(Job.kind, Job.state)
    for kind, state, count in session.execute(by_state):
        counts.setdefault(kind, {})[state] = int(count)
    due: dict[str, tuple[int, dt.datetime | None]] = {}
    pending_due = (
        select(Job.kind, func.count(), func.min(Job.run_after))
        .where(Job.state == JobState.PENDING, Job.run_after <= now)
        .group_by(Job.kind)
    )
    expired = (
        select(Job.kind, func.count(), func.min(Job.lease_expires_at))
        .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
        .group_by(Job.kind)
    )
    for query in (pending_due, expired):
        for kind, count, oldest in session.execute(query):
            previous_count, previous_oldest = due.get(kind, (0, None))
            candidates = [t for t in (previous_oldest, oldest) if t is not None]
            due[kind] = (previous_count + int(count), min(candidates) if candidates else None)
    return [
        QueueDepth(
            kind=kind,
            queued=states.get(JobState.PENDING, 0),
            due=due.get(kind, (0, None))[0],
            running=states.get(JobState.RUNNING, 0),
            dead_letter=states.get(JobState.FAILED, 0),
            oldest_due_at=due.get(kind, (0, None))[1],
        )
        for kind, states in sorted(counts.items())
    ]


def dead_letters(session: Session, limit: int = DEAD_LETTER_IDS) -> DeadLetters:
    """The dead-lettered jobs of every kind (``pneumo deliveries retry ID`` takes a delivery's id)."""
    by_kind = {
        kind: int(count)
        for kind, count in session.execute(
            select(Job.kind, func.count()).where(Job.state == JobState.FAILED).group_by(Job.kind).order_by(Job.kind)
        )
    }
    oldest, newest = session.execute(
        select(func.min(Job.updated_at), func.max(Job.updated_at)).where(Job.state == JobState.FAILED)
    ).one()
    ids = list(session.execute(select(Job.id).where(Job.state == JobState.FAILED).order_by(Job.id).limit(limit)).scalars())
    return DeadLetters(total=sum(by_kind.values()), by_kind=by_kind, ids=ids, oldest_at=oldest, newest_at=newest)


def _delivery_jobs(session: Session) -> dict[tuple[str, str], dict[str, int]]:
    channel = Job.payload["channel"].as_string()
    destination = Job.payload["destination"].as_string()
    query = (
        select(channel, destination, Job.state, func.count())
        .where(Job.kind == DELIVER_JOB, Job.state != JobState.DONE)
        .group_by(channel, destination, Job.state)
    )
    found: dict[tuple[str, str], dict[str, int]] = {}
    for channel_name, destination_name, state, count in session.execute(query):
        found.setdefault((str(channel_name), str(destination_name)), {})[state] = int(count)
    return found


def destination_health(session: Session) -> list[DestinationHealth]:
    """One entry per (channel, destination) that has ever had an attempt or has deliveries waiting."""
    delivered = DeliveryAttempt.outcome == DeliveryOutcome.DELIVERED
    last_times = (
        select(
            DeliveryAttempt.channel,
            DeliveryAttempt.destination,
            func.max(DeliveryAttempt.finished_at).filter(delivered),
            func.max(DeliveryAttempt.finished_at).filter(DeliveryAttempt.outcome == DeliveryOutcome.FAILED),
        )
        .group_by(DeliveryAttempt.channel, DeliveryAttempt.destination)
    )
    seen: dict[tuple[str, str], tuple[dt.datetime | None, dt.datetime | None]] = {
        (channel, destination): (success, failure) for channel, destination, success, failure in session.execute(last_times)
    }
    jobs = _delivery_jobs(session)
    health = []
    for key in sorted(set(seen) | set(jobs)):
        channel, destination = key
        success, failure = seen.get(key, (None, None))
        states = jobs.get(key, {})
        entry: dict[str, Any] = {
            "channel": channel, "destination": destination, "last_success_at": success, "last_failure_at": failure,
            "pending": states.get(JobState.PENDING, 0) + states.get(JobState.RUNNING, 0),
            "dead_letter": states.get(JobState.FAILED, 0),
        }
        if failure is not None:
            entry.update(_failures(session, channel, destination, success))
        health.append(DestinationHealth(**entry))
    return health


def _failures(session: Session, channel: str, destination: str, last_success: dt.datetime | None) -> dict[str, Any]:
    """The latest failure's class and the streak of failures since *last_success*."""
    of_destination = and_(DeliveryAttempt.channel == channel, DeliveryAttempt.destination == destination)
    latest = session.execute(
        select(DeliveryAttempt.peer_status, DeliveryAttempt.error)
        .where(of_destination, DeliveryAttempt.outcome == DeliveryOutcome.FAILED)
        .order_by(DeliveryAttempt.finished_at.desc(), DeliveryAttempt.id.desc())
        .limit(1)
    ).one()
    conditions = [of_destination, DeliveryAttempt.outcome == DeliveryOutcome.FAILED]
    if last_success is not None:
        conditions.append(DeliveryAttempt.finished_at > last_success)
    streak, first = session.execute(select(func.count(), func.min(DeliveryAttempt.finished_at)).where(*conditions)).one()
    return {
        "last_failure_class": failure_class(latest.peer_status, latest.error),
        "last_peer_status": latest.peer_status,
        "failing_streak": int(streak),
        "failing_since": first if streak else None,
    }


def models_in_results(session: Session) -> list[dict[str, Any]]:
    """Which model versions made image results, with how many and the newest (a worker host still
    on an older model package shows here beside the one this host loads)."""
    query = (
        select(InferenceResult.model_id, InferenceResult.model_version, func.count(), func.max(InferenceResult.created_at))
        .group_by(InferenceResult.model_id, InferenceResult.model_version)
        .order_by(func.max(InferenceResult.created_at).desc())
    )
    return [
        {"model_id": model_id, "version": version, "results": int(count), "last_result_at": last}
        for model_id, version, count, last in session.execute(query)
    ]


def problems(
    dead: DeadLetters, destinations: list[DestinationHealth], now: dt.datetime, failing_limit: dt.timedelta
) -> list[str]:
    """Why ``pneumo status`` exits 1 (docs/operations.md, "Monitoring"): dead letters, which no
    retry will clear without an operator, and destinations failing for longer than *failing_limit*
    (shorter outages are what the outbox's retries are for)."""
    found = []
    if dead.total:
        kinds = ", ".join(f"{kind} {count}" for kind, count in dead.by_kind.items())
        found.append(f"{dead.total} dead-lettered job(s) ({kinds})")
    for entry in destinations:
        if entry.failing_since is not None and now - entry.failing_since > failing_limit:
            minutes = int((now - entry.failing_since).total_seconds() // 60)
            found.append(
                f"{entry.channel} destination {entry.destination} failing for {minutes} min "
                f"({entry.failing_streak} attempt(s), last: {entry.last_failure_class})"
            )
    return found
