"""FHIR R4 resources made from the facts (:mod:`fhir_api.facts`): pure functions, no database.

Each mapper builds a plain dict, validates it by parsing it into the ``fhir.resources`` R4B model
of the resource (R4B is wire-compatible with R4 for Patient, Device, ImagingStudy, Observation,
DiagnosticReport and OperationOutcome), and returns the model's JSON dump
(``model_dump(mode="json", exclude_none=True)``: FHIR element names, JSON types). A mapping that
would produce an invalid resource therefore raises instead of reaching an EHR. ``meta`` is not
set here: the projection adds ``meta.versionId`` / ``meta.lastUpdated``.

What the model does *not* check (the R4B models leave value sets and reference target types to a
full validator), these functions keep to by construction: every ``code`` comes from its required
value set, every ``Reference`` targets a type the element allows in R4, no string is empty.

Codes say what the DICOM SR says (``dicom_node/sr.py``, docs/architecture.md §4), so that the PACS
and the EHR hold the same statement:

* finding: SCT 233604007 "Pneumonia"; value SCT 52101004 "Present" / 272519000 "Absent" (the
  meanings of CID 240 "Present-Absent", as the SR writes them);
* certainty: (111012, DCM, "Certainty of Finding") in UCUM ``%``;
* anatomy: Body Part Examined ``CHEST`` is SCT 816094009 "Chest" — the code PS3.16 Annex L
  (Table L-1) and CID 4031 "Common Anatomic Regions" give it today. The older 51185008
  "Thoracic structure" (SRT T-D3000) was replaced in DICOM and is in no current CID; FHIR R4
  ImagingStudy.series.bodySite points to Annex L for this mapping;
* DiagnosticReport: category LOINC LP29684-5 "Radiology" (US Core) and v2-0074 ``RAD``; code
  LOINC 18748-4 "Diagnostic imaging study". No chest-specific LOINC is added: 36643-5 is
  "XR Chest 2 Views" and 36554-4 "XR Chest Single view" (IHE Imaging Diagnostic Report examples),
  and we do not know how many views a study has; when an order carries a code, that belongs here
  (DESIGN §4: "code from the order or LOINC 18748-4").

Times: DICOM DA/TM carry no time zone (unless Timezone Offset From UTC (0008,0201) is present, which
the facts do not carry). A FHIR ``dateTime`` with a time SHALL have a zone offset (FHIR R4
datatypes, dateTime: "If hours and minutes are specified, a time zone SHALL be populated"), so a
study date/time becomes a date only unless a zone is given to :func:`date_time`. Instants
(``issued``) come from timezone-aware Python datetimes.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest

from fhir_api import ids
from fhir_api.facts import ImageFinding, ModelFacts, OrderFacts, PatientFacts, ReportFacts, ReportStatus, StudyFacts

__all__ = [
    "date_time",
    "device",
    "diagnostic_report",
    "imaging_study",
    "observation",
    "operation_outcome",
    "patient",
]

# -- code systems (FHIR R4 terminologies page; DICOM PS3.16 §8 for DCM) ---------------------------
SCT: Final = "http://snomed.info/sct"
LOINC: Final = "http://loinc.org"
DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
UCUM: Final = "http://unitsofmeasure.org"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier type
V2_0074: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"  # diagnostic service section
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"  # as in the R4 ImagingStudy examples: value urn:oid:<uid>
RFC_3986: Final = "urn:ietf:rfc:3986"  # ImagingStudy.series.instance.sopClass system

PNEUMONIA: Final = {"system": SCT, "code": "233604007", "display": "Pneumonia"}
PRESENT: Final = {"system": SCT, "code": "52101004", "display": "Present"}
ABSENT: Final = {"system": SCT, "code": "272519000", "display": "Absent"}
CHEST: Final = {"system": SCT, "code": "816094009", "display": "Chest"}
CERTAINTY_OF_FINDING: Final = {"system": DCM, "code": "111012", "display": "Certainty of Finding"}
RADIOLOGY_LOINC: Final = {"system": LOINC, "code": "LP29684-5", "display": "Radiology"}
RADIOLOGY_V2: Final = {"system": V2_0074, "code": "RAD", "display": "Radiology"}
DIAGNOSTIC_IMAGING_STUDY: Final = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
IMAGING_CATEGORY: Final = {"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}
MR_TYPE: Final = {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record number"}]}
ACSN_TYPE: Final = {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]}
PLAC_TYPE: Final = {"coding": [{"system": V2_0203, "code": "PLAC", "display": "Placer Identifier"}]}
FILL_TYPE: Final = {"coding": [{"system": V2_0203, "code": "FILL", "display": "Filler Identifier"}]}
IMAGING_SERVICE: Final = {"system": SCT, "code": "363679005", "display": "Imaging"}
#: HL7 v2 coding system names (table 0396) of ordered procedures -> FHIR system URIs.
_CODE_SYSTEMS: Final[Mapping[str, str]] = {
    "LN": LOINC, "LOINC": LOINC, "SCT": SCT, "SNM": SCT, "SNOMED": SCT, "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
}
#: HL7 table 0027 priority -> FHIR request-priority.
_PRIORITIES: Final[Mapping[str, str]] = {"S": "stat", "A": "asap", "T": "urgent", "R": "routine"}

#: Code meanings of CID 33 "Modality" (PS3.16) for the modalities a chest X-ray study may hold;
#: any other modality is sent as its code without a display (still a valid DCM Coding).
MODALITY_MEANINGS: Final[Mapping[str, str]] = {
    "CR": "Computed Radiography",
    "DX": "Digital Radiography",
    "RG": "Radiographic imaging",
    "PX": "Panoramic X-Ray",
    "IO": "Intra-oral Radiography",
    "MG": "Mammography",
    "RF": "Radiofluoroscopy",
    "XA": "X-Ray Angiography",
    "CT": "Computed Tomography",
    "MR": "Magnetic Resonance",
    "US": "Ultrasound",
    "NM": "Nuclear Medicine",
    "PT": "Positron emission tomography",
    "SR": "Structured Report Document",
    "KO": "Key Object Selection",
    "PR": "Presentation State",
    "SEG": "Segmentation",
    "DOC": "Document",
    "OT": "Other",
}

#: Body Part Examined (0018,0015) defined terms we can code (PS3.16 Annex L, Table L-1).
BODY_PARTS: Final[Mapping[str, Mapping[str, str]]] = {"CHEST": CHEST}

#: The title of each DICOM SR in DiagnosticReport.presentedForm (the SR's Series Description).
SR_TITLE: Final = "AI pneumonia result (DICOM SR)"
DEVICE_TYPE_TEXT: Final = "AI/ML software (pneumonia classifier)"

#: R4 value sets ``issue-severity`` and ``issue-type`` (both required bindings).
ISSUE_SEVERITIES: Final = frozenset({"fatal", "error", "warning", "information"})
ISSUE_TYPES: Final = frozenset(
    {
        "invalid", "structure", "required", "value", "invariant",
        "security", "login", "unknown", "expired", "forbidden", "suppressed",
        "processing", "not-supported", "duplicate", "multiple-matches", "not-found", "deleted",
        "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict",
        "transient", "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled",
        "informational",
    }
)  # fmt: skip

_GENDERS: Final[Mapping[str, str]] = {"M": "male", "F": "female", "O": "other"}
_OID_RE: Final = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
#: A URI we recognise as one: a URN (RFC 8141) or a hierarchical URI with an authority (scheme://).
#: A bare "NAME:thing" is not taken for a URI: an Issuer of Patient ID such as "HOSP:NORTH" is a name.
_URI_RE: Final = re.compile(r"^(urn:[A-Za-z0-9][A-Za-z0-9-]{0,31}:\S+|[A-Za-z][A-Za-z0-9+.-]*://\S+)$")
_DA_RE: Final = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")  # YYYYMMDD; ACR-NEMA YYYY.MM.DD read too
_TM_RE: Final = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")  # HH[MM[SS[.F{1,6}]]]

_REPORTED: Final = frozenset({ReportStatus.PRELIMINARY, ReportStatus.FINAL, ReportStatus.AMENDED})


# -- public mappers -----------------------------------------------------------------------------


def date_time(date: str | None, time: str | None, *, tz: dt.tzinfo | None = None) -> str | None:
    """A FHIR ``dateTime`` from DICOM DA (``YYYYMMDD``) and TM (``HH[MM[SS[.FFFFFF]]]``), or None.

    FHIR R4 (datatypes, dateTime) requires a zone offset whenever a time is given, and DICOM DA/TM
    have none (PS3.5 §6.2; the zone is in Timezone Offset From UTC (0008,0201) when at all). Guessing
    the zone would shift the moment by hours in the EHR, so without *tz* the result is the date
    alone (``2024-01-05``); with *tz* (the study's offset, or the site's zone) it is the full
    ``2024-01-05T09:30:00+01:00``, partial TM filled with zeros and fractions kept as written.
    An invalid date gives None; an invalid time gives the date alone. A leap second (``60``, legal
    in DICOM and FHIR) is kept as written; the offset is then taken at second 59.
    """
    day = _date(date)
    if day is None:
        return None
    if tz is None or time is None:
        return day.isoformat()
    match = _TM_RE.match(time.strip())
    if match is None:
        return day.isoformat()
    hour, minute, second = (int(part) if part else 0 for part in match.group(1, 2, 3))
    fraction = match.group(4)
    if hour > 23 or minute > 59 or second > 60:
        return day.isoformat()
    moment = dt.datetime(day.year, day.month, day.day, hour, minute, min(second, 59), tzinfo=tz)
    offset = moment.utcoffset()
    if offset is None:  # a tzinfo that does not know its offset is no zone at all
        return day.isoformat()
    text = f"{day.isoformat()}T{hour:02d}:{minute:02d}:{second:02d}"
    if fraction:
        text += "." + fraction
    return text + _offset(offset)


def patient(facts: PatientFacts) -> dict[str, Any]:
    """FHIR R4 Patient from the DICOM Patient Module (PS3.3 C.7.1.1).

    * identifier: Patient ID (0010,0020) typed MR (v2-0203), within Issuer of Patient ID
      (0010,0021): an OID becomes ``urn:oid:<oid>``, a URI is the system as it is, any other
      issuer is a name only (``assigner.display``) because a FHIR ``system`` must be a URI.
    * name: the alphabetic group of the PN (PS3.5 §6.2.1: ``Family^Given^Middle^Prefix^Suffix``,
      ideographic/phonetic groups after ``=`` dropped), with ``text`` for display.
    * gender: M/F/O to male/female/other (administrative-gender); any other non-empty value is
      ``unknown``; absent or empty (DICOM type 2, "not known") is left out.
    * birthDate: Patient's Birth Date (DA); an impossible date is left out rather than guessed.
    """
    resource: dict[str, Any] = {"resourceType": "Patient", "id": ids.patient_id(facts)}
    value = facts.patient_id.strip()
    if value:
        identifier: dict[str, Any] = {"use": "usual", "type": MR_TYPE, "value": value}
        issuer = facts.issuer.strip()
        if issuer:
            system = _issuer_system(issuer)
            if system is not None:
                identifier["system"] = system
            else:
                identifier["assigner"] = {"display": issuer}
        resource["identifier"] = [identifier]
    name = _human_name(facts.name)
    if name is not None:
        resource["name"] = [name]
    gender = _gender(facts.sex)
    if gender is not None:
        resource["gender"] = gender
    birth = _date(facts.birth_date)
    if birth is not None:
        resource["birthDate"] = birth.isoformat()
    return _validated(Patient, resource)


def device(model: ModelFacts) -> dict[str, Any]:
    """FHIR R4 Device for one model version (the SR's device observer, TID 1004, and TID 4019).

    The identifier is the Device UID the SR names (Device Observer UID), so the PACS object and the
    FHIR Device meet on one value; deviceName carries the model name both as the manufacturer's
    name for it and as its model name (the SR's Name and Model Name); version is the SR's Software
    Versions. The decision threshold is given twice: as a ``property`` (machine-readable, UCUM %)
    and with the intended use in ``note`` (read by people).
    """
    threshold = _percent(model.threshold)
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "id": ids.device_id(model),
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{model.device_uid}"}],
        "status": "active",
        "manufacturer": model.manufacturer,
        "deviceName": [
            {"name": model.name, "type": "manufacturer-name"},
            {"name": model.name, "type": "model-name"},
        ],
        "type": {"text": DEVICE_TYPE_TEXT},
        "version": [{"value": model.version}],
        "property": [
            {
                "type": {"text": "Decision threshold (pneumonia present at or above)"},
                "valueQuantity": [_percent_quantity(model.threshold)],
            }
        ],
        "note": [
            {"text": f"Intended use: {model.intended_use}"},
            {"text": f"Decision threshold: pneumonia present at or above {threshold} %"},
        ],
    }
    return _validated(Device, _pruned(resource))


def imaging_study(study: StudyFacts) -> dict[str, Any]:
    """FHIR R4 ImagingStudy for the study as we hold it, our SR and summary-image series included.

    * identifier: the Study Instance UID (``urn:dicom:uid`` / ``urn:oid:<uid>``, as in the R4
      ImagingStudy examples) and the Accession Number typed ACSN (v2-0203).
    * started: Study Date/Time through :func:`date_time` (a date, as the zone is unknown).
    * modality: the distinct series modalities (DCM, CID 33), in series order; a series without
      Modality is ``OT`` "Other", because ``series.modality`` is 1..1 in R4.
    * bodySite: Body Part Examined coded per PS3.16 Annex L where we know the code (CHEST), else
      left out (a Coding without a code says nothing).
    * instance.sopClass: ``urn:ietf:rfc:3986`` / ``urn:oid:<SOP Class UID>`` (R4 binding).
    * referrer: Referring Physician's Name as a display-only reference (we hold no Practitioner).
    """
    modalities: dict[str, dict[str, str]] = {}
    series_list: list[dict[str, Any]] = []
    for series in study.series:
        modality = _modality(series.modality)
        modalities.setdefault(modality["code"], modality)
        entry: dict[str, Any] = {
            "uid": series.series_instance_uid,
            "number": _unsigned(series.number),
            "modality": modality,
            "description": _text(series.description),
            "numberOfInstances": len(series.instances),
            "bodySite": _body_site(series.body_part),
            "instance": [
                {
                    "uid": instance.sop_instance_uid,
                    "sopClass": {"system": RFC_3986, "code": f"urn:oid:{instance.sop_class_uid}"},
                    "number": _unsigned(instance.number),
                }
                for instance in series.instances
            ],
        }
        series_list.append(entry)
    referrer = _human_name(study.referring_physician)
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": ids.imaging_study_id(study.study_instance_uid),
        "identifier": [_uid_identifier(study.study_instance_uid), *_accession(study.accession_number)],
        "status": "available",
        "modality": list(modalities.values()),
        "subject": _patient_reference(study),
        "started": date_time(study.study_date, study.study_time),
        "referrer": {"display": referrer["text"]} if referrer is not None else None,
        "numberOfSeries": len(study.series),
        "numberOfInstances": sum(len(series.instances) for series in study.series),
        "description": _text(study.description),
        "basedOn": _based_on(study) or None,
        "series": series_list,
    }
    return _validated(ImagingStudy, _pruned(resource))


def service_request(order: OrderFacts, study: StudyFacts) -> dict[str, Any]:
    """FHIR R4 ServiceRequest for an imaging order received over HL7 (ORM^O01 / OMI^O23).

    * identifier: the placer order number (v2-0203 PLAC; system ``urn:oid:`` when the namespace is
      an OID), the filler order number (FILL), the Accession Number (ACSN) — how the EHR knows it.
    * status: ``active``, or ``revoked`` once the order was cancelled (ORC-1 CA/OC/DC...);
      intent ``order``; category SCT 363679005 "Imaging" (the US Core ServiceRequest category).
    * code: the ordered procedure (OBR-4) with its coding system mapped to a FHIR URI where known
      (LN -> LOINC, SCT/SNM -> SNOMED CT, C4 -> CPT), else the code with its text only.
    * priority: HL7 table 0027 S -> stat, A -> asap, T -> urgent, R -> routine (others left out).
    * subject: the study's patient; requester: the ordering provider's name (display only, we hold
      no Practitioner); authoredOn: when the gateway received the order.
    """
    coding = None
    if order.procedure_code:
        coding = {"system": _CODE_SYSTEMS.get((order.procedure_system or "").upper()), "code": order.procedure_code,
                  "display": _text(order.procedure_text)}
    provider = _human_name(order.ordering_provider)
    identifiers = [
        {"type": PLAC_TYPE, "system": f"urn:oid:{order.placer_namespace}" if _OID_RE.match(order.placer_namespace) else None,
         "value": order.placer_order_number} if order.placer_namespace != "accession" else None,
        {"type": FILL_TYPE, "value": order.filler_order_number} if order.filler_order_number else None,
        *_accession(order.accession_number),
    ]
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": ids.service_request_id(order),
        "identifier": [i for i in identifiers if i] or None,
        "status": "active" if order.status == "active" else "revoked",
        "intent": "order",
        "category": [{"coding": [IMAGING_SERVICE]}],
        "priority": _PRIORITIES.get((order.priority or "").upper()),
        "code": {"coding": [coding] if coding else None, "text": _text(order.procedure_text) or order.procedure_code}
        if (coding or order.procedure_text) else None,
        "subject": _patient_reference(study),
        "authoredOn": _instant(order.authored, "authored"),
        "requester": {"display": provider["text"]} if provider is not None else None,
    }
    return _validated(ServiceRequest, _pruned(resource))


def _based_on(study: StudyFacts) -> list[dict[str, str]]:
    return [_reference("ServiceRequest", ids.service_request_id(order)) for order in study.orders]


def observation(finding: ImageFinding, study: StudyFacts) -> dict[str, Any]:
    """FHIR R4 Observation for one analysed image: the SR's measurement group (TID 1501) in FHIR.

    Mirrors the SR's content: code = the finding SCT 233604007 "Pneumonia", valueCodeableConcept =
    Present / Absent (``probability >= threshold``), component = Certainty of Finding (111012,
    DCM) in UCUM ``%`` (TID 300): one Observation per measurement group, the shape DESIGN §4 fixes
    (the HL7 "DICOM SR to FHIR" IG is R5-based; its R4-expressible parts are followed: the device
    observer as ``device``, the study as ``derivedFrom``). ``device`` is the model
    version's Device; ``derivedFrom`` and ``partOf`` reference the ImagingStudy (both allow it in
    R4); bodySite is the chest (Annex L); ``method`` names the model and its operating point.

    Where the source image goes: R4 has no resource for one DICOM instance (ImagingSelection is
    R5) and ``derivedFrom`` cannot name an instance inside the ImagingStudy, while ``identifier``
    identifies this Observation, not its input. So the source image's SOP Instance UID (and its
    series) is written in a ``note``; the ImagingStudy's series/instance list resolves it. The
    SR that carries the same finding is this Observation's ``identifier`` (``urn:dicom:uid`` /
    ``urn:oid:<SR SOP Instance UID>``), when it has been stored.

    effectiveDateTime is the study's date (the clinically relevant time, as for the report), else
    the analysis time; ``issued`` is when the model produced the result.
    """
    model = finding.model
    study_ref = _reference("ImagingStudy", ids.imaging_study_id(study.study_instance_uid))
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": ids.observation_id(finding),
        "identifier": [_uid_identifier(finding.sr_sop_instance_uid)] if finding.sr_sop_instance_uid else None,
        "partOf": [study_ref],
        "status": "final",
        "category": [{"coding": [IMAGING_CATEGORY]}],
        "code": {"coding": [PNEUMONIA], "text": "Pneumonia"},
        "subject": _patient_reference(study),
        "effectiveDateTime": date_time(study.study_date, study.study_time) or _instant(finding.analysed_at, "analysed_at"),
        "issued": _instant(finding.analysed_at, "analysed_at"),
        "valueCodeableConcept": (
            {"coding": [PRESENT], "text": "Present"} if finding.present else {"coding": [ABSENT], "text": "Absent"}
        ),
        "note": [
            {"text": f"Intended use: {model.intended_use}"},
            {
                "text": (
                    f"Source image: SOP Instance UID {finding.source_sop_instance_uid} "
                    f"(series {finding.source_series_instance_uid})"
                )
            },
        ],
        "bodySite": {"coding": [CHEST], "text": "Chest"},
        "method": {
            "text": (
                f"AI pneumonia classifier {model.name} {model.version}; positive at or above {_percent(finding.threshold)} %"
            )
        },
        "device": _reference("Device", ids.device_id(model), f"{model.name} {model.version}"),
        "derivedFrom": [study_ref],
        "component": [
            {
                "code": {"coding": [CERTAINTY_OF_FINDING], "text": "Certainty of Finding"},
                "valueQuantity": _percent_quantity(finding.probability),
            }
        ],
    }
    return _validated(Observation, _pruned(resource))


def diagnostic_report(report: ReportFacts) -> dict[str, Any]:
    """FHIR R4 DiagnosticReport for one study's result (one per study; amendments are versions).

    Shaped after US Core "DiagnosticReport Profile for Report and Note Exchange": status, category
    (LOINC LP29684-5 "Radiology" and v2-0074 RAD), code (LOINC 18748-4 "Diagnostic imaging
    study"), subject, effective[x] (the study date, else ``issued``), issued, presentedForm; plus
    result (one Observation per analysed image), imagingStudy, conclusion and conclusionCode.

    * identifier: the Accession Number typed ACSN, as IHE and v2 ORU identify the report of an
      accession. No identifier is invented when there is none: the logical id (the Study Instance
      UID) and ``imagingStudy`` already find the report of a study.
    * performer: left out. R4 allows Practitioner, PractitionerRole, Organization or CareTeam
      there, not Device; the model is named on each Observation's ``device`` and in the conclusion.
    * result: for preliminary/final/amended only; a registered study has nothing analysed yet and a
      cancelled one nothing analysable.
    * conclusion: one line an EHR can show, which tells a negative result from a study that was not
      looked at (see :func:`_conclusion`).
    * conclusionCode: SCT 233604007 "Pneumonia" when the study's label is PNEUMONIA, nothing
      otherwise. A negative classifier result is not a "normal" study (SCT 17621005 would claim
      the whole radiograph normal, which a single-finding classifier cannot say), and SNOMED CT
      has no pre-coordinated "pneumonia absent" finding to send; the Observations carry Absent.
    * presentedForm: each of our SRs as ``application/dicom`` at ``Binary/<SOP Instance UID>``
      (relative to the FHIR base, as Attachment.url allows), and the conclusion as
      ``text/plain`` so that a system reading presentedForm only still gets the words.
    """
    study = report.study
    conclusion = _conclusion(report)
    reported = report.status in _REPORTED
    issued = _instant(report.issued, "issued")
    conclusion_code = [{"coding": [PNEUMONIA], "text": "Pneumonia"}] if reported and _label(report.label) == "PNEUMONIA" else None
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": ids.diagnostic_report_id(study.study_instance_uid),
        "identifier": _accession(study.accession_number) or None,
        "status": report.status.value,
        "category": [{"coding": [RADIOLOGY_LOINC]}, {"coding": [RADIOLOGY_V2]}],
        "code": {"coding": [DIAGNOSTIC_IMAGING_STUDY], "text": "AI pneumonia classification of chest radiographs"},
        "subject": _patient_reference(study),
        "effectiveDateTime": date_time(study.study_date, study.study_time) or issued,
        "issued": issued,
        "result": [_reference("Observation", ids.observation_id(finding)) for finding in report.findings] if reported else None,
        "imagingStudy": [_reference("ImagingStudy", ids.imaging_study_id(study.study_instance_uid))],
        "basedOn": _based_on(study) or None,
        "conclusion": conclusion,
        "conclusionCode": conclusion_code,
        "presentedForm": [
            *(
                {"contentType": "application/dicom", "url": f"Binary/{uid}", "title": SR_TITLE}
                for uid in report.sr_sop_instance_uids
            ),
            {
                "contentType": "text/plain; charset=utf-8",
                "data": base64.b64encode(conclusion.encode("utf-8")).decode("ascii"),
                "title": "Conclusion",
            },
        ],
    }
    return _validated(DiagnosticReport, _pruned(resource))


def operation_outcome(issues: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
    """FHIR R4 OperationOutcome from ``(severity, code, diagnostics)`` triples (no id: not stored).

    *severity* must be from ``issue-severity`` and *code* from ``issue-type`` (both required
    bindings); a wrong one is a programming error and raises :class:`ValueError`, as does an empty
    list (``issue`` is 1..*). An empty *diagnostics* is left out.
    """
    if not issues:
        raise ValueError('Argument "issues" must hold at least one issue (OperationOutcome.issue is 1..*).')
    entries: list[dict[str, Any]] = []
    for severity, code, diagnostics in issues:
        if severity not in ISSUE_SEVERITIES:
            raise ValueError(f'Argument "issues": severity {severity!r} is not in the FHIR issue-severity value set.')
        if code not in ISSUE_TYPES:
            raise ValueError(f'Argument "issues": code {code!r} is not in the FHIR issue-type value set.')
        entries.append({"severity": severity, "code": code, "diagnostics": _text(diagnostics)})
    return _validated(OperationOutcome, _pruned({"resourceType": "OperationOutcome", "issue": entries}))


# -- helpers ------------------------------------------------------------------------------------


_Model = Patient | Device | ImagingStudy | Observation | DiagnosticReport | ServiceRequest | OperationOutcome


def _validated(model: type[_Model], resource: dict[str, Any]) -> dict[str, Any]:
    """Parse *resource* into its R4B model (raises on anything invalid) and return its JSON dump."""
    return model.model_validate(resource).model_dump(mode="json", exclude_none=True)


def _pruned(value: Any) -> Any:
    """Drop None, empty strings, empty lists and empty objects, recursively (FHIR has no empty elements)."""
    if isinstance(value, dict):
        pruned_dict = {key: _pruned(item) for key, item in value.items()}
        return {key: item for key, item in pruned_dict.items() if not _empty(item)}
    if isinstance(value, list):
        pruned_list = [_pruned(item) for item in value]
        return [item for item in pruned_list if not _empty(item)]
    return value


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, (dict, list)) and not value)


def _text(value: str | None) -> str | None:
    """A DICOM text value as a FHIR string: stripped, None when nothing is left."""
    if value is None:
        return None
    stripped = value.strip()
    return stripped or None


def _date(value: str | None) -> dt.date | None:
    """A DICOM DA as a date; None for an absent or impossible one (e.g. ``20230230``)."""
    if value is None:
        return None
    match = _DA_RE.match(value.strip())
    if match is None:
        return None
    year, month, day = (int(part) for part in match.groups())
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


def _offset(offset: dt.timedelta) -> str:
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def _instant(value: dt.datetime, name: str) -> str:
    """A FHIR ``instant`` (UTC): the facts' datetimes are aware, a naive one is a programming error."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f'Argument "{name}" must be a timezone-aware datetime, got a naive one.')
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _issuer_system(issuer: str) -> str | None:
    """Identifier.system for an Issuer of Patient ID: ``urn:oid:`` for an OID, a URI as is, else None."""
    if _OID_RE.match(issuer):
        return f"urn:oid:{issuer}"
    if _URI_RE.match(issuer):
        return issuer
    return None


def _human_name(value: str | None) -> dict[str, Any] | None:
    """A FHIR HumanName from a DICOM PN (PS3.5 §6.2.1), alphabetic component group only.

    ``Family^Given^Middle^Prefix^Suffix``: family, given = [given, middle], prefix, suffix, and a
    ``text`` in reading order. Only the first value of a multi-valued PN and only the five defined
    components are read. None when nothing is left.
    """
    if value is None:
        return None
    alphabetic = value.split("\\", 1)[0].split("=", 1)[0]
    components = [component.strip() for component in alphabetic.split("^")[:5]]
    family, given, middle, prefix, suffix = components + [""] * (5 - len(components))
    words = [word for word in (prefix, given, middle, family, suffix) if word]
    if not words:
        return None
    name: dict[str, Any] = {
        "text": " ".join(words),
        "family": family,
        "given": [word for word in (given, middle) if word],
        "prefix": [prefix],
        "suffix": [suffix],
    }
    pruned: dict[str, Any] = _pruned(name)
    return pruned


def _gender(sex: str | None) -> str | None:
    """Patient's Sex (M/F/O) as administrative-gender; other values unknown; empty left out."""
    if sex is None or not sex.strip():
        return None
    return _GENDERS.get(sex.strip().upper(), "unknown")


def _modality(value: str | None) -> dict[str, str]:
    code = (value or "").strip().upper() or "OT"
    coding = {"system": DCM, "code": code}
    meaning = MODALITY_MEANINGS.get(code)
    if meaning is not None:
        coding["display"] = meaning
    return coding


def _body_site(value: str | None) -> Mapping[str, str] | None:
    return BODY_PARTS.get((value or "").strip().upper())


def _unsigned(value: int | None) -> int | None:
    """An IS number as a FHIR unsignedInt; a negative one (legal in DICOM) cannot be sent."""
    return value if value is not None and value >= 0 else None


def _reference(resource_type: str, logical_id: str, display: str | None = None) -> dict[str, str]:
    reference = {"reference": f"{resource_type}/{logical_id}"}
    if display:
        reference["display"] = display
    return reference


def _patient_reference(study: StudyFacts) -> dict[str, str]:
    """The Patient reference, without the name: a reference display would copy PHI into every resource."""
    return _reference("Patient", ids.patient_id(study.patient))


def _uid_identifier(uid: str) -> dict[str, Any]:
    """A DICOM UID as an Identifier, the R4 ImagingStudy way: ``urn:dicom:uid`` / ``urn:oid:<uid>``."""
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _accession(value: str | None) -> list[dict[str, Any]]:
    accession = _text(value)
    return [{"type": ACSN_TYPE, "value": accession}] if accession else []


def _percent(fraction: float) -> str:
    """A fraction as a percentage for text, at most 2 decimals and no trailing zeros (0.5 -> "50")."""
    return f"{round(fraction * 100, 2):g}"


def _percent_quantity(fraction: float) -> dict[str, Any]:
    return {"value": round(fraction * 100, 2), "unit": "%", "system": UCUM, "code": "%"}


def _label(value: str | None) -> str | None:
    return value.strip().upper() if value else None


def _count(number: int, noun: str = "image") -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _reasons(reasons: Iterable[Mapping[str, Any]]) -> list[str]:
    """``[{"reason": str, "images": int}]`` as ``"<reason> (2 images)"`` phrases."""
    phrases: list[str] = []
    for entry in reasons:
        reason = str(entry.get("reason") or "reason not recorded").strip() or "reason not recorded"
        images = entry.get("images")
        phrases.append(f"{reason} ({_count(images)})" if isinstance(images, int) and not isinstance(images, bool) else reason)
    return phrases


def _conclusion(report: ReportFacts) -> str:
    """The DiagnosticReport.conclusion, by status (FHIR R4 diagnostic-report-status).

    * registered: "Images received (3 images); analysis pending"
    * cancelled: "Not analysed: <reason> (2 images); <reason> (1 image)" — nothing was looked at
    * preliminary / final / amended: "AI pneumonia classifier <name> <version>: pneumonia PRESENT
      (deciding image probability 87.3 %, threshold 50 %); 2 of 3 images analysed; not analysed:
      <reason> (1 image)", prefixed "Preliminary: study still open; " or "Amended: ".
    """
    if report.status is ReportStatus.REGISTERED:
        received = f"Images received ({_count(report.images)})" if report.images > 0 else "Images received"
        return f"{received}; analysis pending"
    reasons = _reasons(report.reasons)
    if report.status is ReportStatus.CANCELLED:
        return "Not analysed: " + "; ".join(reasons) if reasons else "Not analysed"
    model = report.model
    subject = f"AI pneumonia classifier {model.name} {model.version}" if model is not None else "AI pneumonia classifier"
    label = _label(report.label)
    if label == "PNEUMONIA":
        verdict = "pneumonia PRESENT"
    elif label == "NORMAL":
        verdict = "pneumonia ABSENT"
    else:
        verdict = "no result yet"
    numbers = []
    if report.probability is not None:
        numbers.append(f"deciding image probability {_percent(report.probability)} %")
    if report.threshold is not None:
        numbers.append(f"threshold {_percent(report.threshold)} %")
    text = f"{subject}: {verdict}"
    if numbers:
        text += f" ({', '.join(numbers)})"
    text += f"; {report.analysed} of {_count(report.images)} analysed"
    if reasons:
        text += "; not analysed: " + ", ".join(reasons)
    if report.status is ReportStatus.PRELIMINARY:
        return f"Preliminary: study still open; {text}"
    if report.status is ReportStatus.AMENDED:
        return f"Amended: {text}"
    return text
