"""Several processes starting at once migrate one database one after another (storage/migrate.py).

Real processes, as when the gateway and its worker pods start together: each imports everything
and opens its ``Database`` first, then all are released at the same moment into
:func:`storage.migrate.upgrade` on a fresh database (a new PostgreSQL schema, or a SQLite file
that does not exist yet). Without the lock, PostgreSQL processes that all find "no schema" each
create the tables and all but one fail with duplicate-object errors.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from sqlalchemy import inspect, text

from storage.db import Database, _use_wal
from storage.migrate import current_revision, head_revision

PROCESSES = 4
REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys
from storage.db import Database
from storage.migrate import current_revision, upgrade
database = Database(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()  # the start signal: every process is past its imports
upgrade(database)
print(json.dumps({"revision": current_revision(database)}), flush=True)
database.dispose()
"""


def test_processes_starting_together_migrate_once_each_after_the_other(database_url: str) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, database_url], cwd=REPO, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready", child.communicate(timeout=60)[1][-3000:]
        for child in children:  # release them together
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outcomes = [child.communicate(timeout=240) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)

    database = Database(database_url)
    try:
        head = head_revision(database)
        for child, (stdout, stderr) in zip(children, outcomes, strict=True):
            assert child.returncode == 0, stderr[-3000:]
            assert "already exists" not in stderr and "Duplicate" not in stderr, stderr[-3000:]
            assert json.loads(stdout.strip().splitlines()[-1]) == {"revision": head}
        assert current_revision(database) == head
        with database.read_engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
            assert {"job", "instance", "audit_record"} <= set(inspect(connection).get_table_names())
    finally:
        database.dispose()


class _StartingTogether:
    """A cursor of a new SQLite file that other processes lock while they start: the switch to WAL
    is refused (SQLite's immediate "database is locked" when two would wait on each other) *refusals*
    times, then made."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.mode = "delete"
        self.switches = 0

    def execute(self, sql: str) -> _StartingTogether:
        if sql == "PRAGMA journal_mode=WAL":
            self.switches += 1
            if self.refusals:
                self.refusals -= 1
                raise sqlite3.OperationalError("database is locked")
            self.mode = "wal"
        return self

    def fetchone(self) -> tuple[str]:
        return (self.mode,)


def test_the_switch_to_wal_is_retried_while_the_file_is_locked() -> None:
    cursor = _StartingTogether(refusals=3)
    _use_wal(cursor)
    assert cursor.mode == "wal" and cursor.switches == 4
    already = _StartingTogether(refusals=0)
    already.mode = "wal"
    _use_wal(already)
    assert already.switches == 0  # a file in WAL mode is not switched again (no lock needed)
