"""Schema migrations carry existing data forward (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

from alembic import command
from sqlalchemy import Connection, inspect, select, text

from storage.db import Database
from storage.migrate import _config, upgrade
from storage.models import DeliveryAttempt, InferenceResult, Job
from storage.monitoring import WindowSample, recent_results


def _upgrade_to(database: Database, revision: str) -> None:
    config = _config(database)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _insert_patient_study_series(connection: Connection, now: str) -> None:
    """Patient 1 / study 1 (1.2.3) / series 1 (1.2.3.4), as raw rows: the models may be newer than the schema."""
    connection.execute(text(
        "INSERT INTO patient (id, patient_id, issuer, created_at, updated_at) VALUES (1, 'P', '', :n, :n)"), {"n": now})
    connection.execute(text(
        "INSERT INTO study (id, study_instance_uid, patient_pk, created_at, updated_at) VALUES (1, '1.2.3', 1, :n, :n)"),
        {"n": now})
    connection.execute(text(
        "INSERT INTO series (id, series_instance_uid, study_pk, created_at) VALUES (1, '1.2.3.4', 1, :n)"), {"n": now})


def _insert_instance(connection: Connection, now: str) -> None:
    """Instance 1 (1.2.3.4.5) in series 1, as a raw row."""
    connection.execute(text(
        "INSERT INTO instance (id, sop_instance_uid, sop_class_uid, series_pk, transfer_syntax_uid, path, size,"
        " sha256, origin, received_at, updated_at) VALUES (1, '1.2.3.4.5', '1.2', 1, '1.2.840.10008.1.2.1', 'p', 1,"
        " 'x', 'received', :n, :n)"), {"n": now})


def test_0005_makes_the_outbox_channel_neutral_and_folds_summary_jobs(database_url: str) -> None:
    database = Database(database_url)
    try:
        _upgrade_to(database, "0004")
        with database.engine.begin() as connection:
            now = "2026-11-28 06:00:00"
            _insert_patient_study_series(connection, now)
            for pk, uid in ((1, "1.2.3.4.5"), (2, "1.2.3.4.6")):
                connection.execute(text(
                    "INSERT INTO instance (id, sop_instance_uid, sop_class_uid, series_pk, transfer_syntax_uid, path, size,"
                    " sha256, origin, received_at, updated_at) VALUES (:i, :u, '1.2', 1, '1.2.840.10008.1.2.1', 'p', 1,"
                    " 'x', 'generated', :n, :n)"), {"i": pk, "u": uid, "n": now})
            rows = [
                (1, "deliver", "deliver:pacs:1.2.3.4.5", 1, '{"destination": "pacs"}', "failed"),
                (2, "infer", "infer:1.2.3.4.6", 2, "{}", "done"),
                (3, "summary", "summary:1.2.3.4.6:m:1", 2, "{}", "pending"),
            ]
            for job_id, kind, key, instance_pk, payload, state in rows:
                connection.execute(text(
                    "INSERT INTO job (id, kind, dedup_key, instance_pk, payload, state, attempts, run_after, created_at,"
                    " updated_at) VALUES (:i, :k, :d, :p, :j, :s, 1, :n, :n, :n)"),
                    {"i": job_id, "k": kind, "d": key, "p": instance_pk, "j": payload, "s": state, "n": now})
            connection.execute(text(
                "INSERT INTO delivery_attempt (id, job_pk, attempt, destination, sop_instance_uid, started_at, finished_at,"
                " outcome, dimse_status, error) VALUES (1, 1, 1, 'pacs', '1.2.3.4.5', :n, :n, 'failed', 42752, 'busy')"),
                {"n": now})
        upgrade(database)
        with database.read_session() as session:
            jobs = {job.id: job for job in session.execute(select(Job)).scalars()}
            [attempt] = session.execute(select(DeliveryAttempt)).scalars().all()
        assert set(jobs) == {1, 2}  # the summary job is gone ...
        assert jobs[2].state == "pending"  # ... and its image's infer job re-runs to draw the picture
        assert jobs[1].payload == {"channel": "dicom", "destination": "pacs", "subject": "1.2.3.4.5"}
        assert jobs[1].dedup_key == "deliver:dicom:pacs:1.2.3.4.5" and jobs[1].state == "failed"
        assert (attempt.channel, attempt.subject, attempt.peer_status) == ("dicom", "1.2.3.4.5", "0xA700")
    finally:
        database.dispose()


def test_0010_results_per_source_revision_and_back(database_url: str) -> None:
    """0010: existing instances are revision 0 and their results judged revision 0; a second
    result of the same model version for another revision is allowed; downgrading keeps only the
    current revision's result (the old unique key could not hold both)."""
    database = Database(database_url)
    try:
        _upgrade_to(database, "0009")
        now = "2026-11-30 06:00:00"
        with database.engine.begin() as connection:
            _insert_patient_study_series(connection, now)
            _insert_instance(connection, now)
            connection.execute(text(
                "INSERT INTO inference_result (id, instance_pk, model_id, model_version, status, timings_ms, created_at)"
                " VALUES (1, 1, 'm', '1', 'ok', '{}', :n)"), {"n": now})
        upgrade(database)
        with database.engine.begin() as connection:
            assert connection.execute(text("SELECT revision FROM instance")).scalar_one() == 0
            assert connection.execute(text("SELECT source_revision FROM inference_result")).scalar_one() == 0
            connection.execute(text("UPDATE instance SET revision = 1"))
            connection.execute(text(
                "INSERT INTO inference_result (id, instance_pk, model_id, model_version, status, timings_ms, created_at,"
                " source_revision) VALUES (2, 1, 'm', '1', 'ok', '{}', :n, 1)"), {"n": now})
        _downgrade_to(database, "0009")
        with database.engine.begin() as connection:
            assert connection.execute(text("SELECT id FROM inference_result")).scalars().all() == [2]
        upgrade(database)  # and forward again
    finally:
        database.dispose()


def _downgrade_to(database: Database, revision: str) -> None:
    config = _config(database)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_0013_adds_a_nullable_input_stats_column_and_back(database_url: str) -> None:
    """Existing results keep NULL statistics (the drift window reads them as none); new ones hold
    a JSON object; downgrading drops the column and keeps the rows."""
    database = Database(database_url)
    try:
        _upgrade_to(database, "0012")
        now = "2026-12-01 06:00:00"
        with database.engine.begin() as connection:
            _insert_patient_study_series(connection, now)
            _insert_instance(connection, now)
            connection.execute(text(
                "INSERT INTO inference_result (id, instance_pk, model_id, model_version, status, probability, timings_ms,"
                " created_at) VALUES (1, 1, 'm', '1', 'ok', 0.25, '{}', :n)"), {"n": now})
        upgrade(database)
        with database.session() as session:
            old = session.get(InferenceResult, 1)
            assert old is not None and old.input_stats is None
            session.add(InferenceResult(
                id=2, instance_pk=1, model_id="m", model_version="1", status="ok", probability=0.75, source_revision=1,
                created_at=dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC), input_stats={"mean": 0.45, "std": 0.21},
            ))
        with database.read_session() as session:
            assert recent_results(session, "m", "1", 10) == [
                WindowSample(0.75, {"mean": 0.45, "std": 0.21}), WindowSample(0.25, {}),
            ]
        _downgrade_to(database, "0012")
        with database.engine.begin() as connection:
            assert connection.execute(text("SELECT count(*) FROM inference_result")).scalar_one() == 2
            columns = {c["name"] for c in inspect(connection).get_columns("inference_result")}
            assert "input_stats" not in columns
        upgrade(database)  # and forward again
    finally:
        database.dispose()


def test_0014_adds_the_association_record_and_back(database_url: str) -> None:
    """0014: an empty ``dicom_association`` that takes a row (the recorder's), and goes again on
    downgrade without touching the rest."""
    from storage.associations import AssociationRecorder, EndedAssociation
    from storage.models import DicomAssociationEnd

    database = Database(database_url)
    try:
        _upgrade_to(database, "0013")
        with database.engine.begin() as connection:
            _insert_patient_study_series(connection, "2026-12-01 04:00:00")
        upgrade(database)
        started = dt.datetime(2026, 12, 1, 4, 0, tzinfo=dt.UTC)
        recorded = AssociationRecorder(database, acceptor_host="gw-1", acceptor_pid=42)(EndedAssociation(
            calling_ae="MODALITY", called_ae="PNEUMO", peer_address="10.0.0.7", ended_by=DicomAssociationEnd.RELEASED,
            started_at=started, ended_at=started + dt.timedelta(seconds=2), instances_stored=3, tls=True))
        with database.engine.begin() as connection:
            row = connection.execute(text(
                "SELECT id, calling_ae, ended_by, instances_stored, instances_refused, tls, acceptor_host, acceptor_pid"
                " FROM dicom_association")).one()
        assert tuple(row) == (recorded, "MODALITY", "released", 3, 0, True, "gw-1", 42)
        _downgrade_to(database, "0013")
        with database.engine.begin() as connection:
            tables = set(inspect(connection).get_table_names())
            assert "dicom_association" not in tables and {"patient", "study", "series"} <= tables
            assert connection.execute(text("SELECT count(*) FROM series")).scalar_one() == 1
        upgrade(database)  # and forward again
    finally:
        database.dispose()
