"""The PDU reader of our DICOM connections, on a real loopback TCP connection."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dicom_node.tcp import READ_CHUNK, PduReader


@dataclass
class _Transport:
    socket: socket.socket | None


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


def test_reads_exactly_what_is_asked_across_many_chunks(connected: tuple[socket.socket, socket.socket]) -> None:
    client, accepted = connected
    pdu = os.urandom(3 * READ_CHUNK + 1234)
    trailing = b"\x04\x00next PDU"
    sender = threading.Thread(target=client.sendall, args=(pdu + trailing,))
    sender.start()
    read = PduReader(_Transport(accepted))
    header = read(6)
    body = read(len(pdu) - 6)
    sender.join(10)
    assert isinstance(body, bytearray) and bytes(header + body) == pdu
    assert read(len(trailing)) == trailing  # nothing of the next PDU was taken early


def test_a_peer_that_closes_mid_pdu_gives_what_arrived(connected: tuple[socket.socket, socket.socket]) -> None:
    client, accepted = connected
    client.sendall(b"\x04\x00\x00\x00\x10\x00partial")
    client.close()
    read = PduReader(_Transport(accepted))
    assert read(6) == b"\x04\x00\x00\x00\x10\x00"
    assert read(2**32) == b"partial"  # the claimed length is never allocated up front
    assert read(6) == b""


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
def test_every_read_rearms_quick_ack(connected: tuple[socket.socket, socket.socket]) -> None:
    client, accepted = connected
    read = PduReader(_Transport(accepted))
    for message in (b"A-ASSOCIATE-RQ", b"P-DATA-TF", b"C-STORE-RSP", b"A-RELEASE-RQ", b"A-RELEASE-RP"):
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        client.sendall(message)
        assert read(len(message)) == message
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1


def test_a_closed_transport_raises_like_a_socket() -> None:
    with pytest.raises(OSError):
        PduReader(_Transport(None))(6)
