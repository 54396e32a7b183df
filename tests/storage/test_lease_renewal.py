"""Leases are renewed while a job runs (storage.runtime.LeaseKeeper, storage.jobs.renew).

On SQLite and PostgreSQL: a job that runs several times longer than its lease stays with its
worker while a rival worker polls the whole time; a worker that is SIGKILLed (a real process)
stops renewing, its lease runs out and the rival takes the job over; only the holder may renew,
and a worker that lost its job stops renewing it.

No assertion depends on timing: the leases are seconds long, renewals come every third of one,
and every wait is a poll with a deadline far beyond what the work needs.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from conf.errors import LeaseLostError
from storage import jobs
from storage.db import Database
from storage.jobs import ClaimedJob
from storage.models import Job, JobState, utcnow
from storage.runtime import JobKind, JobRegistry, JobWorker, LeaseKeeper, WorkerOptions
from tests.conftest import wait_until
from tests.gateway.processes import alive

#: Short enough for the test, long enough that a loaded machine renews in time (every LEASE / 3).
LEASE = 3.0
KIND = "slow"
REPO = Path(__file__).resolve().parents[2]


def _enqueue(database: Database, key: str = "slow:1") -> int:
    with database.session() as session:
        jobs.enqueue(session, KIND, key)
    with database.read_session() as session:
        return int(session.execute(select(Job.id).where(Job.dedup_key == key)).scalar_one())


def _job(database: Database, job_id: int) -> Job:
    with database.read_session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _complete(database: Database, job: ClaimedJob, worker_id: str) -> None:
    with database.session() as session:
        if not jobs.complete(session, job.id, worker_id):
            raise LeaseLostError(f"job {job.id} was taken over")


class _Rival:
    """A second worker polling for the same kind of job; records every job it starts."""

    def __init__(self, database: Database) -> None:
        self.started: list[int] = []
        self.worker = JobWorker(
            database, JobRegistry([JobKind(KIND, self._handle)]), [KIND],
            WorkerOptions(poll_interval=0.05, lease_seconds=LEASE), "rival",
        )
        self._database = database

    def _handle(self, job: ClaimedJob, worker_id: str) -> None:
        self.started.append(job.id)
        _complete(self._database, job, worker_id)


@pytest.fixture
def rival(database: Database) -> Iterator[_Rival]:
    rival = _Rival(database)
    yield rival
    rival.worker.stop()


def _outlived_three_leases(database: Database, job_id: int, claimed: dt.datetime, rival: _Rival) -> bool:
    """Whether the job's lease has been renewed to three leases past its claim — failing at once
    if the rival took it over meanwhile."""
    job = _job(database, job_id)
    assert rival.started == [] and job.attempts == 1 and job.state == JobState.RUNNING, "taken over"
    return job.lease_expires_at is not None and job.lease_expires_at >= claimed + dt.timedelta(seconds=3 * LEASE)


def test_a_job_three_times_longer_than_its_lease_stays_with_its_worker(database: Database, rival: _Rival) -> None:
    job_id = _enqueue(database)
    ran_by: list[str] = []
    finish = threading.Event()

    def slow(job: ClaimedJob, worker_id: str) -> None:
        ran_by.append(worker_id)
        finish.wait(120)  # until the test has seen the job outlive three leases
        _complete(database, job, worker_id)

    holder = JobWorker(database, JobRegistry([JobKind(KIND, slow)]), [KIND],
                       WorkerOptions(poll_interval=0.05, lease_seconds=LEASE), "holder")
    holder.start()
    try:
        claimed = wait_until(lambda: _job(database, job_id).lease_expires_at, 60, "the holder's claim")
        rival.worker.start()
        # Renewed again and again: the job runs past three of its leases while the rival polls.
        wait_until(lambda: _outlived_three_leases(database, job_id, claimed, rival), 120,
                   "lease renewals covering three leases")
        assert (_job(database, job_id).state, _job(database, job_id).attempts) == (JobState.RUNNING, 1)
        finish.set()
        wait_until(lambda: _job(database, job_id).state == JobState.DONE, 60, "the holder to complete the job")
    finally:
        finish.set()
        holder.stop()
    assert len(ran_by) == 1 and ran_by[0].startswith("holder@")
    assert rival.started == []  # never taken over: the holder's complete() succeeded
    assert _job(database, job_id).attempts == 1


_VICTIM = """
import sys, time
from storage.db import Database
from storage.runtime import JobKind, JobRegistry, JobWorker, WorkerOptions

def forever(job, worker_id):
    time.sleep(3600)

database = Database(sys.argv[1])
worker = JobWorker(database, JobRegistry([JobKind("slow", forever)]), ["slow"],
                   WorkerOptions(poll_interval=0.05, lease_seconds=float(sys.argv[2])), "victim")
worker.start()
time.sleep(3600)
"""


def test_a_sigkilled_worker_stops_renewing_and_its_job_is_taken_over(
    database: Database, database_url: str, rival: _Rival
) -> None:
    job_id = _enqueue(database)
    victim = subprocess.Popen([sys.executable, "-c", _VICTIM, database_url, str(LEASE)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        claimed = wait_until(lambda: _job(database, job_id).lease_expires_at, 90, "the victim's claim")
        assert f":{victim.pid}:" in (_job(database, job_id).locked_by or "")
        rival.worker.start()
        # Alive, the victim keeps its job past three leases although the rival polls all along.
        wait_until(lambda: _outlived_three_leases(database, job_id, claimed, rival), 120,
                   "lease renewals covering three leases")
        held = _job(database, job_id)
        assert held.state == JobState.RUNNING and held.attempts == 1 and f":{victim.pid}:" in (held.locked_by or "")
        assert rival.started == []

        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert not alive(victim.pid)
        last_expiry = _job(database, job_id).lease_expires_at
        assert last_expiry is not None
        wait_until(lambda: _job(database, job_id).state == JobState.DONE, 120, "the rival to take the job over")
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
        assert victim.stderr is not None
        errors = victim.stderr.read()
    assert rival.started == [job_id], errors[-2000:]
    assert _job(database, job_id).attempts == 2  # the victim's attempt, then the rival's


def test_only_the_holder_renews_a_lease(database: Database) -> None:
    job_id = _enqueue(database)
    first = jobs.claim(database, [KIND], "A", dt.timedelta(seconds=60))
    assert first is not None and first.id == job_id
    before = utcnow()
    assert jobs.renew(database, job_id, "A", dt.timedelta(seconds=600))
    expiry = _job(database, job_id).lease_expires_at
    assert expiry is not None and expiry >= before + dt.timedelta(seconds=599)
    assert not jobs.renew(database, job_id, "B", dt.timedelta(seconds=6000))  # not B's to renew
    assert _job(database, job_id).lease_expires_at == expiry

    with database.session() as session:  # A's lease runs out; B takes the job over
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    second = jobs.claim(database, [KIND], "B", dt.timedelta(seconds=60))
    assert second is not None and second.id == job_id
    taken_over = _job(database, job_id).lease_expires_at
    assert not jobs.renew(database, job_id, "A", dt.timedelta(seconds=6000))
    assert _job(database, job_id).lease_expires_at == taken_over
    with database.session() as session:
        assert not jobs.complete(session, job_id, "A")  # nor may A complete it beside B
        assert jobs.complete(session, job_id, "B")
    assert not jobs.renew(database, job_id, "B", dt.timedelta(seconds=60))  # a finished job is not renewed
    assert _job(database, job_id).state == JobState.DONE


def test_the_keeper_stops_renewing_a_job_its_worker_lost(database: Database) -> None:
    job_id = _enqueue(database)
    claimed = jobs.claim(database, [KIND], "A", dt.timedelta(seconds=0.6))
    assert claimed is not None
    keeper = LeaseKeeper(database)
    try:
        with keeper.holding(claimed, "A", dt.timedelta(seconds=0.6)):
            start = _job(database, job_id).lease_expires_at
            assert start is not None
            wait_until(lambda: (_job(database, job_id).lease_expires_at or start) > start, 30, "a renewal")
            with database.session() as session:  # e.g. its input was replaced
                assert jobs.requeue(session, "slow:1")
            taken = jobs.claim(database, [KIND], "B", dt.timedelta(seconds=600))
            assert taken is not None and taken.id == job_id
            b_expiry = _job(database, job_id).lease_expires_at
            wait_until(lambda: job_id not in keeper.held_jobs, 30, "the keeper to let the lost job go")
            assert _job(database, job_id).lease_expires_at == b_expiry
            assert _job(database, job_id).locked_by == "B"
        assert keeper.held_jobs == set()
    finally:
        keeper.stop()


def test_a_stopped_worker_leaves_no_keeper_thread_behind(database: Database) -> None:
    """The keeper's thread starts with the worker's first job and ends with the worker."""
    _enqueue(database)
    done = threading.Event()

    def quick(job: ClaimedJob, worker_id: str) -> None:
        _complete(database, job, worker_id)
        done.set()

    worker = JobWorker(database, JobRegistry([JobKind(KIND, quick)]), [KIND],
                       WorkerOptions(poll_interval=0.05, lease_seconds=LEASE), "short-lived")
    assert not [t for t in threading.enumerate() if t.name == "short-lived-lease"]
    worker.start()
    try:
        assert done.wait(60)
        assert [t for t in threading.enumerate() if t.name == "short-lived-lease"]
    finally:
        worker.stop()
    assert not [t for t in threading.enumerate() if t.name == "short-lived-lease"]
