"""The job queue and the index on SQLite and PostgreSQL (the ``database`` fixture runs both)."""

from __future__ import annotations

import datetime as dt
import threading

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from storage import jobs
from storage.db import Database
from storage.index import add_instance
from storage.metadata import extract_metadata
from storage.models import Job, JobState, Patient, Series, Study, utcnow

LEASE = dt.timedelta(seconds=60)


def _meta(study: str, series: str | None = None) -> object:
    ds = Dataset()
    ds.PatientID, ds.PatientName = "P1", "DOE^JANE"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series or generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.Modality = "CR"
    return extract_metadata(ds)


def _add(database: Database, study: str, series: str | None = None) -> int:
    meta = _meta(study, series)
    with database.session() as session:
        instance = add_instance(
            session, meta, transfer_syntax_uid="1.2.840.10008.1.2.1", relative_path="x", size=1,  # type: ignore[arg-type]
            sha256="0" * 64, origin="received", calling_ae="T",
        )
        jobs.enqueue(session, "infer", f"infer:{instance.sop_instance_uid}", instance_pk=instance.id)
        return instance.id


def test_concurrent_instances_of_one_study_share_parents(database: Database) -> None:
    study, series = generate_uid(), generate_uid()
    threads = [threading.Thread(target=_add, args=(database, study, series)) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with database.read_session() as session:
        assert session.execute(select(func.count()).select_from(Patient)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(Study)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(Series)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(Job)).scalar_one() == 12


def test_enqueue_is_idempotent(database: Database) -> None:
    with database.session() as session:
        for _ in range(3):
            jobs.enqueue(session, "infer", "infer:1.2.3")
    with database.read_session() as session:
        assert session.execute(select(func.count()).select_from(Job)).scalar_one() == 1


def test_claim_complete_and_retry_with_backoff(database: Database) -> None:
    _add(database, generate_uid())
    claimed = jobs.claim(database, ["infer"], "w1", LEASE)
    assert claimed is not None and claimed.attempts == 1
    assert jobs.claim(database, ["infer"], "w2", LEASE) is None  # leased to w1
    assert jobs.fail(database, claimed.id, "w1", "boom", permanent=False, max_attempts=3) == JobState.PENDING
    with database.session() as session:  # skip the backoff wait
        session.get(Job, claimed.id).run_after = utcnow()  # type: ignore[union-attr]
    again = jobs.claim(database, ["infer"], "w2", LEASE)
    assert again is not None and again.id == claimed.id and again.attempts == 2
    with database.session() as session:
        assert jobs.complete(session, again.id, "w2")
    with database.read_session() as session:
        assert session.get(Job, claimed.id).state == JobState.DONE  # type: ignore[union-attr]


def test_dead_letter_after_max_attempts_and_manual_retry(database: Database) -> None:
    _add(database, generate_uid())
    claimed = jobs.claim(database, ["infer"], "w1", LEASE)
    assert claimed is not None
    assert jobs.fail(database, claimed.id, "w1", "bad", permanent=False, max_attempts=1) == JobState.FAILED
    with database.session() as session:
        assert jobs.retry_failed(session) == 1
    assert jobs.claim(database, ["infer"], "w1", LEASE) is not None


def test_expired_lease_is_reclaimed_and_old_holder_cannot_complete(database: Database) -> None:
    _add(database, generate_uid())
    first = jobs.claim(database, ["infer"], "dead-worker", dt.timedelta(seconds=-1))  # already expired
    assert first is not None
    second = jobs.claim(database, ["infer"], "w2", LEASE)
    assert second is not None and second.id == first.id
    with database.session() as session:
        assert not jobs.complete(session, first.id, "dead-worker")


def test_parallel_claims_never_share_a_job(database: Database) -> None:
    for _ in range(20):
        _add(database, generate_uid())
    taken: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := jobs.claim(database, ["infer"], name, LEASE)) is not None:
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 20


def test_backoff_grows_and_is_capped() -> None:
    assert all(1 <= jobs.backoff_delay(1) <= 2 for _ in range(50))
    assert all(300 <= jobs.backoff_delay(30, cap=600) <= 600 for _ in range(50))
    # The delivery defaults keep retrying for at least half an hour, whatever the jitter draws.
    assert sum(min(300.0, 2.0 * 2 ** (n - 1)) / 2 for n in range(1, 20)) >= 30 * 60


def test_orphans_of_a_dead_local_process_are_released(database: Database) -> None:
    for _ in range(3):
        _add(database, generate_uid())
    dead = jobs.claim(database, ["infer"], "infer-0@thishost:999999:1", LEASE)
    alive = jobs.claim(database, ["infer"], "infer-0@thishost:1:1", LEASE)
    remote = jobs.claim(database, ["infer"], "infer-0@otherhost:999999:1", LEASE)
    assert dead and alive and remote
    released = jobs.release_orphans(database, "thishost", lambda pid: pid != 999999)
    assert released == 1
    again = jobs.claim(database, ["infer"], "w", LEASE)
    assert again is not None and again.id == dead.id


def test_overdue_by_takes_only_jobs_due_that_long(database: Database) -> None:
    with database.session() as session:
        jobs.enqueue(session, "study-changed", "study-changed:recent")
        jobs.enqueue(session, "study-changed", "study-changed:old", run_after=utcnow() - dt.timedelta(seconds=45))
    waited = dt.timedelta(seconds=30)
    first = jobs.claim(database, ["study-changed"], "w1", LEASE, overdue_by=waited)
    assert first is not None
    with database.read_session() as session:
        assert session.get(Job, first.id).dedup_key == "study-changed:old"  # type: ignore[union-attr]
    assert jobs.claim(database, ["study-changed"], "w1", LEASE, overdue_by=waited) is None
    assert jobs.claim(database, ["study-changed"], "w1", LEASE) is not None  # due now, without the margin


def test_any_runnable_sees_due_and_expired_jobs_only(database: Database) -> None:
    assert not jobs.any_runnable(database, ["infer"])
    with database.session() as session:
        jobs.enqueue(session, "infer", "infer:later", run_after=utcnow() + dt.timedelta(hours=1))
    assert not jobs.any_runnable(database, ["infer"])
    _add(database, generate_uid())
    assert jobs.any_runnable(database, ["infer"]) and not jobs.any_runnable(database, ["deliver"])
    assert jobs.claim(database, ["infer"], "w1", LEASE) is not None
    assert not jobs.any_runnable(database, ["infer"])  # the due one is leased now
