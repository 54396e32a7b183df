"""GET /fhir/AuditEvent and /fhir/AuditEvent/{id} over real HTTP with real signed tokens, on SQLite and
PostgreSQL: the audit log as FHIR R4 AuditEvent (IHE BALP shape), its search parameters, paging, the
scope it needs, and the audit of reading the audit log (Audit Log Used)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from sqlalchemy import func, select

from audit import builders
from audit.events import Action, Outcome
from audit.models import AuditRecord
from audit.search_index import AuditSearchIndex
from audit.store import append_many
from fhir_api.audit_trail import fhir_access_event
from storage.db import Database
from tests.audit.event_corpus import SOURCE, STUDY, WHEN, all_events
from tests.fhir_api.builders import T0, StudyBuilder
from tests.fhir_api.test_api import Server
from tests.fhir_api.tokens import TokenService

AUDIT_SCOPE = "system/AuditEvent.rs"
OUR_STUDY = "1.2.826.0.1.3680043.8.498.3000"


@pytest.fixture
def server(database: Database, tmp_path: Path) -> Iterator[Server]:
    running = Server(database, tmp_path, TokenService(tmp_path / "idp"))
    yield running
    running.close()


@pytest.fixture
def patient_ref(database: Database) -> str:
    """A published study of patient PAT-001 (so a FHIR Patient exists), every event kind, and two
    records about PAT-001: its DICOM receipt (naming the Patient ID) and a FHIR read (naming the reference)."""
    study = StudyBuilder(database, OUR_STUDY, patient_id="PAT-001")
    study.image(0.8, at=T0)
    study.study_result(1, "final", at=T0 + dt.timedelta(seconds=10), label="PNEUMONIA", probability=0.8, analysed=1)
    study.publish()
    with database.read_session() as session:
        from fhir_api.store import get
        report = get(session, "DiagnosticReport", OUR_STUDY)
        assert report is not None
        reference = str(report.json()["subject"]["reference"])
    events = [event for _, event in all_events()]
    events.append(builders.dicom_transfer(
        SOURCE, action=Action.CREATE, outcome=Outcome.SUCCESS, sender=("CT-ROOM-2", "10.0.0.66"), receiver=("PNEUMO", None),
        sender_is_requestor=True, study_uid=OUR_STUDY, sop_classes={"1.2.840.10008.5.1.4.1.1.1": 1}, instances=(),
        patient_id="PAT-001", patient_name="Doe^Jane", when=WHEN))
    events.append(fhir_access_event(
        SOURCE, client_id="ehr-client", client_address="10.0.0.20", interaction="read", resource_type="Patient",
        returned=[f"{reference}/_history/1"], patients=[reference], query=None, outcome=Outcome.SUCCESS, when=WHEN))
    with database.session() as session:
        append_many(session, events)
    return reference


def _bundle(response: httpx.Response) -> tuple[Bundle, list[dict[str, Any]]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    bundle = Bundle.model_validate(body)
    assert bundle.type == "searchset"
    resources = [e["resource"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]
    for resource in resources:
        FhirAuditEvent.model_validate(resource)
    return bundle, resources


def _search(server: Server, **params: str) -> list[dict[str, Any]]:
    return _bundle(server.get("/AuditEvent", AUDIT_SCOPE, params={"_count": "500", **params}))[1]


def _records(database: Database) -> list[AuditRecord]:
    with database.read_session() as session:
        return list(session.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars().all())


def test_the_audit_log_needs_its_own_scope(server: Server, patient_ref: str) -> None:
    for scope in ("system/*.read", "system/*.rs", "system/DiagnosticReport.rs"):
        response = server.get("/AuditEvent", scope)
        assert response.status_code == 403, (scope, response.text)
        outcome = OperationOutcome.model_validate(response.json())
        assert "system/AuditEvent" in (outcome.issue[0].diagnostics or "")
    assert server.get("/AuditEvent/1", "system/*.rs").status_code == 403
    assert server.client.get("/AuditEvent").status_code == 401
    for scope in (AUDIT_SCOPE, "system/AuditEvent.read", "system/AuditEvent.s"):
        assert server.get("/AuditEvent", scope).status_code == 200, scope
    assert server.get("/AuditEvent/1", "system/AuditEvent.s").status_code == 403  # s is search, not read


def test_search_by_type_agent_entity_patient_and_date(server: Server, database: Database, patient_ref: str) -> None:
    stored = _records(database)
    everything = _search(server)  # (appends an Audit Log Used record, after the search)
    assert [r["id"] for r in everything] == [str(r.seq) for r in reversed(stored)]  # newest first, all of them
    transfers = _search(server, type="110104")
    assert transfers and {r["type"]["code"] for r in transfers} == {"110104"}
    assert len(transfers) == sum(r.event_id == "110104" for r in stored)
    assert _search(server, type="http://dicom.nema.org/resources/ontology/DCM|110104") == transfers
    assert _search(server, type="urn:other|110104") == []
    logins = _search(server, subtype="110122")
    assert [r["subtype"][0]["code"] for r in logins] == ["110122"]
    by_agent = _search(server, agent="CT-ROOM-2")
    assert len(by_agent) == 1 and by_agent[0]["agent"][0]["network"]["address"] == "10.0.0.66"
    by_entity = _search(server, entity=f"urn:oid:{OUR_STUDY}")
    assert [r["id"] for r in by_entity] == [r["id"] for r in by_agent]
    assert _search(server, entity=OUR_STUDY) == by_entity
    assert {r["id"] for r in _search(server, entity=f"urn:oid:{STUDY}")} == {
        str(r.seq) for r in stored if any(o["object_id"] == STUDY for o in r.event["objects"])}
    about_patient = _search(server, patient=patient_ref)
    kinds = sorted(r["type"]["code"] for r in about_patient)
    assert kinds == ["110104", "110110"]  # the DICOM receipt (by Patient ID) and the FHIR read (by reference)
    received = next(r for r in about_patient if r["type"]["code"] == "110104")
    patient_entity = next(e for e in received["entity"] if e["role"]["code"] == "1")
    assert patient_entity["what"]["reference"] == patient_ref  # the FHIR Patient, resolved from the Patient ID
    assert _search(server, patient=patient_ref.removeprefix("Patient/")) == about_patient
    both = _search(server, patient=patient_ref, type="110104")
    assert [r["id"] for r in both] == [received["id"]]
    either = _search(server, type="110104,110110")
    assert len(either) == sum(r.event_id in ("110104", "110110") for r in stored)
    recorded = dt.datetime.fromisoformat(everything[0]["recorded"])
    assert _search(server, date=f"gt{(recorded + dt.timedelta(hours=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}") == []
    today = _search(server, date=recorded.strftime("%Y-%m-%d"))
    assert {r["id"] for r in today} >= {r["id"] for r in everything if r["recorded"].startswith(recorded.strftime("%Y-%m-%d"))}
    assert len(_search(server, date="lt2000-01-01")) == 0


def test_paging_with_next_links(server: Server, database: Database, patient_ref: str) -> None:
    before = _records(database)
    seen: list[str] = []
    url: str | None = "/AuditEvent?_count=4"
    pages = 0
    while url is not None:
        bundle, resources = _bundle(server.get(url, AUDIT_SCOPE))
        assert len(resources) <= 4
        seen += [r["id"] for r in resources]
        links = {link.relation: link.url for link in bundle.link or []}
        url = None
        if "next" in links:
            parts = urlsplit(links["next"])
            url = parts.path.removeprefix("/fhir") + "?" + parts.query
        pages += 1
        if pages == 2:  # records appended while paging do not disturb the pages
            with database.session() as session:
                append_many(session, [all_events()[0][1]])
    assert seen == [str(r.seq) for r in reversed(before)]  # each page's own Audit Log Used record came later
    assert len(set(seen)) == len(seen)


def test_read_one_record_and_unknown_ids(server: Server, database: Database, patient_ref: str) -> None:
    record = _records(database)[3]
    response = server.get(f"/AuditEvent/{record.seq}", AUDIT_SCOPE)
    assert response.status_code == 200, response.text
    resource = FhirAuditEvent.model_validate(response.json())
    assert resource.id == str(record.seq) and resource.type.code == record.event_id
    assert response.headers["etag"] == 'W/"1"'
    for missing in ("999999", "abc", "1.5", "-1", "9" * 40):
        outcome = server.get(f"/AuditEvent/{missing}", AUDIT_SCOPE)
        assert outcome.status_code == 404, missing
        OperationOutcome.model_validate(outcome.json())


def test_bad_search_values_are_400(server: Server, patient_ref: str) -> None:
    for params in ({"date": "yesterday"}, {"_count": "-1"}, {"patient": "Observation/x"}, {"date": "2026,2027"}):
        response = server.get("/AuditEvent", AUDIT_SCOPE, params=params)
        assert response.status_code == 400, (params, response.text)
        OperationOutcome.model_validate(response.json())
    lenient = server.get("/AuditEvent", AUDIT_SCOPE, params={"outcome": "0"})
    assert lenient.status_code == 200 and lenient.json()["entry"][-1]["search"]["mode"] == "outcome"
    strict = server.get("/AuditEvent", AUDIT_SCOPE, params={"outcome": "0"}, headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400


def test_reading_the_audit_log_is_audited(server: Server, database: Database, patient_ref: str) -> None:
    before = len(_records(database))
    _search(server, patient=patient_ref)
    server.get(f"/AuditEvent/{before}", AUDIT_SCOPE)
    server.api.trail.flush()
    used = [r for r in _records(database)[before:] if r.event_id == "110101"]
    assert len(used) == 2
    assert all(r.event["participants"][0]["user_id"] == "ehr-backend" for r in used)
    assert all(r.event["participants"][0]["network_access_point_id"] == "127.0.0.1" for r in used)
    query = next(o for o in used[0].event["objects"] if o["role"] == 24)
    import base64
    assert patient_ref.replace("/", "%2F") in base64.b64decode(query["query"]).decode()


def test_the_index_follows_the_log(server: Server, database: Database, patient_ref: str) -> None:
    count = len(_records(database))
    _search(server)
    with database.read_session() as session:
        indexed = session.execute(select(func.max(AuditSearchIndex.seq))).scalar_one()
    assert indexed == count  # every record before the search, none after
    with database.session() as session:
        append_many(session, [all_events()[2][1]])
    newest = _records(database)[-1]
    assert str(newest.seq) in [r["id"] for r in _search(server, agent="ROGUE")]


def test_capability_statement_lists_audit_event(server: Server) -> None:
    statement = CapabilityStatement.model_validate(server.client.get("/metadata").json())
    [entry] = [r for r in statement.rest[0].resource if r.type == "AuditEvent"]
    assert sorted(i.code for i in entry.interaction) == ["read", "search-type"]
    assert {p.name for p in entry.searchParam} == {"date", "type", "subtype", "agent", "entity", "patient"}
    smart = server.client.get("/.well-known/smart-configuration").json()
    assert AUDIT_SCOPE in smart["scopes_supported"]


def test_a_search_far_behind_the_log_is_503_never_partial(server: Server, database: Database, patient_ref: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """After upgrading a large log the index is built a slice per search; until it is complete a
    search answers 503 (retry) rather than results that miss records."""
    import fhir_api.audit_event_routes as routes

    monkeypatch.setattr(routes, "CATCH_UP_PER_SEARCH", 10)
    stored = len(_records(database))
    answers = []
    for _ in range(stored // 10 + 2):
        response = server.get("/AuditEvent", AUDIT_SCOPE, params={"type": "110104", "_count": "500"})
        answers.append(response.status_code)
        if response.status_code == 503:
            assert OperationOutcome.model_validate(response.json()).issue[0].code == "transient"
    assert answers[0] == 503 and answers[-1] == 200
    transfers = _search(server, type="110104")
    assert len(transfers) == sum(r.event_id == "110104" for r in _records(database)[:stored])
