"""``storage.metrics``: the Prometheus projection of the database, on SQLite and PostgreSQL (the
``database`` fixture runs both). Real rows go in through the same functions the gateway writes
with (``add_instance``, ``audit.store.append``, the outbox); the exposition comes out of a real
``CollectorRegistry`` and is parsed back with prometheus_client's own parser."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, text

from audit.builders import dicom_transfer, security_alert
from audit.events import Action, AuditEvent, AuditSource, EventId, EventType, Outcome, ParticipantObject
from audit.store import append as append_audit
from inference.applicability import ApplicabilityRules, assess
from storage import jobs
from storage.associations import AssociationRecorder, EndedAssociation
from storage.db import Database
from storage.index import add_instance
from storage.job_kinds import DELIVER_JOB, INFER_JOB
from storage.metadata import extract_metadata
from storage.metrics import GAP_SECONDS, DatabaseCollector, _Tail
from storage.models import DeliveryAttempt, DicomAssociationEnd, InferenceResult, Instance, Job, JobState
from storage.outbox import Route, enqueue_delivery
from storage.telemetry import HL7_MESSAGE_TYPES, not_analysed_reason

PATIENT_NAME = "WOLFESCHLEGEL^HUBERTINE"
PATIENT_ID = "PID-SECRET-4711"
ACCESSION = "ACC-SECRET-99"
SOURCE = AuditSource("PNEUMO@test")
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
TIMINGS = {"read": 4.0, "decode": 20.0, "preprocess": 6.0, "infer": 80.0, "total": 110.0}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> tuple[str, Samples]:
    """The exposition text and every sample in it, keyed by (sample name, sorted labels)."""
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def registry(database: Database) -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(database, destinations={"dicom": ["PACS"], "hl7": ["EHR"]}, peers=["MODALITY"],
                                        clock=lambda: NOW))
    yield registry


def _image(session: Any, *, origin: str = "received", size: int = 1000) -> Instance:
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.AccessionNumber = PATIENT_ID, PATIENT_NAME, ACCESSION
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", generate_uid(), "CR"
    return add_instance(session, extract_metadata(ds), transfer_syntax_uid="1.2.840.10008.1.2.1",
                        relative_path=f"x/{ds.SOPInstanceUID}", size=size, sha256="0" * 64, origin=origin,
                        calling_ae="MODALITY")


def _result(session: Any, status: str, *, label: str | None = None, reason: str | None = None,
            timings: dict[str, float] | None = None) -> None:
    session.add(InferenceResult(instance_pk=_image(session).id, model_id="m", model_version="1", status=status,
                                label=label, reason=reason, probability=0.9 if label else None,
                                timings_ms=timings or {}))


def _attempt(session: Any, channel: str, destination: str, outcome: str, *, seconds: float = 0.5,
             peer_status: str | None = None, error: str | None = None) -> None:
    route = Route(channel, destination)
    enqueue_delivery(session, route, generate_uid())
    job_pk = session.execute(select(Job.id).order_by(Job.id.desc())).scalars().first()
    session.add(DeliveryAttempt(job_pk=job_pk, attempt=1, channel=channel, destination=destination,
                                subject=f"{PATIENT_ID}/{generate_uid()}", started_at=NOW,
                                finished_at=NOW + dt.timedelta(seconds=seconds), outcome=outcome,
                                peer_status=peer_status, error=error))


def _association(database: Database, calling: str, ended_by: DicomAssociationEnd, seconds: float) -> None:
    """The row dicom_node writes when an accepted association has ended (storage/associations.py)."""
    AssociationRecorder(database, acceptor_host="gw-1")(EndedAssociation(
        calling_ae=calling, called_ae="PNEUMO", peer_address="10.0.0.9", ended_by=ended_by, started_at=NOW,
        ended_at=NOW + dt.timedelta(seconds=seconds), instances_stored=2))


def _hl7_import(message_type: str, ack: str) -> AuditEvent:
    """The Import record hl7.inbound writes for each message it answers (PS3.15 A.5.3.7)."""
    from audit.events import ActiveParticipant

    return AuditEvent(
        event_id=EventId.IMPORT, action=Action.CREATE, outcome=Outcome.SUCCESS if ack == "AA" else Outcome.MINOR_FAILURE,
        outcome_description=f"HL7 {message_type} received; ACK {ack}: {PATIENT_NAME}", occurred_at=NOW, source=SOURCE,
        participants=(ActiveParticipant(user_id="RIS@HOSP", user_is_requestor=True),),
        objects=(ParticipantObject(object_id="CTL1", id_type=EventId.IMPORT, type_code=2,
                                   details={"MessageType": message_type, "AckCode": ack}),),
    )


def _refused_store(status: int) -> AuditEvent:
    """The record dicom_node.ingest writes for a C-STORE it refuses (its description's shape)."""
    return dicom_transfer(
        SOURCE, action=Action.CREATE, outcome=Outcome.SERIOUS_FAILURE, sender=("MODALITY", "10.0.0.1"),
        receiver=("PNEUMO", "gw"), sender_is_requestor=True, study_uid=generate_uid(),
        sop_classes={"1.2.840.10008.5.1.4.1.1.1": 1}, instances=(generate_uid(),), patient_id="", patient_name=None,
        when=NOW, description=f"refused with status 0x{status:04X}: no space left for {PATIENT_NAME}",
    )


def _fill(database: Database) -> None:
    """One of everything the projection counts, with a patient's name and ID wherever a row holds text."""
    mr = Dataset()
    mr.Modality = "MR"
    with database.session() as session:
        _image(session, size=1000)
        _image(session, size=3000)
        _image(session, origin="generated", size=500)
        _result(session, "ok", label="PNEUMONIA", timings=TIMINGS)
        _result(session, "ok", label="NORMAL", timings={**TIMINGS, "infer": 800.0})
        _result(session, "not-applicable", reason=assess(mr, ApplicabilityRules()).reason)
        _result(session, "failed", reason=f"unreadable DICOM data set: ValueError: {PATIENT_NAME}")
        _attempt(session, "dicom", "PACS", "delivered", seconds=0.2, peer_status="0x0000")
        _attempt(session, "dicom", "PACS", "failed", seconds=3.0, peer_status="0xA700", error=f"refused {PATIENT_ID}")
        _attempt(session, "hl7", f"{PATIENT_NAME}", "failed", error="MLLP: connection refused")
        _attempt(session, "fhir-subscription", "sub-1", "failed", error="timeout")
        append_audit(session, _refused_store(0xA700))
        append_audit(session, security_alert(
            SOURCE, event_type=EventType.NODE_AUTHENTICATION, reporter_ae="PNEUMO", offender_id=PATIENT_NAME,
            offender_host="10.0.0.9", description=f"unknown AE {PATIENT_ID}", when=NOW))
        append_audit(session, _hl7_import("ORM^O01", "AA"))
        append_audit(session, _hl7_import("ZZZ^Z99", "AR"))
    _association(database, "MODALITY", DicomAssociationEnd.RELEASED, 0.3)
    _association(database, "MODALITY", DicomAssociationEnd.ABORTED, 45.0)
    _association(database, PATIENT_NAME, DicomAssociationEnd.CLOSED, 2.0)  # no configured peer's title


def test_counts_what_was_written_after_it_started(database: Database) -> None:
    with database.session() as session:  # before the collector: not counted
        _image(session)
        _result(session, "ok", label="PNEUMONIA", timings=TIMINGS)
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(database, destinations={"dicom": ["PACS"], "hl7": ["EHR"]}, peers=["MODALITY"],
                                        clock=lambda: NOW))
    _fill(database)
    _, samples = scrape(registry)
    # Each _result adds a received instance: 3 + 4 after the collector started (+1 generated).
    assert value(samples, "pneumo_instances_stored_total", origin="received") == 6
    assert value(samples, "pneumo_instances_stored_total", origin="generated") == 1
    assert value(samples, "pneumo_instance_bytes_total", origin="received") == 1000 + 3000 + 4 * 1000
    assert value(samples, "pneumo_inference_results_total", status="ok") == 2
    assert value(samples, "pneumo_predictions_total", label="PNEUMONIA") == 1
    assert value(samples, "pneumo_predictions_total", label="NORMAL") == 1
    assert value(samples, "pneumo_not_analysed_total", status="not-applicable", reason="modality") == 1
    assert value(samples, "pneumo_not_analysed_total", status="failed", reason="unreadable") == 1
    assert value(samples, "pneumo_inference_stage_seconds_count", stage="infer") == 2
    assert value(samples, "pneumo_inference_stage_seconds_sum", stage="infer") == pytest.approx(0.88)
    assert value(samples, "pneumo_inference_stage_seconds_bucket", stage="infer", le="0.1") == 1
    assert value(samples, "pneumo_inference_stage_seconds_bucket", stage="infer", le="1.0") == 2
    assert value(samples, "pneumo_delivery_attempts_total", channel="dicom", destination="PACS", outcome="delivered") == 1
    assert value(samples, "pneumo_delivery_failures_total", channel="dicom", destination="PACS", **{"class": "refused"}) == 1
    # An unconfigured name is "other"; Subscriptions (made by API clients) are one "subscription".
    assert value(samples, "pneumo_delivery_failures_total", channel="hl7", destination="other",
                 **{"class": "no-answer"}) == 1
    assert value(samples, "pneumo_delivery_attempts_total", channel="fhir-subscription", destination="subscription",
                 outcome="failed") == 1
    assert value(samples, "pneumo_delivery_attempt_seconds_count", channel="dicom", destination="PACS") == 2
    assert value(samples, "pneumo_delivery_attempt_seconds_sum", channel="dicom", destination="PACS") == pytest.approx(3.2)
    assert value(samples, "pneumo_dicom_instances_rejected_total", status="0xA700") == 1
    assert value(samples, "pneumo_security_alerts_total", type="Node Authentication") == 1
    assert value(samples, "pneumo_hl7_messages_total", type="ORM^O01", ack="AA") == 1
    assert value(samples, "pneumo_hl7_messages_total", type="other", ack="AR") == 1
    assert value(samples, "pneumo_audit_events_total", event="Import", outcome="success") == 1
    # Accepted associations by a configured peer's AE title (anything else is "other") and their end.
    assert value(samples, "pneumo_dicom_associations_total", calling_ae="MODALITY", end="released") == 1
    assert value(samples, "pneumo_dicom_associations_total", calling_ae="MODALITY", end="aborted") == 1
    assert value(samples, "pneumo_dicom_associations_total", calling_ae="other", end="closed") == 1
    assert value(samples, "pneumo_dicom_association_seconds_count", calling_ae="MODALITY") == 2
    assert value(samples, "pneumo_dicom_association_seconds_sum", calling_ae="MODALITY") == pytest.approx(45.3)
    assert value(samples, "pneumo_dicom_association_seconds_bucket", calling_ae="MODALITY", le="0.5") == 1
    assert value(samples, "pneumo_dicom_association_seconds_bucket", calling_ae="MODALITY", le="60.0") == 2
    assert value(samples, "pneumo_dicom_association_seconds_count", calling_ae="other") == 1
    assert value(samples, "pneumo_metrics_database_up") == 1


def test_no_patient_study_or_instance_identifier_in_any_label(database: Database, registry: CollectorRegistry) -> None:
    _fill(database)
    text, _ = scrape(registry)
    with database.read_session() as session:
        uids = [*session.execute(select(Instance.sop_instance_uid)).scalars()]
    for secret in [PATIENT_NAME, "WOLFESCHLEGEL", PATIENT_ID, ACCESSION, "sub-1", "10.0.0.9", *uids]:
        assert secret not in text, secret
    assert "pneumo_predictions_total" in text  # the exposition is not simply empty


def test_incremental_each_row_counted_once(database: Database, registry: CollectorRegistry) -> None:
    with database.session() as session:
        _result(session, "ok", label="PNEUMONIA", timings=TIMINGS)
    _association(database, "MODALITY", DicomAssociationEnd.RELEASED, 1.0)
    _, first = scrape(registry)
    _, again = scrape(registry)
    assert value(first, "pneumo_predictions_total", label="PNEUMONIA") == 1
    assert value(again, "pneumo_predictions_total", label="PNEUMONIA") == 1
    for samples in (first, again):
        assert value(samples, "pneumo_dicom_associations_total", calling_ae="MODALITY", end="released") == 1
        assert value(samples, "pneumo_dicom_association_seconds_count", calling_ae="MODALITY") == 1
    with database.session() as session:
        _result(session, "ok", label="PNEUMONIA", timings=TIMINGS)
        _result(session, "not-applicable", reason="patient age unknown: neither ...")
    _, third = scrape(registry)
    assert value(third, "pneumo_predictions_total", label="PNEUMONIA") == 2
    assert value(third, "pneumo_not_analysed_total", status="not-applicable", reason="age-unknown") == 1
    assert value(third, "pneumo_instances_stored_total", origin="received") == 3


def test_a_scrape_reads_a_bounded_batch_and_catches_up(database: Database) -> None:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(database, max_rows=2))
    with database.session() as session:
        for _ in range(5):
            _image(session)
    counts = []
    for _ in range(4):
        _, samples = scrape(registry)
        counts.append((value(samples, "pneumo_instances_stored_total", origin="received"),
                       value(samples, "pneumo_metrics_batch_full", table="instance")))
    assert counts == [(2, 1), (4, 1), (5, 0), (5, 0)]


def test_a_key_committed_late_is_still_counted(database: Database, registry: CollectorRegistry) -> None:
    """PostgreSQL hands out ids at insert, not at commit: id 9 may be visible before id 5."""
    with database.session() as session:
        base = _image(session).id
        late = _image(session).id
        session.add(InferenceResult(id=1000 + late, instance_pk=base, model_id="m", model_version="1", status="ok",
                                    label="NORMAL", timings_ms=TIMINGS))
    _, first = scrape(registry)
    with database.session() as session:
        session.add(InferenceResult(id=1000 + base, instance_pk=late, model_id="m", model_version="1", status="ok",
                                    label="PNEUMONIA", timings_ms=TIMINGS))
    _, second = scrape(registry)
    assert value(first, "pneumo_predictions_total", label="NORMAL") == 1
    assert value(first, "pneumo_predictions_total", label="PNEUMONIA") == 0
    assert value(second, "pneumo_predictions_total", label="PNEUMONIA") == 1
    assert value(second, "pneumo_inference_results_total", status="ok") == 2


def test_gaps_expire() -> None:
    """A rolled-back insert leaves its key unused for ever: it is looked for only GAP_SECONDS."""
    rows = {3: "c"}
    asked: list[list[int] | None] = []

    def fetch(_session: Any, after: int, limit: int, ids: Any) -> list[tuple[int, str]]:
        asked.append(None if ids is None else list(ids))
        keys = sorted(ids) if ids is not None else [k for k in sorted(rows) if k > after][:limit]
        return [(k, rows[k]) for k in keys if k in rows]

    tail: _Tail[tuple[int, str]] = _Tail(fetch, lambda row: row[0], cursor=0)
    assert tail.read(None, 10, now=0.0) == [(3, "c")]  # type: ignore[arg-type]
    assert sorted(tail.gaps) == [1, 2]
    rows[1] = "a"
    assert tail.read(None, 10, now=1.0) == [(1, "a")]  # type: ignore[arg-type]
    assert sorted(tail.gaps) == [2]
    assert tail.read(None, 10, now=GAP_SECONDS + 1) == []  # type: ignore[arg-type]
    assert tail.gaps == {}


def test_queue_and_destination_gauges(database: Database, registry: CollectorRegistry) -> None:
    with database.session() as session:
        jobs.enqueue(session, INFER_JOB, "infer:1", run_after=NOW - dt.timedelta(minutes=10))
        jobs.enqueue(session, INFER_JOB, "infer:2", run_after=NOW + dt.timedelta(minutes=10))
        _attempt(session, "dicom", "PACS", "failed", peer_status="0xA700")
        _attempt(session, "dicom", "PACS", "failed", peer_status="0xA700")
        dead = session.execute(select(Job).where(Job.kind == DELIVER_JOB).order_by(Job.id)).scalars().first()
        assert dead is not None
        dead.state = JobState.FAILED
    _, samples = scrape(registry)
    assert value(samples, "pneumo_jobs", kind=INFER_JOB, state="queued") == 2
    assert value(samples, "pneumo_jobs", kind=INFER_JOB, state="due") == 1
    assert value(samples, "pneumo_jobs", kind=DELIVER_JOB, state="dead_letter") == 1
    assert value(samples, "pneumo_job_oldest_due_age_seconds", kind=INFER_JOB) == 600
    assert value(samples, "pneumo_delivery_failing_streak", channel="dicom", destination="PACS") == 2
    assert value(samples, "pneumo_delivery_pending", channel="dicom", destination="PACS") == 1
    assert value(samples, "pneumo_delivery_dead_letter", channel="dicom", destination="PACS") == 1


def test_registering_does_not_read_the_database(database: Database) -> None:
    collector = DatabaseCollector(database)
    names = {family.name for family in collector.describe()}
    assert "pneumo_predictions" in names and all(not family.samples for family in collector.describe())


def _dataset(**attributes: Any) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = "DX", 2048, 2048, 16, 12
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BodyPartExamined, ds.ViewPosition = "MONOCHROME2", 1, "CHEST", "PA"
    ds.PatientAge = "004Y"
    for keyword, attribute in attributes.items():
        if attribute is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, attribute)
    return ds


@pytest.mark.parametrize(
    ("attributes", "code"),
    [
        ({"Modality": "MR"}, "modality"),
        ({"Rows": 100, "Columns": 100}, "image-too-small"),
        ({"Rows": 9000, "Columns": 9000}, "image-too-large"),
        ({"Rows": 4000, "Columns": 300}, "aspect-ratio"),
        ({"BitsAllocated": 32}, "bits-allocated"),
        ({"BitsStored": 4}, "bits-stored"),
        ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "photometric"),
        ({"NumberOfFrames": 3}, "multi-frame"),
        ({"PresentationIntentType": "FOR PROCESSING"}, "not-for-presentation"),
        ({"BodyPartExamined": "KNEE"}, "body-part"),
        ({"BodyPartExamined": None, "ViewPosition": None}, "view-position"),
        ({"ViewPosition": "LL"}, "view-not-frontal"),
        ({"PatientAge": None}, "age-unknown"),
        ({"PatientAge": "070Y"}, "age-out-of-range"),
    ],
)
def test_every_applicability_reason_has_a_code(attributes: dict[str, Any], code: str) -> None:
    """The codes are read from the sentences of inference.applicability: a reworded sentence
    must fail here, not turn into ``other`` on a dashboard."""
    rules = ApplicabilityRules(min_age_years=1, max_age_years=6, reject_other_views=True)
    verdict = assess(_dataset(**attributes), rules)
    assert not verdict.applicable
    assert not_analysed_reason("not-applicable", verdict.reason) == code, verdict.reason


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        ("failed", "not a DICOM file: File is missing DICOM File Meta Information header", "not-dicom"),
        ("failed", "unreadable DICOM data set: EOFError: ...", "unreadable"),
        ("failed", "report not built: ...", "report-not-built"),
        ("failed", f"the image of {PATIENT_NAME} cannot be decoded", "error"),
        ("failed", None, "error"),
        ("not-applicable", f"something new about {PATIENT_NAME}", "other"),
    ],
)
def test_reason_codes_never_pass_the_text(status: str, reason: str | None, code: str) -> None:
    assert not_analysed_reason(status, reason) == code


def test_hl7_types_are_the_ones_hl7_accepts() -> None:
    from hl7.messages import SUPPORTED_MESSAGES

    assert {f"{kind}^{event}" for kind, event in SUPPORTED_MESSAGES} | {"unreadable"} == HL7_MESSAGE_TYPES


def test_a_scrape_without_the_database_says_so_and_loses_nothing(database: Database, registry: CollectorRegistry) -> None:
    with database.session() as session:
        _result(session, "ok", label="NORMAL", timings=TIMINGS)
    _, before = scrape(registry)
    with database.session() as session:
        _result(session, "ok", label="NORMAL", timings=TIMINGS)
        session.execute(text("ALTER TABLE inference_result RENAME TO inference_result_away"))
    _, down = scrape(registry)
    with database.session() as session:
        session.execute(text("ALTER TABLE inference_result_away RENAME TO inference_result"))
    _, after = scrape(registry)
    assert value(down, "pneumo_metrics_database_up") == 0
    assert value(down, "pneumo_predictions_total", label="NORMAL") == 1  # what it had, still exposed
    assert value(after, "pneumo_metrics_database_up") == 1
    assert [value(s, "pneumo_predictions_total", label="NORMAL") for s in (before, after)] == [1, 2]


def test_concurrent_scrapes_count_each_row_once(database: Database, registry: CollectorRegistry) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def scraper() -> None:
        try:
            while not stop.is_set():
                scrape(registry)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=scraper) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        with database.session() as session:
            _result(session, "ok", label="PNEUMONIA", timings=TIMINGS)
    stop.set()
    for thread in threads:
        thread.join(30)
    _, samples = scrape(registry)
    assert errors == []
    assert value(samples, "pneumo_predictions_total", label="PNEUMONIA") == 20
    assert value(samples, "pneumo_inference_stage_seconds_count", stage="total") == 20
