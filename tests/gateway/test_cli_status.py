"""``pneumo status`` and ``pneumo db upgrade`` as an operator runs them (the real command line,
a real store on SQLite and PostgreSQL): the exit status follows what needs attention, the output
names no patient, and an upgrade says from and to which revision and is audited."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from audit.anchor import load_signer
from audit.models import AuditRecord
from audit.store import verify_chain
from inference.drift import site_reference
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from storage import jobs
from storage.db import Database
from storage.index import add_instance
from storage.job_kinds import DELIVER_JOB, INFER_JOB, delivery_key
from storage.metadata import extract_metadata
from storage.migrate import MIGRATIONS_DIR, current_revision, head_revision, upgrade
from storage.models import DeliveryAttempt, InferenceResult, Job, JobState, utcnow
from tests.gateway.serve_process import pneumo, write_config

PATIENT_NAME, PATIENT_ID, ACCESSION = "SECRETNAME^JANE", "PID-7731-SECRET", "ACC-99812"


def _config(tmp_path: Path, database_url: str, extra: str = "") -> Path:
    return write_config(tmp_path / "pneumo.toml", tmp_path / "var", database_url=database_url, extra=extra)


def _status(config: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    result = pneumo(config, "status", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout), result.stdout + result.stderr


def _store(database_url: str) -> Database:
    database = Database(database_url)
    upgrade(database)
    return database


def _phi_rows(database: Database, *, failing_for: dt.timedelta, dead: bool) -> dict[str, str]:
    """An image of a named patient, a delivery of its SR failing for *failing_for* whose peer
    quoted the patient, and (with *dead*) an analysis dead-lettered with a message quoting them."""
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.AccessionNumber = PATIENT_ID, PATIENT_NAME, ACCESSION
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", "CR"
    now = utcnow()
    with database.session() as session:
        instance = add_instance(session, extract_metadata(ds), transfer_syntax_uid="1.2.840.10008.1.2.1",
                                relative_path="x", size=1, sha256="0" * 64, origin="received", calling_ae="MODALITY")
        key = delivery_key("hl7", "EHR", f"study-result/{instance.id}")
        jobs.enqueue(session, DELIVER_JOB, key, payload={"channel": "hl7", "destination": "EHR", "subject": ds.SOPInstanceUID})
        job = session.execute(select(Job).where(Job.dedup_key == key)).scalar_one()
        for minutes_ago in (failing_for.total_seconds() / 60, 1):
            finished = now - dt.timedelta(minutes=minutes_ago)
            session.add(DeliveryAttempt(
                job_pk=job.id, attempt=1, channel="hl7", destination="EHR", subject=ds.SOPInstanceUID,
                started_at=finished, finished_at=finished, outcome="failed", peer_status="AE",
                error=f"EHR answered AE: unknown patient {PATIENT_ID} {PATIENT_NAME} {ACCESSION}",
            ))
        if dead:
            jobs.enqueue(session, INFER_JOB, f"infer:{ds.SOPInstanceUID}", instance_pk=instance.id)
            infer = session.execute(select(Job).where(Job.kind == INFER_JOB)).scalar_one()
            infer.state, infer.last_error = JobState.FAILED, f"ValueError: cannot read {PATIENT_NAME} ({ACCESSION})"
    return {"study": str(ds.StudyInstanceUID), "instance": str(ds.SOPInstanceUID)}


def test_status_of_a_healthy_store_exits_0(tmp_path: Path, database_url: str) -> None:
    _store(database_url).dispose()
    config = _config(tmp_path, database_url)
    code, report, _ = _status(config)
    assert code == 0 and report["healthy"] and report["problems"] == []
    assert report["queues"] == [] and report["destinations"] == [] and report["dead_letters"]["total"] == 0
    assert report["store"]["schema_current"] and report["store"]["schema_revision"] == report["store"]["schema_head"]
    assert report["model"]["ok"] and report["model"]["id"] == "pneumo-effnetb0-kermany" and report["model"]["version"]
    assert report["drift"]["state"] == "too few samples" and report["drift"]["samples"] == 0
    assert not report["drift"]["alert"]
    text = pneumo(config, "status")
    assert text.returncode == 0 and text.stdout.rstrip().endswith("healthy"), text.stdout
    assert "too few samples" in text.stdout


def _drift_rows(database: Database, n: int, *, shifted: bool) -> None:
    """*n* analysed results of the bundled model: spread over its reference bins as the reference
    says (*shifted* False), or all of them dark, flat and saturated (*shifted* True)."""
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    assert manifest.drift_reference is not None
    columns: dict[str, list[float]] = {}
    for name, ref in site_reference(manifest.drift_reference, manifest.calibration.apply).items():
        edges = list(ref.edges)
        values = [edges[0] - 0.01, *((a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)), edges[-1] + 0.001]
        counts = np.round(np.asarray(ref.fractions) * n).astype(int)
        counts[int(np.argmax(counts))] += n - int(counts.sum())
        columns[name] = [v for v, c in zip(values, counts, strict=True) for _ in range(c)]
    start = utcnow() - dt.timedelta(hours=1)
    with database.session() as session:
        for i in range(n):
            ds = Dataset()
            ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
            ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", "CR"
            instance = add_instance(session, extract_metadata(ds), transfer_syntax_uid="1.2.840.10008.1.2.1",
                                    relative_path="x", size=1, sha256="0" * 64, origin="received", calling_ae="MODALITY")
            stats = ({"mean": 0.15, "std": 0.05, "dark_fraction": 0.6, "bright_fraction": 0.0} if shifted
                     else {k: columns[k][i] for k in ("mean", "std", "dark_fraction", "bright_fraction")})
            session.add(InferenceResult(
                instance_pk=instance.id, model_id=manifest.id, model_version=manifest.version, status="ok",
                probability=0.95 if shifted else round(columns["probability"][i], 4), label="PNEUMONIA",
                created_at=start + dt.timedelta(seconds=i), input_stats=stats,
            ))


def test_model_drift_is_shown_and_an_alert_exits_1(tmp_path: Path, database_url: str) -> None:
    database = _store(database_url)
    try:
        _drift_rows(database, 200, shifted=False)
        config = _config(tmp_path, database_url)
        code, report, _ = _status(config)
        assert code == 0 and report["healthy"], report["problems"]
        drift = report["drift"]
        assert (drift["state"], drift["samples"], drift["window"], drift["psi_alert"]) == ("stable", 200, 500, 0.25)
        assert [f["feature"] for f in drift["features"]] == ["probability", "mean", "std", "dark_fraction", "bright_fraction"]
        assert all(f["psi"] < 0.1 and not f["alert"] for f in drift["features"]), drift
        _drift_rows(database, 150, shifted=True)  # newer: 150 shifted + 200 before them in the window
    finally:
        database.dispose()
    code, report, output = _status(config)
    assert code == 1 and report["drift"]["alert"] and report["drift"]["samples"] == 350
    [problem] = report["problems"]
    assert problem.startswith("model drift: PSI above 0.25 (mean ") and "pneumo-effnetb0-kermany 1.1.0" in problem
    text = pneumo(config, "status")
    assert text.returncode == 1 and "ALERT over 350 result(s) of window 500" in text.stdout, text.stdout
    # A wider threshold (a site that tolerates more) makes the same window acceptable.
    relaxed = _config(tmp_path, database_url, extra="[monitoring]\ndrift_psi_alert = 100.0\n")
    assert _status(relaxed)[0] == 0
    for secret in (PATIENT_NAME, "SECRETNAME", PATIENT_ID):
        assert secret not in output and secret not in text.stdout + text.stderr, secret


def test_status_exits_1_on_dead_letters_and_long_failures_and_names_no_patient(tmp_path: Path, database_url: str) -> None:
    database = _store(database_url)
    try:
        uids = _phi_rows(database, failing_for=dt.timedelta(minutes=40), dead=True)
    finally:
        database.dispose()
    config = _config(tmp_path, database_url)
    code, report, output = _status(config)
    assert code == 1 and not report["healthy"]
    assert report["problems"] == [
        f"1 dead-lettered job(s) ({INFER_JOB} 1)",
        "hl7 destination EHR failing for 40 min (2 attempt(s), last: refused)",
    ]
    [destination] = report["destinations"]
    assert (destination["channel"], destination["destination"], destination["last_failure_class"],
            destination["last_peer_status"], destination["failing_streak"], destination["pending"]) == (
        "hl7", "EHR", "refused", "AE", 2, 1)
    assert {q["kind"]: (q["queued"], q["dead_letter"]) for q in report["queues"]} == {
        DELIVER_JOB: (1, 0), INFER_JOB: (0, 1)}
    text = pneumo(config, "status")
    assert text.returncode == 1 and "UNHEALTHY" in text.stdout and "dead letters: 1" in text.stdout
    for secret in (PATIENT_NAME, "SECRETNAME", PATIENT_ID, ACCESSION, uids["study"], uids["instance"]):
        assert secret not in output and secret not in text.stdout + text.stderr, secret


def test_failing_minutes_sets_how_long_a_destination_may_fail(tmp_path: Path, database_url: str) -> None:
    database = _store(database_url)
    try:
        _phi_rows(database, failing_for=dt.timedelta(minutes=20), dead=False)
    finally:
        database.dispose()
    config = _config(tmp_path, database_url)
    assert _status(config)[0] == 1  # default 15 minutes
    code, report, _ = _status(config, "--failing-minutes", "30")
    assert code == 0 and report["destinations"][0]["failing_streak"] == 2
    assert 19 * 60 < report["destinations"][0]["failing_for_seconds"] < 21 * 60


def test_status_without_a_store_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'var' / 'pneumo.db'}")
    result = pneumo(config, "status")
    assert result.returncode == 2 and "no store" in result.stderr
    assert not (tmp_path / "var").exists()


def _downgrade(database_url: str, revision: str) -> None:
    database = Database(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
    finally:
        database.dispose()


def test_db_upgrade_says_from_and_to_and_is_audited(tmp_path: Path, database_url: str) -> None:
    key = tmp_path / "audit.key"
    key.write_text("k" * 64)
    key.chmod(0o600)
    config = _config(tmp_path, database_url, extra=f'[audit]\nhmac_key_file = "{key}"')
    database = _store(database_url)
    head = head_revision(database)
    database.dispose()
    _downgrade(database_url, "0011")

    code, report, _ = _status(config)  # an old schema is reported, not queried
    assert code == 1 and report["store"]["schema_revision"] == "0011" and "queues" not in report
    assert "run `pneumo db upgrade` as the schema owner" in report["problems"][0]

    first = pneumo(config, "db", "upgrade")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) | {"database": None} == {
        "ok": True, "database": None, "from": "0011", "to": head, "changed": True}
    again = pneumo(config, "db", "upgrade")
    assert json.loads(again.stdout)["changed"] is False and json.loads(again.stdout)["from"] == head
    assert _status(config)[0] == 0

    database = Database(database_url)
    try:
        assert current_revision(database) == head
        with database.read_session() as session:
            records = session.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars().all()
            chain = verify_chain(session, signer=load_signer(key))
        assert chain.ok, chain.problem  # sealed with the configured HMAC key like every record
    finally:
        database.dispose()
    upgrades = [r.event for r in records if "SCHEMA-UPGRADE" in json.dumps(r.event)]
    assert len(upgrades) == 2
    assert f"from 0011 to {head}" in json.dumps(upgrades[0]) and f"already at {head}" in json.dumps(upgrades[1])


def test_db_upgrade_creates_the_schema_of_an_empty_postgresql_database(tmp_path: Path, postgres_url: str) -> None:
    config = _config(tmp_path, postgres_url)
    assert pneumo(config, "status").returncode == 2  # no schema: no store yet
    result = pneumo(config, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["from"] is None and json.loads(result.stdout)["changed"] is True
    assert _status(config)[0] == 0


@pytest.mark.parametrize("command_line", [("db", "upgrade"), ("status",)])
def test_a_missing_sqlite_file_is_refused_not_created(tmp_path: Path, command_line: tuple[str, ...]) -> None:
    database = tmp_path / "elsewhere" / "pneumo.db"
    result = pneumo(_config(tmp_path, f"sqlite:///{database}"), *command_line)
    assert result.returncode == 2 and str(database) in result.stderr
    assert not database.exists()
