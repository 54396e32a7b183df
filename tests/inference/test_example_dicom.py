"""The example-DICOM tool and the shipped example: valid CR (dciodvfy), inside the intended use,
attributed; the adult sample is refused by the same pipeline (issue 11)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from inference.applicability import SiteRules
from inference.engine import EngineOptions, InferenceEngine
from inference.example_dicom import KERMANY_ATTRIBUTION, main, wrap_radiograph
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from inference.pipeline import classify_file
from tests.conftest import dcmtk

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "paediatric-cxr-example.dcm"


def _dciodvfy(path: Path) -> str:
    result = subprocess.run([dcmtk("dciodvfy"), str(path)], capture_output=True, text=True, check=False, timeout=60)
    return result.stdout + result.stderr


def test_tool_writes_a_valid_attributed_cr_of_a_child(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(np.tile(np.arange(224, dtype=np.uint8), (224, 1))).save(source)
    out = tmp_path / "out" / "example.dcm"
    assert main([str(source), str(out), "--age", "018M", "--sex", "M"]) == 0
    report = _dciodvfy(out)
    assert "Error" not in report and "Warning" not in report, report
    ds = pydicom.dcmread(out)
    assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge, ds.PatientSex) == ("CR", "CHEST", "AP", "018M", "M")
    assert ds.ImageComments == KERMANY_ATTRIBUTION and "CC BY 4.0" in ds.ImageComments
    assert ds.PatientIdentityRemoved == "YES"
    assert np.array_equal(ds.pixel_array, np.tile(np.arange(224, dtype=np.uint8), (224, 1)))


@pytest.mark.parametrize(("bits", "top"), [(8, 255), (12, 4095), (16, 65535)])
def test_wrap_bit_depths(bits: int, top: int) -> None:
    pixels = np.array([[0, top], [top, 0]], dtype=np.uint16 if bits > 8 else np.uint8)
    ds = wrap_radiograph(pixels, bits_stored=bits, patient_age=None)
    assert ds.BitsStored == bits and ds.BitsAllocated == (8 if bits == 8 else 16)
    assert ds.PatientAge == "" and ds.PatientBirthDate == ""
    assert ds.pixel_array.max() == top
    with pytest.raises(ValueError, match="pixel values"):
        wrap_radiograph(pixels.astype(np.int32) + 1, bits_stored=bits)


def test_shipped_example_is_valid_and_attributed() -> None:
    report = _dciodvfy(EXAMPLE)
    assert "Error" not in report and "Warning" not in report, report
    ds = pydicom.dcmread(EXAMPLE, stop_before_pixels=True)
    assert ds.PatientAge == "003Y" and "CC BY 4.0" in ds.ImageComments
    assert EXAMPLE.stat().st_size < 64 * 1024


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "model.json").is_file(), reason="bundled model not exported")
def test_bundled_model_analyses_the_child_and_refuses_the_adult() -> None:
    with InferenceEngine(load_manifest(BUNDLED_MODEL_DIR), EngineOptions(max_batch=1, allow_cuda=False)) as engine:
        child = classify_file(EXAMPLE, engine)  # no rules given: exactly the model's intended use
        adult = classify_file(str(get_testdata_file("RG1_UNCR.dcm")), engine)
        widened = classify_file(
            str(get_testdata_file("RG1_UNCR.dcm")), engine, SiteRules(min_age_years=0, max_age_years=150)
        )
    assert child.applicable and child.prediction is not None
    assert child.prediction.label == "PNEUMONIA"  # a viral pneumonia from the validation split
    assert child.prediction.probability >= child.prediction.threshold
    assert not adult.applicable and adult.prediction is None
    assert adult.reason is not None and "above the model's intended age range of 1 to under 6 years" in adult.reason
    assert widened.applicable and widened.prediction is not None
