"""ATNA forwarding end to end: records appended to a real database (SQLite and PostgreSQL) reach a
real syslog-over-TLS receiver (mutual TLS with the development PKI) in order, as RFC 5424 messages
carrying the PS3.15 XML; nothing is lost while the receiver is down; a restart resumes from the
cursor; an untrusted repository or a refused client certificate gets nothing."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from audit.builders import application_activity, security_alert
from audit.dicom_xml import audit_message
from audit.events import AuditSource, Code, Outcome
from audit.forward_cursor import ForwardCursor
from audit.forwarder import AuditForwarder, build_forwarder
from audit.models import AuditRecord
from audit.store import append
from conf.dev_pki import DevPki, make_dev_pki
from conf.settings import AuditSyslogSettings
from conf.tls import TlsSettings
from storage.db import Database
from storage.migrate import upgrade
from tests.audit.syslog_receiver import SyslogMessage, TlsSyslogReceiver, free_port
from tests.conftest import wait_until

SOURCE = AuditSource("PNEUMO@test")
ALERT_TYPE = Code("110126", "DCM", "Node Authentication")


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return make_dev_pki(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path: Path) -> DevPki:
    """A second, unrelated CA: certificates our side must not trust, and vice versa."""
    return make_dev_pki(tmp_path / "other-pki")


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'pneumo.db'}")
    upgrade(db)
    yield db
    db.dispose()


def _settings(pki: DevPki, port: int, **overrides: Any) -> AuditSyslogSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": port,
        "tls": TlsSettings(cert_file=pki.client_cert, key_file=pki.client_key, ca_file=pki.ca_cert),
        "hostname": "gw.test",
        "poll_interval_seconds": 0.05,
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "connect_timeout_seconds": 5,
        "batch_size": 3,
        **overrides,
    }
    return AuditSyslogSettings.model_validate(values)


def _append(database: Database, count: int) -> None:
    """Every third record a failed Security Alert (severity warning), the others Application Activity."""
    for i in range(count):
        when = dt.datetime.now(dt.UTC)
        if i % 3 == 2:
            event = security_alert(
                SOURCE, event_type=ALERT_TYPE, reporter_ae="PNEUMO", offender_id="EVIL", offender_host="192.0.2.7",
                description="unknown calling AE title", when=when, outcome=Outcome.MINOR_FAILURE,
            )
        else:
            event = application_activity(SOURCE, started=i % 2 == 0, process_name="test", host="127.0.0.1", when=when)
        with database.session() as session:
            append(session, event)


def _records(database: Database) -> list[AuditRecord]:
    with database.read_session() as session:
        return list(session.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars())


def _receiver(pki: DevPki, port: int = 0, *, ca: Path | None = None) -> TlsSyslogReceiver:
    return TlsSyslogReceiver(pki.server_cert, pki.server_key, ca or pki.ca_cert, port=port).start()


@contextlib.contextmanager
def _forwarding(settings: AuditSyslogSettings, database: Database, cursor: Path) -> Iterator[AuditForwarder]:
    forwarder = build_forwarder(settings, database, cursor)
    forwarder.start()
    try:
        yield forwarder
    finally:
        forwarder.stop()


def _assert_delivered(messages: list[SyslogMessage], records: list[AuditRecord]) -> None:
    """Message i is record i: the same XML the renderer makes for it, with a valid ITI-20 header."""
    assert len(messages) == len(records)
    for message, record in zip(messages, records, strict=True):
        assert message.msg == audit_message(record.event, record.recorded_at), f"record {record.seq} out of order"
        assert ET.fromstring(message.msg).tag.endswith("AuditMessage")
        assert (message.facility, message.severity) == (10, 5 if record.outcome == 0 else 4)
        assert message.version == 1
        assert message.timestamp == record.recorded_at
        assert (message.hostname, message.app_name, message.procid) == ("gw.test", "pneumo-gateway", str(os.getpid()))
        assert message.msgid == "IHE+RFC-3881"
        assert message.structured_data == "-"


def test_records_arrive_in_order_as_rfc5424_with_the_xml(database: Database, pki: DevPki, tmp_path: Path) -> None:
    receiver = _receiver(pki)
    cursor = tmp_path / "audit-forward.cursor"
    try:
        _append(database, 5)  # a backlog from before forwarding was turned on ...
        with _forwarding(_settings(pki, receiver.port), database, cursor) as forwarder:
            receiver.wait_for(5)
            _append(database, 4)  # ... and records appended while it runs
            receiver.wait_for(9)
            wait_until(lambda: forwarder.status().lag == 0, 10, "lag 0")
        records = _records(database)
        _assert_delivered(receiver.messages, records)
        assert ForwardCursor(cursor).read() == records[-1].seq == 9
        assert receiver.client_subjects and set(receiver.client_subjects) == {"pneumo-dev-client"}  # mutual TLS
        assert json.loads(cursor.read_text())["seq"] == 9
    finally:
        receiver.stop()


def test_records_wait_while_the_repository_is_down_and_all_arrive_in_order(
    database: Database, pki: DevPki, tmp_path: Path
) -> None:
    port = free_port()
    cursor = tmp_path / "audit-forward.cursor"
    _append(database, 4)
    with _forwarding(_settings(pki, port), database, cursor) as forwarder:
        wait_until(lambda: forwarder.status().last_error, 10, "a failed connection attempt")
        _append(database, 3)
        wait_until(lambda: forwarder.status().lag == 7, 10, "lag 7 while down")
        assert ForwardCursor(cursor).read() == 0 and not forwarder.status().connected

        first = _receiver(pki, port)  # the repository comes up
        try:
            first.wait_for(7)
            wait_until(lambda: ForwardCursor(cursor).read() == 7, 10, "cursor at 7")
        finally:
            first.stop()  # ... and goes down again while connected
        _append(database, 2)
        wait_until(lambda: forwarder.status().last_error and not forwarder.status().connected, 10, "noticed down")
        assert ForwardCursor(cursor).read() == 7

        second = _receiver(pki, port)
        try:
            second.wait_for(2)
            wait_until(lambda: forwarder.status().lag == 0, 10, "caught up")
        finally:
            second.stop()
    records = _records(database)
    _assert_delivered(first.messages, records[:7])
    _assert_delivered(second.messages, records[7:])


def test_a_restarted_forwarder_resumes_from_the_cursor(database: Database, pki: DevPki, tmp_path: Path) -> None:
    receiver = _receiver(pki)
    cursor = tmp_path / "audit-forward.cursor"
    settings = _settings(pki, receiver.port)
    try:
        _append(database, 4)
        with _forwarding(settings, database, cursor):
            receiver.wait_for(4)
        _append(database, 2)  # written while no forwarder runs
        assert ForwardCursor(cursor).read() == 4
        with _forwarding(settings, database, cursor) as again:
            receiver.wait_for(6)
            wait_until(lambda: again.status().lag == 0, 10, "caught up")
        _assert_delivered(receiver.messages, _records(database))  # exactly 6: nothing twice, nothing skipped
    finally:
        receiver.stop()


def test_an_untrusted_repository_gets_nothing(
    sqlite_database: Database, pki: DevPki, other_pki: DevPki, tmp_path: Path
) -> None:
    """The repository's certificate is not signed by our ca_file: the handshake fails, nothing is sent."""
    impostor = _receiver(other_pki, ca=pki.ca_cert)  # would accept our client certificate
    cursor = tmp_path / "audit-forward.cursor"
    try:
        _append(sqlite_database, 3)
        with _forwarding(_settings(pki, impostor.port), sqlite_database, cursor) as forwarder:
            error = wait_until(lambda: forwarder.status().last_error, 10, "a refused handshake")
            impostor.wait_for_error()
            assert "CERTIFICATE_VERIFY_FAILED" in error
            assert forwarder.status().lag == 3
        assert impostor.messages == [] and impostor.connections == 0
        assert ForwardCursor(cursor).read() == 0
    finally:
        impostor.stop()


@pytest.mark.parametrize("client_cert", ["untrusted", "none"])
def test_a_repository_that_refuses_our_certificate_gets_nothing(
    sqlite_database: Database, pki: DevPki, other_pki: DevPki, tmp_path: Path, client_cert: str
) -> None:
    """Mutual TLS: the repository checks our client certificate. On TLS 1.3 its verdict comes after
    our handshake ended; the forwarder must not count frames written into that refused connection."""
    strict = _receiver(pki, ca=other_pki.ca_cert)  # trusts only the other CA's clients
    cursor = tmp_path / "audit-forward.cursor"
    tls = (
        TlsSettings(cert_file=pki.client_cert, key_file=pki.client_key, ca_file=pki.ca_cert)
        if client_cert == "untrusted"
        else TlsSettings(ca_file=pki.ca_cert)
    )
    try:
        _append(sqlite_database, 3)
        with _forwarding(_settings(pki, strict.port, tls=tls), sqlite_database, cursor) as forwarder:
            strict.wait_for_error()
            wait_until(lambda: forwarder.status().last_error, 10, "a refused connection")
            assert forwarder.status().lag == 3 and not forwarder.status().connected
        assert strict.messages == []
        assert ForwardCursor(cursor).read() == 0
    finally:
        strict.stop()


def test_start_at_newest_skips_the_existing_log(sqlite_database: Database, pki: DevPki, tmp_path: Path) -> None:
    receiver = _receiver(pki)
    cursor = tmp_path / "audit-forward.cursor"
    try:
        _append(sqlite_database, 3)
        with _forwarding(_settings(pki, receiver.port, start_at="newest"), sqlite_database, cursor) as forwarder:
            wait_until(lambda: ForwardCursor(cursor).read() == 3, 10, "cursor created at the head")
            _append(sqlite_database, 2)
            receiver.wait_for(2)
            wait_until(lambda: forwarder.status().lag == 0, 10, "caught up")
        _assert_delivered(receiver.messages, _records(sqlite_database)[3:])
    finally:
        receiver.stop()


def test_a_cursor_past_the_head_moves_back_to_it(sqlite_database: Database, pki: DevPki, tmp_path: Path) -> None:
    """The database was restored from an older backup: new records must still be forwarded."""
    receiver = _receiver(pki)
    cursor = tmp_path / "audit-forward.cursor"
    try:
        _append(sqlite_database, 2)
        ForwardCursor(cursor).write(50)
        with _forwarding(_settings(pki, receiver.port), sqlite_database, cursor) as forwarder:
            wait_until(lambda: ForwardCursor(cursor).read() == 2, 10, "cursor back at the head")
            _append(sqlite_database, 2)
            receiver.wait_for(2)
            wait_until(lambda: forwarder.status().lag == 0, 10, "caught up")
        _assert_delivered(receiver.messages, _records(sqlite_database)[2:])
    finally:
        receiver.stop()


def test_cursor_file_is_replaced_atomically(tmp_path: Path) -> None:
    cursor = ForwardCursor(tmp_path / "sub" / "audit-forward.cursor")
    assert cursor.read() is None
    cursor.write(12)
    cursor.write(13)
    assert cursor.read() == 13
    assert sorted(p.name for p in cursor.path.parent.iterdir()) == ["audit-forward.cursor"]  # no temporary left
