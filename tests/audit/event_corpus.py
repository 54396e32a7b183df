"""Every kind of audit event the gateway emits, built by the code that emits it.

The builders of :mod:`audit.builders` are called directly; the events the parts build in their own
methods (HL7 import / order / patient records, the HL7 and FHIR-notification Export records, the
FHIR access records) are built by those methods, given the few attributes they read. The DICOM
XML and FHIR AuditEvent exporters are tested over all of them, so a new kind of event that one
exporter cannot express fails here.
"""

from __future__ import annotations

import base64
import datetime as dt
from types import SimpleNamespace
from typing import Any

from audit import builders
from audit.events import Action, AuditEvent, AuditSource, EventId, EventType, Outcome, RoleId
from audit.export import audit_log_used
from fhir_api.audit_trail import fhir_access_event, refused_access_event
from fhir_api.notifications import SubscriptionChannel
from hl7.inbound import InboundService
from hl7.messages import OrderMessage, PatientUpdate, parse_inbound
from hl7.mllp import ConnectionInfo
from hl7.results_channel import Hl7ResultChannel
from storage.outbox import DeliveryItem

WHEN = dt.datetime(2026, 11, 30, 10, 15, 30, 123456, tzinfo=dt.UTC)
SOURCE = AuditSource(source_id="PNEUMO", enterprise_site_id="HOSPITAL")
STUDY = "1.2.826.0.1.3680043.8.498.1001"
CR = "1.2.840.10008.5.1.4.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
INSTANCES = ("1.2.826.0.1.3680043.8.498.1001.1.1", "1.2.826.0.1.3680043.8.498.1001.1.2")

ORM = "\r".join([
    "MSH|^~\\&|RIS|RADIOLOGY|PNEUMO|HOSPITAL|20240316075959+0100||ORM^O01^ORM_O01|RIS000777|P|2.5.1|||AL|NE||UNICODE UTF-8",
    "PID|1||PHI4711^^^&1.2.840.99999.1&ISO^MR||EVERYMAN^ADAM^^^^^L||198007041230|F",
    "PV1|1|I|W1^101^A",
    "ORC|NW|PO-77^HIS|FO-77^RIS||SC||^^^20240316080000^^A",
    "OBR|1|PO-77^HIS|FO-77^RIS|71045^XR CHEST 1 VIEW^C4||||||||||||||ACC-77|RP-77|SPS-77||||DX",
])
ADT = "\r".join([
    "MSH|^~\\&|ADT|HOSPITAL|PNEUMO|HOSPITAL|20240316080000||ADT^A08^ADT_A01|ADT0001|P|2.5.1",
    "EVN|A08|20240316080000",
    "PID|1||PHI4711^^^HOSP^MR||EVERYMAN^ADAM||19800704|M",
    "PV1|1|O",
])


def _inbound_events() -> list[tuple[str, AuditEvent]]:
    service: Any = SimpleNamespace(_audit_source=SOURCE)
    service._participants = lambda info, header: InboundService._participants(service, info, header)
    info = ConnectionInfo(peer_host="10.0.0.7", peer_port=40000, connection_id=1)
    order = parse_inbound(ORM)
    update = parse_inbound(ADT)
    assert isinstance(order, OrderMessage) and isinstance(update, PatientUpdate)
    return [
        ("hl7-import-accepted", InboundService._received_event(service, info, "AA", WHEN, None, order.header)),
        ("hl7-import-unreadable", InboundService._received_event(service, info, "AR", WHEN, None, None)),
        ("hl7-order-record", InboundService._record_event(service, order, info, EventId.ORDER_RECORD, Action.CREATE, WHEN)),
        ("hl7-patient-record", InboundService._record_event(service, update, info, EventId.PATIENT_RECORD, Action.UPDATE,
                                                            WHEN)),
    ]


def _export_events() -> list[tuple[str, AuditEvent]]:
    oru = SimpleNamespace(control_id="PNEUMO0001", result_status="F", sending_application="PNEUMO",
                          sending_facility="HOSPITAL", receiving_application="EHR", receiving_facility="HOSPITAL")
    hl7_channel: Any = SimpleNamespace(_audit_source=SOURCE, _destinations={})
    item = DeliveryItem(subject="study", content=oru, study_uid=STUDY, patient_id="PHI4711", patient_name="EVERYMAN^ADAM",
                        accession="ACC-77")
    notification = SimpleNamespace(subscription=SimpleNamespace(endpoint="https://ehr.example/fhir"))
    fhir_channel: Any = SimpleNamespace(_audit_source=SOURCE)
    fhir_item = DeliveryItem(subject="DiagnosticReport/x", content=notification, study_uid=STUDY, patient_id="PHI4711",
                             patient_name=None, accession=None)
    return [
        ("hl7-export", Hl7ResultChannel.audit_event(hl7_channel, item, "ehr", Outcome.SUCCESS, WHEN, None)),
        ("hl7-export-failed", Hl7ResultChannel.audit_event(hl7_channel, item, "ehr", Outcome.SERIOUS_FAILURE, WHEN,
                                                           "EHR answered AE: \x07bell")),
        ("fhir-notification-export", SubscriptionChannel.audit_event(fhir_channel, fhir_item, "sub-1", Outcome.SUCCESS,
                                                                     WHEN, None)),
    ]


def all_events() -> list[tuple[str, AuditEvent]]:
    """(name, event) for every kind of event; names are unique."""
    events: list[tuple[str, AuditEvent]] = [
        ("application-start", builders.application_activity(SOURCE, started=True, process_name="pneumo serve",
                                                             host="gateway.example", when=WHEN, user="root")),
        ("application-stop", builders.application_activity(SOURCE, started=False, process_name="pneumo serve",
                                                            host=None, when=WHEN)),
        ("security-alert-unknown-ae", builders.security_alert(
            SOURCE, event_type=EventType.NODE_AUTHENTICATION, reporter_ae="PNEUMO", offender_id="ROGUE",
            offender_host="192.0.2.5", description="association from unknown AE title ROGUE", when=WHEN)),
        ("dicom-received", builders.dicom_transfer(
            SOURCE, action=Action.CREATE, outcome=Outcome.SUCCESS, sender=("MODALITY", "10.0.0.5"),
            receiver=("PNEUMO", None), sender_is_requestor=True, study_uid=STUDY, sop_classes={CR: 1},
            instances=INSTANCES[:1], patient_id="PHI4711", patient_name="EVERYMAN^ADAM", when=WHEN, accession="ACC-77")),
        ("dicom-delivered-two-classes", builders.dicom_transfer(
            SOURCE, action=Action.READ, outcome=Outcome.MINOR_FAILURE, sender=("PNEUMO", None),
            receiver=("PACS", "pacs.example"), sender_is_requestor=True, study_uid=STUDY, sop_classes={CR: 1, SR: 1},
            instances=INSTANCES, patient_id="PHI4711", patient_name=None, when=WHEN, description="PACS refused one")),
        ("ai-processing", builders.ai_processing(
            SOURCE, application_id="pneumo-classifier", action=Action.READ, outcome=Outcome.SUCCESS, study_uid=STUDY,
            sop_classes={CR: 1}, instances=INSTANCES[:1], patient_id="PHI4711", patient_name="EVERYMAN^ADAM",
            description="classified", when=WHEN)),
        ("query", builders.query(
            SOURCE, requestor=builders.application(SOURCE, "VIEWER", "10.0.0.9", requestor=True),
            responder=builders.application(SOURCE, "PNEUMO", None, requestor=False),
            sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1", query_base64=base64.b64encode(b"\x08\x00\x52\x00").decode(),
            transfer_syntax_uid="1.2.840.10008.1.2", outcome=Outcome.SUCCESS, when=WHEN, patient_id="PHI4711")),
        ("begin-transferring", builders.begin_transferring(
            SOURCE, source_participant=builders.application(SOURCE, "PNEUMO", None, requestor=False, role=RoleId.SOURCE),
            destination_participant=builders.application(SOURCE, "VIEWER", "10.0.0.9", requestor=False,
                                                         role=RoleId.DESTINATION),
            study_uid=STUDY, sop_classes={CR: 2}, instances=INSTANCES, patient_id="PHI4711", patient_name=None, when=WHEN,
            other_participants=(builders.application(SOURCE, "MOVER", "10.0.0.10", requestor=True),))),
        ("instances-transferred-move", builders.instances_transferred(
            SOURCE, action=Action.READ, outcome=Outcome.SUCCESS,
            source_participant=builders.application(SOURCE, "PNEUMO", None, requestor=False, role=RoleId.SOURCE),
            destination_participant=builders.application(SOURCE, "VIEWER", "10.0.0.9", requestor=False,
                                                         role=RoleId.DESTINATION),
            study_uid=STUDY, sop_classes={CR: 2}, instances=INSTANCES, patient_id="PHI4711", patient_name=None, when=WHEN)),
        ("operator-retry", builders.operator_action(SOURCE, operator="alice", host="10.0.0.1", when=WHEN,
                                                    description="re-queued 3 deliveries")),
        ("fhir-search", fhir_access_event(
            SOURCE, client_id="ehr-client", client_address="10.0.0.20", interaction="search",
            resource_type="DiagnosticReport", returned=[f"DiagnosticReport/{STUDY}/_history/1"],
            patients=["Patient/pat-abc"], query="patient=Patient/pat-abc&date=ge2026", outcome=Outcome.SUCCESS,
            when=WHEN)),
        ("fhir-read", fhir_access_event(
            SOURCE, client_id="ehr-client", client_address=None, interaction="read", resource_type="Patient",
            returned=["Patient/pat-abc/_history/2"], patients=["Patient/pat-abc"], query=None, outcome=Outcome.SUCCESS,
            when=WHEN)),
        ("fhir-401", refused_access_event(SOURCE, status=401, client_address="10.0.0.21", path="/fhir/Patient",
                                          reason="no bearer token", when=WHEN)),
        ("fhir-403", refused_access_event(SOURCE, status=403, client_address="10.0.0.21", path="/fhir/AuditEvent",
                                          reason="insufficient scope", when=WHEN)),
        ("audit-log-used-search", audit_log_used(SOURCE, user="auditor-client", host="10.0.0.30", when=WHEN,
                                                 description="FHIR AuditEvent search", query="patient=Patient/pat-abc")),
        ("audit-log-used-export", audit_log_used(SOURCE, user="alice", host="gateway.example", when=WHEN,
                                                 description="pneumo audit export --format dicom")),
        *_inbound_events(),
        *_export_events(),
    ]
    names = [name for name, _ in events]
    assert len(names) == len(set(names))
    return events
