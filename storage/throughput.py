"""The console's live view: what went through per minute, and which DICOM peers are sending.

Why counted in SQL by minute: at full load an hour is hundreds of thousands of instances, results
and delivery attempts; fetching their timestamps to bucket them here would move all of them over
the wire every refresh. Each count is one ``GROUP BY`` on the minute since the epoch, over an
indexed time column (``instance.received_at``, ``inference_result.created_at``,
``delivery_attempt.finished_at``, the last added by migration 0015), spelled per backend by
:func:`minute_of` because SQLite and PostgreSQL share no date-truncation function.

Nothing returned names a patient or a study: counts, AE titles and times only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Integer, case, cast, extract, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from storage.models import (
    DeliveryAttempt,
    DeliveryOutcome,
    DicomAssociation,
    InferenceResult,
    Instance,
    InstanceOrigin,
    ResultStatus,
)

#: The longest window :func:`throughput` counts (a day of minutes).
MAX_MINUTES = 24 * 60
#: How far back :func:`dicom_peers` looks for peers at all.
PEER_LOOKBACK = dt.timedelta(days=30)


@dataclass(frozen=True)
class MinuteCounts:
    """What happened in the minute starting at ``minute`` (UTC, seconds zero).

    ``received``: instances received (not the ones we generated); ``analysed``: image results
    with status ``ok``; ``not_analysed``: results ``not-applicable`` or ``failed``; ``delivered``:
    delivery attempts that succeeded, on every channel, by when they finished."""

    minute: dt.datetime
    received: int = 0
    analysed: int = 0
    not_analysed: int = 0
    delivered: int = 0


@dataclass(frozen=True)
class PeerActivity:
    """One calling AE title that had associations accepted in the lookback (the last 30 days).

    ``associations_24h``/``instances_stored_24h``/``instances_refused_24h``: over the 24 hours
    before *now*; ``last_refused_at``: the end of its latest association in which we refused an
    instance (rejected associations are not recorded, storage/associations.py)."""

    calling_ae: str
    last_association_at: dt.datetime
    last_peer_address: str | None
    associations_24h: int
    instances_stored_24h: int
    instances_refused_24h: int
    last_refused_at: dt.datetime | None


def _floor_minute(when: dt.datetime) -> dt.datetime:
    return when.astimezone(dt.UTC).replace(second=0, microsecond=0)


def minute_of(column: InstrumentedAttribute[dt.datetime], dialect: str) -> ColumnElement[int]:
    """Whole minutes since the Unix epoch of a UTC timestamp column, on *dialect*'s terms."""
    if dialect == "postgresql":
        return cast(func.floor(extract("epoch", column) / 60), Integer)
    # SQLite keeps "YYYY-MM-DD HH:MM:SS.ffffff" (UTC); strftime('%s') reads it as UTC seconds.
    return cast(cast(func.strftime("%s", column), Integer) / 60, Integer)


def _per_minute(
    session: Session, column: InstrumentedAttribute[dt.datetime], start: dt.datetime, end: dt.datetime,
    *conditions: ColumnElement[bool], by: ColumnElement[str] | None = None,
) -> dict[tuple[int, str], int]:
    bucket = minute_of(column, session.get_bind().dialect.name).label("minute")
    window = (column >= start, column < end, *conditions)
    if by is None:
        plain = select(bucket, func.count()).where(*window).group_by(bucket)
        return {(int(minute), ""): int(count) for minute, count in session.execute(plain)}
    query = select(bucket, by, func.count()).where(*window).group_by(bucket, by)
    return {(int(minute), str(key)): int(count) for minute, key, count in session.execute(query)}


def throughput(session: Session, now: dt.datetime, minutes: int = 60) -> list[MinuteCounts]:
    """Counts per minute for the *minutes* minutes up to *now*, oldest first, every minute present.

    The last entry is the minute *now* is in (still filling up)."""
    if not 1 <= minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be between 1 and {MAX_MINUTES}")
    end_minute = _floor_minute(now)
    start = end_minute - dt.timedelta(minutes=minutes - 1)
    end = end_minute + dt.timedelta(minutes=1)
    received = _per_minute(session, Instance.received_at, start, end, Instance.origin == InstanceOrigin.RECEIVED.value)
    ok = ResultStatus.OK.value
    results = _per_minute(
        session, InferenceResult.created_at, start, end,
        by=case((InferenceResult.status == ok, ok), else_="other"),
    )
    delivered = _per_minute(
        session, DeliveryAttempt.finished_at, start, end, DeliveryAttempt.outcome == DeliveryOutcome.DELIVERED.value
    )
    first = int(start.timestamp()) // 60
    return [
        MinuteCounts(
            minute=start + dt.timedelta(minutes=i),
            received=received.get((first + i, ""), 0),
            analysed=results.get((first + i, ok), 0),
            not_analysed=results.get((first + i, "other"), 0),
            delivered=delivered.get((first + i, ""), 0),
        )
        for i in range(minutes)
    ]


def dicom_peers(session: Session, now: dt.datetime, *, lookback: dt.timedelta = PEER_LOOKBACK) -> list[PeerActivity]:
    """Every calling AE with an association that ended in *lookback* before *now*, most recent first."""
    day = now - dt.timedelta(hours=24)
    in_day = DicomAssociation.ended_at >= day
    a = DicomAssociation
    query = (
        select(
            a.calling_ae,
            func.max(a.ended_at),
            func.count().filter(in_day),
            func.coalesce(func.sum(a.instances_stored).filter(in_day), 0),
            func.coalesce(func.sum(a.instances_refused).filter(in_day), 0),
            func.max(a.ended_at).filter(a.instances_refused > 0),
        )
        .where(a.ended_at >= now - lookback, a.ended_at <= now)
        .group_by(a.calling_ae)
    )
    rows = list(session.execute(query))
    addresses = _last_addresses(session, [(ae, last) for ae, last, *_ in rows])
    peers = [
        PeerActivity(
            calling_ae=ae, last_association_at=last, last_peer_address=addresses.get(ae),
            associations_24h=int(count), instances_stored_24h=int(stored), instances_refused_24h=int(refused),
            last_refused_at=last_refused,
        )
        for ae, last, count, stored, refused, last_refused in rows
    ]
    return sorted(peers, key=lambda p: (p.last_association_at, p.calling_ae), reverse=True)


def _last_addresses(session: Session, latest: list[tuple[str, dt.datetime]]) -> dict[str, str | None]:
    """The peer address of each AE's latest association (one indexed query for all of them)."""
    if not latest:
        return {}
    ends = {when for _, when in latest}
    wanted = set(latest)
    found: dict[str, str | None] = {}
    for ae, ended_at, address, _ in session.execute(
        select(DicomAssociation.calling_ae, DicomAssociation.ended_at, DicomAssociation.peer_address, DicomAssociation.id)
        .where(DicomAssociation.ended_at.in_(ends))
        .order_by(DicomAssociation.id)
    ):
        if (ae, ended_at) in wanted:
            found[ae] = address
    return found
