"""Who may associate with us, and what each peer may ask for (docs/architecture.md §5: deny by
default).

A calling AE title must be configured, and when the configuration names a host, the TCP peer
address must be one of that host's addresses; when it names a ``certificate_sha256``, the
association must come over TLS with that client certificate (checked by the DICOM node, which
sees the connection: :attr:`PeerDecision.certificate_sha256`). Host names are resolved once at start, so a
DNS outage later cannot turn into "accept everyone".

Each peer is granted DIMSE services (``permissions``); the default, echo and store, is what a
PACS pushing images needs. Query (C-FIND) and retrieve (C-MOVE, C-GET) disclose patient data, so
they are granted per peer; :func:`service_of` says which service a proposed SOP Class needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from conf.network import host_addresses, normalise_address
from conf.settings import DicomPeer, DicomService

#: The SOP Classes that need a service other than "store" (every other one we offer is a
#: Storage SOP Class, PS3.4 Annex B).
_SERVICE_BY_SOP_CLASS: dict[str, DicomService] = {
    str(Verification): "echo",
    str(StudyRootQueryRetrieveInformationModelFind): "find",
    str(StudyRootQueryRetrieveInformationModelMove): "move",
    str(StudyRootQueryRetrieveInformationModelGet): "get",
    str(PatientRootQueryRetrieveInformationModelFind): "find",
    str(PatientRootQueryRetrieveInformationModelMove): "move",
    str(PatientRootQueryRetrieveInformationModelGet): "get",
}


def service_of(sop_class_uid: str) -> DicomService:
    """The permission a presentation context for *sop_class_uid* needs."""
    return _SERVICE_BY_SOP_CLASS.get(sop_class_uid.strip(), "store")


@dataclass(frozen=True)
class PeerDecision:
    allowed: bool
    reason: str | None = None
    permissions: frozenset[DicomService] = field(default_factory=frozenset)
    #: The SHA-256 fingerprint (lower-case hex) of the client certificate the peer must present
    #: over TLS; None: no certificate mapped to it.
    certificate_sha256: str | None = None


@dataclass(frozen=True)
class _Grant:
    addresses: frozenset[str] | None  # None: any address
    permissions: frozenset[DicomService]
    certificate_sha256: str | None = None


class PeerPolicy:
    def __init__(self, peers: Iterable[DicomPeer]) -> None:
        self._grants: dict[str, _Grant] = {
            peer.ae_title: _Grant(
                host_addresses(peer.host) if peer.host else None, frozenset(peer.permissions), peer.certificate_sha256
            )
            for peer in peers
        }

    @property
    def peer_addresses(self) -> frozenset[str]:
        """Every address a configured peer with a host may connect from (resolved at start)."""
        found: set[str] = set()
        for grant in self._grants.values():
            found |= grant.addresses or frozenset()
        return frozenset(found)

    def check(self, calling_ae: str, address: str) -> PeerDecision:
        title = calling_ae.strip()
        grant = self._grants.get(title)
        if grant is None:
            return PeerDecision(False, f"calling AE title {title!r} is not a configured peer")
        if grant.addresses is not None and normalise_address(address) not in grant.addresses:
            return PeerDecision(False, f"calling AE title {title!r} is not allowed from {address}")
        return PeerDecision(True, permissions=grant.permissions, certificate_sha256=grant.certificate_sha256)
