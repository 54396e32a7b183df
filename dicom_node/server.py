"""The DICOM application entity: which services and transfer syntaxes we offer, who may
associate, and the lifecycle of the listening server.

Transfer syntaxes are those of docs/architecture.md §4. Received data is kept in the encoding it arrived in
(no transcoding on receipt); the pylibjpeg plugins only matter when someone decodes pixels later.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from audit.builders import security_alert
from audit.events import AuditEvent, AuditSource, EventType
from conf.settings import DicomSettings
from dicom_node.ingest import Ingestor
from dicom_node.peers import PeerPolicy
from dicom_node.qr_scp import handle_find, handle_get, handle_move
from dicom_node.query_retrieve import QueryRetrieveService
from dicom_node.storage_scp import handle_store
from dicom_node.verification import handle_echo

log = structlog.get_logger(__name__)

#: PS3.5 Annex A transfer syntaxes we accept (docs/architecture.md §4), most preferred first.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

AuditSink = Callable[[AuditEvent], None]

# Association rejection (PS3.8 9.3.4): rejected-permanent, service-user, calling-AE-not-recognised.
_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03


#: Study Root Query/Retrieve (PS3.4 C.6.2); identifiers are small, so the native syntaxes do.
QUERY_RETRIEVE_SOP_CLASSES: tuple[str, ...] = (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


class ReusePortAssociationServer(ThreadedAssociationServer):
    """A listening socket that other acceptor processes may bind too (Linux SO_REUSEPORT): the
    kernel spreads new associations over the processes, so they stop sharing one GIL."""

    def server_bind(self) -> None:
        assert self.socket is not None  # created by socketserver before binding
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def build_ae(settings: DicomSettings) -> AE:
    """An AE offering Verification, Storage for every storage SOP class pynetdicom knows, and
    Study Root Query/Retrieve.

    Storage contexts accept SCP/SCU role selection (PS3.7 D.3.3.4) both ways: a requestor that
    proposes no roles gets the default (it is the SCU, we store), and a C-GET requestor that
    proposes the SCP role for itself gets it, so that C-STORE sub-operations can flow back on
    its association (PS3.4 C.4.3).
    """
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.require_called_aet = settings.require_called_ae_title
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.add_supported_context(Verification, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"])
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(
                context.abstract_syntax, list(ACCEPTED_TRANSFER_SYNTAXES), scu_role=True, scp_role=True
            )
    for sop_class in QUERY_RETRIEVE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"])
    return ae


class DicomNode:
    """Owns the listening server; start/stop are idempotent-ish and thread-safe enough for the CLI."""

    def __init__(
        self,
        settings: DicomSettings,
        ingestor: Ingestor,
        audit: AuditSink,
        audit_source: AuditSource,
        query_retrieve: QueryRetrieveService | None = None,
    ) -> None:
        self._settings = settings
        self._query_retrieve = query_retrieve
        self._ingestor = ingestor
        self._audit = audit
        self._audit_source = audit_source
        self._policy = PeerPolicy(settings.peers)
        self._ae = build_ae(settings)
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("DICOM node is not running")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        # Receive datasets straight to files (no decode, bounded memory); process-wide setting,
        # owned by the composition root's only DICOM node.
        _config.STORE_RECV_CHUNKED_DATASET = True
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, _set_tcp_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_RELEASED, _on_closed),
            (evt.EVT_ABORTED, _on_closed),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self._ingestor]),
        ]
        if self._query_retrieve is not None:
            # pynetdicom logs every Q/R request identifier at INFO: patient names, IDs and
            # accession numbers, which belong in the audit trail only (docs/architecture.md §5).
            _config.LOG_REQUEST_IDENTIFIERS = False
            handlers += [
                (evt.EVT_C_FIND, handle_find, [self._query_retrieve]),
                (evt.EVT_C_MOVE, handle_move, [self._query_retrieve]),
                (evt.EVT_C_GET, handle_get, [self._query_retrieve]),
            ]
        if self._settings.acceptor_processes > 1:
            # AE.start_server has no server_class; this is its non-blocking path with ours.
            server = self._ae.make_server(
                (self._settings.bind, self._settings.port),
                evt_handlers=handlers,
                server_class=ReusePortAssociationServer,
            )
            threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
            self._ae._servers.append(server)  # ThreadedAssociationServer.shutdown() removes it
            self._server = server
        else:
            self._server = self._ae.start_server(
                (self._settings.bind, self._settings.port), block=False, evt_handlers=handlers
            )
        log.info("dicom.listening", ae_title=self._settings.ae_title, port=self.port)

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish (up to *grace_seconds*), then abort."""
        server, self._server = self._server, None
        if server is None:
            return
        active = list(server.active_associations)
        server.shutdown()
        deadline = time.monotonic() + grace_seconds
        for assoc in active:
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in server.active_associations:
            assoc.abort()
        log.info("dicom.stopped", unfinished=len([a for a in active if a.is_alive()]))

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        # The requestor's AE title is filled in only during negotiation, which comes after us.
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        address = assoc.requestor.address
        structlog.contextvars.bind_contextvars(assoc_id=id(assoc) & 0xFFFFFF, calling_ae=calling)
        decision = self._policy.check(calling, address)
        if decision.allowed:
            return
        log.warning("dicom.association.rejected", address=address, reason=decision.reason)
        try:
            self._audit(
                security_alert(
                    self._audit_source,
                    event_type=EventType.NODE_AUTHENTICATION,
                    reporter_ae=self._settings.ae_title,
                    offender_id=calling,
                    offender_host=address,
                    description=decision.reason or "association rejected",
                    when=dt.datetime.now(dt.UTC),
                )
            )
        except Exception:  # noqa: BLE001 - the rejection stands even if the audit store is down
            log.exception("audit.write_failed", event="security-alert")
        # Audited first, so the record exists by the time the peer learns of the rejection.
        _reject_calling_ae(assoc)


def _reject_calling_ae(assoc: Any, wait_seconds: float = 2.0) -> None:
    """Send A-ASSOCIATE-RJ and wait until the DUL has actually written it.

    pynetdicom closes the socket as soon as the EVT_REQUESTED handler returns; the reject is
    only queued for the DUL thread by then, so without this wait the peer often sees a bare
    connection close (A-P-ABORT) instead of the reason.
    """
    assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
    deadline = time.monotonic() + wait_seconds
    # Sta13: "awaiting transport close" — entered right after the RJ PDU was sent (PS3.8 9.2).
    while assoc.dul.state_machine.current_state not in ("Sta13", "Sta1") and time.monotonic() < deadline:
        time.sleep(0.001)


def _set_tcp_nodelay(event: Event) -> None:
    """Small C-STORE-RSP PDUs must not wait for Nagle: it would cap one association's rate."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _on_closed(event: Event) -> None:
    structlog.contextvars.clear_contextvars()
