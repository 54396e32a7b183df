"""``dicom_association``: one row per accepted association, written when it has ended, against
an in-process gateway with real peers (pynetdicom, DCMTK ``echoscu`` over TLS), on SQLite and
PostgreSQL. Released, aborted, refused instances counted, TLS noted, rejected associations not
written, a database that refuses the row costs the association nothing, and no patient data."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select, text
from structlog.testing import capture_logs

from conf.dev_pki import make_dev_pki
from storage.models import DicomAssociation, Instance
from tests.conftest import copy_with_new_uids, dcmtk, sample, wait_until

EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def _associate(gateway: Any, calling: str = "TESTSCU") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [EXPLICIT_LE, IMPLICIT_LE])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")


def _rows(gateway: Any, count: int | None = None) -> list[DicomAssociation]:
    """The recorded associations; with *count*, once there are that many (they are written from
    the connection's thread after the peer has seen the association end)."""
    def read() -> list[DicomAssociation]:
        with gateway.runtime.database.read_session() as session:
            return list(session.execute(select(DicomAssociation).order_by(DicomAssociation.id)).scalars())

    if count is None:
        return read()
    return list(wait_until(lambda: found if len(found := read()) >= count else None, timeout=20,
                           what=f"{count} association rows"))


def test_a_released_association_is_one_row_with_its_counts(
    database_url: str, gateway_factory: Any, tmp_path: Path
) -> None:
    # database_url first: its PostgreSQL schema must outlive the gateway, stopped at teardown.
    gateway = gateway_factory(database_url)
    good = pydicom.dcmread(copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in"))
    unfiled = pydicom.dcmread(copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "bad"))
    del unfiled.StudyInstanceUID  # cannot be filed: refused 0xC221
    before = dt.datetime.now(dt.UTC)
    assoc = _associate(gateway)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in (good, good, unfiled)]
    assoc.release()
    [row] = _rows(gateway, 1)
    assert statuses == [0x0000, 0x0000, 0xC221]
    assert (row.calling_ae, row.called_ae, row.peer_address, row.ended_by) == ("TESTSCU", "PNEUMO", "127.0.0.1", "released")
    assert (row.instances_stored, row.instances_refused, row.tls) == (2, 1, False)  # the duplicate counts as stored
    assert (row.acceptor_host, row.acceptor_pid) == (gateway.runtime.host_name, os.getpid())
    assert before - dt.timedelta(seconds=1) <= row.started_at <= row.ended_at <= dt.datetime.now(dt.UTC)
    # No patient data anywhere in the row.
    values = " ".join(str(getattr(row, column.key)) for column in DicomAssociation.__table__.columns)
    for secret in (str(good.PatientName), str(good.PatientID), good.StudyInstanceUID, good.SOPInstanceUID):
        assert secret not in values, secret


def test_an_abort_is_recorded_as_aborted_and_a_rejection_not_at_all(gateway_factory: Any) -> None:
    gateway = gateway_factory()
    with capture_logs() as logs:
        assert _associate(gateway, "INTRUDER").is_rejected
        wait_until(lambda: any(e["event"] == "dicom.association" and e["calling_ae"] == "INTRUDER" for e in logs),
                   timeout=20, what="the rejected association's line")
    assoc = _associate(gateway, "ECHOSCU")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0x0000
    assoc.abort()
    [row] = _rows(gateway, 1)  # the rejected INTRUDER, over before this one began, left no row
    assert (row.calling_ae, row.ended_by, row.instances_stored, row.instances_refused) == ("ECHOSCU", "aborted", 0, 0)


def test_an_association_over_tls_is_noted(gateway_factory: Any, tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    gateway = gateway_factory(tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                                   "ca_file": str(pki.ca_cert)})
    import subprocess

    echo = subprocess.run(
        [dcmtk("echoscu"), "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert),
         "-aet", "ECHOSCU", "-aec", "PNEUMO", "127.0.0.1", str(gateway.dicom.port)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert echo.returncode == 0, echo.stdout + echo.stderr
    [row] = _rows(gateway, 1)
    assert (row.calling_ae, row.ended_by, row.tls) == ("ECHOSCU", "released", True)


def test_a_database_that_refuses_the_row_costs_the_association_nothing(gateway_factory: Any, tmp_path: Path) -> None:
    """The row is written after the connection closed; its failure is one warning (no text of the
    database's error, which would quote the values)."""
    gateway = gateway_factory()
    database = gateway.runtime.database
    with database.session() as session:
        session.execute(text("ALTER TABLE dicom_association RENAME TO dicom_association_away"))
    image = pydicom.dcmread(copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in"))
    try:
        with capture_logs() as logs:
            assoc = _associate(gateway)
            assert assoc.is_established
            assert int(assoc.send_c_store(image).Status) == 0x0000
            assoc.release()
            assert assoc.is_released
            warning = wait_until(lambda: next((e for e in logs if e["event"] == "dicom.association.not_recorded"), None),
                                 timeout=20, what="the warning")
    finally:
        with database.session() as session:
            session.execute(text("ALTER TABLE dicom_association_away RENAME TO dicom_association"))
    assert warning["log_level"] == "warning" and warning["error"] == "OperationalError"
    with database.read_session() as session:
        assert session.execute(select(Instance.sop_instance_uid)).scalars().all() == [image.SOPInstanceUID]
    assoc = _associate(gateway)  # and the next association is recorded again
    assoc.release()
    [row] = _rows(gateway, 1)
    assert row.ended_by == "released"


@pytest.mark.parametrize("flags", [{"accepted": False, "rejected": True}, {"accepted": False, "rejected": False}])
def test_only_accepted_associations_make_a_record(flags: dict[str, bool]) -> None:
    from dicom_node.listener import AssociationLog

    class Assoc:
        requestor = None
        is_rejected, is_released, is_aborted = flags["rejected"], False, False

    summary = AssociationLog("10.0.0.1", 104)
    summary.accepted = flags["accepted"]
    assert summary.emit(Assoc()) is None
    summary.accepted = True
    Assoc.is_rejected, Assoc.is_released = False, True
    ended = summary.emit(Assoc(), tls=True)
    assert ended is not None and (ended.ended_by, ended.tls, ended.peer_address) == ("released", True, "10.0.0.1")
