"""The FHIR API over real HTTP (uvicorn on a free port), real signed tokens, SQLite and PostgreSQL.

Every Bundle and resource returned is parsed with fhir.resources (R4B models).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome
from sqlalchemy import select

from audit.events import AuditSource
from audit.models import AuditRecord
from conf.settings import FhirSettings
from fhir_api import search
from fhir_api.api import FhirApi, install
from fhir_api.audit_trail import AuditTrail
from fhir_api.auth import TokenVerifier
from gateway.http import HttpServer, build_app
from storage.db import Database
from storage.filestore import FileStore
from tests.fhir_api.builders import STUDY_UID, T0, StudyBuilder
from tests.fhir_api.tokens import TokenService

BASE_UID = "1.2.826.0.1.3680043.8.498.2000"


class Server:
    def __init__(self, database: Database, tmp_path: Path, tokens: TokenService, **fhir: Any) -> None:
        settings = FhirSettings.model_validate({"bind": "127.0.0.1", "port": 0, "auth": tokens.auth_settings(), **fhir})
        self.tokens = tokens
        self.db = database
        files = FileStore(tmp_path / "dicom", tmp_path / "tmp", fsync=False)
        self.api = FhirApi(
            database, files, TokenVerifier(settings.auth, bind=settings.bind), AuditTrail(database),
            AuditSource("PNEUMO@test"), settings, software_version="test",
        )
        app = build_app(lambda: {"database": True})
        install(app, self.api)
        self.http = HttpServer(app, "127.0.0.1", 0)
        self.http.start()
        self.base = f"http://127.0.0.1:{self.http.port}/fhir"
        self.client = httpx.Client(base_url=self.base, timeout=10)

    def get(self, path: str, scope: str = "system/*.read", **kwargs: Any) -> httpx.Response:
        headers = {**self.tokens.headers(scope), **kwargs.pop("headers", {})}
        return self.client.get(path, headers=headers, **kwargs)

    def close(self) -> None:
        self.client.close()
        self.http.stop()


@pytest.fixture
def server(database: Database, tmp_path: Path) -> Iterator[Server]:
    running = Server(database, tmp_path, TokenService(tmp_path / "idp"))
    yield running
    running.close()


def _reports(database: Database, count: int, *, first: int = 0, patient_id: str = "PAT-001") -> list[str]:
    """*count* final reports (studies of one day each, from 2026-11-01), published."""
    uids = []
    for n in range(first, first + count):
        uid = f"{BASE_UID}.{n}"
        study = StudyBuilder(database, uid, patient_id=patient_id, study_date=f"202611{n % 28 + 1:02d}")
        study.image(0.3 + (n % 5) / 10, at=T0 + dt.timedelta(minutes=n))
        study.study_result(1, "final", at=T0 + dt.timedelta(minutes=n, seconds=10), label="PNEUMONIA", probability=0.7,
                           analysed=1)
        study.publish()
        uids.append(uid)
    return uids


def _outcome(response: httpx.Response, status: int) -> OperationOutcome:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return OperationOutcome.model_validate(response.json())


def _bundle(response: httpx.Response) -> Bundle:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return Bundle.model_validate(response.json())


def test_metadata_and_smart_configuration_are_public_and_truthful(server: Server) -> None:
    response = server.client.get("/metadata")
    assert response.status_code == 200
    statement = CapabilityStatement.model_validate(response.json())
    resources = {r.type: r for r in statement.rest[0].resource}
    assert set(resources) == {
        "Patient", "ImagingStudy", "Device", "Observation", "DiagnosticReport", "ServiceRequest", "Subscription", "Binary",
        "AuditEvent",
    }
    report = resources["DiagnosticReport"]
    assert {"patient", "date", "status", "code", "identifier", "_id", "_lastUpdated"} <= {p.name for p in report.searchParam}
    assert {"DiagnosticReport:result", "DiagnosticReport:subject", "DiagnosticReport:imaging-study"} <= set(report.searchInclude)
    assert {i.code for i in resources["Subscription"].interaction} >= {"create", "update", "delete"}
    assert "create" not in {i.code for i in report.interaction}
    smart = server.client.get("/.well-known/smart-configuration").json()
    assert "client_credentials" in smart["grant_types_supported"]


def test_read_etag_history_and_vread(server: Server, database: Database) -> None:
    study = StudyBuilder(database)
    study.image(0.9, at=T0)
    study.publish()
    study.study_result(1, "final", at=T0 + dt.timedelta(seconds=10), label="PNEUMONIA", probability=0.9, analysed=1)
    study.publish()

    response = server.get(f"/DiagnosticReport/{STUDY_UID}")
    assert response.status_code == 200
    report = DiagnosticReport.model_validate(response.json())
    assert report.status == "final" and response.headers["etag"] == 'W/"2"'
    assert server.get(f"/DiagnosticReport/{STUDY_UID}", headers={"If-None-Match": 'W/"2"'}).status_code == 304
    assert server.get(f"/DiagnosticReport/{STUDY_UID}", headers={"If-None-Match": 'W/"1"'}).status_code == 200

    history = _bundle(server.get(f"/DiagnosticReport/{STUDY_UID}/_history"))
    assert history.type == "history" and [e.resource.meta.versionId for e in history.entry] == ["2", "1"]
    first = server.get(f"/DiagnosticReport/{STUDY_UID}/_history/1")
    assert first.status_code == 200 and first.json()["status"] == "preliminary"
    _outcome(server.get(f"/DiagnosticReport/{STUDY_UID}/_history/7"), 404)
    _outcome(server.get("/DiagnosticReport/no-such-report"), 404)
    _outcome(server.get("/Medication/1"), 404)


def test_search_by_patient_with_includes(server: Server, database: Database) -> None:
    _reports(database, 3)
    _reports(database, 2, first=10, patient_id="PAT-OTHER")
    patient = server.get("/Patient", params={"identifier": "PAT-001"}).json()["entry"][0]["resource"]["id"]
    bundle = _bundle(server.get("/DiagnosticReport", params=[
        ("patient", patient), ("_include", "DiagnosticReport:result"), ("_include", "DiagnosticReport:subject"),
    ]))
    assert bundle.total == 3
    matches = [e for e in bundle.entry if e.search.mode == "match"]
    included = [e for e in bundle.entry if e.search.mode == "include"]
    assert len(matches) == 3 and all(e.resource.subject.reference == f"Patient/{patient}" for e in matches)
    assert sorted(type(e.resource).__name__ for e in included) == ["Observation"] * 3 + ["Patient"]
    assert all(e.fullUrl.startswith(server.base + "/") for e in bundle.entry)
    # The same as a POST _search with a form body.
    posted = server.client.post("/DiagnosticReport/_search", data={"patient": f"Patient/{patient}"},
                                headers=server.tokens.headers())
    assert _bundle(posted).total == 3
    revinclude = _bundle(server.get("/Patient", params={"_id": patient, "_revinclude": "DiagnosticReport:subject"}))
    assert sorted(e.search.mode for e in revinclude.entry) == ["include"] * 3 + ["match"]


def test_paging_is_stable_while_reports_arrive(server: Server, database: Database) -> None:
    _reports(database, 5)
    page = server.get("/DiagnosticReport", params={"_count": 2, "_sort": "-date"}).json()
    seen = [e["resource"]["id"] for e in page["entry"]]
    assert page["total"] == 5
    _reports(database, 3, first=20)  # new reports between the pages
    while (next_link := next((link["url"] for link in page["link"] if link["relation"] == "next"), None)) is not None:
        page = httpx.get(next_link, headers=server.tokens.headers(), timeout=10).json()
        assert page["total"] == 5
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
    assert sorted(seen) == sorted(f"{BASE_UID}.{n}" for n in range(5))  # each once, none of the newcomers
    fresh = server.get("/DiagnosticReport", params={"_summary": "count"}).json()
    assert fresh["total"] == 8 and "entry" not in fresh


def test_date_status_code_and_elements(server: Server, database: Database) -> None:
    _reports(database, 6)  # study dates 2026-11-01 .. 2026-11-06
    def ids(**params: Any) -> set[str]:
        return {e.resource.id for e in _bundle(server.get("/DiagnosticReport", params=params)).entry or []}

    assert len(ids(date="2026-11")) == 6
    assert len(ids(date="ge2026-11-03")) == 4
    assert len(ids(date="lt2026-11-03")) == 2
    assert ids(date="2026-11-02") == {f"{BASE_UID}.1"}
    assert len(ids(status="final")) == 6 and ids(status="preliminary") == set()
    assert len(ids(code="http://loinc.org|18748-4")) == 6
    _outcome(server.get("/DiagnosticReport", params={"date": "not-a-date"}), 400)
    subset = server.get("/DiagnosticReport", params={"_elements": "status", "_count": 1}).json()["entry"][0]["resource"]
    assert set(subset) == {"resourceType", "id", "meta", "status"}
    assert any(t["code"] == "SUBSETTED" for t in subset["meta"]["tag"])


def test_unknown_parameters_lenient_by_default_strict_on_request(server: Server, database: Database) -> None:
    _reports(database, 1)
    lenient = server.get("/DiagnosticReport", params={"colour": "blue"}).json()
    outcome = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert lenient["total"] == 1 and len(outcome) == 1 and "colour" in json.dumps(outcome)
    _outcome(server.get("/DiagnosticReport", params={"colour": "blue"}, headers={"Prefer": "handling=strict"}), 400)


def test_formats(server: Server, database: Database) -> None:
    _reports(database, 1)
    _outcome(server.get("/DiagnosticReport", params={"_format": "xml"}), 406)
    _outcome(server.get("/DiagnosticReport", headers={"Accept": "application/fhir+xml"}), 406)
    assert server.get("/DiagnosticReport", params={"_format": "json"}).status_code == 200
    pretty = server.get("/DiagnosticReport", params={"_pretty": "true"})
    assert pretty.status_code == 200 and "\n  " in pretty.text


@pytest.mark.parametrize(
    ("headers", "scope", "status"),
    [
        ({}, None, 401),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None, 401),
        ({"Authorization": "Bearer not.a.token"}, None, 401),
        (None, "system/Observation.read", 403),
        (None, "system/DiagnosticReport.r", 403),  # v2 read without search
        (None, "system/DiagnosticReport.rs", 200),
        (None, "system/DiagnosticReport.read", 200),
        (None, "system/*.rs", 200),
    ],
)
def test_auth_over_http(server: Server, headers: dict[str, str] | None, scope: str | None, status: int) -> None:
    sent = headers if headers is not None else server.tokens.headers(scope or "")
    response = server.client.get("/DiagnosticReport", headers=sent)
    if status == 200:
        assert response.status_code == 200
    else:
        _outcome(response, status)
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")


def test_expired_and_foreign_tokens_are_refused(server: Server, tmp_path: Path) -> None:
    expired = server.tokens.token(ttl=-120)
    _outcome(server.client.get("/DiagnosticReport", headers={"Authorization": f"Bearer {expired}"}), 401)
    foreign = TokenService(tmp_path / "other-idp")  # same kid, another key: a forged signature
    _outcome(server.client.get("/DiagnosticReport", headers=foreign.headers()), 401)


def test_subscriptions_are_the_only_writable_resources(server: Server) -> None:
    body = {"resourceType": "Subscription", "status": "requested", "reason": "results",
            "criteria": "DiagnosticReport?status=final",
            "channel": {"type": "rest-hook", "endpoint": "https://ehr.example/hook", "payload": "application/fhir+json"}}
    write = server.tokens.headers("system/Subscription.cruds")
    headers = {**write, "Content-Type": "application/fhir+json"}
    _outcome(server.client.post("/Subscription", json=body, headers=server.tokens.headers()), 403)
    created = server.client.post("/Subscription", content=json.dumps(body), headers=headers)
    assert created.status_code == 201 and created.json()["status"] == "active"
    sid = created.json()["id"]
    assert created.headers["location"].endswith(f"/Subscription/{sid}/_history/1")
    bad = {**body, "criteria": "DiagnosticReport?colour=blue"}
    _outcome(server.client.post("/Subscription", content=json.dumps(bad), headers=headers), 400)
    off = server.client.put(f"/Subscription/{sid}", content=json.dumps({**body, "id": sid, "status": "off"}), headers=headers)
    assert off.status_code == 200 and off.json()["status"] == "off" and off.json()["meta"]["versionId"] == "2"
    _outcome(server.client.post("/DiagnosticReport", content="{}", headers=headers), 405)
    assert server.client.delete(f"/Subscription/{sid}", headers=write).status_code == 204
    _outcome(server.client.get(f"/Subscription/{sid}", headers=write), 404)


def test_reads_and_searches_are_audited_with_the_client(server: Server, database: Database) -> None:
    _reports(database, 1)
    server.get(f"/DiagnosticReport/{BASE_UID}.0")
    server.get("/DiagnosticReport", params={"status": "final"})
    with database.read_session() as session:
        events = [r.event for r in session.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars()]
    read = next(e for e in events if e["event_id"]["code"] == "110110")
    search = next(e for e in events if e["event_id"]["code"] == "110112")
    for event in (read, search):
        assert event["participants"][0]["user_id"] == "ehr-backend"
        assert any(o["role"] == 1 and o["object_id"].startswith("Patient/") for o in event["objects"])
    assert any(o["object_id"].startswith(f"DiagnosticReport/{BASE_UID}.0") for o in read["objects"])


def test_refused_requests_are_audited(server: Server, database: Database) -> None:
    _outcome(server.client.get("/DiagnosticReport"), 401)
    _outcome(server.client.get("/DiagnosticReport", headers=server.tokens.headers("system/Patient.rs")), 403)
    with database.read_session() as session:
        events = [r.event for r in session.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars()]
    refused = [(e["event_id"]["code"], e["event_types"][0]["code"], e["outcome"]) for e in events
               if e["event_id"]["code"] in ("110114", "110113")]
    assert refused == [("110114", "110122", 4), ("110113", "110132", 4)]


def test_broad_searches_count_up_to_a_limit_unless_asked(server: Server, database: Database,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _reports(database, 5)
    monkeypatch.setattr(search, "TOTAL_COUNT_LIMIT", 3)
    broad = server.get("/DiagnosticReport", params={"_count": 2}).json()
    assert "total" not in broad and len(broad["entry"]) == 2  # above the limit: no total, still pages
    assert server.get("/DiagnosticReport", params={"_count": 2, "_total": "accurate"}).json()["total"] == 5
    assert server.get("/DiagnosticReport", params={"_count": 2, "_id": f"{BASE_UID}.1"}).json()["total"] == 1
