"""MLLP over TLS (hl7/tls.py, hl7/mllp.py, [hl7.tls]) with real peers on 127.0.0.1.

Certificates from :func:`conf.dev_pki.make_dev_pki` (a CA, a server certificate for localhost /
127.0.0.1 that may also serve as a client certificate, a client certificate). The listener is a
real :class:`MllpServer` in front of the real :class:`InboundService` and a SQLite database:

* a Python ``ssl`` client and ``openssl s_client`` send an order / ADT and read the AA; the
  message is stored and the client certificate's fingerprint reached the application;
* mutual TLS: a client without a certificate, or with one from another CA, gets no ACK, and a
  Security Alert (Node Authentication) is audited; the listener goes on serving;
* plain TCP to the TLS port gets no HL7 processing (nothing stored, nothing audited as a message),
  and a silent half-open connection does not hold up the next client's handshake;
* ``hl7.peers[].certificate_sha256``: the peer's own certificate gets AA; another certificate of
  the same CA, or none, gets AR with an ERR segment and a Security Alert;
* ``hl7.max_message_bytes`` over TLS: AR and the connection closed;
* the sender (:class:`Hl7ResultChannel`, ``tls = true``) to a TLS EHR played by an ``ssl`` server
  thread that requires our client certificate: the ORU arrives and its AA is read; a host name
  the certificate does not carry, a CA we do not trust, a plain-TCP receiver: retryable failures,
  nothing delivered.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import select

from audit.events import AuditSource
from audit.models import AuditRecord
from conf.dev_pki import DevPki, make_dev_pki
from conf.settings import Hl7Destination, Hl7Peer, Hl7Settings
from conf.tls import TlsSettings, server_context
from hl7.inbound import InboundService
from hl7.messages import build_oru, parse_ack
from hl7.mllp import ConnectionInfo, Frame, FrameDecoder, FrameError, MllpServer, encode
from hl7.results_channel import Hl7ResultChannel
from storage.db import Database
from storage.migrate import upgrade
from storage.models import Hl7InboundMessage, ImagingOrder
from storage.outbox import DeliveryFailedError, DeliveryItem
from tests.conftest import free_port, wait_until
from tests.hl7.test_inbound import adt_a08, check_ack, orm
from tests.hl7.test_messages import oru_input

HOST = "127.0.0.1"
SOURCE = AuditSource("PNEUMO@test")
IMPORT, SECURITY_ALERT, NODE_AUTHENTICATION = "110107", "110113", "110126"


# --------------------------------------------------------------------------- certificates and database


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Another CA, whose server certificate names only a host that is not ours."""
    return make_dev_pki(tmp_path_factory.mktemp("other-pki"), hosts=("ehr.elsewhere.example",))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'pneumo.db'}")
    upgrade(database)
    yield database
    database.dispose()


def fingerprint(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def audit_events(database: Database, code: str) -> list[dict[str, Any]]:
    with database.read_session() as session:
        records = session.execute(select(AuditRecord).where(AuditRecord.event_id == code).order_by(AuditRecord.seq))
        return [record.event for record in records.scalars()]


def rows(database: Database, model: Any) -> list[Any]:
    with database.read_session() as session:
        return list(session.execute(select(model)).scalars())


# --------------------------------------------------------------------------- the listener


@dataclass
class TlsListener:
    server: MllpServer
    database: Database
    #: ConnectionInfo of every frame the application saw.
    seen: list[ConnectionInfo] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture
def listen(db: Database, pki: DevPki) -> Iterator[Callable[..., TlsListener]]:
    started: list[MllpServer] = []

    def start(
        *,
        require_client_cert: bool = True,
        peer_fingerprint: str | None = None,
        max_message_bytes: int = 4096,
        idle_timeout: float = 10.0,
        handshake_timeout: float | None = None,
    ) -> TlsListener:
        tls = TlsSettings(
            cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca_cert, require_client_cert=require_client_cert
        )
        settings = Hl7Settings(
            port=0,
            tls=tls,
            peers=[Hl7Peer(sending_application="RIS", sending_facility="HOSP", certificate_sha256=peer_fingerprint)],
        )
        service = InboundService(db, SOURCE, settings)
        listener: TlsListener

        def handler(payload: bytes, info: ConnectionInfo) -> bytes:
            listener.seen.append(info)
            return service.handle(payload, info)

        server = MllpServer(
            HOST,
            0,
            handler,
            on_frame_error=service.on_frame_error,
            max_message_bytes=max_message_bytes,
            idle_timeout=idle_timeout,
            max_connections=8,
            ssl_context=server_context(tls),
            handshake_timeout=handshake_timeout,
            on_tls_auth_failure=service.on_tls_auth_failure,
        )
        listener = TlsListener(server, db)
        server.start()
        started.append(server)
        return listener

    yield start
    for server in started:
        server.stop()


def client_context(pki: DevPki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """The RIS's side: trusts our CA, checks the host name, presents *cert* (certificate, key)."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def read_replies(sock: socket.socket, count: int) -> tuple[list[bytes], bool]:
    """Up to *count* reply blocks: (payloads, whether the connection ended first)."""
    decoder = FrameDecoder(1 << 20)
    replies: list[bytes] = []
    while len(replies) < count:
        try:
            data = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            return replies, True
        if not data:
            return replies, True
        for item in decoder.feed(data):
            assert isinstance(item, Frame), item
            replies.append(item.payload)
    return replies, False


def failures(logs: list[MutableMapping[str, Any]]) -> list[str]:
    """The reasons of the ``hl7.tls_handshake_failed`` lines captured."""
    return [entry["reason"] for entry in logs if entry["event"] == "hl7.tls_handshake_failed"]


def tls_send(
    port: int, context: ssl.SSLContext, *messages: str | bytes, server_hostname: str = "localhost", closed_after: bool = False
) -> tuple[list[bytes], bool]:
    """All *messages* over one TLS connection: their replies, and whether the server closed it
    (read on to the end with *closed_after*)."""
    with (
        socket.create_connection((HOST, port), timeout=15) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as sock,
    ):
        sock.sendall(b"".join(encode(m) for m in messages))
        replies, closed = read_replies(sock, len(messages))
        if closed_after and not closed:
            more, closed = read_replies(sock, 1)
            assert more == []
        return replies, closed


# --------------------------------------------------------------------------- the listener: exchanges


def test_python_ssl_client_sends_an_order_and_an_adt_and_reads_the_acks(listen: Callable[..., TlsListener], pki: DevPki) -> None:
    listener = listen()
    replies, closed = tls_send(
        listener.port, client_context(pki, (pki.client_cert, pki.client_key)), orm("TLS-0001"), adt_a08("TLS-0002")
    )
    assert not closed
    check_ack(replies[0], "AA", "TLS-0001")
    check_ack(replies[1], "AA", "TLS-0002")
    [order] = rows(listener.database, ImagingOrder)
    assert order.accession_number == "ACC-5001"
    # The application knows which certificate the frames came with (what certificate_sha256 matches).
    assert {info.certificate_sha256 for info in listener.seen} == {fingerprint(pki.client_cert)}
    assert audit_events(listener.database, SECURITY_ALERT) == []


def test_openssl_s_client_exchange(listen: Callable[..., TlsListener], pki: DevPki) -> None:
    """OpenSSL's own client, TLS 1.3 and TLS 1.2 (a BCP 195 cipher), with the client certificate."""
    listener = listen(idle_timeout=2.0)  # the server ends the exchange: s_client waits for it (-ign_eof)
    for version, control in (("-tls1_3", "OSSL-13"), ("-tls1_2", "OSSL-12")):
        done = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"{HOST}:{listener.port}",
                version,
                "-quiet",
                "-ign_eof",
                "-verify_return_error",
                "-CAfile",
                str(pki.ca_cert),
                "-verify_hostname",
                "localhost",
                "-cert",
                str(pki.client_cert),
                "-key",
                str(pki.client_key),
            ],
            input=encode(orm(control)),
            capture_output=True,
            timeout=60,
            check=False,
        )
        decoder = FrameDecoder(1 << 20)
        frames = [item for item in decoder.feed(done.stdout) if isinstance(item, Frame)]
        assert len(frames) == 1, (version, done.stderr[-500:])
        check_ack(frames[0].payload, "AA", control)
    assert len(rows(listener.database, Hl7InboundMessage)) == 2


def test_tls_1_1_client_is_refused(listen: Callable[..., TlsListener], pki: DevPki) -> None:
    listener = listen()
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{HOST}:{listener.port}",
            "-tls1_1",
            "-CAfile",
            str(pki.ca_cert),
            "-cert",
            str(pki.client_cert),
            "-key",
            str(pki.client_key),
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ],
        input=encode(orm("OLD-0001")),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert b"alert protocol version" in done.stderr  # our listener refused it (BCP 195: TLS 1.2 or later)
    assert b"\x0b" not in done.stdout  # no MLLP block came back
    assert rows(listener.database, Hl7InboundMessage) == []


# --------------------------------------------------------------------------- node authentication


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_client_without_our_certificate_is_refused_and_alerted(
    listen: Callable[..., TlsListener], pki: DevPki, other_pki: DevPki, who: str
) -> None:
    listener = listen()
    cert = None if who == "no certificate" else (other_pki.client_cert, other_pki.client_key)
    with structlog.testing.capture_logs() as logs:
        try:
            replies, closed = tls_send(listener.port, client_context(pki, cert), orm("MTLS-0001"))
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            replies, closed = [], True  # refused in the handshake itself (TLS 1.2) or on the first write
        alerts = wait_until(lambda: audit_events(listener.database, SECURITY_ALERT), timeout=10, what="the alert")
    assert (replies, closed) == ([], True)
    assert rows(listener.database, Hl7InboundMessage) == [] and audit_events(listener.database, IMPORT) == []
    [alert] = alerts
    assert alert["event_types"][0]["code"] == NODE_AUTHENTICATION
    assert alert["participants"][1]["network_access_point_id"] == HOST
    expected = "tls-no-client-certificate" if cert is None else "tls-certificate-rejected"
    assert expected in alert["outcome_description"]
    [line] = [entry for entry in logs if entry["event"] == "hl7.tls_handshake_failed"]
    assert (line["log_level"], line["reason"], line["address"]) == ("warning", expected, HOST)
    # The listener goes on serving the peer that has its certificate.
    replies, _ = tls_send(listener.port, client_context(pki, (pki.client_cert, pki.client_key)), orm("MTLS-0002"))
    check_ack(replies[0], "AA", "MTLS-0002")


def test_plain_tcp_to_the_tls_port_gets_no_hl7_processing(listen: Callable[..., TlsListener], pki: DevPki) -> None:
    listener = listen()
    with structlog.testing.capture_logs() as logs, socket.create_connection((HOST, listener.port), timeout=15) as plain:
        plain.sendall(encode(orm("PLAIN-0001")))
        answer = b""
        try:
            while chunk := plain.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        # The server logs after closing: wait for the line, then for the slot to be released.
        wait_until(lambda: failures(logs), timeout=10, what="the handshake failure logged")
        wait_until(lambda: listener.server.active_connections == 0, timeout=10, what="the slot released")
    assert b"\x0b" not in answer  # at most a TLS alert record, never an MLLP block
    assert listener.seen == []
    assert rows(listener.database, Hl7InboundMessage) == [] and audit_events(listener.database, IMPORT) == []
    assert audit_events(listener.database, SECURITY_ALERT) == []  # transport noise, not node authentication
    assert failures(logs) == ["tls-not-tls"]
    replies, _ = tls_send(listener.port, client_context(pki, (pki.client_cert, pki.client_key)), orm("PLAIN-0002"))
    check_ack(replies[0], "AA", "PLAIN-0002")


def test_a_silent_connection_does_not_hold_up_the_next_handshake(listen: Callable[..., TlsListener], pki: DevPki) -> None:
    """The handshake runs in the connection's thread: a peer that connects and says nothing holds
    its own slot until the handshake timeout, not the accept loop."""
    listener = listen(handshake_timeout=30.0)
    with socket.create_connection((HOST, listener.port), timeout=15):
        wait_until(lambda: listener.server.active_connections == 1, timeout=10, what="the silent connection admitted")
        replies, _ = tls_send(listener.port, client_context(pki, (pki.client_cert, pki.client_key)), orm("SLOW-0001"))
        check_ack(replies[0], "AA", "SLOW-0001")
        assert listener.server.active_connections >= 1  # the silent one is still waiting


def test_handshake_timeout_closes_a_silent_connection(listen: Callable[..., TlsListener]) -> None:
    listener = listen(handshake_timeout=0.5)
    with structlog.testing.capture_logs() as logs, socket.create_connection((HOST, listener.port), timeout=15) as silent:
        assert silent.recv(1024) == b""  # closed by the server, without a byte
        wait_until(lambda: listener.server.active_connections == 0, timeout=10, what="the slot released")
    assert failures(logs) == ["tls-timed-out"]


def test_stop_interrupts_a_pending_handshake(listen: Callable[..., TlsListener]) -> None:
    listener = listen(handshake_timeout=60.0)
    with socket.create_connection((HOST, listener.port), timeout=15) as silent:
        wait_until(lambda: listener.server.active_connections == 1, timeout=10, what="the silent connection admitted")
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            listener.server.stop(timeout=10)
            took = time.monotonic() - started
        assert took < 5, took
        assert listener.server.active_connections == 0
        assert not [e for e in logs if e["event"] in ("hl7.listener.stop_incomplete", "hl7.tls_handshake_failed")]
        assert silent.recv(1024) == b""


# --------------------------------------------------------------------------- certificate_sha256 of a peer


def test_peer_bound_to_its_certificate(listen: Callable[..., TlsListener], pki: DevPki) -> None:
    listener = listen(require_client_cert=False, peer_fingerprint=fingerprint(pki.client_cert).upper())
    own = client_context(pki, (pki.client_cert, pki.client_key))
    # The server certificate is also a valid client certificate of the same CA: TLS accepts it,
    # the peer binding does not.
    same_ca = client_context(pki, (pki.server_cert, pki.server_key))
    nothing = client_context(pki, None)
    check_ack(tls_send(listener.port, own, orm("FP-0001"))[0][0], "AA", "FP-0001")
    for control, context in (("FP-0002", same_ca), ("FP-0003", nothing)):
        [reply], _ = tls_send(listener.port, context, orm(control))
        check_ack(reply, "AR", control, error=207)
        assert "client certificate" in (parse_ack(reply)[2] or "")
    assert [order.accession_number for order in rows(listener.database, ImagingOrder)] == ["ACC-5001"]
    # Both refused with AR; one Security Alert: the second refusal from the same address within
    # the minute is counted into the next alert, not written (audit.alert_throttle).
    alerts = audit_events(listener.database, SECURITY_ALERT)
    assert [a["outcome_description"] for a in alerts] == ["HL7 sender without its TLS client certificate"]
    assert {a["participants"][1]["user_id"] for a in alerts} == {"RIS@HOSP"}


def test_frame_size_limit_holds_over_tls(listen: Callable[..., TlsListener], pki: DevPki) -> None:
    listener = listen(max_message_bytes=2048)
    big = orm("BIG-0001") + "NTE|1||" + "X" * 4000 + "\r"
    replies, closed = tls_send(listener.port, client_context(pki, (pki.client_cert, pki.client_key)), big, closed_after=True)
    assert closed and len(replies) == 1
    assert parse_ack(replies[0])[0] == "AR"
    assert rows(listener.database, Hl7InboundMessage) == []


# --------------------------------------------------------------------------- the sender


class TlsEhr:
    """The EHR's interface engine over TLS: requires a client certificate of *client_ca*, answers
    each ORU with AA, records the messages and the client certificates' fingerprints."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None, *, tls: bool = True) -> None:
        self.messages: list[str] = []
        self.client_certificates: list[str | None] = []
        self.handshake_errors: list[str] = []
        self.frame_errors: list[str] = []
        self._context: ssl.SSLContext | None = None
        if tls:
            settings = TlsSettings(cert_file=cert, key_file=key, ca_file=client_ca, require_client_cert=client_ca is not None)
            self._context = server_context(settings)
        self.port = free_port()
        self._server = socket.create_server((HOST, self.port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._server.accept()
            except TimeoutError:
                continue
            raw.settimeout(10)
            try:
                conn = self._context.wrap_socket(raw, server_side=True) if self._context else raw
            except (ssl.SSLError, OSError) as exc:
                self.handshake_errors.append(exc.__class__.__name__)
                raw.close()
                continue
            with conn:
                try:
                    self._answer(conn)
                except OSError:
                    continue

    def _answer(self, conn: socket.socket) -> None:
        if isinstance(conn, ssl.SSLSocket):
            der = conn.getpeercert(binary_form=True)
            self.client_certificates.append(hashlib.sha256(der).hexdigest() if der else None)
        decoder = FrameDecoder(1 << 20)
        while chunk := conn.recv(65536):
            for item in decoder.feed(chunk):
                if isinstance(item, FrameError):  # a TLS ClientHello at a plain receiver: not MLLP
                    self.frame_errors.append(item.reason)
                    return
                text = item.payload.decode()
                self.messages.append(text)
                control = text.split("\r", 1)[0].split("|")[9]
                ack = f"MSH|^~\\&|EHR|HOSP|PNEUMO|RAD|20261130120000||ACK^R01^ACK|A{control}|P|2.5.1\rMSA|AA|{control}\r"
                conn.sendall(encode(ack))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture
def ehrs() -> Iterator[list[TlsEhr]]:
    running: list[TlsEhr] = []
    yield running
    for ehr in running:
        ehr.close()


def channel(
    ehr: TlsEhr, tls: TlsSettings, *, host: str = HOST, destination_tls: bool = True, timeout: float = 10
) -> Hl7ResultChannel:
    settings = Hl7Settings(
        tls=tls,
        ack_timeout_seconds=timeout,
        destinations=[
            Hl7Destination(
                name="ehr",
                host=host,
                port=ehr.port,
                receiving_application="RIS",
                receiving_facility="RADIOLOGY",
                tls=destination_tls,
            )
        ],
    )
    return Hl7ResultChannel(settings, SOURCE)


ITEM = DeliveryItem(
    subject="study-result/1",
    content=oru_input(control_id="PNR1"),
    study_uid="1.2.3",
    patient_id="P",
    patient_name=None,
    accession="A",
)


def test_sender_delivers_an_oru_over_mutual_tls(pki: DevPki, ehrs: list[TlsEhr]) -> None:
    ehr = TlsEhr(pki.server_cert, pki.server_key, pki.ca_cert)
    ehrs.append(ehr)
    ours = TlsSettings(cert_file=pki.client_cert, key_file=pki.client_key, ca_file=pki.ca_cert)
    receipt = channel(ehr, ours, host="localhost").send(ITEM, "ehr")  # the certificate names localhost and 127.0.0.1
    assert receipt.peer_status == "AA" and receipt.details == {"control_id": "PNR1"}
    receipt = channel(ehr, ours, host=HOST).send(ITEM, "ehr")
    assert receipt.peer_status == "AA"
    assert ehr.messages == [build_oru(ITEM.content)] * 2
    assert ehr.client_certificates == [fingerprint(pki.client_cert)] * 2


@pytest.mark.parametrize("case", ["host name mismatch", "unknown CA", "receiver not TLS", "no client certificate"])
def test_sender_refuses_a_receiver_it_cannot_authenticate(pki: DevPki, other_pki: DevPki, ehrs: list[TlsEhr], case: str) -> None:
    """Each is a failed, retryable delivery attempt (like a refused connection); nothing arrives."""
    ours = TlsSettings(cert_file=pki.client_cert, key_file=pki.client_key, ca_file=pki.ca_cert)
    host = HOST
    if case == "host name mismatch":
        # A certificate our CA setting trusts, issued to another host (ehr.elsewhere.example).
        ehr = TlsEhr(other_pki.server_cert, other_pki.server_key, None)
        ours = TlsSettings(cert_file=pki.client_cert, key_file=pki.client_key, ca_file=other_pki.ca_cert)
        host, expected = "localhost", "Hostname mismatch, certificate is not valid for 'localhost'"
    elif case == "unknown CA":
        ehr = TlsEhr(other_pki.server_cert, other_pki.server_key, None)
        expected = "server certificate rejected"
    elif case == "receiver not TLS":
        ehr = TlsEhr(pki.server_cert, pki.server_key, None, tls=False)
        expected = "TLS handshake failed"
    else:
        ehr = TlsEhr(pki.server_cert, pki.server_key, pki.ca_cert)
        ours = TlsSettings(ca_file=pki.ca_cert)  # we trust the EHR but have no certificate of our own
        expected = "MLLP peer"
    ehrs.append(ehr)
    with pytest.raises(DeliveryFailedError) as failed:
        channel(ehr, ours, host=host, timeout=3).send(ITEM, "ehr")
    assert failed.value.retryable
    assert expected in str(failed.value)
    assert ehr.messages == []


def test_plain_destination_is_unchanged_when_hl7_tls_is_configured(pki: DevPki, ehrs: list[TlsEhr]) -> None:
    """``tls = false`` (the default) still speaks plain MLLP, whatever [hl7.tls] holds."""
    ehr = TlsEhr(pki.server_cert, pki.server_key, None, tls=False)
    ehrs.append(ehr)
    ours = TlsSettings(cert_file=pki.client_cert, key_file=pki.client_key, ca_file=pki.ca_cert)
    assert channel(ehr, ours, destination_tls=False).send(ITEM, "ehr").peer_status == "AA"
    assert len(ehr.messages) == 1
