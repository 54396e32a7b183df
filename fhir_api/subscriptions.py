"""FHIR R4 Subscriptions (``rest-hook``): which new resource versions to notify, and to whom.

An EHR registers ``Subscription`` with ``criteria`` such as ``DiagnosticReport?status=final``
and a ``rest-hook`` channel. Whenever the projection stores a new version of a resource
(:mod:`fhir_api.projection`), :func:`queue_notifications` evaluates every active subscription's
criteria against that version — with the same search code as ``GET [type]?[criteria]``, limited
to the one resource — and queues a delivery on the outbox's ``fhir-subscription`` channel
(destination: the subscription's id; subject: the resource version). The outbox retries it with
backoff, dead-letters it visibly and lists it in ``pneumo deliveries``; one delivery per
subscription and resource version, so an EHR that was down gets every notification once.
Sending is :mod:`fhir_api.notifications`.

R4 Subscription §2.46.8: the server sets ``status`` (``requested`` → ``active``); ``end`` turns a
subscription off; we support ``channel.type`` ``rest-hook`` only, with ``payload`` empty (a bare
POST to the endpoint) or ``application/fhir+json`` (the resource PUT to ``[endpoint]/[type]/[id]``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from conf.errors import InvalidInputError
from fhir_api.search_params import SEARCH_PARAMS, filter_clause, parse_search
from fhir_api.store import StoredResource
from storage.models import FhirResource, FhirSearchIndex, utcnow
from storage.outbox import Channel, DeliveryPriority, Route, enqueue_delivery

#: What a notification's payload may be (R4 Subscription.channel.payload).
PAYLOAD_TYPES = ("application/fhir+json", "application/json")


@dataclass(frozen=True)
class SubscriptionSpec:
    """An active subscription, as the notifier needs it."""

    logical_id: str
    resource_type: str
    params: tuple[tuple[str, str], ...]
    endpoint: str
    payload: str | None
    headers: tuple[str, ...]
    end: dt.datetime | None


def parse_criteria(criteria: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``DiagnosticReport?status=final`` -> (``DiagnosticReport``, ((``status``, ``final``),))."""
    resource_type, _, query = criteria.strip().partition("?")
    if resource_type not in SEARCH_PARAMS or resource_type == "Subscription":
        raise InvalidInputError(f"Subscription.criteria: resource type {resource_type!r} cannot be subscribed to")
    params = tuple(parse_qsl(query, keep_blank_values=True))
    # Strict: a typo in a criteria must not silently subscribe to everything.
    parse_search(resource_type, params, strict=True, default_count=1, max_count=1)
    return resource_type, params


#: R4 datatypes, instant (seconds and a zone required).
_INSTANT = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)


def _parse_instant(value: Any, where: str) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _INSTANT.fullmatch(value):
        raise InvalidInputError(f"{where}: not a FHIR instant: {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInputError(f"{where}: not a FHIR instant: {value!r}") from exc
    if parsed.tzinfo is None:
        raise InvalidInputError(f"{where}: an instant needs a time zone")
    return parsed


def validate(body: Mapping[str, Any], *, logical_id: str | None, allowed_endpoints: Sequence[str]) -> dict[str, Any]:
    """The Subscription we store for a create/update request *body* (or :class:`InvalidInputError`).

    The server owns ``id`` (create), ``meta`` and ``status``: a requested or active subscription
    becomes ``active``; ``off`` stays off; ``error`` is ours to set.
    """
    if body.get("resourceType") != "Subscription":
        raise InvalidInputError("the body is not a Subscription resource")
    if logical_id is not None and body.get("id") not in (None, logical_id):
        raise InvalidInputError("Subscription.id does not match the id in the URL")
    if not isinstance(body.get("reason"), str) or not body["reason"].strip():
        raise InvalidInputError("Subscription.reason is required")
    criteria = body.get("criteria")
    if not isinstance(criteria, str):
        raise InvalidInputError("Subscription.criteria is required")
    parse_criteria(criteria)
    channel = body.get("channel")
    if not isinstance(channel, Mapping) or channel.get("type") != "rest-hook":
        raise InvalidInputError("Subscription.channel.type: only rest-hook is supported")
    endpoint = channel.get("endpoint")
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc \
            or not str(endpoint).isprintable() or " " in str(endpoint):
        raise InvalidInputError("Subscription.channel.endpoint must be an http(s) URL")
    if allowed_endpoints and not any(str(endpoint).startswith(prefix) for prefix in allowed_endpoints):
        raise InvalidInputError("Subscription.channel.endpoint is not in the endpoints this gateway may call")
    payload = channel.get("payload")
    if payload is not None and payload not in PAYLOAD_TYPES:
        raise InvalidInputError(f"Subscription.channel.payload: one of {', '.join(PAYLOAD_TYPES)} or absent")
    headers = channel.get("header", [])
    if not isinstance(headers, list) or not all(isinstance(h, str) and ":" in h for h in headers):
        raise InvalidInputError("Subscription.channel.header: a list of 'Name: value' strings")
    _parse_instant(body.get("end"), "Subscription.end")
    status = "off" if body.get("status") == "off" else "active"
    stored = {k: v for k, v in body.items() if k not in ("meta", "text", "error")}
    stored["id"] = logical_id or uuid.uuid4().hex
    stored["status"] = status
    return stored


def spec_of(content: Mapping[str, Any]) -> SubscriptionSpec:
    resource_type, params = parse_criteria(str(content["criteria"]))
    channel = content["channel"]
    return SubscriptionSpec(
        logical_id=str(content["id"]), resource_type=resource_type, params=params, endpoint=str(channel["endpoint"]),
        payload=channel.get("payload"), headers=tuple(channel.get("header", ())),
        end=_parse_instant(content.get("end"), "Subscription.end"),
    )


def active_subscriptions(session: Session) -> list[SubscriptionSpec]:
    """Every Subscription whose status is ``active`` and whose ``end`` has not passed."""
    status = FhirSearchIndex.__table__.alias("status")
    rows = session.execute(
        select(FhirResource.content)
        .join(status, and_(status.c.resource_pk == FhirResource.id, status.c.param == "status"))
        .where(FhirResource.resource_type == "Subscription", status.c.value == "active")
    ).scalars()
    now = utcnow()
    specs = []
    for content in rows:
        try:
            spec = spec_of(json.loads(content))
        except (InvalidInputError, KeyError, ValueError):
            continue  # stored before a rule tightened: it notifies nothing rather than failing the projection
        if spec.end is None or spec.end > now:
            specs.append(spec)
    return specs


def matches(session: Session, spec: SubscriptionSpec, resource: StoredResource) -> bool:
    """Whether *resource* (its current version) is in the result of the subscription's search."""
    if spec.resource_type != resource.resource_type:
        return False
    request = parse_search(spec.resource_type, spec.params, strict=True, default_count=1, max_count=1)
    clauses = [filter_clause(spec.resource_type, f) for f in request.filters]
    found = session.execute(
        select(FhirResource.id).where(FhirResource.id == resource.pk, *clauses)
    ).scalar_one_or_none()
    return found is not None


def notification_subject(resource: StoredResource) -> str:
    return f"{resource.resource_type}/{resource.logical_id}/_history/{resource.version_id}"


def queue_notifications(session: Session, changed: Sequence[StoredResource]) -> int:
    """Queue one notification per (matching active subscription, new resource version)."""
    if not changed:
        return 0
    subscriptions = active_subscriptions(session)
    queued = 0
    for resource in changed:
        for spec in subscriptions:
            if matches(session, spec, resource):
                enqueue_delivery(
                    session, Route(Channel.FHIR_SUBSCRIPTION, spec.logical_id), notification_subject(resource),
                    priority=DeliveryPriority.REPORT,
                )
                queued += 1
    return queued
