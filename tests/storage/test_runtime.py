"""The worker loop's choice of job: kinds that give way to more urgent work (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import pytest

from storage import jobs
from storage.db import Database
from storage.jobs import ClaimedJob
from storage.models import Job, utcnow
from storage.runtime import GivesWay, JobKind, JobRegistry, JobWorker, WorkerOptions

WAIT = dt.timedelta(seconds=30)


def _ignore(job: ClaimedJob, worker_id: str) -> None:
    raise AssertionError("the tests claim jobs, they never run them")


def _worker(database: Database, gives_way: GivesWay | None) -> JobWorker:
    registry = JobRegistry([
        JobKind("infer", _ignore),
        JobKind("study-result", _ignore),
        JobKind("study-changed", _ignore, gives_way=gives_way),
    ])
    return JobWorker(database, registry, ["study-result", "study-changed"], WorkerOptions(), "results-test")


def _enqueue(database: Database, kind: str, key: str, due_seconds_ago: float = 0.0) -> None:
    with database.session() as session:
        jobs.enqueue(session, kind, key, run_after=utcnow() - dt.timedelta(seconds=due_seconds_ago))


def _claimed_key(database: Database, job: ClaimedJob | None) -> str | None:
    if job is None:
        return None
    with database.read_session() as session:
        row = session.get(Job, job.id)
        assert row is not None
        return row.dedup_key


@pytest.mark.parametrize(
    ("images_waiting", "publication_due_seconds_ago", "claimed"),
    [
        (False, 0.0, "study-changed:1"),   # nothing more urgent: taken at once
        (True, 0.0, None),                 # images wait for analysis: the publication waits too
        (True, 29.0, None),                # ... up to its longest wait
        (True, 31.0, "study-changed:1"),   # and no longer
    ],
)
def test_publication_gives_way_to_images_at_most_its_longest_wait(
    database: Database, images_waiting: bool, publication_due_seconds_ago: float, claimed: str | None
) -> None:
    if images_waiting:
        _enqueue(database, "infer", "infer:1")
    _enqueue(database, "study-changed", "study-changed:1", publication_due_seconds_ago)
    worker = _worker(database, GivesWay(to=("infer",), at_most=WAIT))
    assert _claimed_key(database, worker.claim("w1")) == claimed


def test_kinds_that_do_not_give_way_are_taken_while_images_wait(database: Database) -> None:
    _enqueue(database, "infer", "infer:1")
    _enqueue(database, "study-changed", "study-changed:1", due_seconds_ago=5.0)
    _enqueue(database, "study-result", "study-result:1")
    worker = _worker(database, GivesWay(to=("infer",), at_most=WAIT))
    assert _claimed_key(database, worker.claim("w1")) == "study-result:1"
    assert worker.claim("w1") is None


def test_without_a_rule_the_oldest_due_job_comes_first(database: Database) -> None:
    _enqueue(database, "infer", "infer:1")
    _enqueue(database, "study-changed", "study-changed:1", due_seconds_ago=5.0)
    _enqueue(database, "study-result", "study-result:1")
    worker = _worker(database, None)
    assert _claimed_key(database, worker.claim("w1")) == "study-changed:1"
    assert _claimed_key(database, worker.claim("w1")) == "study-result:1"
