"""``dicom.on_conflict = "replace"`` end to end, through real associations: an image re-sent with
other content under its SOP Instance UID is judged again by the same model version, its study
result is amended, and everything is delivered again — the SR and summary image (new UIDs) to a
real DCMTK storescp, the amended study result to the HL7 route, the FHIR projection refreshed.
The same bytes again change nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from audit.store import verify_chain
from conf.settings import Hl7Destination
from dicom_node.sr import read_ai_sr
from hl7.results_channel import oru_input
from storage.models import FhirResource, InferenceResult, Instance, Job, JobState, StudyResult
from tests.conftest import copy_with_new_uids, sample, wait_until
from tests.dicom_node.test_query_retrieve import storescp
from tests.dicom_node.test_storage_scp import audit_events, send
from tests.inference.tiny_model import write_model_dir

DEAD_MLLP = {"name": "ehr", "host": "127.0.0.1", "port": 9, "receiving_application": "EHR", "receiving_facility": "HOSP"}
DEAD_DESTINATION = Hl7Destination.model_validate(DEAD_MLLP)


def _rows(gateway: Any, model: Any, *where: Any) -> list[Any]:
    with gateway.runtime.database.read_session() as session:
        return list(session.execute(select(model).where(*where).order_by(model.id)).scalars())


def _settled(gateway: Any, versions: int) -> bool:
    """The study has *versions* study result versions and no infer / study job is left to run."""
    busy = _rows(gateway, Job, Job.kind.in_(["infer", "study-result", "study-changed"]),
                 Job.state.in_([JobState.PENDING, JobState.RUNNING]))
    return not busy and len(_rows(gateway, StudyResult)) == versions


def _received_sops(directory: Path) -> dict[str, pydicom.Dataset]:
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in directory.iterdir() if p.is_file())
    }


def _brighter(ds: pydicom.Dataset) -> None:
    """Other pixel data (and a corrected attribute) under the same UIDs: a replacement."""
    pixels = ds.pixel_array.astype(np.uint16)
    ceiling = (1 << int(ds.BitsStored)) - 1
    ds.PixelData = np.clip(pixels.astype(np.int64) * 3 // 2 + 200, 0, ceiling).astype(pixels.dtype).tobytes()
    ds.StudyDescription = "CHEST PA corrected"


@pytest.fixture
def replacing_gateway(gateway_factory: Any, tmp_path: Path) -> Any:
    def start(pacs_port: int, database_url: str | None = None) -> Any:
        return gateway_factory(
            database_url,
            sections={
                "inference": {"model_dir": str(write_model_dir(tmp_path / "model"))},
                "worker": {"poll_interval": 0.05},
                "results": {"study_stable_seconds": 0.3},
                "hl7": {"port": 0, "destinations": [DEAD_MLLP]},
            },
            on_conflict="replace",
            destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": pacs_port}],
        )
    return start


def test_replaced_image_is_judged_again_and_everything_is_delivered_again(
    replacing_gateway: Any, tmp_path: Path
) -> None:
    _replace_scenario(replacing_gateway, tmp_path, None)


@pytest.mark.postgres
def test_replace_on_postgresql(postgres_url: str, replacing_gateway: Any, tmp_path: Path) -> None:
    # postgres_url first: its schema must outlive the gateway (fixtures tear down in reverse)
    _replace_scenario(replacing_gateway, tmp_path, postgres_url)


def _replace_scenario(replacing_gateway: Any, tmp_path: Path, database_url: str | None) -> None:
    pacs = tmp_path / "pacs"
    sop_uid, study_uid = generate_uid(), generate_uid()
    original = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "v0", study_uid=study_uid, sop_uid=sop_uid)
    changed = copy_with_new_uids(original, tmp_path / "v1", study_uid=study_uid, sop_uid=sop_uid, mutate=_brighter)
    with storescp(pacs) as port:
        gateway = replacing_gateway(port, database_url)

        assert send(gateway, original) == [0]
        wait_until(lambda: _settled(gateway, 1) and len(_received_sops(pacs)) == 2, what="first result delivered")
        [first] = _rows(gateway, InferenceResult)
        first_objects = set(_received_sops(pacs))

        assert send(gateway, changed) == [0]  # same SOP Instance UID, other content: replaced
        wait_until(lambda: _settled(gateway, 2) and len(_received_sops(pacs)) == 4, what="second result delivered")

        # The same bytes again: a no-op. Success is answered after the ingest transaction
        # commits, so a job it queued would already show as pending here.
        assert send(gateway, changed) == [0]
        assert _settled(gateway, 2)

    # The same model version judged the new content; the first result stays as history.
    results = _rows(gateway, InferenceResult)
    assert [r.source_revision for r in results] == [0, 1]
    second = results[1]
    assert (second.model_id, second.model_version) == (first.model_id, first.model_version)
    assert second.status == "ok" and second.probability != first.probability  # it looked at the new pixels
    [instance] = _rows(gateway, Instance, Instance.sop_instance_uid == sop_uid)
    assert instance.revision == 1 and instance.sha256 != "" and len(_rows(gateway, Instance, Instance.origin == "received")) == 1
    stored = pydicom.dcmread(gateway.runtime.store.absolute(instance.path))
    assert np.array_equal(stored.pixel_array, pydicom.dcmread(changed).pixel_array)

    # New SR and summary image (new UIDs), about the same source, delivered to the PACS.
    received = _received_sops(pacs)
    new_objects = set(received) - first_objects
    assert len(first_objects) == 2 and len(new_objects) == 2
    generated = {r.sop_instance_uid for r in _rows(gateway, Instance, Instance.origin == "generated")}
    assert generated == set(received)
    [new_sr_uid] = [uid for uid in new_objects if received[uid].Modality == "SR"]
    new_sr = read_ai_sr(pydicom.dcmread(next(p for p in pacs.iterdir() if _sop(p) == new_sr_uid)))
    [finding] = new_sr.findings
    assert finding.source_sop_instance_uid == sop_uid
    assert finding.probability_percent == pytest.approx(100 * (second.probability or 0), abs=1e-3)

    # The study result was re-derived from the new result and fanned out again (HL7 route).
    v1, v2 = _rows(gateway, StudyResult)
    assert (v1.status, v2.status, v2.version) == ("final", "amended", 2)
    assert v1.deciding_result_pk == first.id and v2.deciding_result_pk == second.id
    subjects = {j.payload["subject"] for j in _rows(gateway, Job, Job.kind == "deliver")
                if j.payload["channel"] == "hl7"}
    assert subjects == {f"study-result/{v1.id}", f"study-result/{v2.id}"}

    # FHIR: the DiagnosticReport now describes the amended result.
    [report] = _rows(gateway, FhirResource, FhirResource.resource_type == "DiagnosticReport")
    content = json.loads(report.content)
    assert content["status"] == "amended"
    # ... from the image's current revision only: one Observation, the new SR (the first is history).
    assert len(content["result"]) == 1
    assert [form["url"] for form in content["presentedForm"] if "Binary/" in form.get("url", "")] == [
        f"Binary/{new_sr_uid}"]
    with gateway.runtime.database.read_session() as session:
        v2_oru = oru_input(session, v2.id, DEAD_DESTINATION, gateway.runtime.settings.hl7)
        v1_oru = oru_input(session, v1.id, DEAD_DESTINATION, gateway.runtime.settings.hl7)
    first_sr_uid = next(uid for uid in first_objects if received[uid].Modality == "SR")
    assert (v1_oru.sr_sop_instance_uids, v2_oru.sr_sop_instance_uids) == ((first_sr_uid,), (new_sr_uid,))

    # Audited: stored, replaced (Action U), then the no-op duplicate.
    actions = [e["action"] for e in audit_events(gateway, "110104") if e["participants"]
               and any(p["user_id"] == "TESTSCU" for p in e["participants"])]
    assert actions[:3] == ["C", "U", "R"]
    with gateway.runtime.database.read_session() as session:
        assert verify_chain(session).ok


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
