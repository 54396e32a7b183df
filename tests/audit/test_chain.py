"""The hash chain detects edits, deletions, reordering and truncation (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import delete, select, update

from audit.builders import application_activity
from audit.events import AuditSource
from audit.models import AuditChainHead, AuditRecord
from audit.store import ChainVerification, append, verify_chain
from storage.db import Database

SOURCE = AuditSource("PNEUMO@test")


def _write(database: Database, n: int) -> None:
    for i in range(n):
        with database.session() as session:
            when = dt.datetime.now(dt.UTC)
            event = application_activity(SOURCE, started=i % 2 == 0, process_name="t", host="127.0.0.1", when=when)
            append(session, event)


def _verify(database: Database) -> ChainVerification:
    with database.read_session() as session:
        return verify_chain(session)


def test_intact_chain_verifies(database: Database) -> None:
    _write(database, 5)
    result = _verify(database)
    assert result.ok and result.records == 5


def test_edit_is_detected(database: Database) -> None:
    _write(database, 5)
    with database.session() as session:
        record = session.get(AuditRecord, 3)
        assert record is not None
        record.event = {**record.event, "outcome": 8}
    result = _verify(database)
    assert not result.ok and result.first_bad_seq == 3


def test_deletion_is_detected(database: Database) -> None:
    _write(database, 5)
    with database.session() as session:
        session.execute(delete(AuditRecord).where(AuditRecord.seq == 2))
    result = _verify(database)
    assert not result.ok and result.first_bad_seq == 2


def test_reordering_is_detected(database: Database) -> None:
    _write(database, 4)
    with database.session() as session:
        a, b = session.get(AuditRecord, 2), session.get(AuditRecord, 3)
        assert a is not None and b is not None
        a_event, b_event = a.event, b.event
        session.execute(update(AuditRecord).where(AuditRecord.seq == 2).values(event=b_event))
        session.execute(update(AuditRecord).where(AuditRecord.seq == 3).values(event=a_event))
    assert not _verify(database).ok


def test_truncation_is_detected(database: Database) -> None:
    _write(database, 4)
    with database.session() as session:
        session.execute(delete(AuditRecord).where(AuditRecord.seq == 4))
    result = _verify(database)
    assert not result.ok and "removed" in (result.problem or "")


def test_rolled_back_action_leaves_no_record(database: Database) -> None:
    try:
        with database.session() as session:
            append(session, application_activity(SOURCE, started=True, process_name="t", host=None, when=dt.datetime.now(dt.UTC)))
            raise RuntimeError("the action failed")
    except RuntimeError:
        pass
    assert _verify(database).records == 0


def test_concurrent_writers_keep_a_strict_chain(database: Database) -> None:
    threads = [threading.Thread(target=_write, args=(database, 10)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    result = _verify(database)
    assert result.ok and result.records == 60
    with database.read_session() as session:
        assert session.execute(select(AuditChainHead.last_seq)).scalar_one() == 60
