"""Quick ACKs on a real loopback TCP connection (Linux: TCP_QUICKACK)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from dicom_node.tcp import QuickAckSocket

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")


@pytest.fixture
def connected() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        try:
            yield client, accepted
        finally:
            client.close()
            accepted.close()


def test_every_read_rearms_quick_ack_and_returns_the_data(connected: tuple[socket.socket, socket.socket]) -> None:
    client, accepted = connected
    wrapped = QuickAckSocket(accepted)
    for chunk in (b"A-ASSOCIATE-RQ", b"P-DATA-TF", b"C-STORE-RSP", b"A-RELEASE-RQ", b"A-RELEASE-RP"):
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        client.sendall(chunk)
        assert wrapped.recv(4096) == chunk
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1


def test_everything_else_is_the_wrapped_socket(connected: tuple[socket.socket, socket.socket]) -> None:
    client, accepted = connected
    wrapped = QuickAckSocket(accepted)
    assert wrapped.fileno() == accepted.fileno() and wrapped.wrapped is accepted
    wrapped.sendall(b"x")
    assert client.recv(1) == b"x"
    client.close()
    assert wrapped.recv(1) == b""  # an orderly close reads as end of stream, no option set on it
