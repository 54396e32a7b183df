"""Limits of the DICOM node (dicom_node/limits.py) against real peers: DCMTK storescu/echoscu and
a pynetdicom SCU holding associations open. Each breach gets its standard answer every time and
at most one Security Alert per address and kind a minute."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from audit.models import AuditRecord
from dicom_node.storage_scp import ReceiveFile
from storage.models import Instance
from tests.conftest import copy_with_new_uids, dcmtk, sample


def _events(gateway: Any, code: str) -> list[dict[str, Any]]:
    with gateway.runtime.database.read_session() as session:
        rows = session.execute(select(AuditRecord).where(AuditRecord.event_id == code).order_by(AuditRecord.seq))
        return [r.event for r in rows.scalars()]


def _alerts(gateway: Any, kind: str) -> list[dict[str, Any]]:
    return [e for e in _events(gateway, "110113") if kind in e.get("outcome_description", "")]


def test_a_data_set_over_the_limit_is_refused_out_of_resources(
    gateway_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # CT_small is 39 kB, MR_small 10 kB: the limit lies between them.
    gateway = gateway_factory(max_dataset_bytes=20000)
    big = [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / f"ct{i}") for i in range(3)]
    small = copy_with_new_uids(sample("MR_small.dcm"), tmp_path / "mr")
    # One association: the three big ones are refused, the small one after them is stored on it.
    store = subprocess.run(
        [dcmtk("storescu"), "-v", "--no-halt", "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(gateway.dicom.port),
         *map(str, big), str(small)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    output = store.stdout + store.stderr
    assert output.count("Received Store Response (Refused: OutOfResources)") == 3, output
    assert output.count("Received Store Response (Success)") == 1, output
    assert output.count("Requesting Association") == 1 and "Abort" not in output
    with gateway.runtime.database.read_session() as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 1
    [alert] = _alerts(gateway, "dataset-size")
    assert alert["event_types"][0]["code"] == "110132"
    offender = next(p for p in alert["participants"] if p["user_is_requestor"])
    assert offender["user_id"] == "STORESCU" and offender["network_access_point_id"] == "127.0.0.1"
    failed = [e for e in _events(gateway, "110104") if e["outcome"] != 0]
    assert len(failed) == 3  # each refused instance is audited as a failed transfer


def test_associations_per_host_beyond_the_limit_are_rejected_transient(
    gateway_factory: Callable[..., Any],
) -> None:
    gateway = gateway_factory(max_associations_per_host=2)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        for _ in range(3):
            echo = subprocess.run(
                [dcmtk("echoscu"), "-v", "-aet", "ECHOSCU", "-aec", "PNEUMO", "127.0.0.1", str(gateway.dicom.port)],
                capture_output=True, text=True, check=False, timeout=30,
            )
            output = echo.stdout + echo.stderr
            assert echo.returncode != 0, output
            # PS3.8 Table 9-21: rejected-transient, service-provider (presentation), local-limit-exceeded
            assert "Rejected Transient" in output and "Local Limit Exceeded" in output, output
    finally:
        for assoc in held:
            assoc.release()
    ok = subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "PNEUMO", "127.0.0.1", str(gateway.dicom.port)],
        capture_output=True, text=True, check=False, timeout=30,
    )
    assert ok.returncode == 0, ok.stderr  # released: the host may associate again
    [alert] = _alerts(gateway, "associations-per-host")  # three rejections, one alert
    assert alert["event_types"][0]["code"] == "110132"


def test_the_receive_file_stops_writing_at_the_limit(tmp_path: Path) -> None:
    """No more than the limit reaches the disk: the partial file goes as soon as it is passed."""
    previous = ReceiveFile.max_bytes
    ReceiveFile.max_bytes = 1000
    try:
        received = ReceiveFile(suffix=".dcm", dir=str(tmp_path))
        assert received.write(b"x" * 600) == 600 and Path(received.name).stat().st_size == 600
        assert received.write(b"x" * 600) == 600  # the peer is never told by an exception
        assert received.error is not None and received.error.errno == errno.EFBIG
        assert not Path(received.name).exists()
        assert received.write(b"x" * 10**6) == 10**6 and list(tmp_path.iterdir()) == []
        received.close()
    finally:
        ReceiveFile.max_bytes = previous
