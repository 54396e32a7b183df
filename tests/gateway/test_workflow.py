"""The whole loop inside one gateway: C-STORE -> infer job -> result row -> SR + SC -> outbox.

Runs with the small contract-honouring test model (fast, outputs computable with numpy) and
once with the bundled EfficientNet-B0, the model hospitals actually get.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from sqlalchemy import func, select

from audit.models import AuditRecord
from audit.store import verify_chain
from dicom_node.sr import read_ai_sr
from gateway.cli import cmd_studies
from inference.manifest import BUNDLED_MODEL_DIR
from storage.models import InferenceResult, Instance, Job, JobState, StudyResult
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
    assert job.state == JobState.DONE, job.last_error  # SR first, then the summary, one job
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
    assert len(deliveries) == 2 and {(d.payload["channel"], d.payload["destination"]) for d in deliveries} == {("dicom", "pacs")}
    assert [p.event["action"] for p in processing] == ["C", "C"]  # SR, then the summary image
    assert result.cam is not None and len(result.cam) == 7
    # The model input's intensity statistics, for drift monitoring (inference/input_stats.py).
    assert result.input_stats is not None and set(result.input_stats) == {"mean", "std", "dark_fraction", "bright_fraction"}
    assert all(0.0 <= v <= 1.0 for v in result.input_stats.values()) and result.input_stats["std"] > 0

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
    assert result.probability is None and generated == 0 and result.input_stats is None


def test_rerun_of_a_job_never_makes_a_second_report(gateway_factory: Any, tmp_path: Path, tiny_model: Path) -> None:
    gateway = _start(gateway_factory, tiny_model)
    assert send(gateway, copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")) == [0]
    wait_for_jobs(gateway, "infer", 1)

    def generated_uids() -> set[str]:
        with gateway.runtime.database.read_session() as session:
            return set(session.execute(select(Instance.sop_instance_uid).where(Instance.origin == "generated")).scalars())

    first = generated_uids()
    # As if the worker had died after placing its files but before committing: the files stay,
    # the rows of that transaction never existed, the job is pending again.
    with gateway.runtime.database.session() as session:
        session.query(Job).filter(Job.kind == "deliver").delete()
        session.query(InferenceResult).delete()
        session.query(Instance).filter(Instance.origin == "generated").delete()
        session.query(Job).filter(Job.kind == "infer").update({"state": JobState.PENDING})
    gateway.workers.wake_inferers()
    wait_for_jobs(gateway, "infer", 1)
    assert generated_uids() == first  # the same SR and SC UIDs, rebuilt in place
    with gateway.runtime.database.read_session() as session:
        assert session.execute(select(func.count()).select_from(InferenceResult)).scalar_one() == 1
    stored = gateway.runtime.store.root.rglob("*.dcm")
    files = [p for p in stored if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID in first]
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


def _study_results(gateway: Any) -> list[StudyResult]:
    with gateway.runtime.database.read_session() as session:
        return list(session.execute(select(StudyResult).order_by(StudyResult.version)).scalars())


def _wait_for_versions(gateway: Any, count: int, timeout: float = 60.0) -> list[StudyResult]:
    deadline = time.monotonic() + timeout
    while len(rows := _study_results(gateway)) < count:
        assert time.monotonic() < deadline, f"{len(rows)} study result version(s), expected {count}"
        time.sleep(0.05)
    return rows


def _lateral(ds: pydicom.Dataset) -> None:
    ds.ViewPosition = "LL"


def test_study_result_two_frontal_one_lateral_then_a_late_image_amends(
    gateway_factory: Any, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = gateway_factory(
        sections={"inference": {"model_dir": str(tiny_model)}, "worker": {"poll_interval": 0.05},
                  "results": {"study_stable_seconds": 0.5}},
        destinations=[DESTINATION],
    )
    study_uid = pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    rg1 = sample("RG1_UNCR.dcm")
    first = [
        copy_with_new_uids(rg1, tmp_path / "in", study_uid=study_uid, series_uid=series_uid),
        copy_with_new_uids(rg1, tmp_path / "in", study_uid=study_uid, series_uid=series_uid),
        copy_with_new_uids(rg1, tmp_path / "in", study_uid=study_uid, mutate=_lateral),
    ]
    assert send(gateway, *first) == [0, 0, 0]
    [v1] = _wait_for_versions(gateway, 1)
    with gateway.runtime.database.read_session() as session:
        results = session.execute(select(InferenceResult).order_by(InferenceResult.id)).scalars().all()
        generated = session.execute(select(Instance).where(Instance.origin == "generated")).scalars().all()
    ok = [r for r in results if r.status == "ok"]
    assert len(results) == 3 and len(ok) == 2
    best = max(ok, key=lambda r: r.probability or 0.0)
    assert (v1.version, v1.status, v1.images, v1.analysed) == (1, "final", 3, 2)
    assert v1.probability == best.probability and v1.label == best.label and v1.deciding_result_pk == best.id
    assert [r["images"] for r in v1.reasons] == [1] and "not applicable" in v1.reasons[0]["reason"]

    # Every SR and summary image has its own Instance Number in its series (viewers show them all).
    stored = [pydicom.dcmread(gateway.runtime.store.absolute(g.path), stop_before_pixels=True) for g in generated]
    by_series: dict[str, list[int]] = {}
    for ds in stored:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(int(ds.InstanceNumber))
    assert len(by_series) == 2 and all(sorted(numbers) == [1, 2] for numbers in by_series.values())

    time.sleep(1.0)  # quiet: no second version without a new image
    assert len(_study_results(gateway)) == 1

    assert send(gateway, copy_with_new_uids(rg1, tmp_path / "late", study_uid=study_uid, series_uid=series_uid)) == [0]
    v1_again, v2 = _wait_for_versions(gateway, 2)
    assert (v2.version, v2.status, v2.images, v2.analysed) == (2, "amended", 4, 3)
    assert v1_again.status == "final"  # what the EHR was told first is kept

    capsys.readouterr()
    with structlog.testing.capture_logs():  # the command's log lines go to stderr in `pneumo`, not into its JSON
        assert cmd_studies(argparse.Namespace(json=True, config=None), gateway.runtime.settings) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {k: row[k] for k in ("study_instance_uid", "status", "label", "images", "analysed", "version")} == {
        "study_instance_uid": study_uid, "status": "amended", "label": v2.label, "images": 4, "analysed": 3, "version": 2,
    }
    assert row["probability"] == pytest.approx(v2.probability, abs=1e-6) and row["reasons"] == v2.reasons


def test_study_with_nothing_applicable_is_not_analysed_with_reasons(
    gateway_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    gateway = gateway_factory(
        sections={"inference": {"model_dir": str(tiny_model)}, "worker": {"poll_interval": 0.05},
                  "results": {"study_stable_seconds": 0.2}},
    )
    study_uid = pydicom.uid.generate_uid()
    assert send(gateway, copy_with_new_uids(sample("RG3_UNCR.dcm"), tmp_path / "in", study_uid=study_uid)) == [0]
    [result] = _wait_for_versions(gateway, 1)
    assert (result.status, result.label, result.probability, result.analysed, result.images) == (
        "not-analysed", None, None, 0, 1)
    assert "EXTREMITY" in result.reasons[0]["reason"].upper()
