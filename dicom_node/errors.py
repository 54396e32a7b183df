"""The dicom_node branch of the exception tree and the one DIMSE boundary.

Handlers never choose a status themselves: they run their work inside :func:`dimse_boundary`
(the ``attempt`` pattern of pynetdicom's service classes), which maps whatever escaped to the
service's status by one table (:func:`dimse_status`): PS3.4 Annex B.2.3 for C-STORE,
C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4 for C-FIND / C-MOVE / C-GET, PS3.7 Annex C for the general
ranges. Our errors carry their status; the kinds of :mod:`conf.errors` and stray exceptions
get the service's status for that kind. Never Success.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from conf.errors import InvalidInputError, NotFoundError, PneumoError, UnavailableError

log = structlog.get_logger(__name__)


class DicomNodeError(PneumoError):
    """Base of everything dicom_node raises on purpose; ``status`` is what a peer is told."""

    status: int = 0xC000


class StoreError(DicomNodeError):
    """A C-STORE that cannot be accepted; ``status`` is what the peer is told."""


class OutOfResourcesError(StoreError, UnavailableError):
    """PS3.4 B.2.3 Refused: Out of Resources (disk full, database unavailable)."""

    status = 0xA700


class SopClassMismatchError(StoreError, InvalidInputError):
    """PS3.4 B.2.3 Error: Data Set does not match SOP Class."""

    status = 0xA900


class CannotUnderstandError(StoreError, InvalidInputError):
    """PS3.4 B.2.3 Error: Cannot understand (the dataset could not be decoded)."""

    status = 0xC210


class MissingIdentifiersError(CannotUnderstandError):
    """Cannot understand: a UID we need to file the instance is missing or malformed."""

    status = 0xC221


class SopInstanceMismatchError(CannotUnderstandError):
    """Cannot understand: the dataset's SOP Instance UID differs from the request's."""

    status = 0xC222


class QueryRetrieveError(DicomNodeError, InvalidInputError):
    """A C-FIND / C-MOVE / C-GET that cannot be served (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).

    The base status is "Unable to process" (0xC000-0xCFFF, the Failure range shared by all
    three services); subclasses carry the specific codes.
    """

    status = 0xC000


class IdentifierMismatchError(QueryRetrieveError):
    """Failure: Identifier does not match SOP Class (bad level, malformed key values, a
    retrieve without the unique key of its level)."""

    status = 0xA900


class MoveDestinationUnknownError(QueryRetrieveError, NotFoundError):
    """C-MOVE Failure: Refused: Move Destination unknown (PS3.4 C.4.2.1.5)."""

    status = 0xA801


class QueryOutOfResourcesError(QueryRetrieveError, UnavailableError):
    """C-FIND Refused: Out of Resources (the index cannot be read)."""

    status = 0xA700


class RetrieveOutOfResourcesError(QueryRetrieveError, UnavailableError):
    """C-MOVE / C-GET Refused: Out of Resources - Unable to calculate number of matches."""

    status = 0xA701


class Service(enum.StrEnum):
    STORE = "store"
    FIND = "find"
    MOVE = "move"
    GET = "get"


#: (service, kind) -> status, for errors that carry no status of their own. The Q/R services
#: have no "Processing failure" (0x0110) in their tables, so their unexpected lands on
#: "Unable to process" (0xC000).
_STATUS_BY_KIND: dict[Service, dict[str, int]] = {
    Service.STORE: {"unavailable": 0xA700, "invalid": 0xC000, "unexpected": 0x0110},
    Service.FIND: {"unavailable": 0xA700, "invalid": 0xC000, "unexpected": 0xC000},
    Service.MOVE: {"unavailable": 0xA701, "invalid": 0xC000, "unexpected": 0xC000},
    Service.GET: {"unavailable": 0xA701, "invalid": 0xC000, "unexpected": 0xC000},
}


def dimse_status(exc: BaseException, service: Service) -> int:
    """The DIMSE status that tells a peer about *exc* in *service* (never Success)."""
    if isinstance(exc, DicomNodeError):
        return exc.status
    table = _STATUS_BY_KIND[service]
    if isinstance(exc, UnavailableError | OSError):
        return table["unavailable"]
    if isinstance(exc, PneumoError):
        return table["invalid"]
    return table["unexpected"]


@dataclass
class Failure:
    """Filled by :func:`dimse_boundary` when the work inside it raised."""

    status: int | None = None
    error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.status is not None


@contextmanager
def dimse_boundary(service: Service, **log_fields: object) -> Iterator[Failure]:
    """Run a DIMSE handler's work; anything it raises becomes ``failure.status`` and one log line.

    Expected refusals (our own errors) log a warning with their message, which never carries
    PHI; anything else logs an error with the exception's class only.
    """
    failure = Failure()
    try:
        yield failure
    except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes a status
        failure.status = dimse_status(exc, service)
        failure.error = exc
        expected = isinstance(exc, PneumoError)
        (log.warning if expected else log.error)(
            f"dicom.{service}.failed",
            status=f"0x{failure.status:04X}",
            error=exc.__class__.__name__,
            detail=str(exc)[:200] if expected else None,
            **log_fields,
        )
