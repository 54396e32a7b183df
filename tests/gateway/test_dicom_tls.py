"""DICOM TLS as the gateway wires it: ``pneumo serve`` with ``[dicom.tls]`` and two acceptor
processes (SO_REUSEPORT) speaks TLS only in both, the ready line and each process's
``dicom.listening`` line say so, DCMTK clients with the client certificate are served while
plain ones are refused; the outbox's dicom channel delivers to ``storescp +tls`` with our
``[dicom.tls]`` certificate as client certificate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest

from conf.dev_pki import DevPki, make_dev_pki
from gateway.app import dicom_channel, open_runtime
from storage.outbox import DeliveryItem
from tests.conftest import copy_with_new_uids, dcmtk, make_settings, sample
from tests.dicom_node.test_tls import _storescp_tls, _tls, pki
from tests.dicom_peers import StoreScp
from tests.gateway.processes import child_pids
from tests.gateway.serve_process import write_config

__all__ = ["pki"]  # the fixture, imported for pytest


def _serve(config: Path, log_path: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start ``pneumo serve`` and return it with its ready line (read from stdout)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
        stdout=subprocess.PIPE, stderr=log_path.open("a"), text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    ready: dict[str, Any] = {}
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "ready":
                ready.update(message)
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(90) or not ready:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"pneumo serve did not become ready; see {log_path}")
    return proc, ready


@pytest.mark.slow
def test_two_tls_acceptor_processes(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    dicom_extra = "\n".join([
        "acceptor_processes = 2",
        "[dicom.tls]",
        f'cert_file = "{pki.server_cert}"',
        f'key_file = "{pki.server_key}"',
        f'ca_file = "{pki.ca_cert}"',
        "require_client_cert = true",
    ])
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", dicom_extra=dicom_extra)
    log_path = tmp_path / "serve.log"
    proc, ready = _serve(config, log_path)
    try:
        assert ready["dicom_tls"] == "mutual"
        assert len(child_pids(proc.pid)) == 1
        port = str(ready["dicom_port"])
        mutual = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)]
        for _ in range(8):  # the kernel spreads them over both processes
            echo = subprocess.run([dcmtk("echoscu"), *mutual, "-aet", "ECHOSCU", "-aec", "PNEUMO", "127.0.0.1", port],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert echo.returncode == 0, echo.stdout + echo.stderr
        for _ in range(4):
            plain = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "PNEUMO", "127.0.0.1", port],
                                   capture_output=True, text=True, timeout=60, check=False)
            assert plain.returncode != 0
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    listening = [line for line in log_path.read_text().splitlines() if "dicom.listening" in line]
    assert len(listening) == 2 and all("mutual" in line for line in listening), listening


def test_delivery_channel_builds_its_tls_context_from_dicom_tls(tmp_path: Path, pki: DevPki) -> None:
    """The outbox's dicom channel as the gateway wires it (gateway.app.dicom_channel): a TLS
    destination gets our [dicom.tls] certificate as client certificate, which storescp requires."""
    image = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    with StoreScp(tmp_path / "pacs", ae_title="PACS", options=_storescp_tls(pki)) as scp:
        settings = make_settings(
            tmp_path, None, {"delivery": {"timeout_seconds": 10}},
            tls=_tls(pki, require_client_cert=False),
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port, "tls": True}],
        )
        runtime = open_runtime(settings)
        channel = dicom_channel(runtime)
        try:
            ds = pydicom.dcmread(image, stop_before_pixels=True)
            relative = runtime.store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            stored = runtime.store.commit(runtime.store.stage_bytes(image.read_bytes()), relative)
            item = DeliveryItem(subject=str(ds.SOPInstanceUID), content=stored.relative_path,
                                study_uid=str(ds.StudyInstanceUID), patient_id=str(ds.PatientID))
            receipt = channel.send(item, "pacs")
        finally:
            channel.close()
            runtime.close()
        received = scp.received()
    assert receipt.peer_status == "0x0000"
    assert len(received) == 1
