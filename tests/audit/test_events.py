"""audit.events: the stored (and hashed) form of an event.

``AuditEvent.to_dict`` is written out field by field for speed; it must stay exactly what
``dataclasses.asdict`` (with enums and the time made JSON-ready) gives, so that a field added to
any of the event dataclasses cannot silently be left out of the audit record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from audit.events import (
    Action,
    ActiveParticipant,
    AuditEvent,
    AuditSource,
    Code,
    EventId,
    NetworkAccessPointType,
    ObjectIdType,
    Outcome,
    ParticipantObject,
    RoleId,
)
from audit.store import canonical_json

WHEN = dt.datetime(2026, 11, 30, 9, 15, 2, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))


def reference(event: AuditEvent) -> dict[str, Any]:
    """The generic conversion: every dataclass field, recursively."""
    data = dataclasses.asdict(event)
    data["occurred_at"] = event.occurred_at.astimezone(dt.UTC).isoformat()
    data["action"] = event.action.value
    data["outcome"] = int(event.outcome)
    for participant in data["participants"]:
        nap = participant["network_access_point_type"]
        participant["network_access_point_type"] = None if nap is None else int(nap)
    return data


FULL = AuditEvent(
    event_id=EventId.IMPORT, action=Action.CREATE, outcome=Outcome.MINOR_FAILURE, occurred_at=WHEN,
    source=AuditSource("PNEUMO@test", enterprise_site_id="SITE", type_code=4),
    participants=(
        ActiveParticipant("RIS@HOSP", True, alternative_user_id="pid-1", user_name="ris", role_id=RoleId.SOURCE,
                          network_access_point_id="10.0.0.7", network_access_point_type=NetworkAccessPointType.IP_ADDRESS),
        ActiveParticipant("PNEUMO@test", False),
    ),
    objects=(
        ParticipantObject("MRN-1", ObjectIdType.PATIENT_NUMBER, 1, role=1, name="DOE^JANE", query="AAEC",
                          details={"MessageType": "ORM^O01"}, sop_classes={"1.2.840.10008.5.1.4.1.1.1": 2},
                          instances=("1.2.3.4", "1.2.3.5")),
        ParticipantObject("1.2.3", ObjectIdType.STUDY_INSTANCE_UID, 2),
    ),
    event_types=(Code("110120", "DCM", "Application Start"),),
    outcome_description="HL7 ORM^O01 received; ACK AE",
)
MINIMAL = AuditEvent(
    event_id=EventId.ORDER_RECORD, action=Action.UPDATE, outcome=Outcome.SUCCESS, occurred_at=WHEN,
    source=AuditSource("PNEUMO@test"), participants=(ActiveParticipant("x", True),),
)


@pytest.mark.parametrize("event", [FULL, MINIMAL], ids=["every-field", "minimal"])
def test_to_dict_is_every_field(event: AuditEvent) -> None:
    assert canonical_json(event.to_dict()) == canonical_json(reference(event))


def test_time_is_utc() -> None:
    assert FULL.to_dict()["occurred_at"] == "2026-11-30T08:15:02.123456+00:00"
