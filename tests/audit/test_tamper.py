"""Tampering with the audit log of a real ``pneumo serve`` run is caught by ``pneumo audit verify``.

One real server (a child process, DCMTK storescu sending real files) writes the audit log; each
test copies its stopped data directory and attacks the copy's database the way someone with write
access to it would (the table owner: it first drops the append-only triggers of migration 0011),
with plain SQL, then runs ``pneumo audit verify`` as an operator does: it must
exit non-zero and name the first bad record. The attacks: edit the ``outcome`` or ``event_id``
column; delete the last 10 records and move the chain head back; edit one record and re-hash the
chain from there (caught by the HMAC key, and by the anchor checkpoints when there is no key);
wipe the table and reset the head.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from audit.store import HASH_HMAC_SHA256, HASH_SHA256, record_payload
from tests.audit.attacker import drop_guards, drop_guards_on
from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.gateway.serve_process import ServeProcess, pneumo, write_config

IMAGES = 12


@dataclass(frozen=True)
class ServedLog:
    """A stopped server's data directory, its config and how many audit records it wrote."""

    data_dir: Path
    key_file: Path | None
    records: int
    log: Path


def _store_images_and_stop(config: Path, root: Path) -> None:
    """Run `pneumo serve` on *config*, C-STORE IMAGES real CTs with DCMTK storescu, stop it cleanly."""
    files = [copy_with_new_uids(sample("CT_small.dcm"), root / "in") for _ in range(IMAGES)]
    server = ServeProcess(config, root / "serve.log").start()
    try:
        store = subprocess.run(
            [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port),
             *map(str, files)],
            capture_output=True, text=True, check=False,
        )
        assert store.returncode == 0, store.stderr
        assert server.terminate() == 0
    finally:
        server.kill()


def _serve_and_stop(root: Path, *, keyed: bool) -> ServedLog:
    key_file = None
    extra = ""
    if keyed:
        key_file = root / "audit.key"
        key_file.write_text(hashlib.sha256(b"test key").hexdigest() + "\n")
        key_file.chmod(0o600)
        extra = f'[audit]\nhmac_key_file = "{key_file}"\nanchor_every = 5\n'
    config = write_config(root / "pneumo.toml", root / "var", extra=extra)
    _store_images_and_stop(config, root)
    verify = pneumo(config, "audit", "verify")
    result = json.loads(verify.stdout)
    assert verify.returncode == 0 and result["ok"] is True, verify.stdout + verify.stderr
    assert result["records"] >= IMAGES + 2  # start, one per image, stop
    assert result["anchored_seq"] == result["records"]  # checkpointed at stop
    assert result["keyed_from_seq"] == (1 if keyed else None)
    return ServedLog(root / "var", key_file, result["records"], root / "serve.log")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedLog:
    return _serve_and_stop(tmp_path_factory.mktemp("served"), keyed=False)


@pytest.fixture(scope="module")
def served_keyed(tmp_path_factory: pytest.TempPathFactory) -> ServedLog:
    return _serve_and_stop(tmp_path_factory.mktemp("served-keyed"), keyed=True)


@dataclass
class Copy:
    config: Path
    db: sqlite3.Connection
    anchor: Path

    def verify(self) -> tuple[int, dict[str, Any], str]:
        self.db.commit()
        result = pneumo(self.config, "audit", "verify")
        return result.returncode, json.loads(result.stdout), result.stderr


def _copy(served: ServedLog, tmp_path: Path) -> Iterator[Copy]:
    data_dir = tmp_path / "var"
    shutil.copytree(served.data_dir, data_dir)
    extra = f'[audit]\nhmac_key_file = "{served.key_file}"\n' if served.key_file else ""
    config = write_config(tmp_path / "pneumo.toml", data_dir, extra=extra)
    db = sqlite3.connect(data_dir / "pneumo.db")
    try:
        # The served database refuses the edit (migration 0011); the attacker owns the file and
        # drops the triggers first, which leaves the detection layer to do its job.
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit_record SET outcome = outcome WHERE seq = 1")
        drop_guards(db.execute, "sqlite")
        yield Copy(config, db, data_dir / "audit-anchor.log")
    finally:
        db.close()


@pytest.fixture
def attacked(served: ServedLog, tmp_path: Path) -> Iterator[Copy]:
    yield from _copy(served, tmp_path)


@pytest.fixture
def attacked_keyed(served_keyed: ServedLog, tmp_path: Path) -> Iterator[Copy]:
    yield from _copy(served_keyed, tmp_path)


def _rehash_from(db: sqlite3.Connection, seq: int, version: int) -> None:
    """Edit record *seq*'s outcome and recompute every SHA-256 hash from there, as an attacker
    without the key would, leaving a chain that is consistent in itself; move the head along."""
    rows = db.execute(
        "SELECT seq, recorded_at, event_id, outcome, event, prev_hash FROM audit_record WHERE seq >= ? ORDER BY seq",
        (seq,),
    ).fetchall()
    prev = rows[0][5]
    for row_seq, recorded_at, event_id, outcome, event_json, _ in rows:
        event = json.loads(event_json)
        if row_seq == seq:
            outcome = event["outcome"] = 8 if outcome == 0 else 0
        stamp = _isoformat(recorded_at)
        digest = hashlib.sha256(record_payload(version, row_seq, prev, stamp, event_id, outcome, event)).hexdigest()
        db.execute(
            "UPDATE audit_record SET outcome = ?, event = ?, prev_hash = ?, hash = ?, hash_version = ? WHERE seq = ?",
            (outcome, json.dumps(event), prev, digest, version, row_seq),
        )
        prev = digest
    db.execute("UPDATE audit_chain_head SET last_hash = ? WHERE id = 1", (prev,))


def _isoformat(stored: str) -> str:
    """recorded_at as the gateway hashes it (SQLite keeps 'YYYY-MM-DD HH:MM:SS.ffffff', UTC)."""
    return dt.datetime.fromisoformat(stored).replace(tzinfo=dt.UTC).isoformat()


def test_clean_run_verifies_and_logs_its_anchor(served: ServedLog, attacked: Copy) -> None:
    code, result, _ = attacked.verify()
    assert code == 0 and result["ok"] is True and result["records"] == served.records
    anchored = [json.loads(line) for line in attacked.anchor.read_text().splitlines()]
    assert anchored[-1]["seq"] == served.records
    logged = [json.loads(line) for line in served.log.read_text().splitlines() if '"audit.anchor"' in line]
    assert logged and logged[-1]["seq"] == served.records and logged[-1]["hash"] == anchored[-1]["hash"]


@pytest.mark.parametrize("column, value", [("outcome", 12), ("event_id", "110113")])
def test_editing_a_column_is_detected(attacked: Copy, column: str, value: object) -> None:
    attacked.db.execute(f"UPDATE audit_record SET {column} = ? WHERE seq = 3", (value,))
    code, result, stderr = attacked.verify()
    assert code == 1 and result["ok"] is False and result["first_bad_seq"] == 3
    assert "record 3" in stderr


def test_removing_the_last_ten_and_moving_the_head_is_detected(served: ServedLog, attacked: Copy) -> None:
    keep = served.records - 10
    attacked.db.execute("DELETE FROM audit_record WHERE seq > ?", (keep,))
    attacked.db.execute(
        "UPDATE audit_chain_head SET last_seq = ?, last_hash = (SELECT hash FROM audit_record WHERE seq = ?)",
        (keep, keep),
    )
    code, result, _ = attacked.verify()
    assert code == 1 and result["first_bad_seq"] == keep + 1 and "removed" in result["problem"]


def test_rehashing_after_an_edit_is_detected_by_the_anchor(served: ServedLog, attacked: Copy) -> None:
    _rehash_from(attacked.db, 4, HASH_SHA256)
    code, result, _ = attacked.verify()
    assert code == 1 and result["ok"] is False
    # The newest checkpoint before record 4 still matches; everything after it is suspect.
    assert 1 <= result["first_bad_seq"] <= 4 and "rewritten" in result["problem"]


@pytest.mark.parametrize("version", [HASH_HMAC_SHA256, HASH_SHA256])
def test_rehashing_after_an_edit_is_detected_by_the_key(attacked_keyed: Copy, version: int) -> None:
    _rehash_from(attacked_keyed.db, 4, version)
    code, result, _ = attacked_keyed.verify()
    # The key pinpoints the edited record itself, before any checkpoint is consulted.
    assert code == 1 and result["first_bad_seq"] == 4
    assert "rewritten" not in result["problem"] and result["keyed_from_seq"] == 1


def test_wiping_the_table_and_resetting_the_head_is_detected(attacked: Copy) -> None:
    attacked.db.execute("DELETE FROM audit_record")
    attacked.db.execute("UPDATE audit_chain_head SET last_seq = 0, last_hash = ?", ("0" * 64,))
    code, result, _ = attacked.verify()
    assert code == 1 and result["records"] == 0 and result["first_bad_seq"] == 1


def test_removing_or_emptying_the_anchor_file_is_not_ok(attacked: Copy) -> None:
    attacked.anchor.write_text("")
    code, result, _ = attacked.verify()
    assert code == 1 and "no checkpoints" in result["problem"]
    attacked.anchor.unlink()
    code, result, _ = attacked.verify()
    assert code == 1 and "missing" in result["problem"]


def test_verify_without_the_key_cannot_pass_a_keyed_log(served_keyed: ServedLog, tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    shutil.copytree(served_keyed.data_dir, data_dir)
    config = write_config(tmp_path / "pneumo.toml", data_dir)
    result = pneumo(config, "audit", "verify")
    assert result.returncode == 1 and "hmac_key_file" in json.loads(result.stdout)["problem"]


@pytest.mark.postgres
def test_postgresql_edit_and_truncation_are_detected(postgres_url: str, tmp_path: Path) -> None:
    """The same attacks on a PostgreSQL audit log written by a real server."""
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", database_url=postgres_url)
    _store_images_and_stop(config, tmp_path)

    def verify() -> tuple[int, dict[str, Any]]:
        result = pneumo(config, "audit", "verify")
        return result.returncode, json.loads(result.stdout)

    code, clean = verify()
    assert code == 0 and clean["ok"] is True and clean["anchored_seq"] == clean["records"] >= IMAGES + 2
    records = clean["records"]
    engine = create_engine(postgres_url)
    try:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text("UPDATE audit_record SET outcome = 12 WHERE seq = 5"))
        drop_guards_on(engine)  # an attacker with the owner's rights lifts the guard first
        with engine.begin() as connection:
            connection.execute(text("UPDATE audit_record SET outcome = 12 WHERE seq = 5"))
        code, result = verify()
        assert code == 1 and result["first_bad_seq"] == 5
        with engine.begin() as connection:
            connection.execute(text("UPDATE audit_record SET outcome = 0 WHERE seq = 5"))
            connection.execute(text("DELETE FROM audit_record WHERE seq > :k"), {"k": records - 10})
            connection.execute(text(
                "UPDATE audit_chain_head SET last_seq = :k, last_hash = (SELECT hash FROM audit_record WHERE seq = :k)"),
                {"k": records - 10})
        code, result = verify()
        assert code == 1 and result["first_bad_seq"] == records - 9 and "removed" in result["problem"]
    finally:
        engine.dispose()


def test_an_unusable_key_file_stops_serve_before_it_writes(tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_text("too short")
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", extra=f'[audit]\nhmac_key_file = "{key_file}"\n')
    for command in ("serve", "audit"):
        result = pneumo(config, command, *(["verify"] if command == "audit" else []))
        assert result.returncode == 2 and "audit key refused" in result.stderr and "too short" not in result.stderr
