"""OHIF (the open-source web viewer) loads our SR and shows the certainty on the source image.

Runs OHIF's own SR extension (``@ohif/extension-cornerstone-dicom-sr``) and ``@ohif/core`` from the
npm registry, versions pinned in ``tests/viewer/ohif/package-lock.json`` (``make ohif-deps``), headless
in Node (``tests/viewer/ohif/load_sr.cjs`` says exactly what is real and what is left out). Skipped
with the reason when Node or the installed packages are missing.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.ai_result import AiResult
from dicom_node.sr import build_ai_sr

OHIF_DIR = Path(__file__).parent / "ohif"
NODE = shutil.which("node")
INSTALLED = (OHIF_DIR / "node_modules" / "@ohif" / "extension-cornerstone-dicom-sr").is_dir()


def _node_requires_esm() -> bool:
    """@cornerstonejs/* are ES modules required from OHIF's UMD bundles: Node >= 20.17 (flag)."""
    if NODE is None:
        return False
    probe = subprocess.run([NODE, "--experimental-require-module", "-e", "0"], capture_output=True, check=False)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.skipif(NODE is None, reason="Node.js is not installed (apt-get install nodejs npm)"),
    pytest.mark.skipif(NODE is not None and not _node_requires_esm(),
                       reason="this Node cannot require ES modules (needs Node >= 20.17)"),
    pytest.mark.skipif(not INSTALLED, reason="OHIF packages not installed: run `make ohif-deps` (npm ci)"),
]


@pytest.fixture(scope="module")
def source_path() -> Path:
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "pydicom-data sample RG1_UNCR.dcm is missing"
    return Path(path)


def make_result(probability: float, cam: np.ndarray | None) -> AiResult:
    return AiResult(
        probability=probability, threshold=0.5, model_id="pneumo-densenet121", model_name="PneumoNet",
        model_version="1.2.0", manufacturer="Pneumo Gateway project",
        device_uid="2.25.123456789012345678901234567890", intended_use="Research use only.", cam=cam,
        completed_at=datetime.datetime(2026, 11, 28, 5, 0, tzinfo=datetime.UTC),
    )


def ohif_load(sr: Dataset, source_path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert NODE is not None
    return subprocess.run(
        [NODE, "--experimental-require-module", "--no-warnings", "load_sr.cjs", str(path), str(source_path)],
        cwd=OHIF_DIR, capture_output=True, text=True, timeout=120, check=False,
    )


def hot_cam() -> np.ndarray:
    cam = np.zeros((8, 8), dtype=np.float32)
    cam[2:5, 1:3] = 1.0  # rows 2-4, columns 1-2 of the 8x8 grid
    return cam


@pytest.mark.parametrize(("probability", "cam"), [(0.87, hot_cam()), (0.12, hot_cam()), (0.9, None)],
                         ids=["positive-attention-box", "negative-whole-image", "positive-no-map"])
def test_ohif_loads_sr_and_shows_the_certainty_on_the_image(
    source_path: Path, tmp_path: Path, probability: float, cam: np.ndarray | None
) -> None:
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    sr = build_ai_sr(source, make_result(probability, cam))
    run = ohif_load(sr, source_path, tmp_path)
    assert run.returncode == 0, run.stderr
    shown: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    assert shown["warnings"] == []
    (measurement,) = shown["measurements"]
    assert measurement["loaded"] is True
    assert measurement["referencedSOPInstanceUID"] == source.SOPInstanceUID
    expected = {"label": "Certainty of Finding", "value": f"{probability * 100:.2f} %"}
    assert measurement["labels"] == [expected]
    (annotation,) = shown["annotations"]
    assert annotation["toolName"] == "DICOMSRDisplay" and annotation["graphicType"] == "POLYLINE"
    assert annotation["labels"] == [expected]
    assert len(annotation["points"]) == 5  # a closed box on the source image


def test_without_spatial_coordinates_ohif_fails_as_reported(source_path: Path, tmp_path: Path) -> None:
    """The structure before the fix (certainty inferred from the IMAGE only) breaks OHIF's loader."""
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    sr = build_ai_sr(source, make_result(0.87, hot_cam()))
    group = sr.ContentSequence[-1].ContentSequence[0]
    (num,) = [item for item in group.ContentSequence if item.ValueType == "NUM"]
    (scoord,) = num.ContentSequence
    image = scoord.ContentSequence[0]  # the SELECTED FROM IMAGE reference, made INFERRED FROM
    image.RelationshipType = "INFERRED FROM"
    num.ContentSequence = [image]
    run = ohif_load(sr, source_path, tmp_path)
    assert run.returncode != 0
    assert "Cannot read properties of undefined (reading 'ReferencedSOPSequence')" in run.stderr
