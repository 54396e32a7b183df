"""Study Root and Patient Root Query/Retrieve SCP (PS3.4 Annex C): thin adapters from
EVT_C_FIND, EVT_C_MOVE and EVT_C_GET to :class:`~dicom_node.query_retrieve.QueryRetrieveService`.

pynetdicom drives the DIMSE exchange from generator handlers (C-FIND: ``(status, identifier)``
pairs; C-MOVE: destination, sub-operation count, then ``(status, dataset)``; C-GET: count,
then ``(status, dataset)``) and runs the C-STORE sub-operations itself. What it does not tell
the handler is how each sub-operation ended, and the Instances Transferred audit record needs
exactly that, so the handlers listen to the C-STORE-RSP messages (EVT_DIMSE_RECV) of the
association the sub-operations run on: the move sub-association for C-MOVE, the requestor's own
association for C-GET (PS3.4 C.4.3.3: C-GET sub-operations use the same association, with the
requestor in the Storage SCP role).

Encoding: each instance goes in its stored transfer syntax when the receiving association
accepted it, else re-encoded losslessly for a context it did accept (compressed pixel data
decoded): the same fallback as result deliveries, :func:`dicom_node.storage_scu.encode_for_association`.
C-MOVE proposes, per SOP Class, the stored compressed syntax alone plus Explicit/Implicit VR
Little Endian, so a destination that takes only uncompressed data still receives every image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.errors import QueryRetrieveError, Service, dimse_boundary
from dicom_node.ingest import Peer
from dicom_node.query_retrieve import QueryRetrieveService, SubOperationResults, Transfer
from dicom_node.storage_scu import DeliveryError, encode_for_association

log = structlog.get_logger(__name__)

PENDING, CANCEL = 0xFF00, 0xFE00
_C_STORE_RSP = 0x8001
#: PS3.8 9.3.2.2: at most 128 presentation contexts in one association request.
MAX_CONTEXTS = 128
_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})

#: Yielded instead of a dataset whose file cannot be read: pynetdicom counts any non-Dataset
#: as a failed sub-operation, which is the truth (PS3.4 C.4.2.1.4.2).
_UNREADABLE = object()


def handle_find(event: Event, service: QueryRetrieveService) -> Iterator[tuple[int, Dataset | None]]:
    """EVT_C_FIND (PS3.4 C.4.1.3): Pending per match, then pynetdicom's final Success."""
    responses: Iterator[Dataset] = iter(())
    with dimse_boundary(Service.FIND) as failure:
        responses = service.find(
            event.identifier,
            _requestor(event),
            sop_class_uid=_sop_class(event),
            encoded=_raw_identifier(event),
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
    if failure.status is not None:
        yield failure.status, None
        return
    for response in responses:
        if event.is_cancelled:
            yield CANCEL, None
            return
        yield PENDING, response


def handle_move(event: Event, service: QueryRetrieveService) -> Iterator[Any]:
    """EVT_C_MOVE (PS3.4 C.4.2.3): the sub-association to the destination is opened by
    pynetdicom with the presentation contexts the matched instances need."""
    destination_ae = str(event.move_destination).strip()
    with dimse_boundary(Service.MOVE) as unknown:
        known = service.move_destination(destination_ae)
    if unknown.failed:
        yield None, None  # pynetdicom answers 0xA801 "Move Destination unknown"
        return
    transfer: Transfer | None = None
    contexts: list[PresentationContext] = []
    with dimse_boundary(Service.MOVE) as failure:
        transfer = service.retrieve(event.identifier, _requestor(event), destination_ae=destination_ae,
                                    sop_class_uid=_sop_class(event))
        contexts = move_contexts(transfer.sop_pairs)
    if failure.status is not None or transfer is None:
        if transfer is not None:
            transfer.finish(SubOperationResults())  # begun, but nothing will be sent
        # pynetdicom wants a destination and a count before it accepts a final status.
        yield known.host, known.port, {"contexts": [build_context(Verification)], **known.association_options()}
        yield 1
        yield failure.status, None
        return
    destination = transfer.destination
    assert destination is not None  # retrieve() with a destination AE always resolves one
    tracker = StoreResponseTracker()
    try:
        yield destination.host, destination.port, {
            "contexts": contexts,
            "evt_handlers": [
                (evt.EVT_ACCEPTED, tracker.on_accepted),
                (evt.EVT_DIMSE_RECV, tracker.on_dimse_recv),
            ],
            **destination.association_options(),
        }
        yield len(transfer.matches)
        yield from _sub_operations(event, transfer, tracker, lambda: tracker.carrier)
    finally:
        # Also when the destination refused the association: pynetdicom then answers 0xA801
        # and drops this generator, and the audit trail must say nothing was sent.
        transfer.finish(tracker.results)


def handle_get(event: Event, service: QueryRetrieveService) -> Iterator[Any]:
    """EVT_C_GET (PS3.4 C.4.3.3): C-STORE sub-operations on the requestor's association, over
    the storage contexts it proposed with the SCP role (role selection, PS3.7 D.3.3.4)."""
    transfer: Transfer | None = None
    with dimse_boundary(Service.GET) as failure:
        transfer = service.retrieve(event.identifier, _requestor(event), sop_class_uid=_sop_class(event))
    if failure.status is not None or transfer is None:
        yield 1
        yield failure.status, None
        return
    tracker = StoreResponseTracker()
    event.assoc.bind(evt.EVT_DIMSE_RECV, tracker.on_dimse_recv)
    try:
        yield len(transfer.matches)
        yield from _sub_operations(event, transfer, tracker, lambda: event.assoc)
    finally:
        event.assoc.unbind(evt.EVT_DIMSE_RECV, tracker.on_dimse_recv)
        transfer.finish(tracker.results)


class StoreResponseTracker:
    """Collects the C-STORE-RSP statuses of the sub-operations, keyed by SOP Instance UID, and
    (C-MOVE) the sub-association that carries them, once the destination accepted it."""

    def __init__(self) -> None:
        self.results = SubOperationResults()
        self.carrier: Association | None = None

    def on_accepted(self, event: Event) -> None:
        self.carrier = event.assoc

    def on_dimse_recv(self, event: Event) -> None:
        command = event.message.command_set
        if command.get("CommandField") == _C_STORE_RSP:
            self.results.record(str(command.get("AffectedSOPInstanceUID", "")), int(command.Status))


def move_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Presentation contexts for the C-MOVE sub-association.

    Every SOP Class gets one native context offering Explicit and Implicit VR Little Endian
    (pynetdicom converts between them; any image can be decoded into them); every other stored
    transfer syntax gets a context of its own, proposed first, so that a destination accepting
    it receives the stored bytes unchanged and one refusing it still receives the image,
    decompressed (:func:`_sub_operations`).
    """
    wanted: dict[tuple[str, str], list[str]] = {}
    pairs = sorted(pairs)
    for sop_class, syntax in pairs:
        if syntax not in _NATIVE:
            wanted[(sop_class, syntax)] = [syntax]
    for sop_class in sorted({sop_class for sop_class, _ in pairs}):
        wanted[(sop_class, "native")] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    if len(wanted) > MAX_CONTEXTS:
        raise QueryRetrieveError(f"the matches need {len(wanted)} presentation contexts, more than {MAX_CONTEXTS}")
    return [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]


def _sub_operations(
    event: Event, transfer: Transfer, tracker: StoreResponseTracker, carrier: Callable[[], Association | None]
) -> Iterator[tuple[int, Any]]:
    """Pending + dataset per instance, read one at a time and encoded for the association that
    *carrier* returns (the one the C-STORE sub-operations run on); stops on C-CANCEL (C.4.2.3.2).
    An instance no accepted context can carry is a failed sub-operation, as is an unreadable one.

    The callers audit the outcome in a ``finally``: pynetdicom simply drops the generator when
    the association is aborted or the sub-association cannot be opened, and closing it runs
    that ``finally`` with whatever the tracker saw.
    """
    results = tracker.results
    for match, dataset in transfer.datasets():
        if event.is_cancelled:
            results.cancelled = True
            yield CANCEL, None
            return
        sendable = None if dataset is None else _encoded(dataset, carrier())
        if sendable is None:
            results.failed.append(match.sop_instance_uid)
            yield PENDING, _UNREADABLE
        else:
            yield PENDING, sendable


def _encoded(dataset: Dataset, assoc: Association | None) -> Dataset | None:
    """*dataset* in an encoding *assoc* accepted (see the module docstring), or None."""
    if assoc is None:  # not reachable through pynetdicom: the carrier exists before any yield
        return dataset
    stored = str(dataset.file_meta.TransferSyntaxUID)
    try:
        encoded, syntax = encode_for_association(dataset, assoc, peer=_receiver_title(assoc))
    except DeliveryError as exc:
        log.warning("dicom.retrieve.no_context", sop_class_uid=str(dataset.SOPClassUID), detail=str(exc)[:300])
        return None
    if syntax != stored:
        log.info("dicom.retrieve.transcoded", sop_class_uid=str(dataset.SOPClassUID), stored=stored, sent=syntax)
    return encoded


def _receiver_title(assoc: Association) -> str:
    """The AE receiving the sub-operations: the C-MOVE destination (we requested the
    sub-association) or the C-GET requestor."""
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return str(peer.ae_title).strip()


def _sop_class(event: Event) -> str:
    """The request's SOP Class (which information model: Study Root or Patient Root)."""
    return str(event.request.AffectedSOPClassUID).strip()


def _requestor(event: Event) -> Peer:
    requestor = event.assoc.requestor
    return Peer(str(requestor.ae_title).strip(), str(requestor.address), int(requestor.port))


def _raw_identifier(event: Event) -> bytes | None:
    """The identifier exactly as received (for the Query audit record), if still readable."""
    stream = getattr(event.request, "Identifier", None)
    return stream.getvalue() if stream is not None else None
