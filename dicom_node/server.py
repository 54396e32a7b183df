"""The DICOM application entity: which services and transfer syntaxes we offer, who may
associate and what each peer may ask for, and the lifecycle of the listening server.

Transfer syntaxes are those of docs/architecture.md §4. Received data is kept in the encoding it arrived in
(no transcoding on receipt); the pylibjpeg plugins only matter when someone decodes pixels later.

Association negotiation (PS3.8 7.1.1, 9.3.2) is where a peer is checked, in this order, each
rejection audited as a PS3.15 A.5.3.11 Security Alert before the peer learns of it:

1. the calling AE title must be a configured peer, from its host, and, when the peer has a
   ``certificate_sha256``, over TLS with that client certificate (certificate mapped to the node,
   PS3.15 B.9; A-ASSOCIATE-RJ rejected-permanent, service-user, reason 3
   "calling-AE-title-not-recognized");
2. the called AE title must be ours when ``require_called_ae_title`` (reason 7
   "called-AE-title-not-recognized");
3. the presentation contexts offered to the peer are those its ``permissions`` grant: a context
   for a service it was not granted is answered "abstract-syntax-not-supported (provider
   rejection)" (PS3.8 Table 9-18, result 3), so a C-FIND / C-MOVE / C-GET request can never
   arrive on it. Storage contexts are offered when "store" (the peer sends, SCU role) or "get"
   (the peer receives C-GET sub-operations, SCP role, PS3.7 D.3.3.4) is granted; a C-STORE from a
   peer granted only "get" is answered 0x0124 "Refused: Not Authorized" (PS3.7 C.5).

An accepted association is recorded once it has ended (``record_association``, one row of
``dicom_association`` through :class:`storage.associations.AssociationRecorder`, best effort, after
the connection is closed: :mod:`dicom_node.listener`); a rejected one is audited only.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import structlog
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from audit.alert_throttle import AlertThrottle
from audit.builders import security_alert
from audit.events import AuditEvent, AuditSource, Code, EventType
from conf.settings import DicomService, DicomSettings
from conf.tls import describe
from dicom_node.ingest import Ingestor
from dicom_node.limits import (
    ASSOCIATIONS,
    DATASET_SIZE,
    LOCAL_LIMIT_EXCEEDED,
    REJECTED_TRANSIENT,
    SOURCE_PROVIDER_PRESENTATION,
    LimitAlerts,
    associations_over_limit,
)
from dicom_node.listener import (
    AdmissionLimits,
    AssociationEndHandler,
    GuardedAssociationServer,
    ReusePortAssociationServer,
)
from dicom_node.peers import PeerPolicy, service_of
from dicom_node.qr_scp import handle_find, handle_get, handle_move
from dicom_node.query_retrieve import QueryRetrieveService
from dicom_node.storage_scp import handle_store, install_receive_file, too_large
from dicom_node.tcp import low_latency_tcp
from dicom_node.tls import listener_context, presented_fingerprint
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

# Association rejection (PS3.8 9.3.4, Table 9-21): rejected-permanent, service-user, and the reason.
_REJECT_PERMANENT, _SOURCE_SERVICE_USER = 0x01, 0x01
_CALLING_AE_NOT_RECOGNISED, _CALLED_AE_NOT_RECOGNISED = 0x03, 0x07
#: PS3.7 C.5: "Refused: Not Authorized", for a C-STORE from a peer not granted "store".
NOT_AUTHORIZED = 0x0124


#: Study Root and Patient Root Query/Retrieve (PS3.4 C.6.2, C.6.1); identifiers are small, so
#: the native syntaxes do.
QUERY_RETRIEVE_SOP_CLASSES: tuple[str, ...] = (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
)


class GatewayAE(AE):
    """pynetdicom's AE, counting only associations that still serve (or negotiate) towards
    ``maximum_associations``.

    pynetdicom counts every live association thread when it checks the limit ("local-limit-
    exceeded", PS3.8 Table 9-21). Two kinds of them serve nothing:

    * a rejected, aborted or released association stays alive in Sta13 (awaiting transport
      close, PS3.8 9.2) until its peer closes or the ARTIM timer expires;
    * an association whose A-ASSOCIATE-RQ never reached it (pynetdicom could not decode it: A-ABORT,
      Sta13) waits for it until the connection is closed. The listener hands over only
      connections whose request is already in the receive buffer, so a healthy association
      leaves this state within milliseconds.

    A burst of refused requests whose senders keep their ends open must not lock a configured peer
    out while those run down.
    """

    @property
    def active_associations(self) -> list[Association]:
        return [
            assoc
            for assoc in super().active_associations
            if assoc.requestor.primitive is not None
            and not (assoc.is_rejected or assoc.is_aborted or assoc.is_released)
        ]


def build_ae(settings: DicomSettings) -> AE:
    """An AE offering Verification, Storage for every storage SOP class pynetdicom knows, and
    Study Root and Patient Root Query/Retrieve.

    Storage contexts accept SCP/SCU role selection (PS3.7 D.3.3.4) both ways: a requestor that
    proposes no roles gets the default (it is the SCU, we store), and a C-GET requestor that
    proposes the SCP role for itself gets it, so that C-STORE sub-operations can flow back on
    its association (PS3.4 C.4.3).
    """
    ae = GatewayAE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    # Checked (and audited) by DicomNode._on_requested instead: pynetdicom rejects silently.
    ae.require_called_aet = False
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


def contexts_for(ae: AE, permissions: frozenset[DicomService]) -> list[PresentationContext]:
    """The AE's supported presentation contexts a peer with *permissions* is offered.

    Storage contexts keep the SCU role for the peer only with "store" and the SCP role only with
    "get" (role selection, PS3.7 D.3.3.4); every other context needs its own service.
    """
    offered: list[PresentationContext] = []
    for supported in ae.supported_contexts:
        abstract_syntax = str(supported.abstract_syntax)
        service = service_of(abstract_syntax)
        if service == "store":
            scu, scp = "store" in permissions, "get" in permissions
            if not (scu or scp):
                continue
            context = build_context(abstract_syntax, list(supported.transfer_syntax))
            context.scu_role, context.scp_role = scu, scp
        elif service in permissions:
            context = build_context(abstract_syntax, list(supported.transfer_syntax))
        else:
            continue
        offered.append(context)
    return offered


def refused_services(proposed: list[PresentationContext], permissions: frozenset[DicomService]) -> set[DicomService]:
    """The services a peer proposed contexts for but was not granted (storage counts as
    granted with "get" too: a C-GET requestor proposes storage contexts to receive on)."""
    effective: set[DicomService] = set(permissions) | ({"store"} if "get" in permissions else set())
    return {service_of(str(cx.abstract_syntax)) for cx in proposed} - effective


class DicomNode:
    """Owns the listening server; start/stop are idempotent-ish and thread-safe enough for the CLI.

    *record_association* is called with every accepted association once it has ended (normally
    an :class:`storage.associations.AssociationRecorder`); what it raises is logged, never felt
    by the association."""

    def __init__(
        self,
        settings: DicomSettings,
        ingestor: Ingestor,
        audit: AuditSink,
        audit_source: AuditSource,
        query_retrieve: QueryRetrieveService | None = None,
        *,
        record_association: AssociationEndHandler | None = None,
    ) -> None:
        self._settings = settings
        self._record_association = record_association
        self._query_retrieve = query_retrieve
        self._ingestor = ingestor
        self._audit = audit
        self._audit_source = audit_source
        self._policy = PeerPolicy(settings.peers)
        self._ae = build_ae(settings)
        self._contexts: dict[frozenset[DicomService], list[PresentationContext]] = {}
        self._permissions: weakref.WeakKeyDictionary[Any, frozenset[DicomService]] = weakref.WeakKeyDictionary()
        self._server: GuardedAssociationServer | None = None
        self._limit_alerts = LimitAlerts(audit, audit_source, settings.ae_title)
        #: Rejections and refused services are answered every time; their Security Alerts are
        #: throttled per (address, event type), so a flood cannot flood the hash-chained log.
        self._alert_throttle = AlertThrottle()

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
        # A full disk, or a data set over max_dataset_bytes, answers 0xA700 instead of dropping the association.
        install_receive_file(self._settings.max_dataset_bytes)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, low_latency_tcp),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_RELEASED, _on_closed),
            (evt.EVT_ABORTED, _on_closed),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self._on_store),
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
        server_class = (
            ReusePortAssociationServer if self._settings.acceptor_processes > 1 else GuardedAssociationServer
        )
        # TLS only on this port with [dicom.tls] (PS3.15 B.9): certificates are read here, at start.
        tls = self._settings.tls
        ssl_context = listener_context(tls) if tls.enabled else None
        # AE.start_server takes no server class; this is its non-blocking path with ours.
        server = self._ae.make_server(
            (self._settings.bind, self._settings.port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=server_class,
            limits=self._admission_limits(),
            on_tls_auth_failure=self._alert_tls_auth_failure if ssl_context is not None else None,
            on_association_end=self._record_association,
        )
        assert isinstance(server, GuardedAssociationServer)  # make_server builds server_class
        threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
        self._ae._servers.append(server)  # ThreadedAssociationServer.shutdown() removes it
        self._server = server
        log.info("dicom.listening", ae_title=self._settings.ae_title, bind=self._settings.bind, port=self.port,
                 tls=describe(tls))
        mapped = sorted(peer.ae_title for peer in self._settings.peers if peer.certificate_sha256)
        if mapped and tls.ca_file is None:
            # No ca_file: no client certificate is ever asked for, so these peers are always rejected.
            log.warning("dicom.tls.certificates_never_requested", peers=mapped,
                        detail="peers with certificate_sha256 need [dicom.tls] cert_file, key_file and ca_file")

    def _admission_limits(self) -> AdmissionLimits:
        settings = self._settings
        return AdmissionLimits(
            request_timeout=settings.association_request_timeout,
            per_host=settings.max_pending_per_host,
            total=settings.max_pending_connections,
            network_timeout=settings.network_timeout,
            peer_addresses=self._policy.peer_addresses,
        )

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
        """EVT_REQUESTED: the A-ASSOCIATE-RQ is in; decide before pynetdicom negotiates."""
        assoc = event.assoc
        # The requestor's AE titles are filled in only during negotiation, which comes after us.
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        called = str(primitive.called_ae_title).strip() if primitive is not None else ""
        address = assoc.requestor.address
        structlog.contextvars.bind_contextvars(assoc_id=id(assoc) & 0xFFFFFF, calling_ae=calling)
        crowded = associations_over_limit(
            self._ae.active_associations, assoc, address, self._settings.max_associations_per_host)
        if crowded is not None:  # dicom_node/limits.py: rejected-transient, local-limit-exceeded
            self._limit_alerts.breached(calling, address, ASSOCIATIONS, crowded)
            _send_reject(assoc, LOCAL_LIMIT_EXCEEDED, result=REJECTED_TRANSIENT, source=SOURCE_PROVIDER_PRESENTATION)
            return
        decision = self._policy.check(calling, address)
        if not decision.allowed:
            self._reject(assoc, calling, address, decision.reason or "association rejected", _CALLING_AE_NOT_RECOGNISED)
            return
        if decision.certificate_sha256 is not None:
            mismatch = certificate_mismatch(calling, decision.certificate_sha256, assoc)
            if mismatch is not None:
                self._reject(assoc, calling, address, mismatch, _CALLING_AE_NOT_RECOGNISED)
                return
        if self._settings.require_called_ae_title and called != self._settings.ae_title:
            reason = f"called AE title {called!r} is not ours ({self._settings.ae_title!r})"
            self._reject(assoc, calling, address, reason, _CALLED_AE_NOT_RECOGNISED)
            return
        permissions = decision.permissions
        self._permissions[assoc] = permissions
        assoc.acceptor.supported_contexts = self._offered(permissions)
        proposed = list(primitive.presentation_context_definition_list) if primitive is not None else []
        refused = refused_services(proposed, permissions)
        if refused:
            self._alert_restricted(calling, address, f"{calling} is not granted {', '.join(sorted(refused))}")

    def _offered(self, permissions: frozenset[DicomService]) -> list[PresentationContext]:
        if permissions not in self._contexts:
            self._contexts[permissions] = contexts_for(self._ae, permissions)
        return self._contexts[permissions]

    def _on_store(self, event: Event) -> int:
        """EVT_C_STORE: only for a peer granted "store" (a C-GET-only peer may still have a
        storage context in the SCU role when it proposed no role selection)."""
        if "store" not in self._permissions.get(event.assoc, frozenset()):
            requestor = event.assoc.requestor
            calling = str(requestor.ae_title).strip()
            self._alert_restricted(calling, requestor.address, f"{calling} is not granted store")
            return NOT_AUTHORIZED
        status = handle_store(event, self._ingestor)
        if too_large(event.request):
            requestor = event.assoc.requestor
            self._limit_alerts.breached(str(requestor.ae_title).strip(), requestor.address, DATASET_SIZE,
                                        f"a data set over {self._settings.max_dataset_bytes} bytes")
        return status

    def _reject(self, assoc: Any, calling: str, address: str, reason: str, diagnostic: int) -> None:
        log.warning("dicom.association.rejected", address=address, reason=reason)
        self._write_alert(EventType.NODE_AUTHENTICATION, calling, address, reason)
        # Audited first, so the record exists by the time the peer learns of the rejection.
        _send_reject(assoc, diagnostic)

    def _alert_tls_auth_failure(self, address: str, reason: str) -> None:
        """A TLS peer failed node authentication before any AE title was sent: the Security Alert
        names the node by its address (the listener has logged it, throttled)."""
        self._write_alert(EventType.NODE_AUTHENTICATION, address, address, reason)

    def _alert_restricted(self, calling: str, address: str, reason: str) -> None:
        log.warning("dicom.service.refused", address=address, reason=reason)
        self._write_alert(EventType.USE_OF_RESTRICTED_FUNCTION, calling, address, reason)

    def _write_alert(self, event_type: Code, calling: str, address: str, description: str) -> None:
        # Keyed by what was refused too: distinct refusals (find, then move) each get their alert;
        # the same refusal repeated from one address is what a flood looks like.
        breach = self._alert_throttle.breach(address, f"{event_type.code}:{description}")
        if breach is None:
            return
        description = breach.describe(description)
        try:
            self._audit(
                security_alert(
                    self._audit_source,
                    event_type=event_type,
                    reporter_ae=self._settings.ae_title,
                    offender_id=calling,
                    offender_host=address,
                    description=description,
                    when=dt.datetime.now(dt.UTC),
                )
            )
        except Exception:  # noqa: BLE001 - the refusal stands even if the audit store is down
            log.exception("audit.write_failed", event="security-alert")


def certificate_mismatch(calling: str, expected: str, assoc: Any) -> str | None:
    """Why the association of *calling*, whose peer entry maps the client certificate *expected*
    (SHA-256, lower-case hex) to it, must be rejected; None when it came over TLS with exactly
    that certificate."""
    transport = getattr(assoc.dul, "socket", None)
    presented = presented_fingerprint(getattr(transport, "socket", None))
    if presented is None:
        return f"calling AE title {calling!r} requires TLS with its client certificate; none presented"
    if presented != expected:
        return f"calling AE title {calling!r} presented client certificate sha256 {presented[:16]}..., not its own"
    return None


def _send_reject(
    assoc: Any, diagnostic: int, wait_seconds: float = 2.0, *, result: int = _REJECT_PERMANENT,
    source: int = _SOURCE_SERVICE_USER,
) -> None:
    """Send A-ASSOCIATE-RJ and wait until the DUL has actually written it.

    pynetdicom closes the socket as soon as the EVT_REQUESTED handler returns; the reject is
    only queued for the DUL thread by then, so without this wait the peer often sees a bare
    connection close (A-P-ABORT) instead of the reason.
    """
    assoc.acse.send_reject(result, source, diagnostic)
    deadline = time.monotonic() + wait_seconds
    # Sta13: "awaiting transport close" — entered right after the RJ PDU was sent (PS3.8 9.2).
    while assoc.dul.state_machine.current_state not in ("Sta13", "Sta1") and time.monotonic() < deadline:
        time.sleep(0.001)


def _on_closed(event: Event) -> None:
    structlog.contextvars.clear_contextvars()
