"""Storage SCP (PS3.4 Annex B): a thin adapter from EVT_C_STORE to :class:`Ingestor`.

pynetdicom runs with ``STORE_RECV_CHUNKED_DATASET``: the dataset arrives as a Part 10 file
written while the PDUs came in, so a 7 MB radiograph is never decoded or held in memory here.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_node.errors import Service, dimse_boundary
from dicom_node.ingest import Ingestor, Peer, ReceivedInstance

log = structlog.get_logger(__name__)


def handle_store(event: Event, ingestor: Ingestor) -> int:
    request = event.request
    assert isinstance(request, C_STORE)  # pynetdicom calls this handler for C-STORE-RQ only
    assoc = event.assoc
    received = ReceivedInstance(
        path=Path(event.dataset_path),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(event.context.transfer_syntax),
        calling=Peer(assoc.requestor.ae_title, assoc.requestor.address, assoc.requestor.port),
        called_ae=assoc.acceptor.ae_title,
    )
    with dimse_boundary(Service.STORE, sop_class_uid=received.sop_class_uid) as failure:
        result = ingestor.ingest(received)
        log.debug("dicom.store.ok", result=str(result), sop_class_uid=received.sop_class_uid)
    return failure.status if failure.status is not None else 0x0000
