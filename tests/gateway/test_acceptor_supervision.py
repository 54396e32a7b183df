"""A killed acceptor child is restarted (with backoff) and ``/ready`` reports lost capacity.

``dicom.acceptor_processes = 2``: the parent supervises its child. After SIGKILL of the child,
``/ready`` answers 503 with ``acceptors: false`` until the replacement listens, then 200 again,
and the port keeps storing everything it acknowledges. ``/ready`` also reports a disk below the
free-space floor.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from gateway.acceptors import Backoff
from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.gateway.processes import alive, child_pids, ready, wait_for
from tests.gateway.serve_process import ServeProcess, pneumo, write_config


@pytest.mark.slow
def test_killed_acceptor_is_restarted_and_reported_in_ready(tmp_path: Path) -> None:
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", dicom_extra="acceptor_processes = 2")
    server = ServeProcess(config, tmp_path / "serve.log").start()
    assert server.proc is not None
    try:
        status, body = ready(server)
        assert status == 200 and body["checks"]["acceptors"] is True
        [child] = child_pids(server.proc.pid)

        os.kill(child, signal.SIGKILL)
        degraded = wait_for(lambda: (r := ready(server))[0] == 503 and r, 30)
        assert degraded, "/ready must report the dead acceptor"
        assert degraded[1]["checks"]["acceptors"] is False

        def restarted() -> bool:
            children = child_pids(server.proc.pid) if server.proc else []
            return bool(children) and child not in children and ready(server)[0] == 200

        assert wait_for(restarted, 90, 0.2), "the acceptor must be restarted and /ready recover"
        log = (tmp_path / "serve.log").read_text()
        assert "dicom.acceptor_died" in log and "dicom.acceptor_restarted" in log

        # Both processes serve the port again: several associations all succeed.
        files = [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in") for _ in range(6)]
        for chunk in (files[0::3], files[1::3], files[2::3]):
            sent = subprocess.run(
                [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port),
                 *map(str, chunk)], capture_output=True, text=True, check=False, timeout=120,
            )
            assert sent.returncode == 0, sent.stderr
        survivors = child_pids(server.proc.pid)
    finally:
        code = server.terminate()
    assert code == 0
    assert wait_for(lambda: not any(alive(pid) for pid in survivors), 30, 0.1), "children stop with the parent"
    rows = pneumo(config, "instances", "--json").stdout.splitlines()
    assert len(rows) == 6


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=60.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay(10_000) == 60


@pytest.mark.slow
def test_ready_reports_a_disk_below_the_free_space_floor(tmp_path: Path) -> None:
    """``/ready`` says ``disk: false`` when the store's file system is below ``storage.min_free_mb``."""
    floor_mb = 1 << 40  # more than any disk: the floor is always crossed
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", extra=f"[storage]\nmin_free_mb = {floor_mb}")
    server = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        status, body = ready(server)
        assert status == 503 and body["status"] == "not-ready"
        assert body["checks"]["disk"] is False
        assert all(ok for name, ok in body["checks"].items() if name != "disk")
    finally:
        assert server.terminate() == 0
