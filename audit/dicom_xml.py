"""Stored audit events as DICOM PS3.15 A.5 audit messages (XML).

:func:`audit_message` is a pure function from the stored form of an event (the dict of
:meth:`audit.events.AuditEvent.to_dict`, as kept in ``audit_record.event``) to one
``<AuditMessage>`` document that validates against the schema of PS3.15 A.5.1.1 (the RELAX NG
schema the tests validate against is in ``tests/audit/schema``). The syslog forwarder (RFC 5424 /
RFC 5425, IHE ATNA) and ``pneumo audit export --format dicom`` both use it.

Choices the schema leaves open, or forces:

* Elements in the schema's order: EventIdentification (EventID, EventTypeCode*,
  EventOutcomeDescription?), ActiveParticipant+ (RoleIDCode*), AuditSourceIdentification
  (AuditSourceTypeCode), ParticipantObjectIdentification* (ParticipantObjectIDTypeCode,
  ParticipantObjectName | ParticipantObjectQuery, ParticipantObjectDetail*,
  ParticipantObjectDescription*). Coded values carry ``csd-code``, ``codeSystemName`` and
  ``originalText`` (the DICOM Code Meaning), all three required by A.5.1.1.
* EventDateTime is when the event happened (``occurred_at``); *recorded_at* (when the record
  was sealed) is used only when a stored event lacks it.
* A.5.1.1 requires either a ParticipantObjectName or a ParticipantObjectQuery. Objects recorded
  with neither (a study, a node) get the object ID as their name.
* ParticipantObjectDetail values are base64 (``xsd:base64Binary``, A.5.1.1: "to preserve details
  of encoding and to protect against text contents that contain XML fragments").
* Study objects (A.5.3.5 and following) carry a ParticipantObjectDescription with the Accession
  Number (recorded as the "Accession Number" detail) and one SOPClass per SOP Class UID with its
  NumberOfInstances. Instance UIDs are nested under their SOP class when the event names one class;
  when it names several, the record does not say which instance is of which class, so they are
  listed under a SOPClass without a UID (the schema makes that attribute optional).
* Characters XML 1.0 cannot carry (C0 controls other than tab, CR, LF; lone surrogates) become
  U+FFFD: outcome descriptions may quote what a remote peer sent.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from lxml import etree

#: The stored detail that becomes the study's ParticipantObjectDescription/Accession (A.5.3.5).
ACCESSION_DETAIL = "Accession Number"

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _text(value: object) -> str:
    return _XML_INVALID.sub("\ufffd", str(value))


def _set(element: etree._Element, name: str, value: object) -> None:
    """Set attribute *name* unless *value* is None (optional attributes are left out, not empty)."""
    if value is not None:
        element.set(name, _text(value))


def _coded(parent: etree._Element, tag: str, code: Mapping[str, Any]) -> etree._Element:
    """A CodedValueType element (A.5.1.1): csd-code, codeSystemName, originalText."""
    element = etree.SubElement(parent, tag)
    element.set("csd-code", _text(code.get("code", "")))
    element.set("codeSystemName", _text(code.get("system", "")))
    element.set("originalText", _text(code.get("display") or code.get("code", "")))
    return element


def _event_time(event: Mapping[str, Any], recorded_at: dt.datetime) -> str:
    occurred = event.get("occurred_at")
    if isinstance(occurred, str):
        try:
            parsed = dt.datetime.fromisoformat(occurred)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.astimezone(dt.UTC).isoformat()
    when = recorded_at if recorded_at.tzinfo is not None else recorded_at.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat()


def _event_identification(root: etree._Element, event: Mapping[str, Any], recorded_at: dt.datetime) -> None:
    ident = etree.SubElement(root, "EventIdentification")
    _set(ident, "EventActionCode", event.get("action"))
    ident.set("EventDateTime", _event_time(event, recorded_at))
    ident.set("EventOutcomeIndicator", str(int(event.get("outcome", 0))))
    _coded(ident, "EventID", event["event_id"])
    for code in event.get("event_types") or ():
        _coded(ident, "EventTypeCode", code)
    description = event.get("outcome_description")
    if description:
        etree.SubElement(ident, "EventOutcomeDescription").text = _text(description)


def _active_participant(root: etree._Element, participant: Mapping[str, Any]) -> None:
    element = etree.SubElement(root, "ActiveParticipant")
    element.set("UserID", _text(participant.get("user_id", "")))
    _set(element, "AlternativeUserID", participant.get("alternative_user_id"))
    _set(element, "UserName", participant.get("user_name"))
    element.set("UserIsRequestor", "true" if participant.get("user_is_requestor") else "false")
    nap = participant.get("network_access_point_id")
    if nap:
        element.set("NetworkAccessPointID", _text(nap))
        _set(element, "NetworkAccessPointTypeCode", participant.get("network_access_point_type"))
    role = participant.get("role_id")
    if role:
        _coded(element, "RoleIDCode", role)


def _audit_source(root: etree._Element, source: Mapping[str, Any]) -> None:
    element = etree.SubElement(root, "AuditSourceIdentification")
    _set(element, "AuditEnterpriseSiteID", source.get("enterprise_site_id") or None)
    element.set("AuditSourceID", _text(source.get("source_id", "")))
    type_code = source.get("type_code")
    if type_code is not None:
        etree.SubElement(element, "AuditSourceTypeCode").set("csd-code", str(type_code))


def _description(element: etree._Element, item: Mapping[str, Any], accession: str | None) -> None:
    sop_classes: Mapping[str, int] = item.get("sop_classes") or {}
    instances: list[str] = list(item.get("instances") or ())
    if accession is None and not sop_classes and not instances:
        return
    description = etree.SubElement(element, "ParticipantObjectDescription")
    if accession is not None:
        etree.SubElement(description, "Accession").set("Number", _text(accession))
    nest = len(sop_classes) == 1
    for uid, count in sorted(sop_classes.items()):
        sop_class = etree.SubElement(description, "SOPClass")
        if nest:
            for instance in instances:
                etree.SubElement(sop_class, "Instance").set("UID", _text(instance))
        sop_class.set("UID", _text(uid))
        sop_class.set("NumberOfInstances", str(int(count)))
    if instances and not nest:
        sop_class = etree.SubElement(description, "SOPClass")
        for instance in instances:
            etree.SubElement(sop_class, "Instance").set("UID", _text(instance))
        sop_class.set("NumberOfInstances", str(len(instances)))


def _participant_object(root: etree._Element, item: Mapping[str, Any]) -> None:
    element = etree.SubElement(root, "ParticipantObjectIdentification")
    element.set("ParticipantObjectID", _text(item.get("object_id", "")))
    _set(element, "ParticipantObjectTypeCode", item.get("type_code"))
    _set(element, "ParticipantObjectTypeCodeRole", item.get("role"))
    _coded(element, "ParticipantObjectIDTypeCode", item["id_type"])
    query, name = item.get("query"), item.get("name")
    if query is not None:
        etree.SubElement(element, "ParticipantObjectQuery").text = _text(query)
    else:
        etree.SubElement(element, "ParticipantObjectName").text = _text(name or item.get("object_id", ""))
    details: Mapping[str, Any] = item.get("details") or {}
    accession = details.get(ACCESSION_DETAIL)
    for key, value in details.items():
        if key == ACCESSION_DETAIL:
            continue
        detail = etree.SubElement(element, "ParticipantObjectDetail")
        detail.set("type", _text(key))
        detail.set("value", base64.b64encode(str(value).encode("utf-8")).decode("ascii"))
    _description(element, item, None if accession is None else str(accession))


def audit_message_element(event: Mapping[str, Any], recorded_at: dt.datetime) -> etree._Element:
    """The ``<AuditMessage>`` element of *event* (for callers that wrap several in one document)."""
    root = etree.Element("AuditMessage")
    _event_identification(root, event, recorded_at)
    for participant in event.get("participants") or ():
        _active_participant(root, participant)
    _audit_source(root, event.get("source") or {})
    for item in event.get("objects") or ():
        _participant_object(root, item)
    return root


def audit_message(event: Mapping[str, Any], recorded_at: dt.datetime) -> bytes:
    """One PS3.15 A.5.1 ``AuditMessage`` XML document (UTF-8, with declaration) for a stored event."""
    return bytes(etree.tostring(audit_message_element(event, recorded_at), xml_declaration=True, encoding="UTF-8"))
