"""The whole loop inside one gateway: C-STORE -> infer job -> result row -> SR + SC -> outbox.

Runs with the small contract-honouring test model (fast, outputs computable with numpy) and
once with the bundled EfficientNet-B0, the model hospitals actually get.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select

from audit.models import AuditRecord
from audit.store import verify_chain
from dicom_node.sr import read_ai_sr
from inference.manifest import BUNDLED_MODEL_DIR
from storage.models import InferenceResult, Instance, Job, JobState
from tests.conftest import copy_with_new_uids, sample
from tests.dicom_node.test_storage_scp import send
from tests.inference.tiny_model import write_model_dir

DESTINATION = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}  # nothing listens: stays queued


def wait_for_jobs(gateway: Any, kind: str, count: int, timeout: float = 60.0) -> list[Job]:
    """Poll (with a deadline) until *count* jobs of *kind* are done or dead-lettered."""
    deadline = time.monotonic() + timeout
    while True:
        with gateway.runtime.database.read_session() as session:
            finished = session.execute(
                select(Job).where(Job.kind == kind, Job.state.in_([JobState.DONE, JobState.FAILED]))
            ).scalars().all()
        if len(finished) >= count or time.monotonic() > deadline:
            return list(finished)
        time.sleep(0.05)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model")


def _start(gateway_factory: Any, model_dir: Path, **dicom: Any) -> Any:
    return gateway_factory(
        sections={"inference": {"model_dir": str(model_dir)}, "worker": {"poll_interval": 0.1}}, **dicom
    )


def test_chest_radiograph_gets_result_sr_sc_and_deliveries(gateway_factory: Any, tmp_path: Path, tiny_model: Path) -> None:
    gateway = _start(gateway_factory, tiny_model, destinations=[DESTINATION])
    source_path = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    assert send(gateway, source_path) == [0]

    [job] = wait_for_jobs(gateway, "infer", 1)
    assert job.state == JobState.DONE, job.last_error
    [summary] = wait_for_jobs(gateway, "summary", 1)
    assert summary.state == JobState.DONE, summary.last_error
    with gateway.runtime.database.read_session() as session:
        result = session.execute(select(InferenceResult)).scalar_one()
        generated = session.execute(select(Instance).where(Instance.origin == "generated")).scalars().all()
        deliveries = session.execute(select(Job).where(Job.kind == "deliver")).scalars().all()
        processing = session.execute(select(AuditRecord).where(AuditRecord.event_id == "110103")).scalars().all()
        assert verify_chain(session).ok
    assert result.status == "ok" and 0.0 <= (result.probability or -1) <= 1.0
    assert result.label in ("PNEUMONIA", "NORMAL") and result.model_id == "tiny-contract-test"
    assert {"decode", "preprocess", "infer"} <= set(result.timings_ms)
    assert len(generated) == 2 and result.sr_instance_pk and result.sc_instance_pk
    assert len(deliveries) == 2 and {d.payload["destination"] for d in deliveries} == {"pacs"}
    assert [p.event["action"] for p in processing] == ["C", "C"]  # SR, then the summary image
    assert result.cam is not None and len(result.cam) == 7

    sr_row = next(g for g in generated if g.id == result.sr_instance_pk)
    sr = pydicom.dcmread(gateway.runtime.store.absolute(sr_row.path))
    content = read_ai_sr(sr)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    [finding] = content.findings
    assert finding.source_sop_instance_uid == source.SOPInstanceUID
    assert finding.probability_percent == pytest.approx(100 * (result.probability or 0), abs=0.01)
    assert finding.present == (result.label == "PNEUMONIA")


@pytest.mark.parametrize(("name", "reason"), [("CT_small.dcm", "modality"), ("RG3_UNCR.dcm", "EXTREMITY")])
def test_other_images_are_stored_and_marked_not_applicable(
    gateway_factory: Any, tmp_path: Path, tiny_model: Path, name: str, reason: str
) -> None:
    gateway = _start(gateway_factory, tiny_model)
    assert send(gateway, copy_with_new_uids(sample(name), tmp_path / "in")) == [0]
    [job] = wait_for_jobs(gateway, "infer", 1)
    assert job.state == JobState.DONE
    with gateway.runtime.database.read_session() as session:
        result = session.execute(select(InferenceResult)).scalar_one()
        generated = session.execute(select(func.count()).select_from(Instance).where(Instance.origin == "generated")).scalar_one()
    assert result.status == "not-applicable" and reason.lower() in (result.reason or "").lower()
    assert result.probability is None and generated == 0


def test_rerun_of_a_job_never_makes_a_second_report(gateway_factory: Any, tmp_path: Path, tiny_model: Path) -> None:
    gateway = _start(gateway_factory, tiny_model)
    assert send(gateway, copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")) == [0]
    wait_for_jobs(gateway, "infer", 1)
    wait_for_jobs(gateway, "summary", 1)

    def generated_uids() -> set[str]:
        with gateway.runtime.database.read_session() as session:
            return set(session.execute(select(Instance.sop_instance_uid).where(Instance.origin == "generated")).scalars())

    first = generated_uids()
    # As if the worker had died after placing its files but before committing: the files stay,
    # the rows of that transaction never existed, the job is pending again.
    with gateway.runtime.database.session() as session:
        session.query(Job).filter(Job.kind.in_(["summary", "deliver"])).delete()
        session.query(InferenceResult).delete()
        session.query(Instance).filter(Instance.origin == "generated").delete()
        session.query(Job).filter(Job.kind == "infer").update({"state": JobState.PENDING})
    gateway.workers.wake_inferers()
    wait_for_jobs(gateway, "infer", 1)
    wait_for_jobs(gateway, "summary", 1)
    assert generated_uids() == first  # the same SR and SC UIDs, rebuilt in place
    with gateway.runtime.database.read_session() as session:
        assert session.execute(select(func.count()).select_from(InferenceResult)).scalar_one() == 1
    files = [p for p in gateway.runtime.store.root.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID in first]
    assert len(files) == 2


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "model.json").is_file(), reason="bundled model not exported yet")
def test_bundled_model_end_to_end(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(sections={"worker": {"poll_interval": 0.1}})
    assert send(gateway, copy_with_new_uids(sample("RG1_J2KR.dcm"), tmp_path / "in")) == [0]
    [job] = wait_for_jobs(gateway, "infer", 1, timeout=120)
    assert job.state == JobState.DONE, job.last_error
    with gateway.runtime.database.read_session() as session:
        result = session.execute(select(InferenceResult)).scalar_one()
    assert result.status == "ok" and result.model_id == "pneumo-effnetb0-kermany"
    assert 0.0 <= (result.probability or -1) <= 1.0
