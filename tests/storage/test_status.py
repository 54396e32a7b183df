"""``storage.status``, the queries behind ``pneumo status``, on SQLite and PostgreSQL (the
``database`` fixture runs both): queue depths, dead letters, delivery health, models in results."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from storage import jobs
from storage.db import Database
from storage.index import add_instance
from storage.job_kinds import DELIVER_JOB, INFER_JOB, STUDY_RESULT_JOB, delivery_key
from storage.metadata import extract_metadata
from storage.models import DeliveryAttempt, InferenceResult, Job, JobState
from storage.outbox import Route, enqueue_delivery
from storage.status import (
    DestinationHealth,
    dead_letters,
    destination_health,
    error_class,
    failure_class,
    models_in_results,
    problems,
    queue_depths,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def minutes(n: float) -> dt.datetime:
    """*n* minutes before :data:`NOW` (negative: after)."""
    return NOW - dt.timedelta(minutes=n)


def _job(
    session: Any, kind: str, key: str, state: str, *, run_after: dt.datetime = NOW,
    lease_expires_at: dt.datetime | None = None, updated_at: dt.datetime = NOW, payload: dict[str, Any] | None = None,
) -> int:
    jobs.enqueue(session, kind, key, payload=payload, run_after=run_after)
    job = session.execute(select(Job).where(Job.dedup_key == key)).scalar_one()
    job.state, job.lease_expires_at = state, lease_expires_at
    if state == JobState.RUNNING:
        job.locked_by = "w@host:1:1"
    session.flush()
    job.updated_at = updated_at  # after the flush: onupdate would set it to now
    return int(job.id)


# (kind, state, run_after minutes ago, lease expires minutes ago)
QUEUE_ROWS: list[tuple[str, str, float, float | None]] = [
    (INFER_JOB, JobState.PENDING, 30, None),  # due for 30 min: the oldest due infer job
    (INFER_JOB, JobState.PENDING, 5, None),  # due
    (INFER_JOB, JobState.PENDING, -10, None),  # a retry in 10 min: queued, not due
    (INFER_JOB, JobState.RUNNING, 1, -4),  # leased for 4 more minutes
    (INFER_JOB, JobState.RUNNING, 50, 45),  # lease expired 45 min ago (dead worker): due, and oldest
    (INFER_JOB, JobState.FAILED, 60, None),
    (INFER_JOB, JobState.DONE, 90, None),  # never counted
    (STUDY_RESULT_JOB, JobState.PENDING, -1, None),  # debounced: not due
    (STUDY_RESULT_JOB, JobState.DONE, 90, None),
    ("study-changed", JobState.DONE, 90, None),  # only done: no line at all
]


def test_queue_depths_per_kind_and_state(database: Database) -> None:
    with database.session() as session:
        for number, (kind, state, run_after, lease) in enumerate(QUEUE_ROWS):
            _job(session, kind, f"{kind}:{number}", state, run_after=minutes(run_after),
                 lease_expires_at=None if lease is None else minutes(lease))
    with database.read_session() as session:
        depths = {q.kind: q for q in queue_depths(session, NOW)}
    assert sorted(depths) == [INFER_JOB, STUDY_RESULT_JOB]
    infer = depths[INFER_JOB]
    assert (infer.queued, infer.due, infer.running, infer.dead_letter) == (3, 3, 2, 1)
    assert infer.oldest_due_at == minutes(45)
    assert infer.oldest_due_age_seconds(NOW) == 45 * 60
    study = depths[STUDY_RESULT_JOB]
    assert (study.queued, study.due, study.running, study.dead_letter) == (1, 0, 0, 0)
    assert study.oldest_due_at is None and study.oldest_due_age_seconds(NOW) is None


def test_an_empty_queue_has_no_lines(database: Database) -> None:
    with database.read_session() as session:
        assert queue_depths(session, NOW) == []
        empty = dead_letters(session)
    assert (empty.total, empty.by_kind, empty.ids, empty.oldest_at) == (0, {}, [], None)


def test_dead_letters_counted_per_kind_ids_limited(database: Database) -> None:
    with database.session() as session:
        dead = [_job(session, INFER_JOB, f"i{n}", JobState.FAILED, updated_at=minutes(10 + n)) for n in range(3)]
        dead.append(_job(session, DELIVER_JOB, "d0", JobState.FAILED, updated_at=minutes(2)))
        _job(session, DELIVER_JOB, "d1", JobState.PENDING)
    with database.read_session() as session:
        letters = dead_letters(session, limit=2)
    assert letters.total == 4 and letters.by_kind == {DELIVER_JOB: 1, INFER_JOB: 3}
    assert letters.ids == sorted(dead)[:2]
    assert (letters.oldest_at, letters.newest_at) == (minutes(12), minutes(2))


def _attempt(session: Any, job_pk: int, channel: str, destination: str, finished: dt.datetime, outcome: str,
             peer_status: str | None = None, error: str | None = None) -> None:
    session.add(DeliveryAttempt(job_pk=job_pk, attempt=1, channel=channel, destination=destination, subject="s",
                                started_at=finished - dt.timedelta(seconds=1), finished_at=finished, outcome=outcome,
                                peer_status=peer_status, error=error))


# (channel, destination, [(minutes ago, outcome, peer_status, error)], job states)
HISTORY: list[tuple[str, str, list[tuple[float, str, str | None, str | None]], list[str]]] = [
    ("dicom", "PACS", [(60, "delivered", "0x0000", None), (50, "failed", "0xA700", "out of resources"),
                       (40, "failed", "0xA700", "out of resources")], [JobState.PENDING, JobState.DONE]),
    ("dicom", "ARCHIVE", [(30, "failed", None, "association rejected"), (20, "failed", None, "timeout")],
     [JobState.RUNNING, JobState.FAILED]),
    ("hl7", "EHR", [(90, "failed", "AE", "EHR answered AE: DOE^JANE unknown"), (10, "delivered", "AA", None)],
     [JobState.DONE]),
    ("fhir-subscription", "sub-1", [(5, "failed", None, "fhir-subscription destination 'sub-1' is not configured")],
     [JobState.FAILED]),
    ("hl7", "LAB", [], [JobState.PENDING, JobState.PENDING]),  # never tried yet
]

EXPECTED = {
    ("dicom", "PACS"): dict(last_success_at=minutes(60), last_failure_at=minutes(40), last_failure_class="refused",
                            last_peer_status="0xA700", failing_streak=2, failing_since=minutes(50), pending=1,
                            dead_letter=0),
    ("dicom", "ARCHIVE"): dict(last_success_at=None, last_failure_at=minutes(20), last_failure_class="no-answer",
                               last_peer_status=None, failing_streak=2, failing_since=minutes(30), pending=1,
                               dead_letter=1),
    ("hl7", "EHR"): dict(last_success_at=minutes(10), last_failure_at=minutes(90), last_failure_class="refused",
                         last_peer_status="AE", failing_streak=0, failing_since=None, pending=0, dead_letter=0),
    ("fhir-subscription", "sub-1"): dict(last_success_at=None, last_failure_at=minutes(5),
                                         last_failure_class="not-configured", last_peer_status=None, failing_streak=1,
                                         failing_since=minutes(5), pending=0, dead_letter=1),
    ("hl7", "LAB"): dict(last_success_at=None, last_failure_at=None, last_failure_class=None, last_peer_status=None,
                         failing_streak=0, failing_since=None, pending=2, dead_letter=0),
}


def _history(database: Database) -> None:
    with database.session() as session:
        for channel, destination, attempts, states in HISTORY:
            ids = []
            for number, state in enumerate(states):
                key = delivery_key(channel, destination, f"subject-{number}")
                ids.append(_job(session, DELIVER_JOB, key, state,
                                payload={"channel": channel, "destination": destination, "subject": f"subject-{number}"}))
            for ago, outcome, peer_status, error in attempts:
                _attempt(session, ids[0], channel, destination, minutes(ago), outcome, peer_status, error)


def test_destination_health_per_channel_and_destination(database: Database) -> None:
    _history(database)
    with database.read_session() as session:
        health = {(d.channel, d.destination): d for d in destination_health(session)}
    assert set(health) == set(EXPECTED)
    for key, expected in EXPECTED.items():
        assert health[key] == DestinationHealth(channel=key[0], destination=key[1], **expected), key  # type: ignore[arg-type]
    assert health[("dicom", "ARCHIVE")].failing_for_seconds(NOW) == 30 * 60


def test_delivery_enqueued_by_the_outbox_counts_as_pending(database: Database) -> None:
    with database.session() as session:
        enqueue_delivery(session, Route("dicom", "PACS"), "1.2.3")
        enqueue_delivery(session, Route("dicom", "PACS"), "1.2.4")
        enqueue_delivery(session, Route("hl7", "EHR"), "study-result/1")
    with database.read_session() as session:
        health = {(d.channel, d.destination): (d.pending, d.last_success_at) for d in destination_health(session)}
    assert health == {("dicom", "PACS"): (2, None), ("hl7", "EHR"): (1, None)}


def test_problems_dead_letters_and_destinations_failing_too_long(database: Database) -> None:
    _history(database)
    with database.read_session() as session:
        dead, health = dead_letters(session), destination_health(session)
    found = problems(dead, health, NOW, dt.timedelta(minutes=25))
    assert found[0] == f"2 dead-lettered job(s) ({DELIVER_JOB} 2)"
    # PACS has failed for 50 min, ARCHIVE for 30; sub-1 only for 5; EHR recovered.
    assert found[1:] == [
        "dicom destination ARCHIVE failing for 30 min (2 attempt(s), last: no-answer)",
        "dicom destination PACS failing for 50 min (2 attempt(s), last: refused)",
    ]
    assert problems(dead, [], NOW, dt.timedelta(minutes=25)) == found[:1]
    with database.session() as session:
        session.query(Job).filter(Job.state == JobState.FAILED).update({"state": JobState.DONE})
    with database.read_session() as session:
        assert problems(dead_letters(session), health, NOW, dt.timedelta(minutes=60)) == []


@pytest.mark.parametrize(
    ("peer_status", "error", "expected"),
    [
        ("0xA700", "C-STORE answered 0xA700", "refused"),
        ("AR", "EHR answered AR: DOE^JANE", "refused"),
        ("503", "rest-hook endpoint answered HTTP 503", "refused"),
        (None, "MLLP: connection refused", "no-answer"),
        (None, None, "no-answer"),
        (None, "dicom destination 'PACS' is not configured", "not-configured"),
    ],
)
def test_failure_class(peer_status: str | None, error: str | None, expected: str) -> None:
    assert failure_class(peer_status, error) == expected


@pytest.mark.parametrize(
    ("last_error", "expected"),
    [
        ("OSError: [Errno 28] No space left on device", "OSError"),
        ("pydicom.errors.InvalidDicomError: File is missing DICOM header", "pydicom.errors.InvalidDicomError"),
        ("TimeoutError", "TimeoutError"),
        ("the image of DOE^JANE cannot be decoded", "error"),
        (None, "error"),
        ("", "error"),
    ],
)
def test_error_class_never_passes_the_text(last_error: str | None, expected: str) -> None:
    assert error_class(last_error) == expected


def _image(session: Any) -> int:
    ds = Dataset()
    ds.PatientID, ds.PatientName = "P1", "DOE^JANE"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", generate_uid(), "CR"
    instance = add_instance(session, extract_metadata(ds), transfer_syntax_uid="1.2.840.10008.1.2.1",
                            relative_path="x", size=1, sha256="0" * 64, origin="received", calling_ae="T")
    return int(instance.id)


def test_models_in_results_newest_first(database: Database) -> None:
    rows = [("m", "1.0.0", 120), ("m", "1.0.0", 100), ("m", "1.1.0", 5)]
    with database.session() as session:
        for model_id, version, ago in rows:
            session.add(InferenceResult(instance_pk=_image(session), model_id=model_id, model_version=version,
                                        status="ok", probability=0.5, label="PNEUMONIA", created_at=minutes(ago)))
    with database.read_session() as session:
        models = models_in_results(session)
    assert models == [
        {"model_id": "m", "version": "1.1.0", "results": 1, "last_result_at": minutes(5)},
        {"model_id": "m", "version": "1.0.0", "results": 2, "last_result_at": minutes(100)},
    ]
