"""Audit records of processes and operator commands (docs/audit.md, "Event catalogue"), from the
real command line: ``pneumo worker`` start and stop (with the configuration's fingerprint, so a
changed configuration shows between two starts) and ``pneumo fhir publish``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from tests.gateway.serve_process import pneumo, write_config


def _events(data_dir: Path) -> list[dict[str, Any]]:
    engine = create_engine(f"sqlite:///{data_dir / 'pneumo.db'}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT event FROM audit_record ORDER BY seq")).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(row) if isinstance(row, str) else row for row in rows]


def _run_worker(config: Path, log: Path) -> None:
    """Start ``pneumo worker``, wait for its ready line, stop it with SIGTERM."""
    with log.open("a") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(config), "worker"],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if '"ready"' in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(60) and proc.poll() is None, log.read_text()
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _activity(events: list[dict[str, Any]], process: str) -> list[tuple[str, str | None]]:
    """(event type code, description) of the Application Activity records of *process*."""
    return [(e["event_types"][0]["code"], e.get("outcome_description")) for e in events
            if e["event_id"]["code"] == "110100" and any(p["user_id"] == process for p in e["participants"])]


def test_worker_start_and_stop_are_audited_with_the_configuration(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    config = write_config(tmp_path / "pneumo.toml", data_dir)
    _run_worker(config, tmp_path / "worker.log")
    first = hashlib.sha256(config.read_bytes()).hexdigest()
    with config.open("a") as handle:
        handle.write("# changed by the operator\n")
    _run_worker(config, tmp_path / "worker.log")
    second = hashlib.sha256(config.read_bytes()).hexdigest()
    assert _activity(_events(data_dir), "pneumo worker") == [
        ("110120", f"configuration pneumo.toml sha256:{first}"), ("110121", None),
        ("110120", f"configuration pneumo.toml sha256:{second}"), ("110121", None),
    ]


def test_fhir_publish_is_an_audited_operator_action(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    config = write_config(tmp_path / "pneumo.toml", data_dir)
    _run_worker(config, tmp_path / "worker.log")  # makes the store
    result = pneumo(config, "fhir", "publish")
    assert result.returncode == 0, result.stderr
    [published] = [e for e in _events(data_dir) if e["event_types"][0]["code"] == "FHIR-PUBLISH"]
    assert published["event_id"]["code"] == "110100" and published["outcome"] == 0
    assert "all 0 studies" in published["outcome_description"]
    operator = published["participants"][0]
    assert operator["user_is_requestor"] is True and operator["user_id"]
