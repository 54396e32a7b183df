"""FHIR R4 REST façade for the EHR (docs/fhir.md): DiagnosticReport, Observation, ImagingStudy,
Patient, Device and our SRs as Binary, searchable and versioned, behind SMART-scoped bearer
tokens; Subscriptions notify through the outbox.

Resources are a projection of the index and result tables (:mod:`fhir_api.projection`), stored
as served (:mod:`fhir_api.store`); the routes (:mod:`fhir_api.api`) read and search them.
"""
