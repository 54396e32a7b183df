"""The console's per-minute counts and DICOM peer activity (storage/throughput.py) on SQLite and
PostgreSQL, and migration 0015's indexes matching the models' (both ways: up and down)."""

from __future__ import annotations

import datetime as dt

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.schema import CreateIndex

from storage.db import Database
from storage.migrate import _config, upgrade
from storage.models import (
    Base,
    DeliveryAttempt,
    DicomAssociation,
    InferenceResult,
    Instance,
    Job,
    Patient,
    Series,
    Study,
)
from storage.throughput import MAX_MINUTES, MinuteCounts, dicom_peers, throughput

NOW = dt.datetime(2026, 12, 1, 12, 0, 30, tzinfo=dt.UTC)  # half a minute into 12:00


def at(minute: int, second: float = 0) -> dt.datetime:
    """*second* seconds into the minute *minute* minutes after 12:00 (negative: before)."""
    return dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC) + dt.timedelta(minutes=minute, seconds=second)


def _seed(database: Database) -> None:
    with database.session() as session:
        patient = Patient(patient_id="P", issuer="")
        session.add(patient)
        session.flush()
        study = Study(study_instance_uid="1.2", patient_pk=patient.id)
        session.add(study)
        session.flush()
        series = Series(series_instance_uid="1.2.1", study_pk=study.id, modality="CR")
        session.add(series)
        session.flush()
        # (minute, second, origin): the window is 11:58 .. 12:00 for minutes=3
        received = [(-3, 59.999, "received"), (-2, 0, "received"), (-2, 30, "received"), (-2, 59.9, "generated"),
                    (0, 10, "received"), (0, 40, "received"), (1, 0, "received")]
        instances = []
        for n, (minute, second, origin) in enumerate(received):
            instance = Instance(sop_instance_uid=f"1.2.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                series_pk=series.id, transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"p{n}", size=1,
                                sha256="0" * 64, origin=origin, received_at=at(minute, second))
            session.add(instance)
            instances.append(instance)
        session.flush()
        for n, (minute, status) in enumerate([(-2, "ok"), (-2, "not-applicable"), (-1, "failed"), (-1, "ok"),
                                              (0, "ok"), (-5, "ok")]):
            session.add(InferenceResult(instance_pk=instances[0].id, model_id="m", model_version=str(n), status=status,
                                        created_at=at(minute, 5)))
        job = Job(kind="deliver", dedup_key="deliver:dicom:PACS:x", payload={})
        session.add(job)
        session.flush()
        for n, (minute, outcome) in enumerate([(-2, "delivered"), (-2, "failed"), (0, "delivered"), (0, "delivered")]):
            session.add(DeliveryAttempt(job_pk=job.id, attempt=n + 1, channel="dicom", destination="PACS", subject="x",
                                        started_at=at(minute, 1), finished_at=at(minute, 2), outcome=outcome))


def test_counts_per_minute_oldest_first_with_every_minute_present(database: Database) -> None:
    _seed(database)
    with database.read_session() as session:
        counts = throughput(session, NOW, minutes=3)
        wider = throughput(session, NOW, minutes=10)
    assert counts == [
        MinuteCounts(at(-2), received=2, analysed=1, not_analysed=1, delivered=1),
        MinuteCounts(at(-1), received=0, analysed=1, not_analysed=1, delivered=0),
        MinuteCounts(at(0), received=2, analysed=1, not_analysed=0, delivered=2),
    ]
    assert len(wider) == 10 and wider[0].minute == at(-9) and wider[-1].minute == at(0)
    assert sum(m.received for m in wider) == 5 and sum(m.analysed for m in wider) == 4
    assert all(m.minute.tzinfo is not None for m in wider)


def test_an_empty_window_is_all_zeros(database: Database) -> None:
    with database.read_session() as session:
        counts = throughput(session, NOW)
    assert len(counts) == 60 and counts[-1] == MinuteCounts(at(0)) and counts[0] == MinuteCounts(at(-59))


@pytest.mark.parametrize("minutes", [0, MAX_MINUTES + 1])
def test_window_bounds(database: Database, minutes: int) -> None:
    with database.read_session() as session, pytest.raises(ValueError):
        throughput(session, NOW, minutes=minutes)


def _association(calling: str, ended: dt.datetime, stored: int, refused: int, address: str) -> DicomAssociation:
    return DicomAssociation(calling_ae=calling, called_ae="PNEUMO", peer_address=address, ended_by="released",
                            started_at=ended - dt.timedelta(seconds=3), ended_at=ended, instances_stored=stored,
                            instances_refused=refused, tls=False, acceptor_host="h", acceptor_pid=1)


def test_dicom_peers(database: Database) -> None:
    hours = dt.timedelta(hours=1)
    with database.session() as session:
        session.add_all([
            _association("MODALITY", NOW - 30 * hours, 9, 2, "10.0.0.1"),  # outside the day: only last_refused
            _association("MODALITY", NOW - 2 * hours, 3, 0, "10.0.0.2"),
            _association("MODALITY", NOW - 1 * hours, 4, 1, "10.0.0.3"),
            _association("ROUTER", NOW - 5 * hours, 10, 0, "10.0.1.1"),
            _association("OLD", NOW - 40 * 24 * hours, 1, 0, "10.0.2.1"),  # beyond the lookback
            _association("FUTURE", NOW + hours, 1, 0, "10.0.3.1"),  # after *now*: not counted
        ])
    with database.read_session() as session:
        peers = dicom_peers(session, NOW)
    assert [(p.calling_ae, p.associations_24h, p.instances_stored_24h, p.instances_refused_24h) for p in peers] == [
        ("MODALITY", 2, 7, 1), ("ROUTER", 1, 10, 0),
    ]
    modality, router = peers
    assert (modality.last_association_at, modality.last_peer_address, modality.last_refused_at) == (
        NOW - hours, "10.0.0.3", NOW - hours)
    assert (router.last_refused_at, router.last_peer_address) == (None, "10.0.1.1")


CONSOLE_INDEXES = {
    "study": "ix_study_created_at_id",
    "job": "ix_job_delivery_subject",
    "delivery_attempt": "ix_delivery_attempt_finished_at",
}


def _indexes(database: Database, table: str) -> dict[str, str]:
    """Index name -> its definition as the database keeps it (reflection skips expression indexes)."""
    query = (
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t AND sql IS NOT NULL"
        if database.is_sqlite
        else "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t AND schemaname = current_schema()"
    )
    with database.engine.connect() as connection:
        return {str(name): str(sql) for name, sql in connection.execute(text(query), {"t": table})}


def _index_names(database: Database, table: str) -> set[str]:
    return set(_indexes(database, table))


def test_migration_0015_creates_the_models_indexes_and_drops_them(database: Database) -> None:
    for table, name in CONSOLE_INDEXES.items():
        declared = {index.name for index in Base.metadata.tables[table].indexes}
        assert name in declared
        assert name in _index_names(database, table), table
        if database.is_sqlite:  # the migration spells the index exactly as the model (and the queries) do
            index = next(i for i in Base.metadata.tables[table].indexes if i.name == name)
            ddl = str(CreateIndex(index).compile(dialect=database.engine.dialect)).strip()
            assert _indexes(database, table)[name] == ddl
    with database.engine.begin() as connection:
        config = _config(database)
        config.attributes["connection"] = connection
        command.downgrade(config, "0014")
    for table, name in CONSOLE_INDEXES.items():
        assert name not in _index_names(database, table)
    upgrade(database)  # and forward again
    assert all(name in _index_names(database, table) for table, name in CONSOLE_INDEXES.items())
