"""The one exception tree of Pneumo Gateway (docs/architecture.md, "Errors").

Every error the project raises on purpose derives from :class:`PneumoError` and says, by its
class, what kind of failure it is. Boundaries translate the *kind* with one table each:

=======================  ===========================  ==================  =====================
kind                     DIMSE (dicom_node.errors)    job runtime         HTTP / HL7 (coming)
=======================  ===========================  ==================  =====================
InvalidInputError        0xC000-range / 0xA900        dead-letter         400 / ACK AE
NotFoundError            0xC000 (unable to process)   dead-letter         404 / ACK AE
ConflictError            0xC000                       dead-letter         409 / ACK AE
AuthenticationError      -                            -                   401 / -
PermissionDeniedError    (association rejected)       -                   403 / ACK AR
NotAcceptableError       -                            -                   406 / -
UnavailableError         0xA700 (out of resources)    retry with backoff  503 / ACK AR
LeaseLostError           -                            drop silently       -
=======================  ===========================  ==================  =====================

The tree lives in ``conf`` because ``conf`` is the one package every other package may import
(parts import only conf, storage and audit; conf imports none of them).
"""

from __future__ import annotations


class PneumoError(Exception):
    """Base of every error raised on purpose by Pneumo Gateway.

    ``retryable`` tells a boundary whether the same request may succeed later unchanged
    (the job runtime retries with backoff; a DICOM peer is told "out of resources").
    """

    retryable: bool = False


class InvalidInputError(PneumoError):
    """What we were given cannot be used: a malformed dataset, message or parameter."""


class NotFoundError(PneumoError):
    """Something the request refers to does not exist (an instance, a destination, a job)."""


class ConflictError(PneumoError):
    """The request contradicts what is already stored (same UID, other content)."""


class AuthenticationError(PneumoError):
    """The caller did not prove who it is: no credentials, or a bad or expired token."""


class PermissionDeniedError(PneumoError):
    """The caller is known but not allowed to do this (a missing SMART scope, a denied service)."""


class NotAcceptableError(PneumoError):
    """The caller asked for a representation we cannot produce (an unsupported ``_format``)."""


class UnavailableError(PneumoError):
    """A resource we depend on is unavailable right now: database, disk, a peer. Retryable."""

    retryable = True


class LeaseLostError(PneumoError):
    """A job's lease passed to another worker; this worker's results must be rolled back."""
