"""conf.tls and conf.dev_pki: the one TLS profile of every listener and sender, and the
development PKI, proved with real handshakes over loopback sockets (and OpenSSL's own checks)."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import ValidationError

from conf.dev_pki import DevPki, make_dev_pki
from conf.settings import Settings
from conf.tls import (
    TlsError,
    TlsSettings,
    client_context,
    describe,
    normalise_fingerprint,
    peer_certificate_fingerprint,
    server_context,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """A second, unrelated CA: its certificates must be refused by the first one's contexts."""
    return make_dev_pki(tmp_path_factory.mktemp("other-pki"))


def _server_tls(pki: DevPki, *, require: bool = False, ca: bool = True) -> TlsSettings:
    return TlsSettings(
        cert_file=pki.server_cert, key_file=pki.server_key,
        ca_file=pki.ca_cert if ca else None, require_client_cert=require,
    )


class _Server:
    """A one-connection-at-a-time TLS echo of the peer's certificate fingerprint (or the error)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.outcomes: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            raw.settimeout(5)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    fingerprint = peer_certificate_fingerprint(tls)
                    tls.sendall((fingerprint or "none").encode())
                    self.outcomes.append(f"ok {tls.version()}")
            except (ssl.SSLError, OSError) as exc:
                self.outcomes.append(f"refused {type(exc).__name__}")
                raw.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[list[_Server]]:
    servers: list[_Server] = []
    yield servers
    for server in servers:
        server.close()


def _connect(port: int, context: ssl.SSLContext, host: str = "localhost") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.recv(100).decode()


def _start(serve: list[_Server], context: ssl.SSLContext) -> _Server:
    server = _Server(context)
    serve.append(server)
    return server


def test_mutual_tls_passes_the_client_fingerprint(pki: DevPki, serve: list[_Server]) -> None:
    server = _start(serve, server_context(_server_tls(pki, require=True)))
    client = client_context(TlsSettings(cert_file=pki.client_cert, key_file=pki.client_key, ca_file=pki.ca_cert))
    der = x509.load_pem_x509_certificate(pki.client_cert.read_bytes()).public_bytes(Encoding.DER)
    assert _connect(server.port, client) == hashlib.sha256(der).hexdigest()


def test_required_client_certificate_refuses_a_client_without_one(pki: DevPki, serve: list[_Server]) -> None:
    server = _start(serve, server_context(_server_tls(pki, require=True)))
    anonymous = client_context(TlsSettings(ca_file=pki.ca_cert))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connect(server.port, anonymous)


def test_optional_client_certificate_accepts_a_client_without_one(pki: DevPki, serve: list[_Server]) -> None:
    server = _start(serve, server_context(_server_tls(pki, require=False)))
    assert _connect(server.port, client_context(TlsSettings(ca_file=pki.ca_cert))) == "none"


def test_a_client_certificate_from_another_ca_is_refused(
    pki: DevPki, other_pki: DevPki, serve: list[_Server]
) -> None:
    server = _start(serve, server_context(_server_tls(pki, require=True)))
    stranger = client_context(
        TlsSettings(cert_file=other_pki.client_cert, key_file=other_pki.client_key, ca_file=pki.ca_cert)
    )
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connect(server.port, stranger)


def test_the_client_refuses_a_server_of_another_ca(pki: DevPki, other_pki: DevPki, serve: list[_Server]) -> None:
    server = _start(serve, server_context(_server_tls(other_pki, ca=False)))
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(server.port, client_context(TlsSettings(ca_file=pki.ca_cert)))


def test_host_name_is_checked_unless_turned_off(pki: DevPki, serve: list[_Server]) -> None:
    server = _start(serve, server_context(_server_tls(pki, ca=False)))
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(server.port, client_context(TlsSettings(ca_file=pki.ca_cert)), host="pacs.elsewhere.example")
    relaxed = client_context(TlsSettings(ca_file=pki.ca_cert), check_hostname=False)
    assert _connect(server.port, relaxed, host="pacs.elsewhere.example") == "none"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_1_1_and_plain_tcp_are_refused(pki: DevPki, serve: list[_Server]) -> None:
    server = _start(serve, server_context(_server_tls(pki, ca=False)))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connect(server.port, old)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
        plain.sendall(b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16)  # an A-ASSOCIATE-RQ header, in clear
        try:
            reply = plain.recv(100)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"\x02")  # never an A-ASSOCIATE-AC: at most a TLS alert, then close
    # the server still serves TLS afterwards
    assert _connect(server.port, client_context(TlsSettings(ca_file=pki.ca_cert))) == "none"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_accepts_the_development_chain(pki: DevPki) -> None:
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki.ca_cert), str(pki.server_cert), str(pki.client_cert)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(pki.server_cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text


def test_dev_pki_keys_are_private_and_never_overwritten(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path, hosts=["pneumo.lab.example"], days=7)
    for key in (pki.ca_key, pki.server_key, pki.client_key):
        assert key.stat().st_mode & 0o777 == 0o600
    before = pki.server_key.read_bytes()
    with pytest.raises(FileExistsError):
        make_dev_pki(tmp_path)
    assert pki.server_key.read_bytes() == before
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=7, minutes=5)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["pneumo.lab.example"]
    make_dev_pki(tmp_path, overwrite=True)
    assert pki.server_key.read_bytes() != before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cert_file": "a.pem"}, "go together"),
        ({"key_file": "a.key"}, "go together"),
        ({"require_client_cert": True}, "needs ca_file"),
        ({"ca_file": "ca.pem", "require_client_cert": True}, "needs cert_file"),
        ({"cert_file": "a.pem", "key_file": "a.key", "ciphers": "NULL"}, "Extra inputs"),
    ],
)
def test_inconsistent_tls_settings_fail_at_start(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TlsSettings.model_validate(settings)


def test_missing_files_fail_with_their_names(tmp_path: Path) -> None:
    tls = TlsSettings(cert_file=tmp_path / "nope.pem", key_file=tmp_path / "nope.key")
    with pytest.raises(TlsError, match="nope.pem"):
        server_context(tls)
    with pytest.raises(TlsError, match="no cert_file"):
        server_context(TlsSettings())


def test_each_listener_has_its_own_tls_section_and_peers_their_fingerprints(pki: DevPki) -> None:
    fingerprint = "AB:" * 31 + "AB"
    settings = Settings.model_validate(
        {
            "dicom": {
                "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
                "peers": [{"ae_title": "PACS", "certificate_sha256": fingerprint}],
                "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104, "tls": True}],
            },
            "hl7": {"tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}},
        }
    )
    assert describe(settings.dicom.tls) == "on" and describe(settings.fhir.tls) == "off"
    assert settings.dicom.peers[0].certificate_sha256 == "ab" * 32
    assert settings.dicom.destinations[0].tls and settings.hl7.tls.enabled
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        normalise_fingerprint("abcd")
