"""``pneumo audit export``: the audit log, or a time slice of it, for an auditor or an archive.

Three formats, each a stream (the log may be large; nothing is held in memory but one batch):

``dicom``
    DICOM PS3.15 A.5.1 audit messages, one ``<AuditMessage>`` per record (:mod:`audit.dicom_xml`),
    inside one ``<AuditMessages>`` root element so the file is one well-formed XML document.
    The wrapper is ours (PS3.15 defines single messages, sent one per syslog message); each child
    validates against the A.5.1.1 schema as it is. The wrapper carries ``since``/``until`` and
    each message is preceded by a comment naming its sequence number.
``fhir``
    FHIR R4 AuditEvent resources (:mod:`audit.fhir_audit_event`) as NDJSON, one resource per line:
    the FHIR Bulk Data export format (``application/fhir+ndjson``), which a FHIR server imports
    and which needs no Bundle of unbounded size.
``jsonl``
    The stored records, one JSON object per line: ``seq``, ``recorded_at`` (exactly the text that
    was hashed), ``event_id``, ``outcome``, ``event``, ``prev_hash``, ``hash``, ``hash_version``.
    An auditor re-verifies the chain offline from it (``audit.store.record_payload``; the HMAC key
    for version 3 records), without access to the database.

Reading the log is itself audited (PS3.15 A.5.3.3 "Audit Log Used", :func:`audit_log_used`):
the caller appends that record, in its own transaction, after the export.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
from collections.abc import Iterable
from typing import IO, Final, Literal, get_args

from lxml import etree
from sqlalchemy.orm import Session

from audit.dicom_xml import audit_message_element
from audit.events import (
    Action,
    ActiveParticipant,
    AuditEvent,
    AuditSource,
    Code,
    EventId,
    NetworkAccessPointType,
    Outcome,
    ParticipantObject,
    RoleId,
)
from audit.fhir_audit_event import PatientReference, to_fhir
from audit.models import AuditRecord
from audit.search_index import records_between

ExportFormat = Literal["dicom", "fhir", "jsonl"]
FORMATS: Final[tuple[str, ...]] = get_args(ExportFormat)

#: PS3.15 A.5.3.3: the audit log is a participant object of ID type URI (RFC 3881 "12").
URI_ID_TYPE = Code("12", "RFC-3881", "URI")
#: The audit log's URI in the records (a name, not a locator).
AUDIT_LOG_URI = "urn:pneumo-gateway:audit-log"


def _address_type(host: str | None) -> NetworkAccessPointType | None:
    if not host:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return NetworkAccessPointType.MACHINE_NAME
    return NetworkAccessPointType.IP_ADDRESS


def audit_log_used(
    source: AuditSource,
    *,
    user: str,
    host: str | None,
    when: dt.datetime,
    description: str,
    query: str | None = None,
    outcome: Outcome = Outcome.SUCCESS,
) -> AuditEvent:
    """PS3.15 A.5.3.3 Audit Log Used: *user* (from *host*) read the audit log.

    The log is the participant object (type 2 system object, role 13 "Security Resource", ID type
    URI, name "Security Audit Log"). *query* (the search or the export's range, as text) is kept
    base64-encoded in a second object of role 24 "Query", as IHE BALP records a search.
    """
    objects = [ParticipantObject(object_id=AUDIT_LOG_URI, id_type=URI_ID_TYPE, type_code=2, role=13,
                                 name="Security Audit Log", details={"Description": description[:500]})]
    if query is not None:
        objects.append(ParticipantObject(object_id="AuditEvent", id_type=URI_ID_TYPE, type_code=2, role=24,
                                         query=base64.b64encode(query.encode("utf-8")).decode("ascii")))
    return AuditEvent(
        event_id=EventId.AUDIT_LOG_USED,
        action=Action.READ,
        outcome=outcome,
        outcome_description=description[:1000],
        occurred_at=when,
        source=source,
        participants=(
            ActiveParticipant(user_id=user, user_is_requestor=True, network_access_point_id=host,
                              network_access_point_type=_address_type(host)),
            ActiveParticipant(user_id=source.source_id, user_is_requestor=False, role_id=RoleId.APPLICATION),
        ),
        objects=tuple(objects),
    )


def stored_record(record: AuditRecord) -> dict[str, object]:
    """The jsonl form of one record: every column, ``recorded_at`` as hashed (UTC ISO 8601)."""
    return {
        "seq": record.seq,
        "recorded_at": record.recorded_at.astimezone(dt.UTC).isoformat(),
        "event_id": record.event_id,
        "outcome": record.outcome,
        "event": record.event,
        "prev_hash": record.prev_hash,
        "hash": record.hash,
        "hash_version": record.hash_version,
    }


def _dicom(records: Iterable[AuditRecord], out: IO[bytes], since: dt.datetime, until: dt.datetime | None) -> int:
    count = 0
    attributes = f' since="{since.astimezone(dt.UTC).isoformat()}"'
    if until is not None:
        attributes += f' until="{until.astimezone(dt.UTC).isoformat()}"'
    out.write(f'<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages{attributes}>\n'.encode())
    for record in records:
        out.write(f"<!-- seq {record.seq} -->\n".encode())
        out.write(etree.tostring(audit_message_element(record.event, record.recorded_at), encoding="UTF-8"))
        out.write(b"\n")
        count += 1
    out.write(b"</AuditMessages>\n")
    return count


def export(
    session: Session,
    out: IO[bytes],
    *,
    since: dt.datetime,
    until: dt.datetime | None = None,
    fmt: ExportFormat,
    patient_reference: PatientReference | None = None,
) -> int:
    """Write the records sealed in ``[since, until)`` to *out* in *fmt*; the number written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if since.tzinfo is None or (until is not None and until.tzinfo is None):
        raise ValueError("since and until must be timezone-aware")
    records = records_between(session, since, until)
    if fmt == "dicom":
        return _dicom(records, out, since, until)
    count = 0
    for record in records:
        if fmt == "fhir":
            line = to_fhir(record.seq, record.recorded_at, record.event, patient_reference=patient_reference)
        else:
            line = stored_record(record)
        out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
        count += 1
    return count
