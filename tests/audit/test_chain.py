"""The hash chain detects edits, deletions, reordering and truncation (SQLite and PostgreSQL);
the HMAC key and the anchor file detect what a consistent re-hash or removal would hide."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import JSON, Integer, String, column, delete, event, insert, select, table, update

from audit.anchor import (
    AnchorFile,
    AnchorFileError,
    AnchorOptions,
    AuditKeyError,
    ChainAnchor,
    load_signer,
    read_head,
    verify_anchored,
)
from audit.builders import application_activity
from audit.events import AuditSource
from audit.models import GENESIS_HASH, AuditChainHead, AuditRecord
from audit.store import (
    HASH_HMAC_SHA256,
    HASH_LEGACY,
    HASH_SHA256,
    AuditSigner,
    ChainVerification,
    Checkpoint,
    append,
    append_many,
    record_hash,
    record_payload,
    signer_session_info,
    verify_chain,
)
from storage.db import Database
from storage.migrate import _config, upgrade
from storage.models import UTCDateTime
from tests.audit.attacker import drop_guards_on

SOURCE = AuditSource("PNEUMO@test")


def _write(database: Database, n: int) -> None:
    for i in range(n):
        with database.session() as session:
            when = dt.datetime.now(dt.UTC)
            event = application_activity(SOURCE, started=i % 2 == 0, process_name="t", host="127.0.0.1", when=when)
            append(session, event)


def _upgrade_to(database: Database, revision: str) -> None:
    config = _config(database)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _verify(database: Database) -> ChainVerification:
    with database.read_session() as session:
        return verify_chain(session)


def test_intact_chain_verifies(database: Database) -> None:
    _write(database, 5)
    result = _verify(database)
    assert result.ok and result.records == 5


@pytest.mark.parametrize("keyed", [False, True])
def test_a_batch_is_sealed_like_single_appends(database: Database, keyed: bool) -> None:
    """append_many (the FHIR access records) makes the same chain as append, keyed or not."""
    writer = _keyed(database) if keyed else database
    _write(writer, 2)
    when = dt.datetime.now(dt.UTC)
    batch = [application_activity(SOURCE, started=True, process_name=f"b{i}", host="h", when=when) for i in range(50)]
    with writer.session() as session:
        assert append_many(session, batch) == 52
        assert append_many(session, []) == 0
    _write(writer, 1)
    with writer.read_session() as session:
        result = verify_chain(session, signer=AuditSigner(KEY) if keyed else None)
        versions = set(session.execute(select(AuditRecord.hash_version)).scalars())
    assert result.ok and result.records == 53
    assert versions == {HASH_HMAC_SHA256 if keyed else HASH_SHA256}
    if keyed:
        writer.dispose()


def test_edit_is_detected(database: Database) -> None:
    _write(database, 5)
    drop_guards_on(database.engine)  # the attacker owns the tables (migration 0011 refuses others)
    with database.session() as session:
        record = session.get(AuditRecord, 3)
        assert record is not None
        record.event = {**record.event, "outcome": 8}
    result = _verify(database)
    assert not result.ok and result.first_bad_seq == 3


def test_deletion_is_detected(database: Database) -> None:
    _write(database, 5)
    drop_guards_on(database.engine)
    with database.session() as session:
        session.execute(delete(AuditRecord).where(AuditRecord.seq == 2))
    result = _verify(database)
    assert not result.ok and result.first_bad_seq == 2


def test_reordering_is_detected(database: Database) -> None:
    _write(database, 4)
    drop_guards_on(database.engine)
    with database.session() as session:
        a, b = session.get(AuditRecord, 2), session.get(AuditRecord, 3)
        assert a is not None and b is not None
        a_event, b_event = a.event, b.event
        session.execute(update(AuditRecord).where(AuditRecord.seq == 2).values(event=b_event))
        session.execute(update(AuditRecord).where(AuditRecord.seq == 3).values(event=a_event))
    assert not _verify(database).ok


def test_truncation_is_detected(database: Database) -> None:
    _write(database, 4)
    drop_guards_on(database.engine)
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


# --- every column is covered; a key and an anchor outside the database --------------------------

KEY = b"k" * 32


def _keyed(database: Database, key: bytes = KEY) -> Database:
    """A second Database on the same URL whose sessions seal audit records with *key*."""
    return Database(str(database.url.render_as_string(hide_password=False)),
                    session_info=signer_session_info(AuditSigner(key)))


def test_editing_the_event_id_column_is_detected(database: Database) -> None:
    _write(database, 4)
    drop_guards_on(database.engine)
    with database.session() as session:
        session.execute(update(AuditRecord).where(AuditRecord.seq == 2).values(event_id="110113"))
    result = _verify(database)
    assert not result.ok and result.first_bad_seq == 2


def test_editing_the_outcome_column_alone_is_detected(database: Database) -> None:
    _write(database, 4)
    drop_guards_on(database.engine)
    with database.session() as session:
        session.execute(update(AuditRecord).where(AuditRecord.seq == 3).values(outcome=12))
    result = _verify(database)
    assert not result.ok and result.first_bad_seq == 3


def _rehash_from(database: Database, seq: int, *, version: int) -> None:
    """The attacker without the key: edit record *seq*, recompute SHA-256 hashes from there on."""
    drop_guards_on(database.engine)
    with database.session() as session:
        rows = session.execute(select(AuditRecord).where(AuditRecord.seq >= seq).order_by(AuditRecord.seq)).scalars().all()
        prev = rows[0].prev_hash
        for row in rows:
            if row.seq == seq:
                row.event = {**row.event, "outcome_description": "nothing happened"}
            row.prev_hash = prev
            row.hash_version = version
            stamp = row.recorded_at.astimezone(dt.UTC).isoformat()
            payload = record_payload(version, row.seq, prev, stamp, row.event_id, row.outcome, row.event)
            row.hash = hashlib.sha256(payload).hexdigest()
            prev = row.hash
        head = session.get(AuditChainHead, 1)
        assert head is not None
        head.last_hash = prev


def test_unkeyed_rehash_passes_the_plain_chain_but_not_an_anchor(database: Database) -> None:
    """Why the anchor exists: without a key, a consistent re-hash fools the chain alone."""
    _write(database, 6)
    with database.read_session() as session:
        pin = Checkpoint(*read_head(session))
    _rehash_from(database, 3, version=HASH_SHA256)
    assert _verify(database).ok
    with database.read_session() as session:
        result = verify_chain(session, checkpoints=[Checkpoint(1, _hash_of(database, 1)), pin])
    assert not result.ok and result.first_bad_seq == 2 and "rewritten" in (result.problem or "")


def _hash_of(database: Database, seq: int) -> str:
    with database.read_session() as session:
        return session.execute(select(AuditRecord.hash).where(AuditRecord.seq == seq)).scalar_one()


def test_keyed_chain_detects_a_rehash_without_the_key(database: Database) -> None:
    keyed = _keyed(database)
    try:
        _write(keyed, 5)
        signer = AuditSigner(KEY)
        with keyed.read_session() as session:
            ok = verify_chain(session, signer=signer)
        assert ok.ok and ok.keyed_from_seq == 1
        for version in (HASH_HMAC_SHA256, HASH_SHA256):  # forged "HMAC" rows, then a downgrade
            _rehash_from(database, 3, version=version)
            with keyed.read_session() as session:
                result = verify_chain(session, signer=signer)
            assert not result.ok and result.first_bad_seq == 3, result
        with keyed.read_session() as session:  # the wrong key fails at once
            assert verify_chain(session, signer=AuditSigner(b"x" * 32)).first_bad_seq == 1
            assert "hmac_key_file" in (verify_chain(session).problem or "")  # no key: cannot verify
    finally:
        keyed.dispose()


def test_unkeyed_records_after_keyed_ones_are_a_downgrade(database: Database) -> None:
    keyed = _keyed(database)
    try:
        _write(keyed, 2)
        _write(database, 1)  # a process that lost its key
        with keyed.read_session() as session:
            result = verify_chain(session, signer=AuditSigner(KEY))
        assert not result.ok and result.first_bad_seq == 3 and "went down" in (result.problem or "")
    finally:
        keyed.dispose()


def test_anchor_detects_truncation_and_a_wiped_table(database: Database, tmp_path: Path) -> None:
    anchor = AnchorFile(tmp_path / "anchor.log")
    _write(database, 12)
    with database.read_session() as session:
        seq, digest = read_head(session)
    anchor.append(seq, digest, keyed=False)
    with database.read_session() as session:
        assert verify_anchored(session, AuditSigner(), anchor).ok
    drop_guards_on(database.engine)
    with database.session() as session:  # remove the last 10, move the head back
        session.execute(delete(AuditRecord).where(AuditRecord.seq > 2))
        session.execute(update(AuditChainHead).values(last_seq=2, last_hash=session.get(AuditRecord, 2).hash))  # type: ignore[union-attr]
    with database.read_session() as session:
        assert verify_chain(session).ok  # the chain alone cannot tell
        result = verify_anchored(session, AuditSigner(), anchor)
    assert not result.ok and result.first_bad_seq == 3 and result.anchored_seq == 12
    with database.session() as session:  # wipe everything, reset the head
        session.execute(delete(AuditRecord))
        session.execute(update(AuditChainHead).values(last_seq=0, last_hash=GENESIS_HASH))
    with database.read_session() as session:
        result = verify_anchored(session, AuditSigner(), anchor)
    assert not result.ok and result.first_bad_seq == 1 and result.records == 0


def test_missing_anchor_file_fails_once_pneumo_serve_has_started(database: Database, tmp_path: Path) -> None:
    anchor = AnchorFile(tmp_path / "absent.log")
    with database.read_session() as session:
        assert verify_anchored(session, AuditSigner(), anchor).ok  # a new, empty log
    _write(database, 2)  # records of other processes (a new install's `db upgrade`): no anchor yet
    with database.read_session() as session:
        result = verify_anchored(session, AuditSigner(), anchor)
    assert result.ok and result.records == 2 and result.anchored_seq is None
    with database.session() as session:  # `pneumo serve` checkpoints from its start on
        append(session, application_activity(SOURCE, started=True, process_name="pneumo serve", host="127.0.0.1",
                                              when=dt.datetime.now(dt.UTC)))
    with database.read_session() as session:
        result = verify_anchored(session, AuditSigner(), anchor)
    assert not result.ok and "missing" in (result.problem or "")
    anchor.path.write_text("")
    with database.read_session() as session:
        result = verify_anchored(session, AuditSigner(), anchor)
    assert not result.ok and "no checkpoints" in (result.problem or "")


def test_anchor_file_ignores_a_torn_last_line_but_not_a_bad_middle_one(tmp_path: Path) -> None:
    anchor = AnchorFile(tmp_path / "anchor.log")
    anchor.append(1, "a" * 64, keyed=False)
    anchor.append(5, "b" * 64, keyed=True)
    with anchor.path.open("a") as handle:
        handle.write('{"seq": 9, "ha')
    assert [c.seq for c in anchor.read()] == [1, 5]
    anchor.path.write_text('junk\n{"seq": 1, "hash": "x"}\n')
    with pytest.raises(AnchorFileError):
        anchor.read()


def test_chain_anchor_checkpoints_every_n_records_and_at_stop(database: Database, tmp_path: Path) -> None:
    anchor = AnchorFile(tmp_path / "anchor.log")
    chain_anchor = ChainAnchor(database, anchor, AuditSigner(), AnchorOptions(every=5, interval_seconds=3600))
    _write(database, 1)
    chain_anchor.start()
    _write(database, 4)
    assert chain_anchor.checkpoint() is None  # 4 new records: not yet due
    _write(database, 1)
    assert chain_anchor.checkpoint() == anchor.newest()
    _write(database, 2)
    chain_anchor.stop()
    assert [c.seq for c in anchor.read()] == [1, 6, 8]


def test_key_file_errors_name_the_file_not_the_key(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("secret-but-short\n")
    with pytest.raises(AuditKeyError) as raised:
        load_signer(short)
    assert "short.key" in str(raised.value) and "secret" not in str(raised.value)
    with pytest.raises(AuditKeyError):
        load_signer(tmp_path / "absent.key")
    good = tmp_path / "good.key"
    good.write_text("0123456789abcdef" * 4 + "\n")
    good.chmod(0o600)
    signer = load_signer(good)
    assert signer.keyed and "0123" not in repr(signer)


def test_rotated_hmac_key_verifies_old_records_with_the_retired_key(database: Database, tmp_path: Path) -> None:
    """Key rotation: records of the old key, then of the new one; verification needs both keys,
    in that order, and a record sealed with the retired key after the rotation is reported (a
    leaked old key cannot forge new records)."""
    old, new = b"o" * 32, b"n" * 32
    for key, count in ((old, 3), (new, 2)):
        keyed = _keyed(database, key)
        try:
            _write(keyed, count)
        finally:
            keyed.dispose()
    with database.read_session() as session:
        rotated = verify_chain(session, signer=AuditSigner(new, [old]))
        assert rotated.ok and rotated.records == 5 and rotated.keyed_from_seq == 1
        without_old = verify_chain(session, signer=AuditSigner(new))
        assert not without_old.ok and without_old.first_bad_seq == 1
        assert not verify_chain(session, signer=AuditSigner(old, [new])).ok  # keys given in the wrong order

    forger = _keyed(database, old)  # the retired key leaked: a record sealed with it after the rotation
    try:
        _write(forger, 1)
    finally:
        forger.dispose()
    with database.read_session() as session:
        forged = verify_chain(session, signer=AuditSigner(new, [old]))
    assert not forged.ok and forged.first_bad_seq == 6 and "older HMAC key" in (forged.problem or "")

    files = []
    for name, key in (("old.key", old), ("new.key", new)):
        path = tmp_path / name
        path.write_bytes(key)
        path.chmod(0o600)
        files.append(path)
    assert load_signer(files[1], [files[0]]).keyed
    with pytest.raises(AuditKeyError, match="needs audit.hmac_key_file"):
        load_signer(None, [files[0]])


_LEGACY_RECORD = table(
    "audit_record",
    column("seq", Integer), column("recorded_at", UTCDateTime()), column("event_id", String),
    column("outcome", Integer), column("event", JSON), column("prev_hash", String), column("hash", String),
)


def test_records_written_before_the_upgrade_still_verify(database_url: str) -> None:
    """Migration 0007 keeps old records as hash version 1; new ones follow as version 2."""
    database = Database(database_url)
    try:
        _upgrade_to(database, "0006")
        when = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
        event = application_activity(SOURCE, started=True, process_name="t", host=None, when=when).to_dict()
        digest = record_hash(1, GENESIS_HASH, when.isoformat(), event)
        with database.engine.begin() as connection:
            connection.execute(
                insert(_LEGACY_RECORD).values(
                    seq=1, recorded_at=when, event_id="110100", outcome=0, event=event, prev_hash=GENESIS_HASH,
                    hash=digest,
                )
            )
            connection.execute(update(AuditChainHead).values(last_seq=1, last_hash=digest))
        upgrade(database)
        _write(database, 1)
        with database.read_session() as session:
            versions = session.execute(select(AuditRecord.hash_version).order_by(AuditRecord.seq)).scalars().all()
        assert versions == [HASH_LEGACY, HASH_SHA256]
        assert _verify(database).ok
        drop_guards_on(database.engine)
        with database.session() as session:  # the outcome column of an old record is still covered
            session.execute(update(AuditRecord).where(AuditRecord.seq == 1).values(outcome=8))
        assert _verify(database).first_bad_seq == 1
    finally:
        database.dispose()


def test_verify_reads_one_snapshot_while_the_gateway_appends(database: Database) -> None:
    """A record appended while verification runs (after it read the head, before it read the
    records) is neither a false alarm nor counted: the head and the records come from one snapshot
    (PostgreSQL: REPEATABLE READ; under READ COMMITTED the new record looked like tampering)."""
    _write(database, 5)
    appended = threading.Event()

    def append_meanwhile(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if not appended.is_set() and "FROM audit_record" in statement:
            appended.set()
            _write(database, 1)  # its own connection and transaction, committed before our read

    event.listen(database.read_engine, "before_cursor_execute", append_meanwhile)
    try:
        with database.read_session() as session:
            result = verify_chain(session)
    finally:
        event.remove(database.read_engine, "before_cursor_execute", append_meanwhile)
    assert appended.is_set()
    assert result.ok and result.records == 5
    with database.read_session() as session:
        assert verify_chain(session).records == 6
