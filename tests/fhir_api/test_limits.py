"""Limits of the FHIR API against abuse (fhir_api/limits.py), over real HTTP with real tokens:
a request rate per client (429 + Retry-After), per address for refused tokens, a body size (413),
each breach answered every time and alerted at most once a minute per client and kind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.operationoutcome import OperationOutcome
from sqlalchemy import select

from audit.alert_throttle import AlertThrottle
from audit.models import AuditRecord
from fhir_api.limits import RateLimiter
from storage.db import Database
from tests.fhir_api.test_api import Server
from tests.fhir_api.tokens import TokenService


@pytest.fixture
def limited(database: Database, tmp_path: Path) -> Iterator[Server]:
    # 3 at once, then one every 100 s: nothing refills during the test.
    running = Server(database, tmp_path, TokenService(tmp_path / "idp"),
                     requests_per_second=0.01, request_burst=3, max_request_bytes=4096)
    yield running
    running.close()


def _issue(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = OperationOutcome.model_validate(response.json())
    return str(outcome.issue[0].code)


def _events(database: Database, code: str) -> list[dict[str, Any]]:
    with database.read_session() as session:
        rows = session.execute(select(AuditRecord).where(AuditRecord.event_id == code).order_by(AuditRecord.seq))
        return [r.event for r in rows.scalars()]


def test_a_client_beyond_its_rate_gets_429_and_one_alert(limited: Server, database: Database) -> None:
    for _ in range(3):
        assert limited.get("/DiagnosticReport").status_code == 200
    for _ in range(4):
        refused = limited.get("/DiagnosticReport")
        assert _issue(refused, 429) == "throttled"
        assert 1 <= int(refused.headers["retry-after"]) <= 100
    # Another client has its own bucket; the public metadata is not charged.
    other = limited.client.get("/DiagnosticReport", headers=limited.tokens.headers(client_id="ris-backend"))
    assert other.status_code == 200
    assert limited.client.get("/metadata").status_code == 200
    [alert] = _events(database, "110113")  # four refusals, one Security Alert
    assert alert["event_types"][0]["code"] == "110132" and alert["outcome"] == 4
    offender = next(p for p in alert["participants"] if p["user_is_requestor"])
    assert offender["user_id"] == "ehr-backend" and offender["network_access_point_id"] == "127.0.0.1"
    assert "request-rate" in alert["outcome_description"]


def test_refused_tokens_are_throttled_per_address(limited: Server, database: Database) -> None:
    bad = {"Authorization": "Bearer not.a.token"}
    for _ in range(3):
        assert _issue(limited.client.get("/DiagnosticReport", headers=bad), 401) == "login"
    for _ in range(3):  # no more User Authentication records: a bad-token flood is bounded
        assert _issue(limited.client.get("/DiagnosticReport", headers=bad), 429) == "throttled"
    assert len(_events(database, "110114")) == 3
    [alert] = _events(database, "110113")
    assert next(p for p in alert["participants"] if p["user_is_requestor"])["user_id"] == "address 127.0.0.1"


def test_a_body_over_the_limit_gets_413_declared_or_chunked(limited: Server, database: Database) -> None:
    headers = {**limited.tokens.headers("system/Subscription.cud system/Subscription.rs"),
               "Content-Type": "application/fhir+json"}
    big = json.dumps({"resourceType": "Subscription", "reason": "x" * 8000}).encode()
    declared = limited.client.post("/Subscription", content=big, headers=headers)
    assert _issue(declared, 413) == "too-long"

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(big), 1000):
            yield big[start:start + 1000]

    chunked = limited.client.post("/Subscription", content=chunks(), headers=headers)
    assert _issue(chunked, 413) == "too-long"
    # A small body is judged on its content, not refused for its size.
    small = limited.client.post("/Subscription", content=b'{"resourceType": "Subscription"}', headers=headers)
    assert small.status_code == 400
    [alert] = _events(database, "110113")  # two refusals, one alert
    assert "request-size" in alert["outcome_description"]


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 2, clock=lambda: now[0])
    assert limiter.take("a") == 0.0 and limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0
    assert RateLimiter(0.0, 1).take("a") == 0.0  # 0 = no limit


def test_alert_throttle_counts_what_it_suppressed() -> None:
    now = [0.0]
    throttle = AlertThrottle(60.0, clock=lambda: now[0])
    first = throttle.breach("peer", "size")
    assert first is not None and first.count == 1
    assert [throttle.breach("peer", "size") for _ in range(5)] == [None] * 5
    assert throttle.breach("peer", "rate") is not None  # another kind
    now[0] = 61.0
    later = throttle.breach("peer", "size")
    assert later is not None and later.count == 6 and "6 times in the last 61 s" in later.describe("too big")
