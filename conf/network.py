"""Network addresses as peer allow-lists compare them (DICOM peers, HL7 peers).

A configured ``host`` may be an IP address or a host name; a connection's address is an IP,
sometimes IPv4-mapped IPv6 (``::ffff:127.0.0.1``) on a dual-stack socket. Both are brought to one
canonical form here; host names are resolved once, when the allow-list is built (at start).
"""

from __future__ import annotations

import ipaddress
import socket


def host_addresses(host: str) -> frozenset[str]:
    """Every address *host* (an IP or a name) stands for, canonical; empty when it does not resolve."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return frozenset({normalise_address(host)})
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return frozenset()
    return frozenset(normalise_address(str(info[4][0])) for info in infos)


def normalise_address(address: str) -> str:
    """An IP address in canonical form; IPv4-mapped IPv6 addresses as plain IPv4."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
