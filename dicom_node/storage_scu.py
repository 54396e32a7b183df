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

Transfer syntax (PS3.5 §10 and Annex A, PS3.8 §9.3.2.2 and §9.3.3.2): the SCP picks one transfer
syntax per presentation context, and a Storage SCP may insist on any one of them — an older PACS
accepting only Implicit VR Little Endian is valid and common. So we offer every encoding we can
really produce, and re-encode the dataset for the one the peer accepted (see
:func:`requested_contexts` and :func:`transcode`). The stored bytes go unchanged whenever the peer
accepts the stored syntax; otherwise the object is decoded if compressed and encoded anew —
never lossily, and always with the same SOP Instance UID (it is the same instance in another
encoding, PS3.5 §10). A peer that accepts only syntaxes we cannot produce losslessly gets a
permanent :class:`DeliveryRejectedError` naming what was offered and what it answered.

TLS (PS3.15 B.9): a destination with ``tls = true`` is reached over TLS with the context the
caller passes (:func:`dicom_node.tls.outgoing_context`: the PACS's certificate chain verified,
our client certificate presented). A failed handshake is a failed connection: a
:class:`DeliveryUnavailableError`, retried like any other.
"""

from __future__ import annotations

import enum
import io
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import structlog
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from conf.settings import DicomDestination
from dicom_node.associations import AssociationPool, Contexts
from dicom_node.errors import DicomNodeError
from dicom_node.tcp import low_latency_tcp
from storage.outbox import DeliveryFailedError

log = structlog.get_logger(__name__)

# Native (unencapsulated) encodings, in the order we list them; the SCP picks among them by its own
# preference. Implicit VR Little Endian is the default every SCP supports (PS3.5 §10.1); Explicit
# VR Big Endian is retired (PS3.5 A.3) but still a valid choice of an old peer; deflate is lossless.
NATIVE_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
# Lossless encapsulated syntaxes (PS3.5 A.4) we can produce from native pixel data, best first;
# offered only where the installed pydicom encoder plugins can actually encode them.
LOSSLESS_ENCODABLE: tuple[UID, ...] = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
# For an object without Pixel Data an encapsulated syntax only means Explicit VR Little Endian
# (PS3.5 A.4 a-c), so any lossless one will do; no lossy one is offered: its label would claim a
# lossy compression that never happened.
LOSSLESS_LABELS: tuple[UID, ...] = (*LOSSLESS_ENCODABLE, JPEGLosslessSV1)
_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}  # "other" VRs swapped for Big Endian


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


def _encodable(syntax: UID) -> bool:
    try:
        return bool(get_encoder(syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def requested_contexts(sop_class_uid: str, stored_syntax: str, *, has_pixel_data: bool) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose: (abstract syntax, transfer syntaxes) pairs.

    The SCP picks one syntax per context (PS3.8 §9.3.3.2), so the order of contexts is our order of
    preference and the syntaxes inside one context are the SCP's to choose from:

    1. a compressed stored syntax alone, so that the SCP cannot pick an uncompressed one instead
       and force a needless decode (an uncompressed stored syntax leads the native context);
    2. every native encoding in one context — the SCP's preference decides (``storescp +xi``
       picks Implicit VR LE, ``+xb`` Big Endian, ``+xd`` Deflated);
    3. one context per lossless encapsulated syntax, for a peer that accepts nothing native: for
       an object with Pixel Data those we can encode, for one without any lossless label.
    """
    stored = UID(stored_syntax)
    native = [str(ts) for ts in NATIVE_SYNTAXES]
    contexts: list[tuple[str, list[str]]] = []
    if stored in NATIVE_SYNTAXES:
        native = [str(stored), *(ts for ts in native if ts != stored)]
    else:
        contexts.append((sop_class_uid, [str(stored)]))
    contexts.append((sop_class_uid, native))
    extra = [ts for ts in LOSSLESS_ENCODABLE if _encodable(ts)] if has_pixel_data else list(LOSSLESS_LABELS)
    contexts.extend((sop_class_uid, [str(ts)]) for ts in extra if ts != stored)
    return contexts


def _read(path: Path | BinaryIO) -> Dataset:
    try:
        dataset = dcmread(path)
    except (OSError, InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise DeliveryRejectedError(f"stored file cannot be read: {exc.__class__.__name__}") from exc
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta or "SOPClassUID" not in dataset or "SOPInstanceUID" not in dataset:
        raise DeliveryRejectedError("stored file lacks SOP Class/Instance UID or its Transfer Syntax UID")
    return dataset


def _names(syntaxes: Sequence[str]) -> str:
    return ", ".join(UID(ts).name for ts in syntaxes) or "none"


def _ranked(assoc: Association, sop_class_uid: str, stored_syntax: str) -> list[PresentationContext]:
    """The accepted contexts for the SOP Class, best first: the stored syntax (no re-encoding),
    then a native one, then the lossless encapsulated ones in our order of preference."""

    def rank(context: PresentationContext) -> int:
        syntax = context.transfer_syntax[0]
        if syntax == stored_syntax:
            return 0
        if syntax in NATIVE_SYNTAXES:
            return 1
        return 2 + (LOSSLESS_LABELS.index(syntax) if syntax in LOSSLESS_LABELS else len(LOSSLESS_LABELS))

    # as_scu: on a C-GET association we are the acceptor and may only C-STORE over contexts
    # whose role selection made us the SCU (PS3.7 D.3.3.4); a requestor always is.
    accepted = [
        cx for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class_uid and cx.transfer_syntax and cx.as_scu
    ]
    return sorted(accepted, key=rank)


class CannotEncodeError(Exception):
    """The dataset cannot be put losslessly into one particular transfer syntax."""


def _reencoded(dataset: Dataset, syntax: UID) -> Dataset:
    """Serialise *dataset* as a Part 10 stream in *syntax* and parse it back.

    pydicom converts every element while writing in an encoding other than the one it was read
    in (VR, byte order, deflate); parsing the result back gives a dataset whose original encoding
    *is* the target, which pynetdicom then sends as it is instead of refusing the mismatch between
    the dataset's encoding and its Transfer Syntax UID. It also proves the new encoding parses.
    """
    dataset.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def _swap_other_words(dataset: Dataset) -> None:
    """Byte-swap OW/OF/OL/OD/OV values in place for Explicit VR Big Endian (PS3.5 §7.3, A.3).

    pydicom writes these "other" values as the bytes it holds, which after reading a Little
    Endian file are little-endian words; numbers with other VRs are converted by the writer.
    """
    for element in dataset.iterall():
        size = _WORD_SIZES.get(str(element.VR))
        if size and isinstance(element.value, bytes) and len(element.value) % size == 0:
            element.value = np.frombuffer(element.value, dtype=f"<u{size}").byteswap().tobytes()


def transcode(dataset: Dataset, target: str) -> Dataset:
    """Return *dataset* re-encoded in the *target* transfer syntax, losslessly, same SOP Instance UID.

    Compressed pixel data are decoded first (decoding adds no loss). Then, by target: a native
    syntax re-encodes the dataset (Big Endian also swaps the "other" word values); a lossless
    encapsulated one compresses the pixel data with pydicom's encoder and checks that decoding
    the result gives back exactly the same pixel values — an object without Pixel Data is simply
    Explicit VR Little Endian under that label (PS3.5 A.4). The SOP Instance UID is kept: this is
    the same instance in another encoding (PS3.5 §10), and the deterministic UID is what makes a
    re-send idempotent at the PACS.

    Raises:
        CannotEncodeError: *target* cannot hold this dataset losslessly (or is not supported).
        DeliveryRejectedError: the stored compressed pixel data cannot be decoded.
    """
    wanted = UID(target)
    stored = UID(str(dataset.file_meta.TransferSyntaxUID))
    if stored.is_encapsulated and "PixelData" in dataset:
        try:
            dataset.decompress(generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "cannot send this"
            raise DeliveryRejectedError(f"cannot decode {stored.name} pixel data: {exc.__class__.__name__}") from exc
    if wanted in NATIVE_SYNTAXES:
        try:
            if wanted == ExplicitVRBigEndian:
                dataset = _reencoded(dataset, ExplicitVRLittleEndian)  # gives every element a concrete VR
                _swap_other_words(dataset)
            return _reencoded(dataset, wanted)
        except Exception as exc:  # noqa: BLE001 - pydicom cannot write some element in this encoding
            raise CannotEncodeError(f"cannot encode the dataset as {wanted.name}: {exc.__class__.__name__}") from exc
    if wanted not in LOSSLESS_LABELS:
        raise CannotEncodeError(f"{wanted.name} is not a lossless syntax we produce")
    try:
        native = _reencoded(dataset, ExplicitVRLittleEndian)
        if "PixelData" not in native:
            return _reencoded(native, wanted)
    except Exception as exc:  # noqa: BLE001 - pydicom cannot write some element in this encoding
        raise CannotEncodeError(f"cannot encode the dataset as {wanted.name}: {exc.__class__.__name__}") from exc
    if wanted not in LOSSLESS_ENCODABLE:
        raise CannotEncodeError(f"no encoder for {wanted.name}")
    try:
        expected = native.pixel_array
        native.compress(wanted, generate_instance_uid=False)
        result = _reencoded(native, wanted)
        lossless = bool(np.array_equal(result.pixel_array, expected))
    except Exception as exc:  # noqa: BLE001 - an encoder refusing these pixels: try another syntax
        raise CannotEncodeError(f"{wanted.name} encoder failed: {exc.__class__.__name__}") from exc
    if not lossless:
        raise CannotEncodeError(f"{wanted.name} did not round-trip the pixel values exactly")
    return result


def encode_for_association(dataset: Dataset, assoc: Association, *, peer: str) -> tuple[Dataset, str]:
    """*dataset* (as read from the store) encoded for the best context *assoc* accepted for its
    SOP Class, and that context's transfer syntax: the stored bytes when the stored syntax was
    accepted, else a lossless re-encoding (:func:`transcode`).

    Shared by every C-STORE we originate: deliveries (:func:`send_instance`) and the C-MOVE /
    C-GET sub-operations of the Query/Retrieve SCP, whose destination may accept nothing but
    uncompressed syntaxes for an image we hold compressed (PS3.4 C.4.2.3.1: the SCP performs
    the sub-operations over the contexts the destination accepted).

    Raises:
        DeliveryRejectedError: no accepted context can carry it (the message names them).
    """
    sop_class_uid = str(dataset.SOPClassUID)
    stored_syntax = str(dataset.file_meta.TransferSyntaxUID)
    offered = [
        str(ts)
        for cx in (*assoc.accepted_contexts, *assoc.rejected_contexts)
        if cx.abstract_syntax == sop_class_uid
        for ts in cx.transfer_syntax
    ]
    return _prepare(dataset, assoc, sop_class_uid, stored_syntax, list(dict.fromkeys(offered)), peer)


def _prepare(
    dataset: Dataset, assoc: Association, sop_class_uid: str, stored_syntax: str, offered: Sequence[str], destination: str
) -> tuple[Dataset, str]:
    """Pick the best accepted context we can fill and return the dataset encoded for it."""
    accepted = _ranked(assoc, sop_class_uid, stored_syntax)
    reasons: list[str] = []
    for context in accepted:
        syntax = str(context.transfer_syntax[0])
        if syntax == stored_syntax:
            return dataset, syntax
        try:
            return transcode(dataset, syntax), syntax
        except CannotEncodeError as exc:
            reasons.append(str(exc))
    raise DeliveryRejectedError(
        f"destination {destination!r} accepted no presentation context we can fill for "
        f"{UID(sop_class_uid).name}: offered {_names(offered)}; "
        f"accepted {_names([str(cx.transfer_syntax[0]) for cx in accepted])}"
        + (f" ({'; '.join(reasons)})" if reasons else "")
    )


def _refused_everything(
    assoc: Association, sop_class_uid: str, offered: Sequence[str], destination: str
) -> DeliveryRejectedError:
    """Negotiation completed and the peer refused every context (PS3.8 §9.3.3.2 results 3/4)."""
    answers = sorted({cx.status for cx in assoc.rejected_contexts})
    return DeliveryRejectedError(
        f"destination {destination!r} accepted no presentation context for {UID(sop_class_uid).name}: "
        f"offered {_names(offered)}; accepted none ({', '.join(answers)})"
    )


def _association_failure(
    assoc: Association, destination: DicomDestination, *, connected: bool = True
) -> DeliveryUnavailableError:
    if assoc.is_rejected:
        what = "rejected the association (A-ASSOCIATE-RJ)"
    elif destination.tls and not connected:
        # pynetdicom logs the OpenSSL reason ("TCP Initialisation Error") and keeps the exception.
        what = "could not be reached over TLS (connection refused, timeout, or TLS handshake failed)"
    else:  # pynetdicom reports a refused or timed-out connection as an abort, too
        what = "was unreachable or aborted the association (connection refused, timeout or A-ABORT)"
    return DeliveryUnavailableError(f"destination {destination.name!r} {what}")


def _associate(
    destination: DicomDestination, calling_ae: str, timeout: float, contexts: Contexts,
    sop_class_uid: str, offered: Sequence[str], tls_context: ssl.SSLContext | None = None,
) -> Association:
    """An established association proposing *contexts*, or the typed error saying why not.
    Over TLS when the destination asks for it (the handshake is part of the connect, bounded
    by *timeout* like the TCP connect)."""
    tls_args: tuple[ssl.SSLContext, str] | None = None
    if destination.tls:
        if tls_context is None:
            raise DeliveryRejectedError(f"destination {destination.name!r} needs TLS, but no TLS context was given")
        tls_args = (tls_context, destination.host)
    connected: list[bool] = []
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, low_latency_tcp)]
    if tls_args is not None:  # to tell a failed handshake from a failed association
        handlers.append((evt.EVT_CONN_OPEN, lambda _event: connected.append(True)))
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title,
        evt_handlers=handlers,
        tls_args=tls_args,
    )
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # pynetdicom aborts after such a negotiation, but the answer is about the SOP Class
            # and our encodings, not the peer's state: sending again gets the same answer.
            raise _refused_everything(assoc, sop_class_uid, offered, destination.name)
        raise _association_failure(assoc, destination, connected=bool(connected))
    return assoc


def _store(
    assoc: Association, dataset: Dataset, sop_class_uid: str, stored_syntax: str, offered: Sequence[str], destination: str
) -> tuple[Dataset, str]:
    """C-STORE *dataset* over *assoc*; the response and the transfer syntax it went in."""
    dataset, sent_syntax = _prepare(dataset, assoc, sop_class_uid, stored_syntax, offered, destination)
    try:
        response = assoc.send_c_store(dataset)
    except RuntimeError as exc:  # the association went away before the request was sent
        raise DeliveryUnavailableError(f"association with {destination!r} lost before sending") from exc
    except (ValueError, AttributeError) as exc:  # pynetdicom could not encode the dataset
        raise DeliveryRejectedError(
            f"dataset cannot be encoded for sending as {UID(sent_syntax).name}: {exc.__class__.__name__}"
        ) from exc
    if "Status" not in response:
        raise DeliveryUnavailableError(f"no C-STORE response from {destination!r} (timeout or association aborted)")
    return response, sent_syntax


def send_instance(
    path: Path | BinaryIO, destination: DicomDestination, calling_ae: str, timeout: float, pool: AssociationPool | None = None,
    *, tls_context: ssl.SSLContext | None = None,
) -> SendResult:
    """C-STORE the Part 10 file at *path* (a path, or an open binary file such as
    :meth:`storage.filestore.FileStore.open` returns) to *destination*.

    *timeout* bounds the TCP connect, the association negotiation (ACSE), each DIMSE message
    and network inactivity, so a hung peer costs at most a few timeouts, never a stuck worker.

    With *pool*, the open association to the same destination is reused if it proposed the
    contexts this object needs, and left open afterwards (:mod:`dicom_node.associations`); if sending over a reused
    one fails for a reason worth retrying (the peer may have dropped it while idle), the object
    is sent once more over a new association at once. Without, one association per object.

    *tls_context* is needed for a destination with ``tls = true``.

    Raises:
        DeliveryUnavailableError: retry later (see the module docstring).
        DeliveryRejectedError: retrying cannot help.
    """
    dataset = _read(path)
    sop_class_uid = str(dataset.SOPClassUID)
    sop_instance_uid = str(dataset.SOPInstanceUID)
    stored_syntax = str(dataset.file_meta.TransferSyntaxUID)

    contexts = requested_contexts(sop_class_uid, stored_syntax, has_pixel_data="PixelData" in dataset)
    offered = list(dict.fromkeys(ts for _, syntaxes in contexts for ts in syntaxes))
    needed: Contexts = tuple((abstract, tuple(syntaxes)) for abstract, syntaxes in contexts)
    key = (destination.host, destination.port, destination.ae_title, calling_ae, destination.tls)
    pool = pool or AssociationPool(0)

    def connect(proposed: Contexts) -> Association:
        return _associate(destination, calling_ae, timeout, proposed, sop_class_uid, offered, tls_context)

    for last_try in (False, True):
        reused = False
        try:
            with pool.checkout(key, needed, connect) as (assoc, reused):
                response, sent_syntax = _store(assoc, dataset, sop_class_uid, stored_syntax, offered, destination.name)
            break
        except DeliveryUnavailableError:
            if last_try or not reused:
                raise
            log.debug("delivery.reused_association_failed", destination=destination.name)
    transcoded = sent_syntax != stored_syntax

    status = int(response.Status)
    comment = str(response.get("ErrorComment", "")) or None
    category = classify_store_status(status)
    log.debug(
        "delivery.c_store",
        destination=destination.name,
        status=f"0x{status:04X}",
        category=str(category),
        transfer_syntax=UID(sent_syntax).name,
        transcoded=transcoded,
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
