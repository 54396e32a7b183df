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



class QueryRetrieveError(DicomNodeError):
    """A C-FIND / C-MOVE / C-GET that cannot be served (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).

    The base status is "Unable to process" (0xC000-0xCFFF, the Failure range shared by all
    three services); subclasses carry the specific codes.
    """

    status = 0xC000


class IdentifierMismatchError(QueryRetrieveError):
    """Failure: Identifier does not match SOP Class (bad level, malformed key values, a
    retrieve without the unique key of its level)."""

    status = 0xA900


class MoveDestinationUnknownError(QueryRetrieveError):
    """C-MOVE Failure: Refused: Move Destination unknown (PS3.4 C.4.2.1.5)."""

    status = 0xA801


class QueryOutOfResourcesError(QueryRetrieveError):
    """C-FIND Refused: Out of Resources (the index cannot be read)."""

    status = 0xA700


class RetrieveOutOfResourcesError(QueryRetrieveError):
    """C-MOVE / C-GET Refused: Out of Resources - Unable to calculate number of matches."""

    status = 0xA701

#: Status for anything unexpected: "Processing failure" (PS3.7 C.4.2). Never Success.
UNEXPECTED_FAILURE = 0x0110


def status_for(exc: BaseException) -> int:
    """The DIMSE status for *exc*: ours carry one; anything else is a processing failure."""
    if isinstance(exc, DicomNodeError):
        return exc.status
    if isinstance(exc, OSError):
        return OutOfResourcesError.status
    return UNEXPECTED_FAILURE


#: "Unable to process" (PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4): the Q/R services have no
#: "Processing failure" (0x0110) in their status tables, so the unexpected lands here.
QR_UNABLE_TO_PROCESS = 0xC000


def qr_status_for(exc: BaseException) -> int:
    """The C-FIND / C-MOVE / C-GET status for *exc* (the Q/R counterpart of :func:`status_for`)."""
    if isinstance(exc, QueryRetrieveError):
        return exc.status
    return QR_UNABLE_TO_PROCESS
