"""The outbox's ``fhir-subscription`` channel: send one notification to a rest-hook endpoint.

Destinations are Subscription ids; subjects are resource versions (``DiagnosticReport/<id>/
_history/<n>``, see :mod:`fhir_api.subscriptions`). R4 Subscription §2.46.7.1 (rest-hook): with
no ``payload`` the endpoint gets an empty POST; with a payload the resource version is PUT to
``[endpoint]/[type]/[id]``. The channel's ``header`` values are sent with each request (that is
how an EHR gives us its own bearer token).

Retries: connection errors, timeouts, 408, 429 and 5xx are retryable; any other non-2xx answer
means the endpoint refused this notification (dead-lettered at once, visible in ``pneumo
deliveries``). The same version is always sent with the same ``ETag``/``meta.versionId``, so a
re-send after a crash is recognisable as the same notification.

TLS (:func:`rest_hook_verify`): an ``https`` endpoint's certificate is always verified (httpx
``verify``, never off) and its host name checked. Without ``[fhir.tls] ca_file`` against httpx's
bundled Mozilla roots (certifi); with it, against that CA only (the hospital's CA, which signs
the EHR's endpoints as it signs our API clients), presenting our ``[fhir.tls]`` certificate as
client certificate when one is configured (an endpoint that requires mutual TLS).
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.builders import patient_object, study_object
from audit.events import (
    Action,
    ActiveParticipant,
    AuditEvent,
    AuditSource,
    EventId,
    Outcome,
    RoleId,
)
from conf.errors import NotFoundError
from conf.tls import TlsSettings, client_context
from fhir_api import store
from fhir_api.subscriptions import SubscriptionSpec, spec_of
from storage.db import Database
from storage.jobs import ClaimedJob
from storage.models import FhirResource, Patient, Study
from storage.outbox import Channel, DeliveryFailedError, DeliveryItem, DeliveryReceipt

_RETRYABLE_STATUS = {408, 425, 429}


@dataclass(frozen=True)
class Notification:
    """What one delivery sends: the subscription and the resource version."""

    subscription: SubscriptionSpec
    resource_type: str
    logical_id: str
    version_id: int
    content: str


def rest_hook_verify(tls: TlsSettings) -> ssl.SSLContext | bool:
    """How rest-hook endpoints' certificates are verified (module docstring): True (httpx's
    default trust store) unless ``[fhir.tls] ca_file`` is set; then :func:`conf.tls.client_context`
    (BCP 195, that CA, host name checked, our certificate as client certificate)."""
    return client_context(tls, check_hostname=True) if tls.ca_file is not None else True


class SubscriptionChannel:
    """:class:`~storage.outbox.ChannelSender` for FHIR rest-hook notifications."""

    channel = Channel.FHIR_SUBSCRIPTION.value

    def __init__(
        self, database: Database, audit_source: AuditSource, *, timeout: float, client: httpx.Client | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if verify is False:
            raise ValueError("rest-hook endpoints' certificates are always verified")
        self._db = database
        self._audit_source = audit_source
        self._client = client or httpx.Client(timeout=timeout, follow_redirects=False, verify=verify)

    def has_destination(self, name: str) -> bool:
        with self._db.read_session() as session:
            return store.get(session, "Subscription", name) is not None

    def load(self, session: Session, job: ClaimedJob, subject: str) -> DeliveryItem:
        destination = str(job.payload.get("destination", ""))
        subscription = store.get(session, "Subscription", destination)
        if subscription is None:
            raise NotFoundError(f"Subscription/{destination} no longer exists")
        path, _, version = subject.partition("/_history/")
        resource_type, _, logical_id = path.partition("/")
        resource = store.get_version(session, resource_type, logical_id, int(version or 0))
        if resource is None:
            raise NotFoundError(f"{subject} is not stored")
        study_uid, patient_id, patient_name, accession = _study_of(session, resource)
        return DeliveryItem(
            subject=subject,
            content=Notification(spec_of(subscription.json()), resource_type, logical_id, resource.version_id,
                                 resource.content),
            study_uid=study_uid,
            patient_id=patient_id,
            patient_name=patient_name,
            accession=accession,
        )

    def send(self, item: DeliveryItem, destination: str) -> DeliveryReceipt:
        notification: Notification = item.content
        spec = notification.subscription
        headers = {"User-Agent": "pneumo-gateway"}
        for header in spec.headers:
            name, _, value = header.partition(":")
            headers[name.strip()] = value.strip()
        try:
            if spec.payload is None:
                response = self._client.post(spec.endpoint, headers=headers)
            else:
                headers["Content-Type"] = f"{spec.payload}; charset=utf-8" if spec.payload.endswith("json") else spec.payload
                headers["ETag"] = f'W/"{notification.version_id}"'
                url = f"{spec.endpoint.rstrip('/')}/{notification.resource_type}/{notification.logical_id}"
                response = self._client.put(url, content=notification.content.encode("utf-8"), headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryFailedError(f"rest-hook endpoint unreachable: {exc.__class__.__name__}", retryable=True) from exc
        status = response.status_code
        if 200 <= status < 300:
            return DeliveryReceipt(peer_status=str(status), details={"subscription": spec.logical_id})
        retryable = status >= 500 or status in _RETRYABLE_STATUS
        raise DeliveryFailedError(f"rest-hook endpoint answered HTTP {status}", retryable=retryable, peer_status=str(status))

    def audit_event(
        self, item: DeliveryItem, destination: str, outcome: Outcome, when: dt.datetime, description: str | None
    ) -> AuditEvent:
        """PS3.15 A.5.3.6 Export (IHE BALP "Export"): PHI left us for the subscriber's endpoint."""
        notification: Notification = item.content
        objects = [patient_object(item.patient_id, item.patient_name)]
        if item.study_uid:
            objects.append(study_object(item.study_uid, {}, (), item.accession))
        return AuditEvent(
            event_id=EventId.EXPORT,
            action=Action.READ,
            outcome=outcome,
            outcome_description=(description or f"FHIR notification {item.subject}")[:1000],
            occurred_at=when,
            source=self._audit_source,
            participants=(
                ActiveParticipant(user_id=self._audit_source.source_id, user_is_requestor=True, role_id=RoleId.SOURCE),
                ActiveParticipant(user_id=f"Subscription/{destination}", alternative_user_id=notification.subscription.endpoint,
                                  user_is_requestor=False, role_id=RoleId.DESTINATION),
            ),
            objects=tuple(objects),
        )

    def close(self) -> None:
        self._client.close()


def _study_of(session: Session, resource: store.StoredResource) -> tuple[str, str, str | None, str | None]:
    """The study, patient and accession a resource is about (for the audit record), from the index.

    Resources of one study carry its UID (``fhir_resource.study_uid``); a Patient or Device
    notification names no study, and the audit names the FHIR Patient id then."""
    study_uid = session.execute(select(FhirResource.study_uid).where(FhirResource.id == resource.pk)).scalar_one_or_none()
    if not study_uid:
        return "", f"{resource.resource_type}/{resource.logical_id}", None, None
    found = session.execute(
        select(Study.accession_number, Patient.patient_id, Patient.name)
        .join(Patient, Study.patient_pk == Patient.id)
        .where(Study.study_instance_uid == study_uid)
    ).one_or_none()
    if found is None:
        return study_uid, "", None, None
    return study_uid, found[1], found[2], found[0]
