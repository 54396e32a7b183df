"""DICOM UID helpers shared by every part.

Two jobs: refuse anything that is not a well-formed UID before it is used to build a file path
(PS3.5 §9.1: digits and dots, no leading zeros in a component, at most 64 characters), and derive
*deterministic* UIDs so that re-running the same work (a retried job, a restarted worker) produces
the same SOP Instance UID instead of a second object (docs/architecture.md §3, step 4).
"""

from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
MAX_UID_LENGTH = 64


class InvalidUidError(ValueError):
    """A value that must be a DICOM UID is not one."""


def is_valid_uid(value: object) -> bool:
    """True when *value* is a syntactically valid DICOM UID (PS3.5 §9.1)."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID_RE.match(value))


def validate_uid(value: object, name: str = "uid") -> str:
    """Return *value* unchanged if it is a valid UID, else raise :class:`InvalidUidError`.

    Call this before a UID becomes part of a path: a UID from the network is attacker-controlled.
    """
    if not is_valid_uid(value):
        raise InvalidUidError(f"{name} is not a valid DICOM UID: {value!r}")
    return str(value)


def derive_uid(*parts: str) -> str:
    """A UID that is a pure function of *parts*, in the ``2.25.<integer>`` form (PS3.5 §B.2).

    The integer is the first 128 bits of SHA-256 over the parts (unit-separator joined), set to a
    version-8 (custom) UUID layout, so the same inputs always give the same UID and different
    inputs collide with negligible probability. No organisation root is needed.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    digest = bytearray(hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # UUID version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return f"2.25.{int.from_bytes(digest, 'big')}"
