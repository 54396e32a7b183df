"""The projection: a study's rows become versioned FHIR resources, notifications follow matches.

Runs on SQLite and PostgreSQL with the index and result tables filled as the workers fill them.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient as FhirPatient
from fhir.resources.R4B.servicerequest import ServiceRequest
from sqlalchemy import select

from fhir_api import projection, store, subscriptions
from storage import jobs
from storage.db import Database
from storage.models import ImagingOrder, Job
from storage.study_results import schedule_study_changed
from tests.fhir_api.builders import STUDY_UID, T0, StudyBuilder


def test_report_follows_the_study_from_preliminary_to_amended(database: Database) -> None:
    study = StudyBuilder(database)
    study.image(0.91, at=T0)
    changed, _ = study.publish()
    assert {c.resource_type for c in changed} == {"Patient", "ImagingStudy", "Device", "Observation", "DiagnosticReport"}
    for resource in changed:  # every resource we serve parses as FHIR R4(B)
        model = {"Patient": FhirPatient, "ImagingStudy": ImagingStudy, "Observation": Observation,
                 "DiagnosticReport": DiagnosticReport}.get(resource.resource_type)
        if model is not None:
            model.model_validate(json.loads(resource.content))
    report = study.report()
    assert report["status"] == "preliminary" and report["meta"]["versionId"] == "1"
    assert len(report["result"]) == 1

    assert study.publish() == ([], 0)  # nothing changed: no new version of anything

    study.study_result(1, "final", at=T0 + dt.timedelta(seconds=10), label="PNEUMONIA", probability=0.91, analysed=1)
    changed, _ = study.publish()
    assert [c.resource_type for c in changed] == ["DiagnosticReport"]
    report = study.report()
    assert report["status"] == "final" and report["meta"]["versionId"] == "2"

    # A late image: an Observation at once, the report keeps citing its version's images...
    study.image(0.12, at=T0 + dt.timedelta(minutes=5))
    changed, _ = study.publish()
    assert "Observation" in {c.resource_type for c in changed}
    assert len(study.report()["result"]) == 1 and study.report()["status"] == "final"
    # ...until the amended study result, which cites both.
    study.study_result(2, "amended", at=T0 + dt.timedelta(minutes=6), label="PNEUMONIA", probability=0.91, analysed=2)
    study.publish()
    report = study.report()
    assert report["status"] == "amended" and report["meta"]["versionId"] == "3" and len(report["result"]) == 2
    with database.read_session() as session:
        versions = store.history(session, "DiagnosticReport", STUDY_UID)
        first = store.get_version(session, "DiagnosticReport", STUDY_UID, 1)
    assert [v.version_id for v in versions] == [3, 2, 1]
    assert first is not None and first.json()["status"] == "preliminary"  # earlier versions stay readable


def test_a_study_nothing_could_be_analysed_in_is_cancelled_with_reasons(database: Database) -> None:
    study = StudyBuilder(database)
    study.image(None, at=T0, status="not-applicable")
    study.publish()
    assert study.report()["status"] == "registered"
    study.study_result(1, "not-analysed", at=T0 + dt.timedelta(seconds=10), label=None, probability=None, analysed=0)
    study.publish()
    report = study.report()
    assert report["status"] == "cancelled"
    assert "not applicable" in report["conclusion"].lower()
    assert "result" not in report and "conclusionCode" not in report


def _subscribe(database: Database, criteria: str) -> str:
    body = subscriptions.validate(
        {"resourceType": "Subscription", "status": "requested", "reason": "EHR inbox", "criteria": criteria,
         "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook", "payload": "application/fhir+json"}},
        logical_id=None, allowed_endpoints=(),
    )
    with database.session() as session:
        stored = store.put(session, body, study_uid=None, now=T0)
    assert stored is not None
    return stored.logical_id


def test_notifications_are_queued_for_matching_versions_only(database: Database) -> None:
    finals = _subscribe(database, "DiagnosticReport?status=final,amended")
    everything = _subscribe(database, "DiagnosticReport")
    study = StudyBuilder(database)
    study.image(0.8, at=T0)
    _, queued = study.publish()  # preliminary: only the catch-all subscription
    assert queued == 1
    study.study_result(1, "final", at=T0 + dt.timedelta(seconds=10), label="PNEUMONIA", probability=0.8, analysed=1)
    _, queued = study.publish()
    assert queued == 2
    assert study.publish() == ([], 0)
    with database.read_session() as session:
        deliveries = session.execute(select(Job).where(Job.kind == "deliver").order_by(Job.id)).scalars().all()
    assert sorted((d.payload["destination"], d.payload["subject"]) for d in deliveries) == sorted([
        (everything, f"DiagnosticReport/{STUDY_UID}/_history/1"),
        (finals, f"DiagnosticReport/{STUDY_UID}/_history/2"),
        (everything, f"DiagnosticReport/{STUDY_UID}/_history/2"),
    ])
    assert {d.payload["channel"] for d in deliveries} == {"fhir-subscription"}


def test_an_hl7_order_becomes_a_service_request_the_report_is_based_on(database: Database) -> None:
    study = StudyBuilder(database)  # accession ACC-10001
    with database.session() as session:
        session.add(ImagingOrder(
            placer_order_number="PO-1", placer_namespace="HIS", filler_order_number="FO-1", accession_number="ACC-10001",
            order_control="NW", status="active", patient_id="PAT-001", patient_issuer="1.2.3.4",
            procedure_code="36554-4", procedure_system="LN", procedure_text="XR Chest Single view",
            ordering_provider="Kildare^James", priority="S", sending_application="RIS", sending_facility="HOSP",
            message_type="ORM^O01", received_at=T0,
        ))
    study.image(0.7, at=T0)
    changed, _ = study.publish()
    order = next(c for c in changed if c.resource_type == "ServiceRequest")
    request = ServiceRequest.model_validate(json.loads(order.content)).model_dump(mode="json", exclude_none=True)
    assert request["status"] == "active" and request["intent"] == "order" and request["priority"] == "stat"
    assert {i["type"]["coding"][0]["code"]: i["value"] for i in request["identifier"]} == {
        "PLAC": "PO-1", "FILL": "FO-1", "ACSN": "ACC-10001"}
    assert request["code"]["coding"][0] == {"system": "http://loinc.org", "code": "36554-4", "display": "XR Chest Single view"}
    assert request["requester"]["display"] == "James Kildare"
    assert study.report()["basedOn"] == [{"reference": f"ServiceRequest/{order.logical_id}"}]
    with database.read_session() as session:
        imaging = store.get(session, "ImagingStudy", STUDY_UID)
    assert imaging is not None and imaging.json()["basedOn"] == [{"reference": f"ServiceRequest/{order.logical_id}"}]


def test_a_change_committed_while_the_job_maps_the_study_is_published_by_its_rerun(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler reads and maps in a read transaction, then stores in a short write one. A study
    result made in between re-arms the running job, and its rerun publishes it."""
    study = StudyBuilder(database)
    study.image(0.91, at=T0)
    with database.session() as session:
        schedule_study_changed(session, study.study_pk, STUDY_UID, 0.0)
    real_plan = projection.plan_publication
    arrived: list[bool] = []

    def plan_then_the_study_result_arrives(session: Any, study_pk: int) -> projection.Publication:
        planned = real_plan(session, study_pk)
        if not arrived:
            arrived.append(True)
            study.study_result(1, "final", at=T0 + dt.timedelta(seconds=10), label="PNEUMONIA", probability=0.91,
                               analysed=1)
            with database.session() as write:
                schedule_study_changed(write, study.study_pk, STUDY_UID, 0.0)
        return planned

    monkeypatch.setattr(projection, "plan_publication", plan_then_the_study_result_arrives)
    handler = projection.StudyProjectionHandler(database)
    for expected in ("preliminary", "final"):
        job = jobs.claim(database, ["study-changed"], "w1", dt.timedelta(seconds=60))
        assert job is not None
        handler(job, "w1")
        assert study.report()["status"] == expected
    assert jobs.claim(database, ["study-changed"], "w1", dt.timedelta(seconds=60)) is None
