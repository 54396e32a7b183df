"""``GET /fhir/metadata``: the CapabilityStatement, built from what the code implements.

The resource types and search parameters come from the registry the search code itself uses
(:data:`fhir_api.search_params.SEARCH_PARAMS`), the includes from its reference parameters,
the interactions from :mod:`fhir_api.api`: the statement cannot claim what the server does not
do, nor miss what it does (FHIR R4 CapabilityStatement; SMART App Launch "Conformance").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fhir_api.audit_event_search import AUDIT_EVENT_PARAMS
from fhir_api.search_params import SEARCH_PARAMS

_COMMON_PARAMS = ("_id", "_lastUpdated")
_READ_INTERACTIONS = ("read", "vread", "history-instance", "search-type")
_WRITE_INTERACTIONS = ("create", "update", "delete")
#: The US Core 6.1 profiles our resources are shaped after (they are not validated against them).
_PROFILES = {
    "Patient": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient",
    "DiagnosticReport": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-diagnosticreport-note",
    "Observation": "http://hl7.org/fhir/StructureDefinition/Observation",
    "ImagingStudy": "http://hl7.org/fhir/StructureDefinition/ImagingStudy",
    "Device": "http://hl7.org/fhir/StructureDefinition/Device",
    "Subscription": "http://hl7.org/fhir/StructureDefinition/Subscription",
}
_SPEC = "http://hl7.org/fhir/SearchParameter/"
#: Parameters of ours, not of the R4 specification.
_CUSTOM = {("DiagnosticReport", "imaging-study"): "urn:pneumo-gateway:SearchParameter:DiagnosticReport-imaging-study"}


#: Binary: our DICOM SRs, read only, cited by DiagnosticReport.presentedForm (no search).
_BINARY: dict[str, Any] = {
    "type": "Binary",
    "interaction": [{"code": "read"}],
    "documentation": "GET Binary/<SOP Instance UID> returns one of our DICOM SRs (application/dicom, or a Binary "
    "resource with Accept: application/fhir+json)",
}


def _audit_event() -> dict[str, Any]:
    """AuditEvent: the audit log itself (fhir_api.audit_event_routes), read and search only."""
    return {
        "type": "AuditEvent",
        "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
        "documentation": "The hash-chained audit log (DICOM PS3.15 A.5 events in the IHE BALP shape), newest first; "
        "needs scope system/AuditEvent.rs (system/*.rs does not grant it). Every read and search is itself audited "
        "(Audit Log Used).",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "versioning": "no-version",
        "readHistory": False,
        "updateCreate": False,
        "conditionalCreate": False,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": [
            {"name": name, "definition": f"{_SPEC}AuditEvent-{name}", "type": kind, "documentation": text}
            for name, (kind, text) in sorted(AUDIT_EVENT_PARAMS.items())
        ],
    }


def _definition(resource_type: str, name: str) -> str:
    if name == "_id":
        return f"{_SPEC}Resource-id"
    if name == "_lastUpdated":
        return f"{_SPEC}Resource-lastUpdated"
    return _CUSTOM.get((resource_type, name), f"{_SPEC}{resource_type}-{name}")


def _resource(resource_type: str, writable: bool) -> dict[str, Any]:
    params = SEARCH_PARAMS[resource_type]
    references = sorted(name for name, p in params.items() if p.type == "reference")
    revincludes = sorted(
        f"{source}:{name}"
        for source, source_params in SEARCH_PARAMS.items()
        for name, p in source_params.items()
        if p.type == "reference" and (resource_type in p.targets)
    )
    entry: dict[str, Any] = {
        "type": resource_type,
        "profile": _PROFILES.get(resource_type, f"http://hl7.org/fhir/StructureDefinition/{resource_type}"),
        "interaction": [{"code": code} for code in (*_READ_INTERACTIONS, *(_WRITE_INTERACTIONS if writable else ()))],
        "versioning": "versioned",
        "readHistory": True,
        "updateCreate": writable,
        "conditionalCreate": False,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchInclude": [f"{resource_type}:{name}" for name in references],
        "searchRevInclude": revincludes,
        "searchParam": [
            {"name": name, "definition": _definition(resource_type, name),
             "type": "token" if name == "_id" else "date" if name == "_lastUpdated" else params[name].type,
             "documentation": params[name].documentation if name in params else
             ("The logical id" if name == "_id" else "When the resource version was stored")}
            for name in (*_COMMON_PARAMS, *sorted(n for n in params if n not in _COMMON_PARAMS))
        ],
    }
    if not references:
        del entry["searchInclude"]
    if not revincludes:
        del entry["searchRevInclude"]
    return entry


def capability_statement(base_url: str, *, software_version: str, writable: Sequence[str], max_count: int) -> dict[str, Any]:
    """The server's CapabilityStatement (kind ``instance``, FHIR 4.0.1, JSON only)."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-30",
        "publisher": "Pneumo Gateway",
        "kind": "instance",
        "software": {"name": "Pneumo Gateway", "version": software_version},
        "implementation": {"description": "Pneumo Gateway FHIR R4 facade (chest X-ray pneumonia classifier results)",
                           "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": f"Searches return at most {max_count} entries per page (_count is capped); "
                "unknown parameters are ignored (reported in an OperationOutcome entry) unless Prefer: handling=strict.",
                "security": {
                    "cors": False,
                    "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                             "code": "SMART-on-FHIR"}]}],
                    "description": "Bearer JWT (RS256/ES256) with SMART v1 (system/*.read) or v2 (system/*.rs) scopes; "
                    "see /fhir/.well-known/smart-configuration",
                },
                "resource": sorted(
                    [_resource(t, t in writable) for t in SEARCH_PARAMS] + [_BINARY, _audit_event()], key=lambda r: str(r["type"])
                ),
            }
        ],
    }
