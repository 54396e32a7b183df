"""audit.dicom_xml: every event kind the gateway emits is a valid PS3.15 A.5.1 AuditMessage.

Validated with lxml's RELAX NG validator against the schema of PS3.15 A.5.1.1 (tests/audit/schema),
and read back field by field; invalid documents are shown to be rejected, so the validation can fail.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from audit.dicom_xml import audit_message
from tests.audit.event_corpus import WHEN, all_events

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parent / "schema" / "dicom-audit-message.rng")))
RECORDED = dt.datetime(2026, 11, 30, 10, 15, 31, tzinfo=dt.UTC)
EVENTS = all_events()


def _validate(document: bytes) -> etree._Element:
    root = etree.fromstring(document)
    assert SCHEMA.validate(root), SCHEMA.error_log.last_error
    return root


@pytest.mark.parametrize(("name", "event"), EVENTS, ids=[name for name, _ in EVENTS])
def test_every_event_kind_validates_against_the_ps3_15_schema(name: str, event: Any) -> None:
    stored = event.to_dict()
    document = audit_message(stored, RECORDED)
    assert document.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = _validate(document)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.find("EventID").get("csd-code") == stored["event_id"]["code"]  # type: ignore[union-attr]
    assert ident.get("EventActionCode") == stored["action"]
    assert ident.get("EventOutcomeIndicator") == str(stored["outcome"])
    assert dt.datetime.fromisoformat(ident.get("EventDateTime", "")) == WHEN
    assert [c.get("csd-code") for c in ident.findall("EventTypeCode")] == [c["code"] for c in stored["event_types"]]
    participants = root.findall("ActiveParticipant")
    assert [p.get("UserID") for p in participants] == [p["user_id"] for p in stored["participants"]]
    assert [p.get("UserIsRequestor") for p in participants] == [
        "true" if p["user_is_requestor"] else "false" for p in stored["participants"]]
    objects = root.findall("ParticipantObjectIdentification")
    assert [o.get("ParticipantObjectID") for o in objects] == [o["object_id"] for o in stored["objects"]]
    for element, item in zip(objects, stored["objects"], strict=True):
        assert element.find("ParticipantObjectIDTypeCode").get("csd-code") == item["id_type"]["code"]  # type: ignore[union-attr]
        if item["query"] is not None:
            assert element.findtext("ParticipantObjectQuery") == item["query"]
        details = {d.get("type"): base64.b64decode(d.get("value", "")).decode()
                   for d in element.findall("ParticipantObjectDetail")}
        assert details == {k: v for k, v in item["details"].items() if k != "Accession Number"}
        instances = [i.get("UID") for i in element.iter("Instance")]
        assert sorted(instances) == sorted(item["instances"])
        if "Accession Number" in item["details"]:
            assert element.find("ParticipantObjectDescription/Accession").get("Number") == item["details"]["Accession Number"]  # type: ignore[union-attr]


def test_element_order_follows_the_schema() -> None:
    _, event = next(e for e in EVENTS if e[0] == "dicom-received")
    root = _validate(audit_message(event.to_dict(), RECORDED))
    assert [child.tag for child in root] == [
        "EventIdentification", "ActiveParticipant", "ActiveParticipant", "AuditSourceIdentification",
        "ParticipantObjectIdentification", "ParticipantObjectIdentification"]
    study = root.findall("ParticipantObjectIdentification")[0]
    assert [child.tag for child in study] == [
        "ParticipantObjectIDTypeCode", "ParticipantObjectName", "ParticipantObjectDescription"]


def test_control_characters_are_replaced_not_fatal() -> None:
    _, event = next(e for e in EVENTS if e[0] == "hl7-export-failed")
    root = _validate(audit_message(event.to_dict(), RECORDED))
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "EHR answered AE: \ufffdbell"


def test_recorded_at_stands_in_for_a_missing_event_time() -> None:
    _, event = EVENTS[0]
    stored = event.to_dict()
    del stored["occurred_at"]
    root = _validate(audit_message(stored, RECORDED))
    assert root.find("EventIdentification").get("EventDateTime") == RECORDED.isoformat()  # type: ignore[union-attr]


def _mutated(edit: Any) -> etree._Element:
    _, event = next(e for e in EVENTS if e[0] == "dicom-received")
    root = etree.fromstring(audit_message(event.to_dict(), RECORDED))
    edit(root)
    return root


@pytest.mark.parametrize("edit", [
    pytest.param(lambda r: r.remove(r.find("AuditSourceIdentification")), id="no-audit-source"),
    pytest.param(lambda r: r.find("EventIdentification").set("EventOutcomeIndicator", "5"), id="bad-outcome"),
    pytest.param(lambda r: r.find("EventIdentification").set("EventDateTime", "yesterday"), id="bad-datetime"),
    pytest.param(lambda r: r.find("EventIdentification/EventID").attrib.pop("originalText"), id="code-without-meaning"),
    pytest.param(lambda r: r.insert(0, copy.deepcopy(r.find("ActiveParticipant"))), id="participant-before-event"),
    pytest.param(lambda r: [r.remove(p) for p in r.findall("ActiveParticipant")], id="no-participant"),
    pytest.param(lambda r: r.find("ParticipantObjectIdentification").remove(
        r.find("ParticipantObjectIdentification/ParticipantObjectName")), id="object-without-name-or-query"),
    pytest.param(lambda r: r.find("ActiveParticipant").set("UserIsRequestor", "yes"), id="bad-boolean"),
])
def test_the_schema_rejects_invalid_messages(edit: Any) -> None:
    assert not SCHEMA.validate(_mutated(edit))
