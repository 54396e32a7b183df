"""Storage SCU: send one stored instance to a remote Storage SCP (PS3.4 Annex B, SCU role).

Used by the delivery outbox to put our reports (SR, Secondary Capture) into the PACS. The module
only speaks DICOM; when to retry and what to record is the caller's business. What it adds over a
bare ``send_c_store`` is a verdict the caller can act on: every outcome is either a
:class:`SendResult` (Success or a Warning, i.e. the SCP now holds the instance) or one of two typed
errors:

* :class:`DeliveryUnavailableError` — *try again later*: the peer could not be reached, rejected
  or aborted the association, timed out, or answered with a failure that describes its own state
  rather than our object (PS3.4 B.2.3 "Refused: Out of Resources" A7xx, PS3.7 C "Processing
  failure" 0110, "Resource limitation" 0213, "Duplicate invocation" 0210, Cancel FE00).
* :class:`DeliveryRejectedError` — *retrying cannot help*: the peer refused the object itself
  (PS3.4 B.2.3 "Error: Data Set does not match SOP Class" A9xx, "Error: Cannot understand" Cxxx,
  PS3.7 C "SOP Class not supported" 0122, "Not authorized" 0124, "Invalid SOP Instance" 0117,
  "Mistyped argument" 0212, "Unrecognized operation" 0211), or it accepted no presentation
  context for the SOP Class, or our own stored file cannot be read.

Transfer syntax (PS3.5 §10, PS3.8 §9.3.2.2): the object is offered in the syntax it is stored in,
in a presentation context of its own, plus a second context with Explicit and Implicit VR Little
Endian, which every Storage SCP must support. The stored bytes are sent unchanged whenever the
peer accepts the stored syntax; only otherwise is the pixel data decoded and the object sent
uncompressed (lossless either way: decoding never adds loss).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from conf.settings import DicomDestination
from dicom_node.errors import DicomNodeError
from storage.outbox import DeliveryFailedError

log = structlog.get_logger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class StatusCategory(enum.StrEnum):
    """What a C-STORE response status means for the sender."""

    SUCCESS = "success"
    WARNING = "warning"  # stored, with a remark (coercion, elements discarded ...)
    TRANSIENT = "transient"  # not stored; the peer's state may change, so retry
    PERMANENT = "permanent"  # not stored; the same object will be refused again


# PS3.7 Annex C general statuses with a fixed meaning for a C-STORE sender.
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})  # warning; attribute list error; value out of range
_TRANSIENT = frozenset({0x0110, 0x0210, 0x0213, 0xFE00})  # processing failure; duplicate invocation; resource limitation; cancel
_PERMANENT = frozenset({0x0117, 0x0122, 0x0124, 0x0211, 0x0212})


def classify_store_status(status: int) -> StatusCategory:
    """Map a C-STORE response status (PS3.4 B.2.3, PS3.7 C) to what the sender should do.

    A status we do not know is a failure (PS3.7 C.1) of unknown cause; it is retried, because the
    attempt limit bounds the cost of being wrong while dead-lettering it at once would give up on
    a delivery that might have succeeded a minute later.
    """
    if status == 0x0000:
        return StatusCategory.SUCCESS
    if status in _WARNINGS or 0xB000 <= status <= 0xBFFF:
        return StatusCategory.WARNING
    if 0xA700 <= status <= 0xA7FF or status in _TRANSIENT:
        return StatusCategory.TRANSIENT
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in _PERMANENT:
        return StatusCategory.PERMANENT
    return StatusCategory.TRANSIENT


class DeliveryError(DeliveryFailedError, DicomNodeError):
    """A send that did not leave the instance at the destination (the outbox's
    :class:`~storage.outbox.DeliveryFailedError` on the ``dicom`` channel).

    ``dimse_status`` is the DIMSE status the *peer* answered (not one we send), or None when no
    response came back. ``transient`` tells the caller whether a later attempt may succeed.
    """

    transient: bool = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message, retryable=self.transient, peer_status=None if status is None else f"0x{status:04X}")
        self.dimse_status = status


class DeliveryUnavailableError(DeliveryError):
    """Transient: peer unreachable, association rejected/aborted, timeout, or a refusal that
    describes the peer's state (out of resources, processing failure)."""

    transient = True


class DeliveryRejectedError(DeliveryError):
    """Permanent: the peer refused this object, accepts no context for it, or our stored copy
    is unreadable. Sending the same bytes again gets the same answer."""

    transient = False


@dataclass(frozen=True)
class SendResult:
    """The instance is at the destination: Success (0000) or a Warning status (PS3.4 B.2.3)."""

    status: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str  # the syntax actually sent
    transcoded: bool
    error_comment: str | None = None

    @property
    def warning(self) -> bool:
        return self.status != 0x0000


def requested_contexts(sop_class_uid: str, stored_syntax: str) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose: (abstract syntax, transfer syntaxes) pairs.

    The stored syntax goes in a context of its own so that the SCP, which picks one syntax per
    context (PS3.8 §9.3.3.2), cannot choose an uncompressed syntax instead of it and force a
    needless decode; Explicit/Implicit VR Little Endian follow as the fallback every SCP supports.
    """
    if stored_syntax in _UNCOMPRESSED:
        others = [ts for ts in _UNCOMPRESSED if ts != stored_syntax]
        return [(sop_class_uid, [stored_syntax, *others])]
    return [(sop_class_uid, [stored_syntax]), (sop_class_uid, list(_UNCOMPRESSED))]


def _read(path: Path) -> Dataset:
    try:
        dataset = dcmread(path)
    except (OSError, InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise DeliveryRejectedError(f"stored file cannot be read: {exc.__class__.__name__}") from exc
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta or "SOPClassUID" not in dataset or "SOPInstanceUID" not in dataset:
        raise DeliveryRejectedError("stored file lacks SOP Class/Instance UID or its Transfer Syntax UID")
    return dataset


def _choose_context(assoc: Association, sop_class_uid: str, stored_syntax: str) -> PresentationContext:
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class_uid]
    for context in accepted:
        if context.transfer_syntax and context.transfer_syntax[0] == stored_syntax:
            return context
    for wanted in _UNCOMPRESSED:
        for context in accepted:
            if context.transfer_syntax and context.transfer_syntax[0] == wanted:
                return context
    raise DeliveryRejectedError("destination accepted no presentation context for the SOP Class")


def _transcode(dataset: Dataset, target: str) -> None:
    """Re-encode *dataset* in place for an uncompressed *target* syntax (lossless decode)."""
    stored = UID(str(dataset.file_meta.TransferSyntaxUID))
    if stored.is_compressed:
        try:
            # Same SOP Instance UID: this is the same instance in another encoding (PS3.5 §10),
            # and the deterministic UID is what makes a re-send idempotent at the PACS.
            dataset.decompress(generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "cannot send this"
            raise DeliveryRejectedError(f"cannot decode {stored.name} pixel data: {exc.__class__.__name__}") from exc
    elif stored not in (*_UNCOMPRESSED, DeflatedExplicitVRLittleEndian):
        # Explicit VR Big Endian: pydicom keeps OW pixel bytes as read, so relabelling would
        # corrupt them. Retired since 2006 (PS3.5 A.3); refuse rather than guess.
        raise DeliveryRejectedError(f"cannot convert {stored.name} to {UID(target).name}")
    dataset.file_meta.TransferSyntaxUID = UID(target)


def _association_failure(assoc: Association, destination: DicomDestination) -> DeliveryUnavailableError:
    if assoc.is_rejected:
        what = "rejected the association (A-ASSOCIATE-RJ)"
    else:  # pynetdicom reports a refused or timed-out connection as an abort, too
        what = "was unreachable or aborted the association (connection refused, timeout or A-ABORT)"
    return DeliveryUnavailableError(f"destination {destination.name!r} {what}")


def send_instance(path: Path, destination: DicomDestination, calling_ae: str, timeout: float) -> SendResult:
    """C-STORE the Part 10 file at *path* to *destination* over one association.

    *timeout* bounds the TCP connect, the association negotiation (ACSE), each DIMSE message
    and network inactivity, so a hung peer costs at most a few timeouts, never a stuck worker.

    Raises:
        DeliveryUnavailableError: retry later (see the module docstring).
        DeliveryRejectedError: retrying cannot help.
    """
    dataset = _read(path)
    sop_class_uid = str(dataset.SOPClassUID)
    sop_instance_uid = str(dataset.SOPInstanceUID)
    stored_syntax = str(dataset.file_meta.TransferSyntaxUID)

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    for abstract, syntaxes in requested_contexts(sop_class_uid, stored_syntax):
        ae.add_requested_context(abstract, syntaxes)

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # Negotiation completed and refused every context (PS3.8 §9.3.3.2 results 3/4):
            # pynetdicom then aborts, but the answer is about the SOP Class, not the peer's state.
            raise DeliveryRejectedError("destination accepted no presentation context for the SOP Class")
        raise _association_failure(assoc, destination)
    try:
        context = _choose_context(assoc, sop_class_uid, stored_syntax)
        sent_syntax = str(context.transfer_syntax[0])
        transcoded = sent_syntax != stored_syntax
        if transcoded:
            _transcode(dataset, sent_syntax)
        try:
            response = assoc.send_c_store(dataset)
        except RuntimeError as exc:  # the association went away before the request was sent
            raise DeliveryUnavailableError(f"association with {destination.name!r} lost before sending") from exc
        except (ValueError, AttributeError) as exc:  # pynetdicom could not encode the dataset
            raise DeliveryRejectedError(f"dataset cannot be encoded for sending: {exc.__class__.__name__}") from exc
    finally:
        if assoc.is_established:
            assoc.release()

    if "Status" not in response:
        raise DeliveryUnavailableError(
            f"no C-STORE response from {destination.name!r} (timeout or association aborted)"
        )
    status = int(response.Status)
    comment = str(response.get("ErrorComment", "")) or None
    category = classify_store_status(status)
    log.debug(
        "delivery.c_store", destination=destination.name, status=f"0x{status:04X}", category=str(category), transcoded=transcoded
    )
    if category is StatusCategory.TRANSIENT:
        raise DeliveryUnavailableError(f"destination {destination.name!r} refused with status 0x{status:04X}", status=status)
    if category is StatusCategory.PERMANENT:
        raise DeliveryRejectedError(f"destination {destination.name!r} rejected with status 0x{status:04X}", status=status)
    return SendResult(
        status=status,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax_uid=sent_syntax,
        transcoded=transcoded,
        error_comment=comment,
    )
