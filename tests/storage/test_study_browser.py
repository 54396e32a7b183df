"""The console's study list and study page (storage/study_browser.py) and outbox page
(storage/console_outbox.py), on SQLite and PostgreSQL (the ``database`` fixture runs both):
filters, keyset paging, cursors, the delivery aggregate, reasons and the study page's parts."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from conf.errors import InvalidInputError
from storage.console_outbox import list_deliveries_page
from storage.db import Database
from storage.job_kinds import DELIVER_JOB, INFER_JOB
from storage.models import (
    DeliveryAttempt,
    InferenceResult,
    Instance,
    InstanceOrigin,
    Job,
    JobState,
    Patient,
    Series,
    Study,
    StudyResult,
)
from storage.study_browser import (
    StudyFilter,
    decode_cursor,
    delivery_state,
    encode_cursor,
    list_studies,
    study_detail,
)

_SERIAL = itertools.count(1)
T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"


class Builder:
    """Index rows made with the ORM directly: patients, studies, images, results, deliveries."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def _uid(self) -> str:
        self.serial = next(_SERIAL)
        return f"1.2.826.0.1.3680043.10.1.{self.serial}"

    def patient(self, patient_id: str) -> Patient:
        found = self.session.execute(select(Patient).where(Patient.patient_id == patient_id)).scalar_one_or_none()
        if found is None:
            found = Patient(patient_id=patient_id, issuer="", name=f"DOE^{patient_id}", birth_date="20220101", sex="F")
            self.session.add(found)
            self.session.flush()
        return found

    def study(
        self, uid: str, created_at: dt.datetime, *, patient_id: str = "P1", accession: str | None = None,
        modality: str = "CR", images: int = 1,
    ) -> Study:
        study = Study(study_instance_uid=uid, patient_pk=self.patient(patient_id).id, accession_number=accession,
                      study_date="20261130", description="CHEST", created_at=created_at, updated_at=created_at)
        self.session.add(study)
        self.session.flush()
        series = Series(series_instance_uid=self._uid(), study_pk=study.id, modality=modality, series_number=1)
        self.session.add(series)
        self.session.flush()
        for number in range(1, images + 1):
            self.instance(series, CR_CLASS, InstanceOrigin.RECEIVED, created_at, number)
        return study

    def instance(self, series: Series, sop_class: str, origin: str, when: dt.datetime, number: int = 1) -> Instance:
        instance = Instance(sop_instance_uid=self._uid(), sop_class_uid=sop_class, series_pk=series.id,
                            instance_number=number, transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path=f"x/{self.serial}.dcm", size=1, sha256="0" * 64, origin=origin, received_at=when,
                            updated_at=when)
        self.session.add(instance)
        self.session.flush()
        return instance

    def received(self, study: Study) -> list[Instance]:
        return list(self.session.execute(
            select(Instance).join(Series).where(Series.study_pk == study.id, Instance.origin == InstanceOrigin.RECEIVED)
            .order_by(Instance.id)
        ).scalars())

    def result(
        self, study: Study, status: str, label: str | None = None, *, version: int = 1,
        reasons: list[dict[str, Any]] | None = None, probability: float | None = None,
    ) -> StudyResult:
        row = StudyResult(study_pk=study.id, version=version, status=status, label=label, probability=probability,
                          threshold=None if probability is None else 0.5, images=1, analysed=0 if label is None else 1,
                          reasons=reasons or [], basis=str(version), created_at=study.created_at)
        self.session.add(row)
        self.session.flush()
        return row

    def generated(self, study: Study, sop_class: str) -> Instance:
        series = Series(series_instance_uid=self._uid(), study_pk=study.id, modality="SR" if sop_class == SR_CLASS else "OT")
        self.session.add(series)
        self.session.flush()
        return self.instance(series, sop_class, InstanceOrigin.GENERATED, study.created_at + dt.timedelta(seconds=5))

    def delivery(
        self, state: str, *, instance: Instance | None = None, result: StudyResult | None = None,
        channel: str | None = None, destination: str = "DEST", attempts: int = 0, last_error: str | None = None,
    ) -> Job:
        if instance is not None:
            channel, subject = channel or "dicom", instance.sop_instance_uid
        else:
            assert result is not None
            channel, subject = channel or "hl7", f"study-result/{result.id}"
        job = Job(kind=DELIVER_JOB, dedup_key=f"deliver:{channel}:{destination}:{subject}",
                  instance_pk=None if instance is None else instance.id,
                  payload={"channel": channel, "destination": destination, "subject": subject}, state=state,
                  attempts=attempts, last_error=last_error)
        self.session.add(job)
        self.session.flush()
        return job


def minutes(n: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=n)


def _corpus(session: Session) -> None:
    """Eight studies covering every filter value (uids say what they are)."""
    b = Builder(session)
    pos = b.study("pos", minutes(1), patient_id="P1", accession="A1")
    b.result(pos, "final", "PNEUMONIA", probability=0.9)
    b.delivery(JobState.DONE, instance=b.generated(pos, SR_CLASS))
    neg = b.study("neg", minutes(2), patient_id="P2", accession="A2", modality="DX")
    b.result(neg, "final", "NORMAL", probability=0.1)
    b.delivery(JobState.FAILED, instance=b.generated(neg, SR_CLASS))
    b.delivery(JobState.DONE, instance=b.generated(neg, SC_CLASS))
    amended = b.study("amended-neg", minutes(3), patient_id="P1")
    b.result(amended, "final", "PNEUMONIA", probability=0.7)  # superseded: the current version says NORMAL
    v2 = b.result(amended, "amended", "NORMAL", version=2, probability=0.2)
    b.delivery(JobState.PENDING, result=v2)
    b.delivery(JobState.DONE, result=v2, channel="fhir-subscription")
    na = b.study("na", minutes(4), patient_id="P3", accession="A3")
    r = b.result(na, "not-analysed", reasons=[{"reason": "not applicable: lateral", "images": 1}])
    b.delivery(JobState.DONE, result=r)
    b.study("pending", minutes(5), patient_id="P3")
    b.study("day-before", T0 - dt.timedelta(hours=9), patient_id="P4", modality="DX")  # 2026-11-29 23:00 UTC
    b.study("next-day", T0 + dt.timedelta(hours=16), patient_id="P4")  # 2026-12-01 00:00 UTC
    running = b.study("running", minutes(6), patient_id="P5")
    b.delivery(JobState.RUNNING, instance=b.generated(running, SR_CLASS))
    b.delivery(JobState.DONE, instance=b.generated(running, SC_CLASS))


NOV30 = dt.date(2026, 11, 30)

FILTERS: list[tuple[StudyFilter, list[str]]] = [
    (StudyFilter(), ["next-day", "running", "pending", "na", "amended-neg", "neg", "pos", "day-before"]),
    (StudyFilter(received_from=NOV30, received_to=NOV30), ["running", "pending", "na", "amended-neg", "neg", "pos"]),
    (StudyFilter(received_from=NOV30), ["next-day", "running", "pending", "na", "amended-neg", "neg", "pos"]),
    (StudyFilter(received_to=NOV30), ["running", "pending", "na", "amended-neg", "neg", "pos", "day-before"]),
    (StudyFilter(modality="DX"), ["neg", "day-before"]),
    (StudyFilter(modality="SR"), []),  # our own reports are not what the study was
    (StudyFilter(result="positive"), ["pos"]),
    (StudyFilter(result="negative"), ["amended-neg", "neg"]),
    (StudyFilter(result="not-analysed"), ["na"]),
    (StudyFilter(result="pending"), ["next-day", "running", "pending", "day-before"]),
    (StudyFilter(delivery="failed"), ["neg"]),
    (StudyFilter(delivery="pending"), ["running", "amended-neg"]),
    (StudyFilter(delivery="done"), ["na", "pos"]),
    (StudyFilter(delivery="none"), ["next-day", "pending", "day-before"]),
    (StudyFilter(text="P1"), ["amended-neg", "pos"]),
    (StudyFilter(text="A2"), ["neg"]),
    (StudyFilter(text=" na "), ["na"]),
    (StudyFilter(text="P"), []),  # exact only
    (StudyFilter(text="  "), ["next-day", "running", "pending", "na", "amended-neg", "neg", "pos", "day-before"]),
    (StudyFilter(text="P3", result="pending"), ["pending"]),
    (StudyFilter(modality="DX", received_from=NOV30, delivery="failed", result="negative"), ["neg"]),
]


def test_filters(database: Database) -> None:
    with database.session() as session:
        _corpus(session)
    with database.read_session() as session:
        for flt, expected in FILTERS:
            page = list_studies(session, flt)
            assert [row.study_instance_uid for row in page.rows] == expected, flt
            assert page.next_cursor is None


def test_row_extras(database: Database) -> None:
    with database.session() as session:
        _corpus(session)
        b = Builder(session)
        two = b.study("two-images", minutes(30), images=2)
        extra = Series(series_instance_uid="1.2.9", study_pk=two.id, modality="DX")
        session.add(extra)
        session.flush()
        b.instance(extra, CR_CLASS, InstanceOrigin.RECEIVED, minutes(30))
        b.generated(two, SR_CLASS)  # not an image of the study
    with database.read_session() as session:
        rows = {row.study_instance_uid: row for row in list_studies(session, StudyFilter()).rows}
    assert (rows["two-images"].images, rows["two-images"].modalities) == (3, ("CR", "DX"))
    pos = rows["pos"]
    assert (pos.result_status, pos.result_label, pos.probability, pos.threshold) == ("final", "PNEUMONIA", 0.9, 0.5)
    assert (pos.patient_id, pos.patient_name, pos.accession_number, pos.received_at) == ("P1", "DOE^P1", "A1", minutes(1))
    assert (rows["amended-neg"].result_status, rows["amended-neg"].result_label) == ("amended", "NORMAL")
    assert rows["na"].not_analysed_reasons == (("not applicable: lateral", 1),)
    assert (rows["na"].result_status, rows["na"].result_label) == ("not-analysed", None)
    assert (rows["pending"].result_status, rows["pending"].not_analysed_reasons) == ("pending", ())
    states = {uid: row.delivery_state for uid, row in rows.items()}
    assert states == {"pos": "done", "neg": "failed", "amended-neg": "pending", "na": "done", "pending": "none",
                      "day-before": "none", "next-day": "none", "running": "pending", "two-images": "none"}


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], "none"),
        (["done"], "done"),
        (["done", "pending"], "pending"),
        (["running"], "pending"),
        (["done", "running", "failed"], "failed"),
        (["failed"], "failed"),
    ],
)
def test_delivery_state(states: list[str], expected: str) -> None:
    assert delivery_state(states) == expected


@pytest.mark.parametrize("limit", [1, 4, 7, 50])
def test_paging_has_no_duplicates_and_no_gaps(database: Database, limit: int) -> None:
    with database.session() as session:
        b = Builder(session)
        for i in range(23):
            # Ties on created_at (three studies per instant) are broken by pk, descending.
            study = b.study(f"s{i:02d}", minutes(i // 3))
            if i % 2:
                b.result(study, "final", "NORMAL")
    with database.read_session() as session:
        for flt in (StudyFilter(), StudyFilter(result="negative")):
            everything = [row.study_pk for row in list_studies(session, flt, limit=500).rows]
            paged: list[int] = []
            cursor: str | None = None
            while True:
                page = list_studies(session, flt, limit=limit, after=cursor)
                assert len(page.rows) <= limit
                paged.extend(row.study_pk for row in page.rows)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert paged == everything and len(set(paged)) == len(paged)
            assert len(everything) == (23 if flt.result is None else 11)
        keys = [(r.received_at, r.study_pk) for r in list_studies(session, StudyFilter(), limit=500).rows]
    assert keys == sorted(keys, reverse=True)


def test_a_study_received_while_paging_does_not_shift_later_pages(database: Database) -> None:
    with database.session() as session:
        b = Builder(session)
        for i in range(6):
            b.study(f"s{i}", minutes(i))
    with database.read_session() as session:
        first = list_studies(session, StudyFilter(), limit=3)
    with database.session() as session:
        Builder(session).study("newest", minutes(60))
    with database.read_session() as session:
        second = list_studies(session, StudyFilter(), limit=3, after=first.next_cursor)
    assert [r.study_instance_uid for r in first.rows + second.rows] == ["s5", "s4", "s3", "s2", "s1", "s0"]


def _tampered(cursor: str) -> str:
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    when, pk, check = raw.split("|")
    return base64.urlsafe_b64encode(f"{when}|{int(pk) + 1}|{check}".encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not a cursor",
        "%%%",
        base64.urlsafe_b64encode(b"2026-11-30T08:00:00+00:00|12").decode(),  # no check digits
        base64.urlsafe_b64encode(b"\xff\xfe|1|2").decode(),  # not UTF-8
        "TAMPERED",
        "NAIVE",
    ],
)
def test_a_malformed_or_tampered_cursor_is_invalid_input(database: Database, cursor: str) -> None:
    if cursor == "TAMPERED":
        cursor = _tampered(encode_cursor(minutes(1), 12))
    elif cursor == "NAIVE":
        body = "2026-11-30T08:00:00|12"
        check = hashlib.sha256(body.encode()).hexdigest()[:8]
        cursor = base64.urlsafe_b64encode(f"{body}|{check}".encode()).decode()
    with database.read_session() as session, pytest.raises(InvalidInputError):
        list_studies(session, StudyFilter(), after=cursor)


def test_cursor_round_trip_and_page_size_bounds(database: Database) -> None:
    when = dt.datetime(2026, 11, 30, 8, 0, 0, 123456, tzinfo=dt.UTC)
    assert decode_cursor(encode_cursor(when, 42)) == (when, 42)
    assert "=" not in encode_cursor(when, 42)
    with database.read_session() as session:
        for limit in (0, 501):
            with pytest.raises(InvalidInputError):
                list_studies(session, StudyFilter(), limit=limit)


def test_study_detail(database: Database) -> None:
    with database.session() as session:
        _corpus(session)
        b = Builder(session)
        study = b.study("detail", minutes(40), patient_id="P9", accession="A9", images=3)
        first, second, third = b.received(study)
        session.add_all([
            InferenceResult(instance_pk=first.id, model_id="m", model_version="1", status="ok", probability=0.2,
                            label="NORMAL", threshold=0.5, created_at=minutes(41)),
            InferenceResult(instance_pk=second.id, model_id="m", model_version="1", status="not-applicable",
                            reason="lateral", created_at=minutes(41)),
        ])
        session.add(Job(kind=INFER_JOB, dedup_key=f"infer:{third.sop_instance_uid}", instance_pk=third.id,
                        payload={}, state=JobState.PENDING))
        session.flush()
        sr, sc = b.generated(study, SR_CLASS), b.generated(study, SC_CLASS)
        result = session.execute(select(InferenceResult).where(InferenceResult.instance_pk == first.id)).scalar_one()
        result.sr_instance_pk, result.sc_instance_pk = sr.id, sc.id
        v1 = b.result(study, "final", "NORMAL", probability=0.2)
        v2 = b.result(study, "amended", "NORMAL", version=2, probability=0.2,
                      reasons=[{"reason": "not applicable: lateral", "images": 1}])
        d1 = b.delivery(JobState.DONE, instance=sr, attempts=1)
        d2 = b.delivery(JobState.FAILED, instance=sc, attempts=3, last_error="OSError: refused")
        d3 = b.delivery(JobState.DONE, result=v1)
        d4 = b.delivery(JobState.PENDING, result=v2)
        uids = (first.sop_instance_uid, second.sop_instance_uid, third.sop_instance_uid, sr.sop_instance_uid,
                sc.sop_instance_uid)
        job_ids = [d4.id, d3.id, d2.id, d1.id]
    with database.read_session() as session:
        assert study_detail(session, "no-such-study") is None
        detail = study_detail(session, "detail")
    assert detail is not None
    assert (detail.row.study_instance_uid, detail.row.images, detail.row.delivery_state) == ("detail", 3, "failed")
    assert (detail.row.result_status, detail.row.not_analysed_reasons) == ("amended", (("not applicable: lateral", 1),))
    assert (detail.patient.patient_id, detail.patient.name, detail.patient.birth_date, detail.patient.sex) == (
        "P9", "DOE^P9", "20220101", "F")
    images = [(i.sop_instance_uid, i.instance_number, i.result_status, i.label, i.probability, i.reason, i.waiting)
              for i in detail.images]
    assert images == [
        (uids[0], 1, "ok", "NORMAL", 0.2, None, False),
        (uids[1], 2, "not-applicable", None, None, "lateral", False),
        (uids[2], 3, None, None, None, None, True),
    ]
    assert detail.images[0].model_id == "m" and detail.images[0].modality == "CR"
    assert [v.version for v in detail.result_versions] == [2, 1]
    assert detail.result_versions[0].reasons == (("not applicable: lateral", 1),)
    generated = [(g.kind, g.sop_instance_uid, g.source_sop_instance_uid) for g in detail.generated]
    assert generated == [("sr", uids[3], uids[0]), ("summary-image", uids[4], uids[0])]
    assert detail.generated[0].path.startswith("x/")
    assert [d.job_id for d in detail.deliveries] == job_ids
    failed = next(d for d in detail.deliveries if d.state == JobState.FAILED)
    assert (failed.channel, failed.destination, failed.subject, failed.attempts, failed.last_error) == (
        "dicom", "DEST", uids[4], 3, "OSError: refused")


def test_deliveries_page(database: Database) -> None:
    with database.session() as session:
        b = Builder(session)
        study = b.study("s", minutes(0))
        result = b.result(study, "final", "NORMAL")
        jobs = []
        for i in range(7):
            instance = b.generated(study, SR_CLASS)
            jobs.append(b.delivery(JobState.FAILED if i % 3 == 0 else JobState.DONE, instance=instance, attempts=2))
        hl7 = b.delivery(JobState.FAILED, result=result, attempts=2, last_error="DeliveryFailedError: AE")
        fhir = b.delivery(JobState.DONE, result=result, channel="fhir-subscription")
        for attempt, outcome in ((1, "failed"), (2, "failed")):
            session.add(DeliveryAttempt(job_pk=hl7.id, attempt=attempt, channel="hl7", destination="DEST",
                                        subject=hl7.payload["subject"], started_at=minutes(attempt),
                                        finished_at=minutes(attempt), outcome=outcome, peer_status=f"A{attempt}"))
        ids = [job.id for job in jobs] + [hl7.id, fhir.id]
        hl7_id = hl7.id
    with database.read_session() as session:
        seen: list[int] = []
        after: int | None = None
        while True:
            rows, after = list_deliveries_page(session, limit=4, after_id=after)
            seen.extend(row.id for row in rows)
            if after is None:
                break
        assert seen == sorted(ids, reverse=True)
        failed, nxt = list_deliveries_page(session, state=JobState.FAILED)
        assert [row.id for row in failed] == sorted([ids[0], ids[3], ids[6], hl7_id], reverse=True) and nxt is None
        rows, _ = list_deliveries_page(session, channel="hl7")
        assert len(rows) == 1
        row = rows[0]
        assert (row.id, row.state, row.attempts, row.attempts_recorded, row.failed_attempts) == (hl7_id, "failed", 2, 2, 2)
        assert (row.last_attempt_at, row.last_peer_status, row.last_error) == (minutes(2), "A2", "DeliveryFailedError: AE")
        assert row.study_instance_uid == "s"
        assert all(r.study_instance_uid == "s" for r in list_deliveries_page(session, limit=50)[0])
        with pytest.raises(InvalidInputError):
            list_deliveries_page(session, limit=0)
