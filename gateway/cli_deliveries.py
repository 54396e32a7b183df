"""``pneumo deliveries``: the operator's view of the outbox (DESIGN.md §3 step 5).

``list`` shows delivery jobs (optionally one state), ``show`` one job with every attempt, and
``retry`` puts dead-lettered deliveries (state ``failed``) back in the queue — by id or all of
them. Only ``deliver`` jobs are touched: ``retry --all-failed`` never revives inference jobs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from conf.settings import Settings
from gateway.app import open_runtime
from gateway.delivery import DELIVER_JOB
from storage import jobs
from storage.models import DeliveryAttempt, Instance, Job, JobState


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def _job_dict(job: Job, sop_instance_uid: str | None) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "destination": job.payload.get("destination"),
        "sop_instance_uid": sop_instance_uid,
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
        "dimse_status": None if attempt.dimse_status is None else f"0x{attempt.dimse_status:04X}",
        "started_at": _iso(attempt.started_at),
        "finished_at": _iso(attempt.finished_at),
        "error": attempt.error,
    }


def list_deliveries(session: Session, state: str | None = None) -> list[dict[str, Any]]:
    """Delivery jobs, oldest first, optionally only those in *state*."""
    query = (
        select(Job, Instance.sop_instance_uid)
        .outerjoin(Instance, Job.instance_pk == Instance.id)
        .where(Job.kind == DELIVER_JOB)
        .order_by(Job.id)
    )
    if state is not None:
        query = query.where(Job.state == state)
    return [_job_dict(job, uid) for job, uid in session.execute(query).all()]


def show_delivery(session: Session, job_id: int) -> dict[str, Any] | None:
    """One delivery job and all its attempts (in order), or None if there is no such delivery."""
    row = session.execute(
        select(Job, Instance.sop_instance_uid)
        .outerjoin(Instance, Job.instance_pk == Instance.id)
        .where(Job.id == job_id, Job.kind == DELIVER_JOB)
    ).one_or_none()
    if row is None:
        return None
    job, uid = row
    attempts = session.execute(
        select(DeliveryAttempt).where(DeliveryAttempt.job_pk == job_id).order_by(DeliveryAttempt.started_at, DeliveryAttempt.id)
    ).scalars()
    return {**_job_dict(job, uid), "attempt_history": [_attempt_dict(a) for a in attempts]}


def retry_deliveries(session: Session, job_ids: list[int] | None) -> list[int]:
    """Re-queue dead-lettered deliveries (*job_ids*, or all when None); returns those re-queued."""
    query = select(Job.id).where(Job.kind == DELIVER_JOB, Job.state == JobState.FAILED)
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    eligible = sorted(session.execute(query).scalars())
    if eligible:
        jobs.retry_failed(session, eligible)
    return eligible


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    runtime = open_runtime(settings)
    try:
        with runtime.database.read_session() as session:
            rows = list_deliveries(session, args.state)
    finally:
        runtime.close()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'id':>6} {'state':<8} {'tries':>5} {'destination':<16} {'SOP Instance UID':<64} last error")
    for row in rows:
        error = (row["last_error"] or "").splitlines()[0][:60] if row["last_error"] else "-"
        print(
            f"{row['id']:>6} {row['state']:<8} {row['attempts']:>5} {str(row['destination'])[:16]:<16} "
            f"{row['sop_instance_uid'] or '-':<64} {error}"
        )
    print(f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}")
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    runtime = open_runtime(settings)
    try:
        with runtime.database.read_session() as session:
            detail = show_delivery(session, args.job_id)
    finally:
        runtime.close()
    if detail is None:
        print(json.dumps({"error": f"no delivery job {args.job_id}"}))
        return 1
    print(json.dumps(detail, indent=2))
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.job_ids) == bool(args.all_failed):
        print(json.dumps({"error": "give JOB_ID... or --all-failed (not both)"}))
        return 2
    wanted: list[int] | None = None if args.all_failed else list(args.job_ids)
    runtime = open_runtime(settings)
    try:
        with runtime.database.session() as session:
            retried = retry_deliveries(session, wanted)
    finally:
        runtime.close()
    skipped = sorted(set(wanted or ()) - set(retried))
    print(json.dumps({"retried": retried, "skipped": skipped}))
    return 1 if skipped else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``deliveries list|show|retry`` to the ``pneumo`` command parser's *subparsers*."""
    deliveries = subparsers.add_parser("deliveries", help="the outbox: list, inspect and retry report deliveries")
    actions = deliveries.add_subparsers(dest="deliveries_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="list delivery jobs")
    listing.add_argument("--state", choices=[s.value for s in JobState], default=None)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=cmd_list)

    show = actions.add_parser("show", help="one delivery job with all its attempts (JSON)")
    show.add_argument("job_id", type=int, metavar="JOB_ID")
    show.set_defaults(handler=cmd_show)

    retry = actions.add_parser("retry", help="put dead-lettered deliveries back in the queue")
    retry.add_argument("job_ids", type=int, nargs="*", metavar="JOB_ID")
    retry.add_argument("--all-failed", action="store_true", help="every dead-lettered delivery")
    retry.set_defaults(handler=cmd_retry)
