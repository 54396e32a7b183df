"""``pneumo`` as an operator uses it: a real child process, real DCMTK peers, real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.gateway.serve_process import ServeProcess, pneumo, write_config


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServeProcess]:
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var")
    server = ServeProcess(config, tmp_path / "serve.log").start()
    yield server
    server.kill()


def test_help_lists_every_command() -> None:
    entry_point = Path(sys.executable).with_name("pneumo")  # the installed console script
    result = subprocess.run([str(entry_point), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("serve", "instances", "audit"):
        assert command in result.stdout
    assert "==SUPPRESS==" not in result.stdout


def test_health_and_ready(served: ServeProcess) -> None:
    base = f"http://127.0.0.1:{served.http_port}"
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": True, "migrations": True, "dicom": True, "acceptors": True, "workers": True, "hl7": True, "disk": True
    }


def test_dcmtk_echo_and_store_then_list(served: ServeProcess, tmp_path: Path) -> None:
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "PNEUMO", "127.0.0.1", str(served.dicom_port)],
        capture_output=True, text=True, check=False,
    )
    assert echo.returncode == 0, echo.stderr

    files = {
        "uncompressed": copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in"),
        "j2k-lossless": copy_with_new_uids(sample("RG1_J2KR.dcm"), tmp_path / "in"),
        "ct": copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in"),
    }
    # -xv: propose JPEG 2000 lossless as well as uncompressed, so DCMTK sends the file as encoded.
    store = subprocess.run(
        [dcmtk("storescu"), "-xv", "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(served.dicom_port),
         *map(str, files.values())],
        capture_output=True, text=True, check=False,
    )
    assert store.returncode == 0, store.stderr

    listed = pneumo(served.config, "instances", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["sop_instance_uid"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert len(rows) == 3
    for path in files.values():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        row = rows[ds.SOPInstanceUID]
        assert row["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID
        assert row["sop_class_uid"] == ds.SOPClassUID
        assert row["study_instance_uid"] == ds.StudyInstanceUID
        assert row["series_instance_uid"] == ds.SeriesInstanceUID
        assert row["calling_ae"] == "STORESCU"
        assert row["job_state"] == "pending"
        assert (row["kind"], row["outcome"], row["reason"]) == ("image", "pending", None)  # workers are off
        assert row["size"] == Path(row["path"]).stat().st_size
        assert row["received_at"]


def test_dcmtk_unknown_ae_is_rejected(served: ServeProcess) -> None:
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "NOBODY", "-aec", "PNEUMO", "127.0.0.1", str(served.dicom_port)],
        capture_output=True, text=True, check=False,
    )
    assert echo.returncode != 0
    assert "Calling AE Title Not Recognized" in echo.stderr


def test_sigterm_is_graceful_and_audited(served: ServeProcess) -> None:
    assert served.terminate() == 0
    verify = pneumo(served.config, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["ok"] is True
    assert json.loads(verify.stdout)["records"] == 2  # application start + stop


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = pneumo(tmp_path / "absent.toml", "instances")
    assert result.returncode == 2
    assert "configuration file not found" in result.stderr
