"""FHIR R4 REST façade (DiagnosticReport, Observation, ImagingStudy, Patient, Device, AuditEvent).

Not built yet: it arrives with its own issue. The HTTP server of ``pneumo serve`` is where it mounts.
"""
