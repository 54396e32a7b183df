"""Start-up checks against the real ``pneumo serve`` (storage/integrity.py).

Faults are made while the gateway is stopped, the way they happen in the field: SQLite pages
overwritten, the database file deleted, truncated or emptied row by row, the store's volume not
mounted. ``pneumo serve`` must refuse to start (exit code 2, a message naming the fault and the
way out) instead of answering Success on a broken or empty index; ``pneumo db reindex`` is the
way out for a lost database. A restart after a crash, which legitimately leaves files no row
points at, must still start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest

from storage.db import Database
from storage.integrity import MARKER_NAME, run_checks, write_marker
from tests.audit.attacker import drop_guards
from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.gateway.serve_process import ServeProcess, pneumo, write_config

pytestmark = pytest.mark.slow


def _config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "pneumo.toml", tmp_path / "var")


def _send(server: ServeProcess, files: list[Path]) -> None:
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port), *map(str, files)],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 0, result.stderr


def _populated(tmp_path: Path, count: int = 3) -> tuple[Path, list[Path]]:
    """A gateway that stored *count* instances and was stopped cleanly."""
    config = _config(tmp_path)
    files = [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in") for _ in range(count)]
    server = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        _send(server, files)
    finally:
        assert server.terminate() == 0
    return config, files


def _refused(config: Path, *words: str) -> str:
    """``pneumo serve`` exits 2 without announcing ready; its message contains *words*."""
    result = pneumo(config, "serve", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert '"event": "ready"' not in result.stdout
    message = result.stderr
    assert "pneumo: refusing to start:" in message
    for word in words:
        assert word in message, message[-2000:]
    return message


def _database_files(tmp_path: Path) -> list[Path]:
    base = tmp_path / "var" / "pneumo.db"
    return [p for p in (base, base.with_name("pneumo.db-wal"), base.with_name("pneumo.db-shm")) if p.exists()]


@pytest.mark.parametrize("pages", ["all", "last"])
def test_damaged_database_pages_refuse_start(tmp_path: Path, pages: str) -> None:
    config, _ = _populated(tmp_path)
    database = tmp_path / "var" / "pneumo.db"
    assert _database_files(tmp_path) == [database], "a clean stop checkpoints the WAL"
    data = bytearray(database.read_bytes())
    page_size = int.from_bytes(data[16:18], "big") or 65536
    assert len(data) // page_size > 4
    # Overwrite b-tree pages (never the header page) with garbage, as a failing disk would.
    offsets = range(page_size, len(data), page_size) if pages == "all" else [len(data) - page_size]
    for offset in offsets:
        data[offset : offset + page_size] = os.urandom(page_size)
    database.write_bytes(bytes(data))

    _refused(config, "is damaged", "pneumo db reindex")
    check = pneumo(config, "db", "check")
    assert check.returncode == 1
    assert json.loads(check.stdout)["ok"] is False


def test_deleted_database_refuses_start_until_reindexed(tmp_path: Path) -> None:
    config, files = _populated(tmp_path)
    for path in _database_files(tmp_path):
        path.unlink()

    _refused(config, "deleted, emptied or replaced", "pneumo db reindex")
    # The refusal itself changed nothing: still refused, and `db check` agrees.
    _refused(config, "pneumo db reindex")
    assert pneumo(config, "db", "check").returncode == 1

    rebuilt = pneumo(config, "db", "reindex")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    summary = json.loads(rebuilt.stdout)
    assert (summary["indexed_received"], summary["jobs_queued"], summary["unreadable"]) == (3, 3, 0)
    again = json.loads(pneumo(config, "db", "reindex").stdout)  # repeatable, adds nothing
    assert (again["already_indexed"], again["indexed_received"]) == (3, 0)

    server = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        rows = [json.loads(line) for line in pneumo(config, "instances", "--json").stdout.splitlines()]
        expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
        assert {r["sop_instance_uid"] for r in rows} == expected
        assert all(r["job_state"] == "pending" for r in rows)  # analysis comes back by itself
    finally:
        assert server.terminate() == 0
    # (The audit records of the lost database are gone for good; reindex does not pretend otherwise.)
    assert pneumo(config, "db", "check").returncode == 0


@pytest.mark.parametrize("how", ["truncated", "rows-deleted"])
def test_emptied_database_refuses_start(tmp_path: Path, how: str) -> None:
    config, _ = _populated(tmp_path)
    database = tmp_path / "var" / "pneumo.db"
    if how == "truncated":
        for path in _database_files(tmp_path):
            path.write_bytes(b"")
    else:
        with sqlite3.connect(database) as connection:
            tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            connection.execute("PRAGMA foreign_keys = OFF")
            drop_guards(connection.execute, "sqlite")  # the audit table is append-only: a file-level attacker lifts that
            for table in tables:
                if table != "alembic_version":
                    connection.execute(f'DELETE FROM "{table}"')  # noqa: S608 - names from sqlite_master
        connection.close()
    _refused(config, "pneumo db reindex")


def test_store_volume_missing_refuses_start(tmp_path: Path) -> None:
    config, _ = _populated(tmp_path)
    shutil.move(tmp_path / "var" / "dicom", tmp_path / "elsewhere")
    _refused(config, "mounted")


def test_restart_after_a_crash_with_unindexed_files_starts(tmp_path: Path) -> None:
    """Files renamed into the store whose transaction never committed are a normal crash leftover."""
    config = _config(tmp_path)
    server = ServeProcess(config, tmp_path / "serve.log").start()
    _send(server, [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in") for _ in range(2)])
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    # What a SIGKILL between the rename and the commit leaves: a complete file nobody indexed.
    for _ in range(3):
        orphan = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "orphans")
        ds = pydicom.dcmread(orphan, stop_before_pixels=True)
        target = tmp_path / "var" / "dicom" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True)
        shutil.copy(orphan, target)

    check = json.loads(pneumo(config, "db", "check").stdout)
    assert check["ok"] is True and check["facts"]["files_unknown"] == 3 and check["warnings"]
    restarted = ServeProcess(config, tmp_path / "serve.log").start()
    assert restarted.terminate() == 0


def test_store_identity_binds_one_database_to_one_store(tmp_path: Path, database_url: str) -> None:
    """The marker and the database's id must agree; SQLite and PostgreSQL alike (no serve needed)."""
    store = tmp_path / "dicom"
    database = Database(database_url)
    try:
        first = run_checks(database, store, initialise=True)
        assert first.ok and first.facts.get("initialised") is True
        assert (store / MARKER_NAME).is_file()
        assert run_checks(database, store, initialise=True).ok  # the pair is bound now
        marker = (store / MARKER_NAME).read_text()
        write_marker(store, "some-other-store")
        refused = run_checks(database, store, initialise=True)
        assert not refused.ok and "indexes another file store" in refused.problems[0]
        (store / MARKER_NAME).write_text(marker)
    finally:
        database.dispose()

    # The same store against a brand-new database (the old one dropped), once it holds a file.
    shutil.copy(sample("CT_small.dcm"), _store_path(store, "1.2.3", "1.2.3.4", "1.2.3.4.5"))
    fresh = Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        refused = run_checks(fresh, store, initialise=True)
        assert not refused.ok and "deleted, emptied or replaced" in refused.problems[0]
    finally:
        fresh.dispose()


def _store_path(store: Path, *uids: str) -> Path:
    path = store.joinpath(*uids[:-1], f"{uids[-1]}.dcm")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
