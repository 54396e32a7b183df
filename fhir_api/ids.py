"""Logical ids of the resources we serve: stable, derived from DICOM identity, never from row keys.

Row keys change when the index is rebuilt from the file store (``pneumo db reindex``); an EHR's
references must not. FHIR ids are 1-64 characters of ``[A-Za-z0-9\\-.]``: a DICOM UID (digits and
dots, at most 64) is one as it is; other identities are hashed (base32, lower case, 26 characters).
"""

from __future__ import annotations

import base64
import hashlib

from fhir_api.facts import ImageFinding, ModelFacts, OrderFacts, PatientFacts


def _hashed(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return prefix + base64.b32encode(digest).decode("ascii").rstrip("=").lower()[:26]


def patient_id(patient: PatientFacts) -> str:
    """Patient: PatientID within its issuer (the same pair is the same patient, as in the index)."""
    return _hashed("pat-", patient.issuer, patient.patient_id)


def imaging_study_id(study_instance_uid: str) -> str:
    return study_instance_uid


def diagnostic_report_id(study_instance_uid: str) -> str:
    """One DiagnosticReport per study (its study result); amendments are new versions of it."""
    return study_instance_uid


def observation_id(finding: ImageFinding) -> str:
    """One Observation per analysed image and model version."""
    return _hashed("obs-", finding.source_sop_instance_uid, finding.model.model_id, finding.model.version)


def device_id(model: ModelFacts) -> str:
    """The model version's device UID (the one the SR names), a UID and so a valid id."""
    return model.device_uid


def service_request_id(order: OrderFacts) -> str:
    """One ServiceRequest per order: its placer order number within its namespace."""
    return _hashed("ord-", order.placer_namespace, order.placer_order_number)
