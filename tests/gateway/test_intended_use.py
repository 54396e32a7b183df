"""Issue 11: with the shipped rules the bundled paediatric model does not analyse an adult's
radiograph — the reason reaches the result row, the audit trail and the study result (hence the
FHIR DiagnosticReport and the HL7 ORU) — while the shipped child example is analysed, with a
calibrated probability. ``pneumo infer`` applies the same rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from audit.models import AuditRecord
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from storage.models import InferenceResult, StudyResult
from tests.conftest import SHIPPED_AGE_RULES, copy_with_new_uids, sample, wait_until
from tests.dicom_node.test_storage_scp import send
from tests.gateway.serve_process import pneumo, write_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "paediatric-cxr-example.dcm"
AGE_REASON = "is above the model's intended age range of 1 to under 6 years (rule max_age_years)"

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "model.json").is_file(), reason="bundled model not exported")


def test_adult_not_analysed_child_analysed_with_shipped_rules(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(
        sections={"inference": SHIPPED_AGE_RULES, "worker": {"poll_interval": 0.05},
                  "results": {"study_stable_seconds": 0.2}},
    )
    adult = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in", study_uid=pydicom.uid.generate_uid())
    child = copy_with_new_uids(EXAMPLE, tmp_path / "in", study_uid=pydicom.uid.generate_uid())
    assert send(gateway, adult, child) == [0, 0]

    def studies() -> dict[str, StudyResult] | None:
        with gateway.runtime.database.read_session() as session:
            rows = {r.status: r for r in session.execute(select(StudyResult)).scalars()}
        return rows if len(rows) == 2 else None

    by_study = wait_until(studies, timeout=120, what="two study results")
    with gateway.runtime.database.read_session() as session:
        results = {r.status: r for r in session.execute(select(InferenceResult)).scalars()}
        events = [json.dumps(r.event) for r in session.execute(select(AuditRecord)).scalars()]

    refused = results["not-applicable"]
    assert refused.reason is not None and AGE_REASON in refused.reason and refused.probability is None
    assert any(AGE_REASON in e for e in events), "the age reason is audited"
    assert not any("1940" in e for e in events), "the birth date never reaches the audit trail"

    not_analysed = by_study["not-analysed"]
    assert (not_analysed.label, not_analysed.analysed, not_analysed.images) == (None, 0, 1)
    assert AGE_REASON in not_analysed.reasons[0]["reason"]

    analysed = results["ok"]
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    assert analysed.label == "PNEUMONIA" and analysed.threshold == pytest.approx(manifest.threshold)
    assert by_study["final"].label == "PNEUMONIA" and by_study["final"].analysed == 1


def test_pneumo_infer_refuses_the_adult_with_shipped_rules(tmp_path: Path) -> None:
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", inference_rules="")
    result = pneumo(config, "infer", str(sample("RG1_UNCR.dcm")), str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    adult, child = (json.loads(line) for line in result.stdout.splitlines())
    assert adult["applicable"] is False and AGE_REASON in adult["reason"] and adult["probability"] is None
    assert child["applicable"] is True and child["label"] == "PNEUMONIA"
    assert child["probability"] >= child["threshold"] == pytest.approx(load_manifest(BUNDLED_MODEL_DIR).threshold)
