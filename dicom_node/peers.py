"""Who may associate with us (docs/architecture.md §5: deny by default).

A calling AE title must be configured, and when the configuration names a host, the TCP peer
address must be one of that host's addresses. Host names are resolved once at start, so a
DNS outage later cannot turn into "accept everyone".
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from conf.settings import DicomPeer


@dataclass(frozen=True)
class PeerDecision:
    allowed: bool
    reason: str | None = None


def _addresses(host: str) -> frozenset[str]:
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return frozenset()
    return frozenset(str(ipaddress.ip_address(info[4][0])) for info in infos)


def _normalise(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class PeerPolicy:
    def __init__(self, peers: Iterable[DicomPeer]) -> None:
        self._allowed: dict[str, frozenset[str] | None] = {
            peer.ae_title: (_addresses(peer.host) if peer.host else None) for peer in peers
        }

    def check(self, calling_ae: str, address: str) -> PeerDecision:
        title = calling_ae.strip()
        if title not in self._allowed:
            return PeerDecision(False, f"calling AE title {title!r} is not a configured peer")
        hosts = self._allowed[title]
        if hosts is not None and _normalise(address) not in hosts:
            return PeerDecision(False, f"calling AE title {title!r} is not allowed from {address}")
        return PeerDecision(True)
