"""Backup and restore, exactly as docs/operations.md tells operators (its ``<!-- tested: ... -->``
blocks are run verbatim with ``bash``): a real ``pneumo serve`` on a PostgreSQL database of its
own, with encryption at rest and an HMAC-keyed audit log (keys kept outside ``data_dir``),
receives a real CR radiograph from DCMTK ``storescu`` and makes its result; it is backed up while
running; the database is dropped and ``data_dir`` deleted; the restore brings back a gateway
whose ``db check``, ``audit verify``, ``studies`` and ``status`` pass, that starts again, finds
the study by C-FIND and hands out the image and its SR by C-GET."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from storage.keyring import generate_key_file
from tests.conftest import _PG_SKIP_REASON, POSTGRES_URL, copy_with_new_uids, dcmtk, sample, wait_until
from tests.gateway.serve_process import ServeProcess, pneumo, write_config

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
BLOCK = re.compile(r"<!-- tested: (\w+) -->\n```sh\n(.*?)```", re.DOTALL)

pytestmark = pytest.mark.postgres


def doc_blocks() -> dict[str, str]:
    """The shell blocks of docs/operations.md marked as tested, by name."""
    return dict(BLOCK.findall(OPERATIONS.read_text()))


def run_block(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run one documented block as an operator's shell would (stop at the first failing command)."""
    script = "set -euo pipefail\n" + doc_blocks()[name]
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"docs/operations.md block {name!r} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """The name of a database of its own (created here, dropped afterwards), for pg_dump/pg_restore."""
    if _PG_SKIP_REASON:
        pytest.skip(_PG_SKIP_REASON)
    name = f"pneumo_restore_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield name
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _libpq(database: str) -> str:
    """``postgresql://`` URL of *database* on the test server (what pg_dump and createdb take)."""
    return make_url(POSTGRES_URL).set(drivername="postgresql", database=database).render_as_string(hide_password=False)


def _drop(database: str) -> None:
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{database}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _idle(config: Path) -> bool:
    """``pneumo status`` healthy with nothing due or running (what is done is in the backup)."""
    result = pneumo(config, "status", "--json")
    report = json.loads(result.stdout) if result.stdout else {}
    return result.returncode == 0 and all(q["due"] == 0 and q["running"] == 0 for q in report.get("queues", []))


def _dcmtk_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(args[0]), *args[1:]], capture_output=True, text=True, timeout=120, check=False)


def test_backup_destroy_restore_as_documented(tmp_path: Path, fresh_database: str) -> None:
    for tool in ("pg_dump", "pg_restore", "createdb", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install postgresql-client)")
    assert set(doc_blocks()) == {"backup", "restore", "check"}

    keys = tmp_path / "keys"  # kept apart from data_dir and from the backup
    keys.mkdir()
    generate_key_file(keys / "store.key")
    (keys / "audit.key").write_text(os.urandom(32).hex())
    (keys / "audit.key").chmod(0o600)
    data_dir = tmp_path / "srv" / "var"
    database_url = make_url(POSTGRES_URL).set(database=fresh_database).render_as_string(hide_password=False)
    config = write_config(
        tmp_path / "pneumo.toml", data_dir, database_url=database_url, workers=True,
        extra="\n".join([
            f'[storage.encryption]\nkey_id = "site-1"\nkey_file = "{keys / "store.key"}"',
            f'[audit]\nhmac_key_file = "{keys / "audit.key"}"',
            "[results]\nstudy_stable_seconds = 0.5",
            '[[dicom.peers]]\nae_title = "VIEWER"\nhost = "127.0.0.1"\npermissions = ["echo", "find", "get"]',
        ]),
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the installed `pneumo`
        "PNEUMO_CONFIG": str(config),
        "PG_URL": _libpq(fresh_database),
        "PG_ADMIN_URL": _libpq(make_url(POSTGRES_URL).database or "postgres"),
        "PG_DATABASE": fresh_database,
        "DATA_DIR": str(data_dir),
        "BACKUP": str(tmp_path / "backup" / "2026-12-01"),
    }

    # 1. A gateway receives a real radiograph and makes its result.
    image = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")
    study_uid = str(pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID)
    server = ServeProcess(config, tmp_path / "serve.log").start(timeout=120)
    try:
        sent = _dcmtk_run("storescu", "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port), str(image))
        assert sent.returncode == 0, sent.stderr

        def final() -> dict[str, object] | None:
            listed = pneumo(config, "studies", "--json")
            rows = [json.loads(line) for line in listed.stdout.splitlines()]
            return next((r for r in rows if r["study_instance_uid"] == study_uid and r["status"] == "final"), None)

        before = wait_until(final, timeout=180, what="the study result")
        wait_until(lambda: _idle(config), timeout=120, what="an idle, healthy queue")

        # 2. Backed up while it runs, as documented.
        run_block("backup", env)
    finally:
        stopped = server.terminate()
    assert stopped == 0
    backup = Path(env["BACKUP"])
    assert sorted(p.name for p in backup.iterdir()) == ["audit-anchor.log", "dicom.tar", "pneumo.dump"]
    archived = subprocess.run(["tar", "-tf", str(backup / "dicom.tar")], capture_output=True, text=True, check=True).stdout
    assert "dicom/.pneumo-store.json" in archived and not list(backup.rglob("*.key"))

    # 3. Destroyed: the database dropped, data_dir gone (the keys are kept elsewhere).
    _drop(fresh_database)
    shutil.rmtree(data_dir)
    assert pneumo(config, "studies").returncode == 2

    # 4. Restored as documented, then checked with the documented commands.
    run_block("restore", env)
    checked = run_block("check", env)
    assert "healthy" in checked.stdout and study_uid in checked.stdout
    db_check = pneumo(config, "db", "check")
    assert json.loads(db_check.stdout)["ok"] is True, db_check.stdout
    verified = json.loads(pneumo(config, "audit", "verify").stdout)
    assert verified["ok"] is True and verified["keyed_from_seq"] is not None and verified["anchored_seq"], verified
    after = [json.loads(line) for line in pneumo(config, "studies", "--json").stdout.splitlines()]
    assert [row for row in after if row["study_instance_uid"] == study_uid] == [before]
    status = json.loads(pneumo(config, "status", "--json").stdout)
    assert status["healthy"] and status["store"]["bound"] and status["model"]["in_results"][0]["results"] == 1

    # 5. The restored gateway starts (its start-up checks pass) and serves the study again.
    server = ServeProcess(config, tmp_path / "serve-restored.log").start(timeout=120)
    try:
        found = _dcmtk_run("findscu", "-S", "-aet", "VIEWER", "-aec", "PNEUMO", "-k", "QueryRetrieveLevel=STUDY",
                           "-k", f"StudyInstanceUID={study_uid}", "-k", "NumberOfStudyRelatedInstances",
                           "127.0.0.1", str(server.dicom_port))
        assert found.returncode == 0 and study_uid in found.stderr + found.stdout, found.stderr
        retrieved = tmp_path / "retrieved"
        retrieved.mkdir()
        got = _dcmtk_run("getscu", "-S", "-aet", "VIEWER", "-aec", "PNEUMO", "-od", str(retrieved),
                         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                         "127.0.0.1", str(server.dicom_port))
        assert got.returncode == 0, got.stderr
        modalities = sorted(str(pydicom.dcmread(p).Modality) for p in retrieved.iterdir())
        assert "CR" in modalities and "SR" in modalities, modalities
        original = pydicom.dcmread(image)
        [cr] = [p for p in retrieved.iterdir() if pydicom.dcmread(p).Modality == "CR"]
        assert pydicom.dcmread(cr).PixelData == original.PixelData  # decrypted with the key kept apart
    finally:
        server.terminate()
