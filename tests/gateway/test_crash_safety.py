"""SIGKILL in the middle of a multi-file send: every instance that got Success survives.

This is the promise a PACS relies on (docs/architecture.md §3): a C-STORE success means the instance is on
disk and its job is committed, whatever happens to the process a moment later.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.gateway.serve_process import ServeProcess, pneumo, write_config

pytestmark = pytest.mark.slow

_SENDING = re.compile(r"Sending file: (\S+)")
_SUCCESS = "Received Store Response (Success)"


def _send_and_kill(server: ServeProcess, files: list[Path], kill_after: int) -> set[str]:
    """storescu all *files* in one association; SIGKILL the server after *kill_after* successes.

    Returns the SOP Instance UIDs whose C-STORE got a Success response.
    """
    proc = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    acknowledged: set[str] = set()
    current: str | None = None
    for line in proc.stdout:
        sending = _SENDING.search(line)
        if sending:
            current = sending.group(1)
        elif _SUCCESS in line and current is not None:
            acknowledged.add(pydicom.dcmread(current, stop_before_pixels=True).SOPInstanceUID)
            if len(acknowledged) == kill_after and server.proc is not None:
                os.kill(server.proc.pid, signal.SIGKILL)
    proc.wait(60)
    return acknowledged


def test_sigkill_mid_send_loses_nothing_acknowledged(tmp_path: Path) -> None:
    originals = [copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in") for _ in range(10)]
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var")
    server = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        acknowledged = _send_and_kill(server, originals, kill_after=4)
    finally:
        server.kill()
    assert 4 <= len(acknowledged) < len(originals), "the kill must land mid-send"

    restarted = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        staging = tmp_path / "var" / "tmp"
        assert not any(staging.iterdir()), "unacknowledged partial files must be swept at start"
        listed = pneumo(config, "instances", "--json")
        rows = {row["sop_instance_uid"]: row for row in map(json.loads, listed.stdout.splitlines())}
        by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in originals}
        for uid in acknowledged:
            row = rows[uid]  # indexed
            assert row["job_state"] == "pending"  # its job committed with it
            stored = pydicom.dcmread(row["path"])  # on disk, complete and decodable
            assert stored.PixelData == pydicom.dcmread(by_uid[uid]).PixelData

        # The PACS resends everything: all succeed, nothing is duplicated.
        resend = subprocess.run(
            [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(restarted.dicom_port),
             *map(str, originals)],
            capture_output=True, text=True, check=False,
        )
        assert resend.returncode == 0, resend.stderr
        rows_after = [json.loads(line) for line in pneumo(config, "instances", "--json").stdout.splitlines()]
        assert sorted(r["sop_instance_uid"] for r in rows_after) == sorted(by_uid)
        assert all(r["job_state"] == "pending" for r in rows_after)
    finally:
        restarted.terminate()
    verify = pneumo(config, "audit", "verify")
    assert json.loads(verify.stdout)["ok"] is True
