"""The drift window's query and migration 0013 (inference_result.input_stats), SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

from alembic import command
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import inspect, text

from storage.db import Database
from storage.index import add_instance
from storage.metadata import extract_metadata
from storage.migrate import _config, upgrade
from storage.models import InferenceResult
from storage.monitoring import WindowSample, recent_results

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _image(session: Any) -> int:
    ds = Dataset()
    ds.PatientID, ds.PatientName = "P", "X^Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", generate_uid(), "CR"
    instance = add_instance(session, extract_metadata(ds), transfer_syntax_uid="1.2.840.10008.1.2.1",
                            relative_path="x", size=1, sha256="0" * 64, origin="received", calling_ae="T")
    return int(instance.id)


def _result(session: Any, *, minutes_ago: float, probability: float | None = 0.5, status: str = "ok",
            version: str = "1.1.0", stats: dict[str, float] | None = None) -> None:
    session.add(InferenceResult(
        instance_pk=_image(session), model_id="m", model_version=version, status=status, probability=probability,
        label="NORMAL", created_at=NOW - dt.timedelta(minutes=minutes_ago), input_stats=stats,
    ))


def test_recent_results_newest_first_of_one_model_version_only_analysed(database: Database) -> None:
    with database.session() as session:
        _result(session, minutes_ago=30, probability=0.1, stats={"mean": 0.4})
        _result(session, minutes_ago=20, probability=0.2, stats=None)  # made before 0013: no statistics
        _result(session, minutes_ago=10, probability=0.3, stats={"mean": 0.6, "std": 0.2})
        _result(session, minutes_ago=5, probability=None, status="not-applicable")
        _result(session, minutes_ago=4, probability=None, status="failed")
        _result(session, minutes_ago=3, probability=0.9, version="1.0.0", stats={"mean": 0.1})
    with database.read_session() as session:
        window = recent_results(session, "m", "1.1.0", 10)
        assert window == [
            WindowSample(0.3, {"mean": 0.6, "std": 0.2}), WindowSample(0.2, {}), WindowSample(0.1, {"mean": 0.4}),
        ]
        assert recent_results(session, "m", "1.1.0", 2) == window[:2]
        assert recent_results(session, "m", "1.1.0", 0) == []
        assert recent_results(session, "m", "1.0.0", 10) == [WindowSample(0.9, {"mean": 0.1})]
        assert recent_results(session, "other", "1.1.0", 10) == []


def _migrate(database: Database, revision: str, *, down: bool = False) -> None:
    config = _config(database)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def test_0013_adds_a_nullable_input_stats_column_and_back(database_url: str) -> None:
    """Existing results keep NULL statistics (the drift window reads them as none); new ones hold
    a JSON object; downgrading drops the column and keeps the rows."""
    database = Database(database_url)
    try:
        _migrate(database, "0012")
        now = "2026-12-01 06:00:00"
        with database.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO patient (id, patient_id, issuer, created_at, updated_at) VALUES (1, 'P', '', :n, :n)"), {"n": now})
            connection.execute(text(
                "INSERT INTO study (id, study_instance_uid, patient_pk, created_at, updated_at) VALUES (1, '1.2.3', 1, :n, :n)"),
                {"n": now})
            connection.execute(text(
                "INSERT INTO series (id, series_instance_uid, study_pk, created_at) VALUES (1, '1.2.3.4', 1, :n)"), {"n": now})
            connection.execute(text(
                "INSERT INTO instance (id, sop_instance_uid, sop_class_uid, series_pk, transfer_syntax_uid, path, size,"
                " sha256, origin, received_at, updated_at) VALUES (1, '1.2.3.4.5', '1.2', 1, '1.2.840.10008.1.2.1', 'p', 1,"
                " 'x', 'received', :n, :n)"), {"n": now})
            connection.execute(text(
                "INSERT INTO inference_result (id, instance_pk, model_id, model_version, status, probability, timings_ms,"
                " created_at) VALUES (1, 1, 'm', '1', 'ok', 0.25, '{}', :n)"), {"n": now})
        upgrade(database)
        with database.session() as session:
            old = session.get(InferenceResult, 1)
            assert old is not None and old.input_stats is None
            session.add(InferenceResult(id=2, instance_pk=1, model_id="m", model_version="1", status="ok", probability=0.75,
                                        source_revision=1, created_at=NOW, input_stats={"mean": 0.45, "std": 0.21}))
        with database.read_session() as session:
            assert recent_results(session, "m", "1", 10) == [
                WindowSample(0.75, {"mean": 0.45, "std": 0.21}), WindowSample(0.25, {}),
            ]
        _migrate(database, "0012", down=True)
        with database.engine.begin() as connection:
            assert connection.execute(text("SELECT count(*) FROM inference_result")).scalar_one() == 2
            columns = {c["name"] for c in inspect(connection).get_columns("inference_result")}
            assert "input_stats" not in columns
        upgrade(database)  # and forward again
    finally:
        database.dispose()
