"""Verification SCP (PS3.4 Annex A): C-ECHO always succeeds once the association is accepted."""

from __future__ import annotations

from pynetdicom.events import Event


def handle_echo(event: Event) -> int:
    return 0x0000
