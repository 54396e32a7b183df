"""A development PKI (``pneumo certs dev``): a private CA, a server and a client certificate.

For trying TLS on one machine or in a test lab — never for production, where the hospital's CA
issues the certificates. Everything is made with ``cryptography``: ECDSA P-256 keys, SHA-256
signatures, the extensions a strict TLS stack checks (basic constraints, key usage, extended key
usage, subject alternative names for every host name and address the server is reached by), and
a short validity so that a forgotten development certificate expires.

Files written (keys with mode 0600, created exclusively so an existing key is never silently
overwritten unless *overwrite* is asked for):

* ``ca.pem`` / ``ca.key`` — the CA: ``ca_file`` of every ``[*.tls]`` section and of the peers;
* ``server.pem`` / ``server.key`` — this gateway's certificate (server and client use);
* ``client.pem`` / ``client.key`` — a peer's client certificate, e.g. for DCMTK ``storescu +tls``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevPki:
    """Paths of the files :func:`make_dev_pki` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def files(self) -> dict[str, Path]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pneumo Gateway development PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    descriptor = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _leaf(
    common_name: str,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    usages: list[x509.ObjectIdentifier],
    hosts: Sequence[str],
    now: dt.datetime,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_subject_alt_names(hosts), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_dev_pki(
    directory: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 90,
    overwrite: bool = False,
    now: dt.datetime | None = None,
) -> DevPki:
    """Write a development CA and server/client certificates into *directory* (created if missing).

    *hosts* become the server certificate's subject alternative names (DNS names and IP
    addresses), so clients that check host names accept it. Raises ``FileExistsError`` if a file
    is already there and *overwrite* is False.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    now = now or dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    pki = DevPki(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    if not overwrite:
        existing = [str(p) for p in pki.files().values() if p.exists()]
        if existing:
            raise FileExistsError(f"already there (use --overwrite to replace): {', '.join(existing)}")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Pneumo Gateway development CA"))
        .issuer_name(_name("Pneumo Gateway development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert, server_key = _leaf(
        hosts[0] if hosts else "pneumo-gateway",
        ca_cert,
        ca_key,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        hosts,
        now,
        days,
    )
    client_cert, client_key = _leaf("pneumo-dev-client", ca_cert, ca_key, [ExtendedKeyUsageOID.CLIENT_AUTH], (), now, days)
    pem = serialization.Encoding.PEM
    for path, data, private in (
        (pki.ca_cert, ca_cert.public_bytes(pem), False),
        (pki.ca_key, _key_pem(ca_key), True),
        (pki.server_cert, server_cert.public_bytes(pem), False),
        (pki.server_key, _key_pem(server_key), True),
        (pki.client_cert, client_cert.public_bytes(pem), False),
        (pki.client_key, _key_pem(client_key), True),
    ):
        _write(path, data, private=private, overwrite=overwrite)
    return pki
