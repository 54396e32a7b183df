"""The ``dicom`` channel of the outbox: our generated instances C-STOREd to a PACS.

Implements :class:`~storage.outbox.ChannelSender` over :func:`dicom_node.storage_scu.send_instance`,
reusing open associations for ``delivery.association_idle_seconds`` (:mod:`dicom_node.associations`).
Each attempt is audited as PS3.15 A.5.3.5 "DICOM Instances Transferred" with us as Source and
the PACS as Destination, Action R (an existing instance read and sent).

Destinations with ``tls = true`` are reached over TLS (PS3.15 B.9) with one client context built
at start from ``[dicom.tls]`` (:func:`dicom_node.tls.outgoing_context`): its CA verifies the PACS,
its certificate is ours. Without ``[dicom.tls]`` the system's trust store verifies the PACS and
no client certificate is presented.
"""

from __future__ import annotations

import datetime as dt
import socket

from sqlalchemy.orm import Session

from audit.builders import dicom_transfer
from audit.events import Action, AuditEvent, AuditSource, Outcome
from conf.errors import NotFoundError
from conf.settings import DicomDestination
from conf.tls import TlsSettings
from dicom_node.associations import AssociationPool
from dicom_node.storage_scu import DeliveryRejectedError, send_instance
from dicom_node.tls import outgoing_context
from storage.encryption import StoredFileIntegrityError
from storage.filestore import FileStore, FileStoreError
from storage.jobs import ClaimedJob
from storage.outbox import Channel, DeliveryItem, DeliveryReceipt
from storage.results import load_instance_context


class DicomChannel:
    """Sends stored instances to the configured ``dicom.destinations``."""

    channel: str = Channel.DICOM

    def __init__(
        self,
        store: FileStore,
        destinations: list[DicomDestination],
        *,
        calling_ae: str,
        timeout: float,
        audit_source: AuditSource,
        local_host: str | None = None,
        association_idle_seconds: float = 0.0,
        tls: TlsSettings | None = None,
    ) -> None:
        self._store = store
        needs_tls = any(d.tls for d in destinations)
        self._tls_context = outgoing_context(tls or TlsSettings()) if needs_tls else None
        self._destinations = {d.name: d for d in destinations}
        self._calling_ae = calling_ae
        self._timeout = timeout
        self._audit_source = audit_source
        self._host = local_host or socket.gethostname()
        self._associations = AssociationPool(association_idle_seconds)

    def close(self) -> None:
        """Release the associations kept open (A-RELEASE), on shutdown."""
        self._associations.close()

    def has_destination(self, name: str) -> bool:
        return name in self._destinations

    def load(self, session: Session, job: ClaimedJob, subject: str) -> DeliveryItem:
        context = load_instance_context(session, job.instance_pk) if job.instance_pk is not None else None
        if context is None:
            raise NotFoundError("the instance to deliver is no longer in the store index")
        meta = context.meta
        return DeliveryItem(
            subject=meta.sop_instance_uid,
            content=context.path,
            study_uid=meta.study_instance_uid,
            patient_id=meta.patient_id,
            patient_name=meta.patient_name,
            accession=meta.accession_number,
            sop_classes={meta.sop_class_uid: 1},
            instances=(meta.sop_instance_uid,),
        )

    def send(self, item: DeliveryItem, destination: str) -> DeliveryReceipt:
        target = self._destinations[destination]
        # The store authenticates and decrypts (storage.filestore.FileStore.open): a file that
        # fails is rejected for good (the same bytes fail again), never sent.
        try:
            source = self._store.open(str(item.content))
        except FileStoreError as exc:
            raise DeliveryRejectedError(f"stored file path is invalid: {exc.strerror}") from exc
        except OSError as exc:
            raise DeliveryRejectedError(f"stored file cannot be read: {exc.__class__.__name__}") from exc
        except StoredFileIntegrityError as exc:
            raise DeliveryRejectedError(str(exc)) from exc
        with source:
            result = send_instance(
                source, target, self._calling_ae, self._timeout, self._associations, tls_context=self._tls_context
            )
        note = None
        if result.warning:
            note = f"stored with warning status 0x{result.status:04X}"
            if result.error_comment:
                note += f": {result.error_comment}"
        return DeliveryReceipt(f"0x{result.status:04X}", note, {"transcoded": result.transcoded})

    def audit_event(
        self, item: DeliveryItem, destination: str, outcome: Outcome, when: dt.datetime, description: str | None
    ) -> AuditEvent:
        target = self._destinations.get(destination)
        receiver = (target.ae_title, target.host) if target is not None else (destination[:64] or "UNKNOWN", None)
        return dicom_transfer(
            self._audit_source,
            action=Action.READ,
            outcome=outcome,
            sender=(self._calling_ae, self._host),
            receiver=receiver,
            sender_is_requestor=True,
            study_uid=item.study_uid,
            sop_classes=dict(item.sop_classes),
            instances=item.instances,
            patient_id=item.patient_id,
            patient_name=item.patient_name,
            accession=item.accession,
            when=when,
            description=description,
        )
