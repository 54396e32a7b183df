"""``pneumo audit verify`` on a new install, before ``pneumo serve`` has written its first anchor.

The install steps of docs/operations.md run ``pneumo db upgrade`` (and may run ``db reindex``)
before the first ``pneumo serve``; both write audit records, and only ``pneumo serve`` writes the
anchor checkpoints. Verification then passes on the chain alone and says there is no checkpoint
yet — while edits are still caught, and a log that records a start of ``pneumo serve`` still
needs its anchor file. Real commands (SQLite and PostgreSQL), real audit records.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from audit.builders import application_activity
from audit.events import AuditSource
from audit.store import append
from storage.db import Database
from tests.audit.attacker import drop_guards_on
from tests.gateway.serve_process import pneumo, write_config


def _new_install(tmp_path: Path, database_url: str) -> Path:
    """`db reindex` (creates the store, audited) and `db upgrade` (audited): two records, no serve."""
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", database_url=database_url)
    for command in (("db", "reindex"), ("db", "upgrade")):
        done = pneumo(config, *command)
        assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "var" / "audit-anchor.log").exists()
    return config


def _verify(config: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = pneumo(config, "audit", "verify")
    return done, json.loads(done.stdout)


def test_a_new_install_verifies_before_the_first_anchor(tmp_path: Path, database_url: str) -> None:
    config = _new_install(tmp_path, database_url)
    done, result = _verify(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert result["ok"] is True and result["records"] == 2 and result["anchored_seq"] is None
    assert "no anchor checkpoint yet" in done.stderr


def test_an_edit_before_the_first_anchor_is_still_detected(tmp_path: Path, database_url: str) -> None:
    config = _new_install(tmp_path, database_url)
    engine = create_engine(database_url)
    try:
        drop_guards_on(engine)
        with engine.begin() as connection:
            connection.execute(text("UPDATE audit_record SET outcome = 4 WHERE seq = 1"))
    finally:
        engine.dispose()
    done, result = _verify(config)
    assert done.returncode == 1 and result["ok"] is False and result["first_bad_seq"] == 1


def test_once_pneumo_serve_has_started_the_anchor_file_is_required(tmp_path: Path, database_url: str) -> None:
    """A log that records a start of ``pneumo serve`` (which checkpoints at once) without an anchor
    file has lost it: removal of its newest records could not be ruled out."""
    config = _new_install(tmp_path, database_url)
    database = Database(database_url)
    try:
        with database.session() as session:
            append(session, application_activity(
                AuditSource(source_id="PNEUMO@test"), started=True, process_name="pneumo serve", host="test",
                when=dt.datetime.now(dt.UTC),
            ))
    finally:
        database.dispose()
    done, result = _verify(config)
    assert done.returncode == 1 and result["ok"] is False and "is missing" in result["problem"]
