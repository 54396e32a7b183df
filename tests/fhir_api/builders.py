"""Index and result rows of chest studies, added the way the workers add them (for FHIR tests)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select

from fhir_api import store
from fhir_api.projection import publish_study
from storage.db import Database
from storage.models import (
    InferenceResult,
    Instance,
    InstanceOrigin,
    Patient,
    RegisteredModel,
    Series,
    Study,
    StudyResult,
)

T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
STUDY_UID = "1.2.826.0.1.3680043.8.498.10001"
CR = "1.2.840.10008.5.1.4.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


class StudyBuilder:
    """Index and result rows of one chest study, added the way the workers add them."""

    def __init__(self, database: Database, study_uid: str = STUDY_UID, *, patient_id: str = "PAT-001",
                 study_date: str = "20261130") -> None:
        self.db = database
        self.study_uid = study_uid
        with database.session() as session:
            patient = session.execute(select(Patient).where(Patient.patient_id == patient_id)).scalar_one_or_none()
            if patient is None:
                patient = Patient(patient_id=patient_id, issuer="1.2.3.4", name="Doe^Jane", birth_date="19700102", sex="F")
                session.add(patient)
                session.flush()
            study = Study(study_instance_uid=study_uid, patient_pk=patient.id, study_date=study_date, study_time="0745",
                          accession_number="ACC-" + study_uid.rsplit(".", 1)[-1])
            session.add(study)
            session.flush()
            series = Series(series_instance_uid=study_uid + ".1", study_pk=study.id, modality="CR", series_number=1,
                            body_part_examined="CHEST")
            reports = Series(series_instance_uid=study_uid + ".9901", study_pk=study.id, modality="SR", series_number=9901)
            session.add_all([series, reports])
            if session.execute(select(RegisteredModel)).first() is None:
                session.add(RegisteredModel(model_id="pneumo-effnet", version="1.0.0", name="Pneumo EfficientNet-B0",
                                            manufacturer="Pneumo Gateway", device_uid="1.2.826.0.1.3680043.8.498.77",
                                            intended_use="Adult frontal chest radiographs", threshold=0.5))
            session.flush()
            self.study_pk, self.series_pk, self.reports_pk = study.id, series.id, reports.id
        self.images = 0

    def _instance(self, session: Any, uid: str, series_pk: int, sop_class: str, origin: str) -> Instance:
        instance = Instance(sop_instance_uid=uid, sop_class_uid=sop_class, series_pk=series_pk, instance_number=1,
                            transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{uid}.dcm", size=1, sha256="0" * 64,
                            origin=origin)
        session.add(instance)
        session.flush()
        return instance

    def image(self, probability: float | None, *, at: dt.datetime, status: str = "ok") -> None:
        self.images += 1
        uid = f"{self.study_uid}.1.{self.images}"
        with self.db.session() as session:
            source = self._instance(session, uid, self.series_pk, CR, InstanceOrigin.RECEIVED)
            sr = self._instance(session, f"{self.study_uid}.9901.{self.images}", self.reports_pk, SR, InstanceOrigin.GENERATED)
            session.add(InferenceResult(
                instance_pk=source.id, model_id="pneumo-effnet", model_version="1.0.0", status=status,
                reason=None if status == "ok" else "not a frontal chest radiograph", probability=probability,
                label=None if probability is None else ("PNEUMONIA" if probability >= 0.5 else "NORMAL"),
                threshold=0.5, sr_instance_pk=sr.id if status == "ok" else None, created_at=at,
            ))

    def study_result(self, version: int, status: str, *, at: dt.datetime, label: str | None, probability: float | None,
                     analysed: int) -> None:
        with self.db.session() as session:
            session.add(StudyResult(
                study_pk=self.study_pk, version=version, status=status, label=label, probability=probability,
                threshold=0.5, images=self.images, analysed=analysed,
                reasons=[] if analysed == self.images else [{"reason": "not applicable", "images": self.images - analysed}],
                model_id="pneumo-effnet" if analysed else None, model_version="1.0.0" if analysed else None,
                basis=f"basis-{version}", created_at=at,
            ))

    def publish(self) -> tuple[list[store.StoredResource], int]:
        with self.db.session() as session:
            return publish_study(session, self.study_pk)

    def report(self) -> dict[str, Any]:
        with self.db.read_session() as session:
            found = store.get(session, "DiagnosticReport", self.study_uid)
        assert found is not None
        return found.json()
