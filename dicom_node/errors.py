"""The dicom_node exception tree and its one translation table to DIMSE status codes.

Handlers never choose a status themselves: they raise a typed error and the boundary maps it
here (PS3.4 Annex B.2.3 for C-STORE; PS3.7 Annex C for the general ranges).
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base of everything dicom_node raises on purpose."""

    status: int = 0xC000


class StoreError(DicomNodeError):
    """A C-STORE that cannot be accepted; ``status`` is what the peer is told."""


class OutOfResourcesError(StoreError):
    """PS3.4 B.2.3 Refused: Out of Resources (disk full, database unavailable)."""

    status = 0xA700


class SopClassMismatchError(StoreError):
    """PS3.4 B.2.3 Error: Data Set does not match SOP Class."""

    status = 0xA900


class CannotUnderstandError(StoreError):
    """PS3.4 B.2.3 Error: Cannot understand (the dataset could not be decoded)."""

    status = 0xC210


class MissingIdentifiersError(StoreError):
    """Cannot understand: a UID we need to file the instance is missing or malformed."""

    status = 0xC221


class SopInstanceMismatchError(StoreError):
    """Cannot understand: the dataset's SOP Instance UID differs from the request's."""

    status = 0xC222


#: Status for anything unexpected: "Processing failure" (PS3.7 C.4.2). Never Success.
UNEXPECTED_FAILURE = 0x0110


def status_for(exc: BaseException) -> int:
    """The DIMSE status for *exc*: ours carry one; anything else is a processing failure."""
    if isinstance(exc, DicomNodeError):
        return exc.status
    if isinstance(exc, OSError):
        return OutOfResourcesError.status
    return UNEXPECTED_FAILURE
