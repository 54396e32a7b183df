"""HTTPS for the FHIR API ([fhir.tls], gateway/http.py) and TLS of our rest-hook notifications.

Real servers on 127.0.0.1 with certificates from :func:`conf.dev_pki.make_dev_pki`:

* the uvicorn server of ``pneumo serve`` (:class:`HttpServer`) with the FHIR API: httpx and curl
  with our CA read ``/fhir/metadata``; plain HTTP to the port gets no HTTP answer; TLS 1.1 and a
  TLS 1.2 suite outside BCP 195 are refused (``openssl s_client``); with ``require_client_cert``
  a client without a certificate of our CA cannot complete a request, one with it can;
* :class:`~fhir_api.notifications.SubscriptionChannel` to an HTTPS rest-hook endpoint: verified
  against ``[fhir.tls] ca_file`` (and presenting our certificate) when set, against the default
  trust store (which does not know the dev CA: a retryable failure) when not;
* the real ``pneumo serve`` with ``[fhir.tls]`` and ``[hl7.tls]`` (mutual): its ready line says
  so, ``/fhir/metadata`` answers over HTTPS only, and an order over MLLP/TLS gets its AA.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from audit.events import AuditSource
from conf.dev_pki import DevPki, make_dev_pki
from conf.settings import FhirSettings
from conf.tls import TlsSettings
from fhir_api.api import FhirApi, install
from fhir_api.audit_trail import AuditTrail
from fhir_api.auth import TokenVerifier
from fhir_api.notifications import Notification, SubscriptionChannel, rest_hook_verify
from fhir_api.subscriptions import SubscriptionSpec
from gateway.http import HttpServer, build_app
from hl7.messages import parse_ack
from hl7.mllp import Frame, FrameDecoder, encode
from storage.db import Database
from storage.filestore import FileStore
from storage.migrate import upgrade
from storage.outbox import DeliveryFailedError, DeliveryItem
from tests.gateway.serve_process import ServeProcess, write_config
from tests.hl7.test_inbound import orm

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'pneumo.db'}")
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def https(db: Database, tmp_path: Path, pki: DevPki) -> Iterator[Callable[..., HttpServer]]:
    """The FHIR API behind :class:`HttpServer` with [fhir.tls] (anonymous auth on loopback)."""
    started: list[HttpServer] = []

    def start(*, require_client_cert: bool = False) -> HttpServer:
        tls = {
            "cert_file": str(pki.server_cert),
            "key_file": str(pki.server_key),
            "ca_file": str(pki.ca_cert),
            "require_client_cert": require_client_cert,
        }
        settings = FhirSettings.model_validate({"bind": HOST, "port": 0, "auth": {"mode": "anonymous"}, "tls": tls})
        api = FhirApi(
            db,
            FileStore(tmp_path / "dicom", tmp_path / "tmp", fsync=False),
            TokenVerifier(settings.auth, bind=settings.bind),
            AuditTrail(db),
            AuditSource("PNEUMO@test"),
            settings,
            software_version="test",
        )
        app = build_app(lambda: {"database": True})
        install(app, api)
        server = HttpServer(app, HOST, 0, tls=settings.tls)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def verify(pki: DevPki, *, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"{HOST}:{port}", *args], input=b"", capture_output=True, timeout=60, check=False
    )


# --------------------------------------------------------------------------- the FHIR API over HTTPS


def test_https_metadata_with_our_ca(https: Callable[..., HttpServer], pki: DevPki) -> None:
    server = https()
    for host in ("localhost", HOST):  # the certificate names both
        response = httpx.get(f"https://{host}:{server.port}/fhir/metadata", verify=verify(pki), timeout=10)
        assert response.status_code == 200
        assert response.json()["resourceType"] == "CapabilityStatement"
        # Links the API builds from the request carry the https scheme.
        assert response.json()["implementation"]["url"] == f"https://{host}:{server.port}/fhir"
    assert httpx.get(f"https://localhost:{server.port}/ready", verify=verify(pki), timeout=10).status_code == 200
    curl = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(pki.ca_cert), f"https://localhost:{server.port}/fhir/metadata"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert curl.returncode == 0, curl.stderr
    assert b'"CapabilityStatement"' in curl.stdout
    # Without our CA the certificate is not trusted.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://localhost:{server.port}/fhir/metadata", timeout=10)


def test_plain_http_to_the_https_port_gets_no_answer(https: Callable[..., HttpServer], pki: DevPki) -> None:
    server = https()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{HOST}:{server.port}/fhir/metadata", timeout=10)
    # The server goes on serving.
    assert httpx.get(f"https://localhost:{server.port}/health", verify=verify(pki), timeout=10).status_code == 200


def test_old_tls_versions_and_weak_suites_are_refused(https: Callable[..., HttpServer], pki: DevPki) -> None:
    server = https()
    # asyncio's TLS closes a failed handshake without an alert: s_client sees the connection end
    # instead of a session (the same s_client with TLS 1.2 and a BCP 195 suite gets one, below).
    old = s_client(server.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0 and b"no peer certificate available" in old.stdout, old.stdout
    # TLS 1.2 with RSA key exchange and CBC (not ECDHE + AEAD): outside RFC 9325 4.2.
    weak = s_client(server.port, "-tls1_2", "-cipher", "AES128-SHA")
    assert weak.returncode != 0 and b"no peer certificate available" in weak.stdout, weak.stdout
    good = s_client(server.port, "-tls1_2", "-CAfile", str(pki.ca_cert), "-verify_return_error")
    assert good.returncode == 0, good.stderr
    assert b"New, TLSv1.2, Cipher is ECDHE-" in good.stdout, good.stdout


def test_client_certificate_required(https: Callable[..., HttpServer], pki: DevPki) -> None:
    server = https(require_client_cert=True)
    url = f"https://localhost:{server.port}/fhir/metadata"
    with pytest.raises(httpx.TransportError):
        httpx.get(url, verify=verify(pki), timeout=10)
    response = httpx.get(url, verify=verify(pki, client_cert=True), timeout=10)
    assert response.status_code == 200


# --------------------------------------------------------------------------- rest-hook notifications


class Endpoint:
    """An EHR's rest-hook endpoint over HTTPS (our own HttpServer with a one-route app)."""

    def __init__(self, pki: DevPki, *, require_client_cert: bool) -> None:
        self.calls: list[str] = []
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> dict[str, str]:
            self.calls.append(request.url.path)
            return {"ok": "yes"}

        tls = TlsSettings(
            cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca_cert, require_client_cert=require_client_cert
        )
        self.server = HttpServer(app, HOST, 0, tls=tls)
        self.server.start()
        self.url = f"https://localhost:{self.server.port}/hook"


def _item(endpoint: str) -> DeliveryItem:
    spec = SubscriptionSpec("sub-1", "DiagnosticReport", (), endpoint, None, (), None)
    return DeliveryItem(
        subject="DiagnosticReport/r1/_history/1",
        content=Notification(spec, "DiagnosticReport", "r1", 1, "{}"),
        study_uid="",
        patient_id="DiagnosticReport/r1",
        patient_name=None,
        accession=None,
    )


@pytest.mark.parametrize("mutual", [False, True], ids=["server-auth", "mutual"])
def test_rest_hook_verifies_the_endpoint(db: Database, pki: DevPki, mutual: bool) -> None:
    endpoint = Endpoint(pki, require_client_cert=mutual)
    source = AuditSource("PNEUMO@test")
    ours = TlsSettings(cert_file=pki.client_cert, key_file=pki.client_key, ca_file=pki.ca_cert)
    channels: list[SubscriptionChannel] = []
    try:
        trusted = SubscriptionChannel(db, source, timeout=10, verify=rest_hook_verify(ours))
        default = SubscriptionChannel(db, source, timeout=10, verify=rest_hook_verify(TlsSettings()))
        channels += [trusted, default]
        assert trusted.send(_item(endpoint.url), "sub-1").peer_status == "200"
        with pytest.raises(DeliveryFailedError) as failed:
            default.send(_item(endpoint.url), "sub-1")  # httpx's default roots do not hold the dev CA
        assert failed.value.retryable
        assert endpoint.calls == ["/hook"]
    finally:
        for channel in channels:
            channel.close()
        endpoint.server.stop()


def test_rest_hook_never_skips_verification(db: Database) -> None:
    with pytest.raises(ValueError, match="always verified"):
        SubscriptionChannel(db, AuditSource("PNEUMO@test"), timeout=1, verify=False)


# --------------------------------------------------------------------------- pneumo serve


def test_pneumo_serve_with_https_and_mllp_over_tls(tmp_path: Path, pki: DevPki) -> None:
    extra = "\n".join(
        [
            "[fhir.tls]",
            f'cert_file = "{pki.server_cert}"',
            f'key_file = "{pki.server_key}"',
            f'ca_file = "{pki.ca_cert}"',
            "[hl7.tls]",
            f'cert_file = "{pki.server_cert}"',
            f'key_file = "{pki.server_key}"',
            f'ca_file = "{pki.ca_cert}"',
            "require_client_cert = true",
            "[[hl7.peers]]",
            'sending_application = "RIS"',
            'sending_facility = "HOSP"',
        ]
    )
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "data", extra=extra)
    served = ServeProcess(config, tmp_path / "serve.log")
    ready: dict[str, Any] = {}
    try:
        served.start(timeout=120)
        assert served.proc is not None
        response = httpx.get(f"https://localhost:{served.http_port}/fhir/metadata", verify=verify(pki), timeout=10)
        assert response.status_code == 200 and response.json()["resourceType"] == "CapabilityStatement"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://{HOST}:{served.http_port}/fhir/metadata", timeout=10)
        ready = httpx.get(f"https://localhost:{served.http_port}/ready", verify=verify(pki), timeout=10).json()
        assert (served.ready["http_tls"], served.ready["hl7_tls"]) == ("on, client certificates verified", "mutual")
        hl7_port = int(served.ready["hl7_port"])
        with (
            socket.create_connection((HOST, hl7_port), timeout=15) as raw,
            verify(pki, client_cert=True).wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            sock.sendall(encode(orm("SERVE-TLS-1")))
            decoder = FrameDecoder(1 << 20)
            frames: list[Frame] = []
            while not frames:
                chunk = sock.recv(65536)
                assert chunk, "closed without an ACK"
                frames = [item for item in decoder.feed(chunk) if isinstance(item, Frame)]
        assert parse_ack(frames[0].payload)[:2] == ("AA", "SERVE-TLS-1")
    finally:
        served.kill()
    assert ready["checks"]["hl7"] is True
