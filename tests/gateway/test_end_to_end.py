"""The first end-to-end loop against real peers: a PACS sends radiographs, the reports arrive
at real receiving PACSes (Orthanc, DCMTK storescp) — exactly once, even across a SIGKILL while
the PACS is down — and what arrives passes dciodvfy and dsrdump."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from inference.manifest import BUNDLED_MODEL_DIR
from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.dicom_peers import Orthanc, StoreScp, free_port
from tests.gateway.serve_process import ServeProcess, pneumo, write_config
from tests.inference.tiny_model import write_model_dir

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _model(tmp_path: Path) -> Path:
    """The bundled model when it has been exported, else the small contract test model."""
    return BUNDLED_MODEL_DIR if (BUNDLED_MODEL_DIR / "model.json").is_file() else write_model_dir(tmp_path / "model")


def _config(tmp_path: Path, destinations: list[tuple[str, str, int]]) -> Path:
    extra = [
        "threads = 1",
        "poll_interval = 0.1",
        "[delivery]",
        "backoff_base_seconds = 0.2",
        "backoff_cap_seconds = 1.0",
        "max_attempts = 100",
        "[inference]",
        f'model_dir = "{_model(tmp_path)}"',
        "[results]",
        "study_stable_seconds = 0.5",
    ]
    for name, ae, port in destinations:
        extra += ["[[dicom.destinations]]", f'name = "{name}"', f'ae_title = "{ae}"', 'host = "127.0.0.1"', f"port = {port}"]
    return write_config(tmp_path / "pneumo.toml", tmp_path / "var", workers=True, extra="\n".join(extra))


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _storescu(port: int, files: list[Path]) -> None:
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr


def _deliveries(config: Path) -> list[dict[str, object]]:
    listed = pneumo(config, "deliveries", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines()]


def _studies(config: Path) -> list[dict[str, object]]:
    listed = pneumo(config, "studies", "--json")
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines()]


def test_reports_reach_orthanc_and_storescp_and_validate(tmp_path: Path) -> None:
    with Orthanc(tmp_path / "orthanc") as orthanc, StoreScp(tmp_path / "storescp" / "in") as storescp:
        config = _config(tmp_path, [("orthanc", "ORTHANC", orthanc.dicom_port), ("viewer", "STORESCP", storescp.port)])
        server = ServeProcess(config, tmp_path / "serve.log").start()
        try:
            chest = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")
            _storescu(server.dicom_port, [chest, copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")])
            _wait(lambda: len(orthanc.instances()) == 2 and len(storescp.received()) == 2, 120, "SR + SC at both PACSes")
        finally:
            server.terminate()

        study = pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances()} == {
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in storescp.received()
        }
        [sr_path] = [p for p in storescp.received() if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == SR_CLASS]
        assert pydicom.dcmread(sr_path, stop_before_pixels=True).StudyInstanceUID == study
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, check=False)
            errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
            assert errors == [], errors
        dump = subprocess.run([dcmtk("dsrdump"), str(sr_path)], capture_output=True, text=True, check=False)
        assert dump.returncode == 0 and "Pneumonia" in dump.stdout and "Certainty of Finding" in dump.stdout


def test_pacs_down_and_gateway_killed_still_exactly_once(tmp_path: Path) -> None:
    orthanc_port = free_port()
    config = _config(tmp_path, [("orthanc", "ORTHANC", orthanc_port)])
    radiographs = [copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in") for _ in range(3)]

    server = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        _storescu(server.dicom_port, radiographs)
        # Reports exist, the PACS is down: deliveries fail and back off.
        _wait(lambda: sum(1 for d in _deliveries(config) if int(d["attempts"]) >= 1) == 6, 120, "failed attempts")  # type: ignore[call-overload]
    finally:
        server.kill()  # SIGKILL: no graceful shutdown

    with Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port) as orthanc:
        restarted = ServeProcess(config, tmp_path / "serve.log").start()
        try:
            _wait(lambda: all(d["state"] == "done" for d in _deliveries(config)), 120, "all deliveries done")
            _wait(lambda: all(s["status"] == "final" for s in _studies(config)), 60, "study results")
        finally:
            restarted.terminate()
        uids = orthanc.sop_instance_uids()
    assert len(uids) == 6 and len(set(uids)) == 6  # 3 SR + 3 SC, none twice
    assert all(d["state"] == "done" for d in _deliveries(config))
    studies = _studies(config)  # one study result per radiograph's study, each made once
    assert len(studies) == 3 and all((s["images"], s["analysed"], s["version"]) == (1, 1, 1) for s in studies)
    assert {s["label"] for s in studies} <= {"PNEUMONIA", "NORMAL"}
    verify = pneumo(config, "audit", "verify")
    assert json.loads(verify.stdout)["ok"] is True
