"""The served resources: write a new version when content changed, read current and past versions.

A resource is stored as the exact JSON we serve (``meta.versionId`` and ``meta.lastUpdated``
included), so that a read is one indexed row and no serialisation. Each write replaces the
resource's search index rows (:func:`fhir_api.search_params.extract_index`) in the same
transaction, so search never sees a version its index does not describe.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, select
from sqlalchemy.orm import Session

from fhir_api.search_params import date_range, extract_index
from storage.index import insert_ignore
from storage.models import FhirResource, FhirResourceVersion, FhirSearchIndex


@dataclass(frozen=True)
class StoredResource:
    """One version of one resource, as served."""

    pk: int
    resource_type: str
    logical_id: str
    version_id: int
    last_updated: dt.datetime
    content: str  # JSON text

    @property
    def etag(self) -> str:
        """RFC 7232 weak ETag, as FHIR R4 "Managing Resource Contention" prescribes: ``W/"<versionId>"``."""
        return f'W/"{self.version_id}"'

    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.content)
        return loaded


def content_digest(body: Mapping[str, Any]) -> str:
    """The digest of a resource's content without ``meta``: the same content is the same version."""
    without_meta = {k: v for k, v in body.items() if k != "meta"}
    return hashlib.sha256(json.dumps(without_meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def instant(value: dt.datetime) -> str:
    """A FHIR ``instant`` in UTC with milliseconds (``2026-11-30T06:18:07.123Z``)."""
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _served(body: Mapping[str, Any], version_id: int, last_updated: dt.datetime) -> str:
    meta = {**dict(body.get("meta") or {}), "versionId": str(version_id), "lastUpdated": instant(last_updated)}
    ordered: dict[str, Any] = {"resourceType": body["resourceType"], "id": body["id"], "meta": meta}
    ordered.update((k, v) for k, v in body.items() if k not in ordered)
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)


def _stored(row: FhirResource) -> StoredResource:
    return StoredResource(row.id, row.resource_type, row.logical_id, row.version_id, row.last_updated, row.content)


def put(
    session: Session, body: Mapping[str, Any], *, study_uid: str | None, now: dt.datetime, digest: str | None = None
) -> StoredResource | None:
    """Store *body* (a resource with ``resourceType`` and ``id``) as its next version.

    Returns the new version, or None when the content is what the current version already says
    (no new version, no notification). Concurrent writers of the same resource (two studies of
    one patient) serialise on the row lock. *digest* is :func:`content_digest` of *body* when the
    caller already computed it.
    """
    resource_type = str(body["resourceType"])
    logical_id = str(body["id"])
    digest = digest or content_digest(body)
    insert_ignore(
        session,
        FhirResource,
        {
            "resource_type": resource_type, "logical_id": logical_id, "version_id": 0, "last_updated": now,
            "sort_date": None, "sort_date_high": None, "study_uid": study_uid, "digest": "", "content": "",
        },
        ["resource_type", "logical_id"],
    )
    row = session.execute(
        select(FhirResource)
        .where(FhirResource.resource_type == resource_type, FhirResource.logical_id == logical_id)
        .with_for_update()
    ).scalar_one()
    if row.version_id > 0 and row.digest == digest:
        return None
    row.version_id += 1
    row.last_updated = now
    own_date = date_range(resource_type, body)
    row.sort_date, row.sort_date_high = own_date if own_date is not None else (None, None)
    row.study_uid = study_uid if study_uid is not None else row.study_uid
    row.digest = digest
    row.content = _served(body, row.version_id, now)
    session.add(FhirResourceVersion(resource_pk=row.id, version_id=row.version_id, last_updated=now, content=row.content))
    _reindex(session, row, body)
    session.flush()
    return _stored(row)


def current_digests(session: Session, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The content digest of the current version of each (resource type, id) in *keys* that exists.

    One query for a whole study's resources, so that the unchanged ones (on a study's second
    publication: the Patient, the Device, the orders) cost no write statements at all."""
    if not keys:
        return {}
    wanted = set(keys)
    rows = session.execute(
        select(FhirResource.resource_type, FhirResource.logical_id, FhirResource.digest).where(
            FhirResource.logical_id.in_({logical_id for _, logical_id in keys}), FhirResource.version_id > 0
        )
    )
    return {(t, i): d for t, i, d in rows if (t, i) in wanted}


def _reindex(session: Session, row: FhirResource, body: Mapping[str, Any]) -> None:
    session.execute(_DELETE_INDEX, {"resource_pk": row.id})
    entries = extract_index(row.resource_type, body)
    if entries:
        session.execute(
            _INSERT_INDEX,
            [
                {
                    "resource_pk": row.id, "resource_type": row.resource_type, "param": e.param, "system": e.system,
                    "value": e.value, "low": e.low, "high": e.high,
                }
                for e in entries
            ],
        )


# Core statements on the index table, built once: the ORM's bulk path and building the statements
# per call cost more than running them (every changed resource version is re-indexed).
_INDEX_TABLE = cast(Table, FhirSearchIndex.__table__)
_DELETE_INDEX = _INDEX_TABLE.delete().where(_INDEX_TABLE.c.resource_pk == bindparam("resource_pk"))
_INSERT_INDEX = _INDEX_TABLE.insert()


def remove(session: Session, resource_type: str, logical_id: str) -> bool:
    """Delete a resource with its versions and index rows (only Subscriptions are ever deleted)."""
    row = session.execute(
        select(FhirResource).where(FhirResource.resource_type == resource_type, FhirResource.logical_id == logical_id)
    ).scalar_one_or_none()
    if row is None:
        return False
    session.execute(delete(FhirSearchIndex).where(FhirSearchIndex.resource_pk == row.id))
    session.execute(delete(FhirResourceVersion).where(FhirResourceVersion.resource_pk == row.id))
    session.delete(row)
    return True


def get(session: Session, resource_type: str, logical_id: str) -> StoredResource | None:
    row = session.execute(
        select(FhirResource).where(
            FhirResource.resource_type == resource_type, FhirResource.logical_id == logical_id,
            FhirResource.version_id > 0,
        )
    ).scalar_one_or_none()
    return None if row is None else _stored(row)


def get_version(session: Session, resource_type: str, logical_id: str, version_id: int) -> StoredResource | None:
    found = session.execute(
        select(FhirResource.id, FhirResourceVersion.last_updated, FhirResourceVersion.content)
        .join(FhirResourceVersion, FhirResourceVersion.resource_pk == FhirResource.id)
        .where(
            FhirResource.resource_type == resource_type, FhirResource.logical_id == logical_id,
            FhirResourceVersion.version_id == version_id,
        )
    ).one_or_none()
    if found is None:
        return None
    return StoredResource(found[0], resource_type, logical_id, version_id, found[1], found[2])


def history(session: Session, resource_type: str, logical_id: str) -> list[StoredResource]:
    """Every version of one resource, newest first (FHIR R4 ``history`` order)."""
    rows = session.execute(
        select(FhirResource.id, FhirResourceVersion.version_id, FhirResourceVersion.last_updated, FhirResourceVersion.content)
        .join(FhirResourceVersion, FhirResourceVersion.resource_pk == FhirResource.id)
        .where(FhirResource.resource_type == resource_type, FhirResource.logical_id == logical_id)
        .order_by(FhirResourceVersion.version_id.desc())
    ).all()
    return [StoredResource(pk, resource_type, logical_id, version, updated, content) for pk, version, updated, content in rows]
