"""``dicom.acceptor_processes = 2``: two processes share the port; everything they accept is
stored, indexed and queued exactly once; SIGTERM stops both; SIGKILL of the parent does not
leave an orphan listener behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.gateway.processes import child_pids, wait_gone
from tests.gateway.serve_process import ServeProcess, pneumo, write_config

pytestmark = pytest.mark.slow


def _serve(tmp_path: Path) -> ServeProcess:
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", dicom_extra="acceptor_processes = 2")
    return ServeProcess(config, tmp_path / "serve.log").start()


def test_two_acceptor_processes_store_everything_once(tmp_path: Path) -> None:
    server = _serve(tmp_path)
    assert server.proc is not None
    children = child_pids(server.proc.pid)
    assert len(children) == 1
    files = [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in") for _ in range(24)]
    failures: list[str] = []

    def send(chunk: list[Path]) -> None:
        result = subprocess.run(
            [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port), *map(str, chunk)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            failures.append(result.stderr)

    threads = [threading.Thread(target=send, args=(files[i::6],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert server.terminate() == 0
    assert wait_gone(children, 30), "the acceptor child must stop with its parent"

    rows = [json.loads(line) for line in pneumo(server.config, "instances", "--json").stdout.splitlines()]
    assert len(rows) == 24 and len({r["sop_instance_uid"] for r in rows}) == 24
    assert all(r["job_state"] == "pending" for r in rows)
    assert json.loads(pneumo(server.config, "audit", "verify").stdout)["ok"] is True


def test_sigkill_of_the_parent_leaves_no_orphan_listener(tmp_path: Path) -> None:
    server = _serve(tmp_path)
    assert server.proc is not None
    children = child_pids(server.proc.pid)
    assert children
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert wait_gone(children, 30)
