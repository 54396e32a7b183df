"""TLS for every wire: one settings shape and one way to build SSL contexts.

``[dicom.tls]``, ``[hl7.tls]`` and ``[fhir.tls]`` share :class:`TlsSettings`; each part turns it
into an :class:`ssl.SSLContext` with :func:`server_context` (its listener) or
:func:`client_context` (its outgoing connections), so every listener and sender speaks the same
profile:

* the "secure" profile of BCP 195 (RFC 9325) that DICOM PS3.15 B.9 ("BCP 195 TLS Profile")
  adopts: TLS 1.2 or 1.3 only; on TLS 1.2 only ECDHE key exchange with AEAD ciphers (AES-GCM,
  ChaCha20-Poly1305); no compression, no renegotiation (Python's ``ssl`` defaults since 3.10
  already forbid both);
* a server asks for a client certificate signed by ``ca_file`` and, with
  ``require_client_cert``, refuses the handshake without one (PS3.15 B.9 node authentication);
* a client verifies the server's certificate against ``ca_file`` (the system's trust store when
  None) and presents ``cert_file``/``key_file`` as its own client certificate when set.

Certificates are read when the context is built (at start), so a renewed certificate takes
effect at the next start; :func:`describe` is what the ready line and ``/ready`` report.
"""

from __future__ import annotations

import enum
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from conf.errors import InvalidInputError

#: RFC 9325 §4.2 recommended TLS 1.2 cipher suites (ECDHE with AEAD), in OpenSSL's names; TLS 1.3
#: suites are all AEAD and are configured separately by OpenSSL (its defaults are kept).
BCP195_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


class TlsError(InvalidInputError):
    """The TLS settings name files that cannot be used (missing, unreadable, not matching)."""


class TlsSettings(BaseModel):
    """One listener's (and its senders') TLS: off unless ``cert_file`` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path | None = Field(
        default=None,
        description="PEM certificate (chain) of this gateway: the server certificate of the listener and the "
        "client certificate of outgoing connections. Setting it turns TLS on for this part.",
    )
    key_file: Path | None = Field(default=None, description="PEM private key of cert_file (unencrypted; mode 0600).")
    ca_file: Path | None = Field(
        default=None,
        description="PEM CA certificate(s): they sign the peers' client certificates (listener) and the peers' "
        "server certificates (outgoing). None: the system's trust store for outgoing connections, no client "
        "certificates asked for on the listener.",
    )
    require_client_cert: bool = Field(
        default=False,
        description="Refuse a peer that presents no client certificate signed by ca_file (mutual TLS).",
    )

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: cert_file and key_file go together (set both, or neither to turn TLS off)")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls: require_client_cert needs ca_file (the CA that signs the peers' certificates)")
        if self.require_client_cert and self.cert_file is None:
            raise ValueError("tls: require_client_cert needs cert_file and key_file (TLS is off without them)")
        return self


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, tls: TlsSettings) -> None:
    if tls.cert_file is None or tls.key_file is None:
        return
    try:
        context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"tls: cannot load cert_file {tls.cert_file} with key_file {tls.key_file}: {exc}") from exc


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"tls: cannot load ca_file {ca_file}: {exc}") from exc


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The listener's context: our certificate; client certificates verified against ``ca_file``
    (required with ``require_client_cert``, else optional but verified when presented)."""
    if not tls.enabled:
        raise TlsError("tls: no cert_file/key_file configured")
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, tls)
    if tls.ca_file is not None:
        _load_ca(context, tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: TlsSettings, *, check_hostname: bool = True) -> ssl.SSLContext:
    """An outgoing connection's context: the server's certificate verified (against ``ca_file``, or
    the system's trust store) and, by default, its host name; our certificate as client certificate
    when configured. *check_hostname* False is for peers addressed by a name their certificate
    does not carry (a DICOM peer configured by IP whose certificate names only its host name):
    the certificate chain is still verified."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if tls.ca_file is not None:
        _load_ca(context, tls.ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_chain(context, tls)
    return context


def peer_certificate_fingerprint(sock: ssl.SSLSocket) -> str | None:
    """SHA-256 fingerprint (lower-case hex) of the certificate the peer presented, if any: what a
    peer's ``certificate_sha256`` setting is compared with."""
    der = sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


def normalise_fingerprint(value: str) -> str:
    """Accept ``AB:CD:...`` (OpenSSL's ``-fingerprint`` output) or plain hex; return lower-case hex."""
    cleaned = value.replace(":", "").strip().lower()
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError(f"not a SHA-256 fingerprint: {value!r}")
    return cleaned


def describe(tls: TlsSettings) -> str:
    """A short, PHI-free description for the ready line and logs."""
    if not tls.enabled:
        return "off"
    return "mutual" if tls.require_client_cert else ("on, client certificates verified" if tls.ca_file else "on")


class HandshakeFailure(enum.Enum):
    """Why a TLS handshake on a listener failed, in an operator's words (the log's ``reason``);
    the same words on every port (DICOM, MLLP)."""

    TIMED_OUT = "tls-timed-out"
    CLOSED = "tls-closed"
    NOT_TLS = "tls-not-tls"
    NO_CLIENT_CERTIFICATE = "tls-no-client-certificate"
    CERTIFICATE_REJECTED = "tls-certificate-rejected"
    PROTOCOL = "tls-protocol"

    @property
    def node_authentication(self) -> bool:
        """Whether this is the peer failing node authentication (PS3.15 A.5.3.11, DCM 110126:
        a Security Alert); everything else (a plain client, an old TLS version, a port scanner)
        is transport noise, logged only."""
        return self in (HandshakeFailure.NO_CLIENT_CERTIFICATE, HandshakeFailure.CERTIFICATE_REJECTED)


@dataclass(frozen=True)
class HandshakeError:
    failure: HandshakeFailure
    #: OpenSSL's reason (or the verification message): protocol words only, never PHI.
    detail: str


#: OpenSSL reasons (``SSLError.reason``) of a first record that is not TLS at all: a plain DICOM
#: or MLLP client (PDU type 0x01 or 0x0B where a TLS record type belongs), HTTP, random bytes.
_NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNKNOWN_PROTOCOL",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LAYER_FAILURE",
        "UNEXPECTED_RECORD",
    }
)
#: The peer presented no certificate although ``require_client_cert`` asks for one (TLS 1.2, 1.3).
_NO_CERTIFICATE_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"})


def classify_handshake_failure(exc: BaseException) -> HandshakeError:
    """What an exception from the server side of :meth:`ssl.SSLSocket.do_handshake` means."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return HandshakeError(HandshakeFailure.CERTIFICATE_REJECTED, str(exc.verify_message or exc.reason))
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError (3.10+)
        return HandshakeError(HandshakeFailure.TIMED_OUT, "handshake not complete in time")
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", None) or exc.__class__.__name__)
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return HandshakeError(HandshakeFailure.CLOSED, reason)
        if reason in _NO_CERTIFICATE_REASONS:
            return HandshakeError(HandshakeFailure.NO_CLIENT_CERTIFICATE, reason)
        if reason in _NOT_TLS_REASONS:
            return HandshakeError(HandshakeFailure.NOT_TLS, reason)
        return HandshakeError(HandshakeFailure.PROTOCOL, reason)
    return HandshakeError(HandshakeFailure.CLOSED, exc.__class__.__name__)
