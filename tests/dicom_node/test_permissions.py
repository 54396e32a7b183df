"""Who may do what, against a real ``pneumo serve`` with the shipped configuration.

* an association addressed to another called AE title is rejected (PS3.8 reason 7) and audited
  as a Security Alert, like an unknown calling AE title;
* a configured peer gets only the services its ``permissions`` grant: STORESCU (the default,
  echo + store) can neither query nor retrieve; FINDSCU may C-FIND but not C-GET; a C-MOVE may
  name only a configured destination; a C-STORE from a peer granted only "get" is refused 0x0124;
  each refusal is audited (Use of Restricted Function);
* the shipped configuration listens on loopback only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.dicom_node.shipped_serve import echo, security_alerts, shipped
from tests.gateway.serve_process import ServeProcess, pneumo

__all__ = ["shipped"]  # the fixture, imported for pytest

pytestmark = pytest.mark.slow

NODE_AUTHENTICATION, USE_OF_RESTRICTED_FUNCTION = "110126", "110132"


def _client(calling: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    return ae


def _store(server: ServeProcess, path: Path) -> None:
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port), str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr


def _study_identifier(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def _find(server: ServeProcess, calling: str, study_uid: str) -> list[int] | None:
    """C-FIND statuses, or None when the association offers no C-FIND context."""
    ae = _client(calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="PNEUMO")
    if not assoc.is_established:
        return None
    try:
        responses = assoc.send_c_find(_study_identifier(study_uid), StudyRootQueryRetrieveInformationModelFind)
        return [int(status.Status) for status, _ in responses if "Status" in status]
    except ValueError:  # no accepted presentation context for the SOP Class
        return None
    finally:
        assoc.release()


def _accept_store(event: Event) -> int:
    return 0x0000


def _get(server: ServeProcess, calling: str, study_uid: str) -> list[int] | None:
    """C-GET statuses (receiving on a CT storage context in the SCP role), or None when refused."""
    ae = _client(calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1", server.dicom_port, ae_title="PNEUMO",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, _accept_store)],
    )
    if not assoc.is_established:
        return None
    try:
        responses = assoc.send_c_get(_study_identifier(study_uid), StudyRootQueryRetrieveInformationModelGet)
        return [int(status.Status) for status, _ in responses if "Status" in status]
    except ValueError:
        return None
    finally:
        assoc.release()


def _alerts(server: ServeProcess, tmp_path: Path, event_type: str) -> list[str]:
    return [
        str(event["outcome_description"])
        for event in security_alerts(tmp_path / "var")
        if any(code["code"] == event_type for code in event["event_types"])
    ]


def test_wrong_called_ae_title_is_rejected_and_audited(shipped: ServeProcess, tmp_path: Path) -> None:
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "NOTPNEUMO", "127.0.0.1", str(shipped.dicom_port)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr
    assert echo(shipped.dicom_port) == 0x0000  # the right called AE title still gets in
    [alert] = _alerts(shipped, tmp_path, NODE_AUTHENTICATION)
    assert "called AE title 'NOTPNEUMO'" in alert


def test_a_storage_peer_can_neither_query_nor_retrieve(shipped: ServeProcess, tmp_path: Path) -> None:
    image = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    study_uid = str(pydicom.dcmread(image).StudyInstanceUID)
    _store(shipped, image)
    port = str(shipped.dicom_port)

    for tool, extra in (("findscu", []), ("getscu", ["-od", str(tmp_path)]), ("movescu", ["-aem", "STORESCU"])):
        result = subprocess.run(
            [dcmtk(tool), "-S", "-aet", "STORESCU", "-aec", "PNEUMO", *extra,
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", port],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode != 0, f"{tool} as STORESCU must be refused"
        assert "No Acceptable Presentation Contexts" in result.stderr or "No presentation context" in result.stderr
    assert _find(shipped, "STORESCU", study_uid) is None
    assert _get(shipped, "STORESCU", study_uid) is None
    assert not list(tmp_path.glob("CT*")), "nothing was retrieved"
    refused: set[str] = set()
    for alert in _alerts(shipped, tmp_path, USE_OF_RESTRICTED_FUNCTION):
        assert alert.startswith("STORESCU is not granted ")
        refused.update(alert.removeprefix("STORESCU is not granted ").split(", "))
    assert refused == {"find", "get", "move"}


def test_granted_services_only(shipped: ServeProcess, tmp_path: Path) -> None:
    image = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    study_uid = str(pydicom.dcmread(image).StudyInstanceUID)
    _store(shipped, image)

    assert _find(shipped, "FINDSCU", study_uid) == [0xFF00, 0x0000]  # one match, then Success
    assert _get(shipped, "FINDSCU", study_uid) is None  # find only
    assert _get(shipped, "GETSCU", study_uid) == [0xFF00, 0x0000]  # one sub-operation, then Success
    assert _find(shipped, "GETSCU", study_uid) is None  # get only

    # MOVESCU may move, but only to a configured peer with a port (PS3.4 C.4.2.1.5: 0xA801).
    ae = _client("MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", shipped.dicom_port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        responses = assoc.send_c_move(_study_identifier(study_uid), "EVILPACS", StudyRootQueryRetrieveInformationModelMove)
        statuses = [int(status.Status) for status, _ in responses if "Status" in status]
    finally:
        assoc.release()
    assert statuses == [0xA801]


def test_c_store_from_a_peer_granted_only_get_is_refused(shipped: ServeProcess, tmp_path: Path) -> None:
    image = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    ae = _client("GETSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # no role selection: SCU role
    assoc = ae.associate("127.0.0.1", shipped.dicom_port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(pydicom.dcmread(image))
    finally:
        assoc.release()
    assert int(status.Status) == 0x0124  # PS3.7 C.5: Refused: Not Authorized
    assert pneumo(shipped.config, "instances", "--json").stdout.strip() == ""
    assert any("GETSCU is not granted store" in alert for alert in _alerts(shipped, tmp_path, USE_OF_RESTRICTED_FUNCTION))


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on *port* (/proc/net/tcp and tcp6, state 0A)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_shipped_listener_binds_loopback_only(shipped: ServeProcess) -> None:
    addresses = _listening_addresses(shipped.dicom_port)
    assert addresses == {"0100007F"}, f"listening on {addresses} (0100007F is 127.0.0.1)"
