"""DICOM over TLS (PS3.15 B.9, BCP 195) against real peers: DCMTK ``echoscu``/``storescu``/
``movescu``/``storescp`` with ``+tls``, Python ``ssl`` clients and raw sockets, and an in-process
gateway whose listener has ``[dicom.tls]`` on, with a development PKI made per test.

* mutual TLS: DCMTK echo and store of a real radiograph (and anonymous TLS when client
  certificates are optional); a client without a certificate, or with one from another CA, is
  refused in the handshake and audited as a Security Alert (Node Authentication);
* the port speaks TLS only: plain ``echoscu`` fails, and the next TLS association is served;
  TLS 1.1 is refused (BCP 195);
* the listener's defences hold on TLS: a silent connection is closed at the ARTIM timeout
  without holding up other peers (the handshake is not in the accept loop), pending TLS
  connections are bounded per host, and a malformed A-ASSOCIATE-RQ sent over TLS is refused;
* ``dicom.peers[].certificate_sha256``: the mapped certificate is accepted, another one (or none)
  is rejected with A-ASSOCIATE-RJ and audited;
* our SCU: a delivery to ``storescp +tls`` (which requires our client certificate) arrives; a
  failed handshake is a transient delivery failure; C-MOVE sub-associations go over TLS.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]
from sqlalchemy import func, select

from audit.models import AuditRecord
from conf.dev_pki import DevPki, make_dev_pki
from conf.settings import DicomDestination
from conf.tls import TlsSettings, client_context, normalise_fingerprint
from dicom_node.listener import A_ABORT_PDU, REJECT_PROTOCOL_VERSION
from dicom_node.storage_scu import DeliveryUnavailableError, send_instance
from dicom_node.tls import HandshakeFailure, classify, outgoing_context
from storage.models import Instance
from tests.conftest import copy_with_new_uids, dcmtk, sample, wait_until
from tests.dicom_node import pdu_fuzz as fz
from tests.dicom_peers import StoreScp

SECURITY_ALERT, NODE_AUTHENTICATION = "110113", "110126"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
#: Slack for a shared 2-core machine on top of the ARTIM timeout.
SLACK = 10.0


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return make_dev_pki(tmp_path / "pki")


@pytest.fixture
def foreign(tmp_path: Path) -> DevPki:
    """Certificates signed by a CA the gateway does not trust."""
    return make_dev_pki(tmp_path / "foreign")


def _tls(pki: DevPki, *, require_client_cert: bool = True) -> dict[str, Any]:
    return {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "ca_file": str(pki.ca_cert),
            "require_client_cert": require_client_cert}


def _fingerprint(pem: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(pem.read_text())
    import hashlib

    return hashlib.sha256(der).hexdigest()


def _run(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False)


def _echo(port: int, *tls: str, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return _run("echoscu", *tls, "-aet", calling, "-aec", "PNEUMO", "127.0.0.1", str(port))


def _mutual(pki: DevPki) -> tuple[str, ...]:
    return ("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert))


def _alerts(gateway: Any, count: int | None = None) -> list[dict[str, Any]]:
    """The Security Alerts audited so far; with *count*, once there are that many (the listener
    writes them in the connection's thread, which may finish after the client gave up)."""
    if count is not None:
        def enough() -> list[dict[str, Any]] | None:
            found = _alerts(gateway)
            return found if len(found) >= count else None

        return list(wait_until(enough, timeout=30, what=f"{count} security alerts"))
    with gateway.runtime.database.read_session() as session:
        rows = session.execute(
            select(AuditRecord).where(AuditRecord.event_id == SECURITY_ALERT).order_by(AuditRecord.seq)
        ).scalars()
        return [row.event for row in rows]


def _count_instances(gateway: Any) -> int:
    with gateway.runtime.database.read_session() as session:
        return int(session.execute(select(func.count()).select_from(Instance)).scalar_one())


def _tls_client(pki: DevPki | None, ca: DevPki) -> ssl.SSLContext:
    """A Python client context trusting *ca*, presenting *pki*'s client certificate (if any)."""
    tls = TlsSettings(ca_file=ca.ca_cert) if pki is None else TlsSettings(
        cert_file=pki.client_cert, key_file=pki.client_key, ca_file=ca.ca_cert
    )
    return client_context(tls, check_hostname=False)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed *sock* (EOF or reset), or None if still open after *seconds*."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - started


# --------------------------------------------------------------------------- the listener


@pytest.mark.parametrize("require_client_cert", [True, False])
def test_dcmtk_echo_and_store_over_tls(gateway_factory: Any, pki: DevPki, tmp_path: Path, require_client_cert: bool) -> None:
    gateway = gateway_factory(tls=_tls(pki, require_client_cert=require_client_cert))
    port = gateway.dicom.port
    echo = _echo(port, *_mutual(pki))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    image = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")
    store = _run("storescu", *_mutual(pki), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(port), str(image))
    assert store.returncode == 0, store.stdout + store.stderr
    with gateway.runtime.database.read_session() as session:
        stored = session.execute(select(Instance.sop_instance_uid)).scalars().all()
    assert stored == [pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID]
    anonymous = _echo(port, "+tla", "+cf", str(pki.ca_cert))
    if require_client_cert:
        assert anonymous.returncode != 0
        [alert] = _alerts(gateway, 1)
        assert alert["event_types"][0]["code"] == NODE_AUTHENTICATION
        assert "no client certificate" in alert["outcome_description"]
        assert alert["participants"][1]["network_access_point_id"] == "127.0.0.1"
    else:  # certificates optional: anonymous TLS clients are still encrypted and may associate
        assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
        assert _alerts(gateway) == []


def test_certificate_from_another_ca_is_refused_and_audited(gateway_factory: Any, pki: DevPki, foreign: DevPki) -> None:
    gateway = gateway_factory(tls=_tls(pki, require_client_cert=False))
    refused = _echo(gateway.dicom.port, "+tls", str(foreign.client_key), str(foreign.client_cert), "+cf", str(pki.ca_cert))
    assert refused.returncode != 0
    [alert] = _alerts(gateway, 1)
    assert alert["event_types"][0]["code"] == NODE_AUTHENTICATION
    assert "client certificate rejected" in alert["outcome_description"]
    assert _echo(gateway.dicom.port, *_mutual(pki)).returncode == 0


def test_plain_client_on_the_tls_port_fails_and_tls_goes_on(gateway_factory: Any, pki: DevPki) -> None:
    gateway = gateway_factory(tls=_tls(pki))
    plain = _echo(gateway.dicom.port)
    assert plain.returncode != 0
    assert "Association Request Failed" in plain.stdout + plain.stderr
    for _ in range(2):
        served = _echo(gateway.dicom.port, *_mutual(pki))
        assert served.returncode == 0, served.stdout + served.stderr
    assert _alerts(gateway) == []  # not TLS at all: transport noise, logged, not a node authentication


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(gateway_factory: Any, pki: DevPki) -> None:
    gateway = gateway_factory(tls=_tls(pki))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 offer TLS 1.1 at all
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.load_cert_chain(pki.client_cert, pki.client_key)
    with socket.create_connection(("127.0.0.1", gateway.dicom.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError) as refused:
            old.wrap_socket(raw)
    assert "PROTOCOL_VERSION" in str(refused.value).upper() or "UNSUPPORTED" in str(refused.value).upper()
    assert _echo(gateway.dicom.port, *_mutual(pki)).returncode == 0


def test_silent_connection_closed_at_artim_without_blocking_others(gateway_factory: Any, pki: DevPki) -> None:
    """The handshake runs in the connection's thread: a peer that connects and says nothing holds
    up nobody, and is closed when the ARTIM timer (association_request_timeout) expires."""
    gateway = gateway_factory(tls=_tls(pki), association_request_timeout=2.0)
    port = gateway.dicom.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        started = time.monotonic()
        served = _echo(port, *_mutual(pki))
        assert served.returncode == 0, served.stdout + served.stderr
        assert time.monotonic() - started < 2.0 + SLACK
        closed_after = _closed_within(silent, 2.0 + SLACK)
    assert closed_after is not None, "a silent TLS connection must be closed at the ARTIM timeout"


def test_handshake_then_no_request_is_closed_at_artim(gateway_factory: Any, pki: DevPki) -> None:
    """ARTIM covers the handshake and the A-ASSOCIATE-RQ together."""
    gateway = gateway_factory(tls=_tls(pki), association_request_timeout=2.0)
    context = _tls_client(pki, pki)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", gateway.dicom.port), timeout=10)) as tls:
        started = time.monotonic()
        assert _closed_within(tls, 2.0 + SLACK) is not None
        assert time.monotonic() - started >= 1.0


def test_pending_tls_connections_are_bounded_per_host(gateway_factory: Any, pki: DevPki) -> None:
    """Newer connections displace the oldest pending ones of the same address long before ARTIM."""
    gateway = gateway_factory(tls=_tls(pki), association_request_timeout=60.0, max_pending_per_host=3)
    port = gateway.dicom.port
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
    try:
        assert _closed_within(silent[0], SLACK) is not None, "the oldest pending connection must be evicted"
        served = _echo(port, *_mutual(pki))
        assert served.returncode == 0, served.stdout + served.stderr
    finally:
        for sock in silent:
            sock.close()


def test_malformed_requests_over_tls_are_refused(gateway_factory: Any, pki: DevPki) -> None:
    """The first-PDU checks run on TLS too (the PDU is read and checked, then replayed)."""
    gateway = gateway_factory(tls=_tls(pki))
    context = _tls_client(pki, pki)
    good = fz.associate_rq("ECHOSCU", "PNEUMO", [fz.Context(1, VERIFICATION, (EXPLICIT_LE,))])
    bad_version = good[:6] + struct.pack(">H", 0x0002) + good[8:]
    answers = []
    for first in (bad_version, fz.release_rq(), good):
        with context.wrap_socket(socket.create_connection(("127.0.0.1", gateway.dicom.port), timeout=10)) as tls:
            tls.sendall(first)
            answers.append(_read_pdu(tls))
    assert answers[0] == REJECT_PROTOCOL_VERSION
    assert answers[1] == A_ABORT_PDU
    assert answers[2][0] == 0x02  # A-ASSOCIATE-AC: the replayed request reached pynetdicom whole


def _read_pdu(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_peer_certificate_mapping(gateway_factory: Any, pki: DevPki, foreign: DevPki) -> None:
    """ECHOSCU is mapped to the client certificate; TESTSCU to a certificate nobody presents."""
    peers = [
        {"ae_title": "ECHOSCU", "host": "127.0.0.1", "certificate_sha256": _fingerprint(pki.client_cert)},
        {"ae_title": "TESTSCU", "host": "127.0.0.1", "certificate_sha256": _fingerprint(pki.server_cert).upper()},
    ]
    gateway = gateway_factory(tls=_tls(pki, require_client_cert=False), peers=peers)
    port = gateway.dicom.port
    mapped = _echo(port, *_mutual(pki))
    assert mapped.returncode == 0, mapped.stdout + mapped.stderr
    other = _echo(port, *_mutual(pki), calling="TESTSCU")
    assert other.returncode != 0 and "Calling AE Title Not Recognized" in other.stdout + other.stderr
    anonymous = _echo(port, "+tla", "+cf", str(pki.ca_cert))
    assert anonymous.returncode != 0 and "Calling AE Title Not Recognized" in anonymous.stdout + anonymous.stderr
    reasons = [alert["outcome_description"] for alert in _alerts(gateway, 2)]
    assert len(reasons) == 2
    assert "TESTSCU" in reasons[0] and "not its own" in reasons[0]
    assert "ECHOSCU" in reasons[1] and "none presented" in reasons[1]
    assert normalise_fingerprint(peers[1]["certificate_sha256"]) == _fingerprint(pki.server_cert)


def test_handshake_failures_are_told_apart() -> None:
    """Only a peer's failed node authentication is a Security Alert."""
    no_cert = ssl.SSLError(1, "peer did not return a certificate")
    no_cert.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    plain = ssl.SSLError(1, "wrong version number")
    plain.reason = "WRONG_VERSION_NUMBER"
    assert classify(no_cert).failure is HandshakeFailure.NO_CLIENT_CERTIFICATE
    assert classify(plain).failure is HandshakeFailure.NOT_TLS
    assert classify(TimeoutError()).failure is HandshakeFailure.TIMED_OUT
    assert classify(ssl.SSLEOFError()).failure is HandshakeFailure.CLOSED
    assert [f for f in HandshakeFailure if f.node_authentication] == [
        HandshakeFailure.NO_CLIENT_CERTIFICATE, HandshakeFailure.CERTIFICATE_REJECTED,
    ]


# --------------------------------------------------------------------------- our SCU


def _storescp_tls(pki: DevPki) -> tuple[str, ...]:
    """storescp over TLS, requiring and verifying our client certificate (``-rc``, its default)."""
    return ("+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca_cert), "-rc")


def _our_side(pki: DevPki) -> TlsSettings:
    """The gateway's [dicom.tls]: the same CA; its certificate (server.pem) is its client certificate."""
    return TlsSettings(cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca_cert)


def test_delivery_to_storescp_over_tls(tmp_path: Path, pki: DevPki) -> None:
    image = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    with StoreScp(tmp_path / "pacs", options=_storescp_tls(pki)) as scp:
        destination = DicomDestination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=scp.port, tls=True)
        result = send_instance(image, destination, "PNEUMO", 10, tls_context=outgoing_context(_our_side(pki)))
        received = scp.received()
    assert result.status == 0x0000
    [arrived] = received
    assert pydicom.dcmread(arrived).SOPInstanceUID == pydicom.dcmread(image).SOPInstanceUID


@pytest.mark.parametrize("peer", ["foreign-ca", "plain"])
def test_failed_handshake_is_a_transient_delivery_failure(tmp_path: Path, pki: DevPki, foreign: DevPki, peer: str) -> None:
    image = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    options = _storescp_tls(foreign) if peer == "foreign-ca" else ()
    with StoreScp(tmp_path / "pacs", options=options) as scp:
        destination = DicomDestination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=scp.port, tls=True)
        with pytest.raises(DeliveryUnavailableError, match="over TLS"):
            send_instance(image, destination, "PNEUMO", 5, tls_context=outgoing_context(_our_side(pki)))
        assert scp.received() == []


def test_c_move_sub_association_goes_over_tls(gateway_factory: Any, pki: DevPki, tmp_path: Path) -> None:
    """A C-MOVE over TLS (pynetdicom: DCMTK 3.6.7's movescu has no TLS) to the TLS gateway, of a
    study to storescp +tls, which requires our client certificate: the sub-association is TLS."""
    image = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    with StoreScp(tmp_path / "dest", ae_title="DEST", options=_storescp_tls(pki)) as scp:
        peers = [
            {"ae_title": "STORESCU", "host": "127.0.0.1"},
            {"ae_title": "MOVESCU", "host": "127.0.0.1", "permissions": ["echo", "move"]},
            {"ae_title": "DEST", "host": "127.0.0.1", "port": scp.port},
        ]
        gateway = gateway_factory(tls=_tls(pki), peers=peers)
        port = str(gateway.dicom.port)
        stored = _run("storescu", *_mutual(pki), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", port, str(image))
        assert stored.returncode == 0, stored.stdout + stored.stderr
        study = pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID
        client = AE(ae_title="MOVESCU")
        client.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = client.associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO",
                                 tls_args=(_tls_client(pki, pki), "127.0.0.1"))
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", study
        try:
            statuses = [int(status.Status) for status, _ in assoc.send_c_move(
                identifier, "DEST", StudyRootQueryRetrieveInformationModelMove)]
        finally:
            assoc.release()
        assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
        received = scp.received()
    assert [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received] == [
        pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID
    ]

