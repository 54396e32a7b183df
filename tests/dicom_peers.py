"""Real remote Storage SCPs for delivery tests: DCMTK ``storescp`` and Orthanc, on free ports.

Each is started as a child process and waited for by polling its port (or REST API) against a
deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest

ORTHANC_BINARY = "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 30.0) -> None:
    """Return once 127.0.0.1:*port* accepts a connection; fail if *proc* dies or time runs out."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        try:
            code = proc.wait(timeout=0.05)  # doubles as the pause between probes
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"peer process exited with {code} before listening on {port}")
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {deadline_s}s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class StoreScp:
    """DCMTK ``storescp`` writing every received instance into *out_dir* (default syntaxes:
    uncompressed only, so compressed objects must be transcoded to reach it)."""

    def __init__(
        self, out_dir: Path, *, ae_title: str = "STORESCP", port: int | None = None, options: tuple[str, ...] = ()
    ) -> None:
        self.out_dir = out_dir
        self.ae_title = ae_title
        self.port = port or free_port()
        self.options = options  # extra storescp flags, e.g. ("+xi",) to accept Implicit VR LE only
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        binary = shutil.which("storescp")
        if binary is None:
            pytest.skip("DCMTK storescp not installed (apt-get install dcmtk)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = (self.out_dir.parent / f"storescp-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, *self.options, "-aet", self.ae_title, "-od", str(self.out_dir), str(self.port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Orthanc:
    """An Orthanc server with a generated configuration: DICOM and HTTP on free ports, storage
    in *work_dir*, loopback REST without authentication (test only)."""

    def __init__(
        self,
        work_dir: Path,
        *,
        dicom_port: int | None = None,
        ae_title: str = "ORTHANC",
        options: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """*options* are added to the generated configuration; *env* to Orthanc's environment."""
        self.work_dir = work_dir
        self.ae_title = ae_title
        self.options = dict(options or {})
        self.env = dict(env or {})
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        if not Path(ORTHANC_BINARY).is_file():
            pytest.skip("Orthanc not installed (apt-get install orthanc)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "pneumo-test",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            **self.options,
        }
        config_path = self.work_dir / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        log = (self.work_dir / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            [ORTHANC_BINARY, str(config_path)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        wait_for_port(self.http_port, self.proc)
        wait_for_port(self.dicom_port, self.proc)
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def instances(self) -> list[dict[str, Any]]:
        """Every instance Orthanc holds (``GET /instances?expand``)."""
        response = httpx.get(f"http://127.0.0.1:{self.http_port}/instances", params={"expand": ""}, timeout=10)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def sop_instance_uids(self) -> list[str]:
        return sorted(str(item["MainDicomTags"]["SOPInstanceUID"]) for item in self.instances())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class StatusScp:
    """A pynetdicom Storage SCP on a free port that answers each C-STORE with the status mapped
    to its SOP Instance UID (default Success) and records the transfer syntax it arrived in —
    a real peer over a real socket, for the statuses DCMTK and Orthanc never send."""

    def __init__(
        self,
        sop_classes: list[str],
        transfer_syntaxes: list[str],
        *,
        statuses: dict[str, int] | None = None,
        ae_title: str = "STATUSSCP",
        require_called_aet: bool = False,
    ) -> None:
        from pynetdicom import AE, evt

        self.statuses = dict(statuses or {})
        self.received: dict[str, str] = {}  # SOP Instance UID -> transfer syntax UID
        self.ae_title = ae_title
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, transfer_syntaxes)
        self._ae = ae
        self._handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store)]
        self._server: Any = None
        self.port = 0

    def active_associations(self) -> list[Any]:
        """The associations the SCP has open now (its side of them)."""
        return [a for a in self._server.active_associations if a.is_established] if self._server is not None else []

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.received[uid] = str(event.context.transfer_syntax)
        return self.statuses.get(uid, 0x0000)

    def __enter__(self) -> Self:
        self._server = self._ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=self._handlers)
        self.port = int(self._server.server_address[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
