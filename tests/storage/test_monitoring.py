"""The drift window's query (storage/monitoring.py), SQLite and PostgreSQL; migration 0013 is in test_migrations.py."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from storage.db import Database
from storage.index import add_instance
from storage.metadata import extract_metadata
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
