"""``worker.processes``: ``pneumo serve`` runs the job workers in supervised child processes.

Real processes and sockets: a radiograph stored by the parent wakes a worker child across
processes (the poll interval is set far longer than the test waits, so only the wake-up can
explain a prompt result); a killed worker child is restarted and ``/ready`` reports the gap;
a SIGKILLed parent takes its worker children with it (they must not hold jobs past a restart).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.gateway.processes import alive, child_pids, ready, wait_for
from tests.gateway.serve_process import ServeProcess, pneumo, write_config
from tests.inference.tiny_model import write_model_dir

pytestmark = pytest.mark.slow

#: Longer than any wait below: a result within it came from a wake-up, not from a poll.
POLL_SECONDS = 120


def _config(tmp_path: Path) -> Path:
    extra = "\n".join([
        "processes = 2",
        f"poll_interval = {POLL_SECONDS}",
        "[inference]",
        f'model_dir = "{write_model_dir(tmp_path / "model")}"',
    ])
    return write_config(tmp_path / "pneumo.toml", tmp_path / "var", workers=True, extra=extra)


def _analysed(config: Path) -> int:
    listed = pneumo(config, "instances", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    return sum(1 for row in rows if row["origin"] == "received" and row["outcome"] not in ("pending", "running"))


def _store(server: ServeProcess, tmp_path: Path) -> None:
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port), str(path)],
        check=True, capture_output=True, timeout=60,
    )


def test_images_wake_a_worker_process_and_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    config = _config(tmp_path)
    server = ServeProcess(config, tmp_path / "serve.log").start()
    assert server.proc is not None
    try:
        workers = child_pids(server.proc.pid)
        assert len(workers) == 2
        status, body = ready(server)
        assert status == 200 and body["checks"]["workers"] is True
        # Each worker warmed up on a synthetic radiograph in memory, and stored nothing of it.
        assert (tmp_path / "serve.log").read_text().count('"worker.warmed_up"') == 2
        assert pneumo(config, "instances", "--json").stdout.strip() == ""

        # Each worker polled once at start and then sleeps for POLL_SECONDS: only the wake-up
        # sent by the parent's C-STORE can make them judge the image within the wait.
        time.sleep(1.0)
        _store(server, tmp_path)
        assert wait_for(lambda: _analysed(config) == 1, POLL_SECONDS / 4), "the worker process was not woken"

        os.kill(workers[0], signal.SIGKILL)
        degraded = wait_for(lambda: (r := ready(server))[0] == 503 and r, 30)
        assert degraded and degraded[1]["checks"]["workers"] is False

        def replaced() -> bool:
            children = child_pids(server.proc.pid) if server.proc else []
            return len(children) == 2 and workers[0] not in children and ready(server)[0] == 200

        assert wait_for(replaced, 90, 0.2), "the worker process must be restarted and /ready recover"
        log = (tmp_path / "serve.log").read_text()
        assert "worker.process_died" in log and "worker.process_restarted" in log

        _store(server, tmp_path)  # the replacement registered for wake-ups too
        assert wait_for(lambda: _analysed(config) == 2, POLL_SECONDS / 4)
    finally:
        server.terminate(60)


def test_sigkill_of_the_parent_takes_the_worker_processes_with_it(tmp_path: Path) -> None:
    server = ServeProcess(_config(tmp_path), tmp_path / "serve.log").start()
    assert server.proc is not None
    workers = child_pids(server.proc.pid)
    assert len(workers) == 2
    server.kill()
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 10), "worker processes outlived their parent"
