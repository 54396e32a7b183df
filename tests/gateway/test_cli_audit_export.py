"""``pneumo audit export`` as an operator runs it (a subprocess on a real store, SQLite and PostgreSQL):
DICOM XML valid against the PS3.15 A.5.1.1 schema, FHIR NDJSON valid R4 AuditEvents, JSON lines an
auditor can re-verify offline; the time window; and the export audited as Audit Log Used."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from lxml import etree
from sqlalchemy import select

from audit.models import GENESIS_HASH, AuditRecord
from audit.store import AuditSigner, append_many, record_payload, signer_session_info, verify_chain
from storage.db import Database
from storage.migrate import upgrade
from tests.audit.event_corpus import all_events
from tests.gateway.serve_process import pneumo

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parents[1] / "audit" / "schema" / "dicom-audit-message.rng")))
KEY = b"k" * 48


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> tuple[Path, Database, dt.datetime]:
    """A migrated store holding every event kind twice, sealed with the HMAC key; the instant between the two."""
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    config = tmp_path / "pneumo.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "var"}"\ndatabase_url = "{database_url}"\n[audit]\nhmac_key_file = "{key_file}"\n'
    )
    database = Database(database_url, session_info=signer_session_info(AuditSigner(KEY)))
    upgrade(database)
    events = [event for _, event in all_events()]
    with database.session() as session:
        append_many(session, events)
    with database.session() as session:
        boundary = session.execute(select(AuditRecord.recorded_at).order_by(AuditRecord.seq.desc())).scalars().first()
    assert boundary is not None
    middle = boundary + dt.timedelta(microseconds=1)
    with database.session() as session:  # a later batch, recorded after *middle*
        append_many(session, events)
    return config, database, middle


def _records(database: Database) -> list[AuditRecord]:
    with database.read_session() as session:
        return list(session.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars().all())


def _verify_offline(lines: list[dict[str, Any]], key: bytes, start_prev: str) -> str | None:
    """What an auditor runs on the jsonl export: the chain and every HMAC (None: intact)."""
    previous = start_prev
    for row in lines:
        if row["prev_hash"] != previous:
            return f"record {row['seq']}: predecessor hash differs"
        payload = record_payload(row["hash_version"], row["seq"], row["prev_hash"], row["recorded_at"], row["event_id"],
                                 row["outcome"], row["event"])
        expected = (hmac.new(key, payload, hashlib.sha256) if row["hash_version"] == 3 else hashlib.sha256(payload)).hexdigest()
        if expected != row["hash"]:
            return f"record {row['seq']}: content does not match its hash"
        previous = row["hash"]
    return None


def test_jsonl_export_reverifies_offline_and_the_export_is_audited(store: tuple[Path, Database, dt.datetime],
                                                                  tmp_path: Path) -> None:
    config, database, _ = store
    before = _records(database)
    output = tmp_path / "audit.jsonl"
    result = pneumo(config, "audit", "export", "--since", "2000-01-01", "--format", "jsonl", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "records": len(before), "format": "jsonl", "output": str(output)}
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["seq"] for row in lines] == [r.seq for r in before]
    assert _verify_offline(lines, KEY, GENESIS_HASH) is None
    tampered = [dict(row) for row in lines]
    tampered[3]["event"] = {**tampered[3]["event"], "outcome": 12}
    assert _verify_offline(tampered, KEY, GENESIS_HASH) == f"record {lines[3]['seq']}: content does not match its hash"
    after = _records(database)
    assert len(after) == len(before) + 1
    used = after[-1]
    assert used.event_id == "110101" and used.hash_version == 3  # Audit Log Used, sealed with the key
    assert "--format jsonl" in used.event["outcome_description"]
    with database.read_session() as session:  # the chain still verifies with the key, the new record included
        verified = verify_chain(session, signer=AuditSigner(KEY))
    assert verified.ok and verified.records == len(after), verified


def test_dicom_export_is_schema_valid_and_windowed(store: tuple[Path, Database, dt.datetime]) -> None:
    config, database, middle = store
    records = _records(database)
    later = [r for r in records if r.recorded_at >= middle]
    assert 0 < len(later) < len(records)
    result = pneumo(config, "audit", "export", "--since", middle.isoformat(), "--format", "dicom")
    assert result.returncode == 0, result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines() if '"audit.exported"' in line]
    assert [(e["records"], e["format"], e["to_file"]) for e in logged] == [(len(later), "dicom", False)]
    root = etree.fromstring(result.stdout.encode())
    assert root.tag == "AuditMessages"
    messages = root.findall("AuditMessage")
    assert len(messages) == len(later)
    for message in messages:
        assert SCHEMA.validate(message), SCHEMA.error_log.last_error
    comments = [c.text.strip() for c in root.iter(etree.Comment)]
    assert comments == [f"seq {r.seq}" for r in later]
    until = pneumo(config, "audit", "export", "--since", "2000-01-01", "--until", middle.isoformat(), "--format", "dicom")
    assert len(etree.fromstring(until.stdout.encode()).findall("AuditMessage")) == len(records) - len(later)


def test_fhir_export_is_ndjson_of_valid_audit_events(store: tuple[Path, Database, dt.datetime], tmp_path: Path) -> None:
    config, database, _ = store
    records = _records(database)
    output = tmp_path / "audit.ndjson"
    result = pneumo(config, "audit", "export", "--since", "2000-01-01", "--format", "fhir", "--output", str(output))
    assert result.returncode == 0, result.stderr
    resources = [FhirAuditEvent.model_validate_json(line) for line in output.read_text().splitlines()]
    assert [r.id for r in resources] == [str(r.seq) for r in records]
    assert [r.type.code for r in resources] == [r.event_id for r in records]
    assert not (tmp_path / "audit.ndjson.part").exists()


def test_bad_arguments_are_refused(store: tuple[Path, Database, dt.datetime]) -> None:
    config, _, _ = store
    assert pneumo(config, "audit", "export", "--since", "yesterday", "--format", "dicom").returncode == 2
    assert pneumo(config, "audit", "export", "--since", "2026-01-01", "--format", "xml").returncode == 2
    backwards = pneumo(config, "audit", "export", "--since", "2026-02-01", "--until", "2026-01-01", "--format", "jsonl")
    assert backwards.returncode == 2 and "--until must be after --since" in backwards.stderr
