"""Tests for the Secondary Capture summary image (heat map + banner)."""

from __future__ import annotations

import copy
import datetime
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.ai_result import AiResult
from dicom_node.summary_image import (
    NOT_FOR_DIAGNOSTIC_USE,
    SummaryImageError,
    banner_lines,
    blend_heat_map,
    build_summary_image,
    heat_alpha,
    jet,
    scale_activation,
)
from storage.uids import derive_uid

DCIODVFY = shutil.which("dciodvfy")
COMPLETED = datetime.datetime(2026, 11, 28, 5, 0, 0, tzinfo=datetime.UTC)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# The sample's Referring Physician "ward" is a one-component name; highdicom warns about it.
pytestmark = pytest.mark.filterwarnings('ignore:The string "ward" is unlikely')


@pytest.fixture(scope="module")
def source() -> Dataset:
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "pydicom-data sample RG1_UNCR.dcm is missing"
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def display(source: Dataset) -> npt.NDArray[np.float32]:
    """What the gateway hands over: MONOCHROME2, windowed to [0, 1], downsized (here 512 rows)."""
    pixels = source.pixel_array.astype(np.float32)
    low, high = np.percentile(pixels, [1.0, 99.0])
    scaled = np.clip((pixels - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)
    if source.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    rows = 512
    columns = round(source.Columns * rows / source.Rows)
    resized = Image.fromarray(scaled).resize((columns, rows), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def blob_cam() -> npt.NDArray[np.float32]:
    yy, xx = np.mgrid[0:16, 0:16]
    cam: npt.NDArray[np.float32] = np.exp(-((yy - 10.0) ** 2 + (xx - 5.0) ** 2) / 8.0).astype(np.float32)
    return cam


def make_result(**overrides: Any) -> AiResult:
    values: dict[str, Any] = {
        "probability": 0.8734,
        "threshold": 0.5,
        "model_id": "pneumo-densenet121",
        "model_name": "PneumoNet",
        "model_version": "1.2.0",
        "manufacturer": "Pneumo Gateway project",
        "device_uid": "2.25.123456789012345678901234567890",
        "intended_use": "Research use only.",
        "cam": blob_cam(),
        "completed_at": COMPLETED,
    }
    values.update(overrides)
    return AiResult(**values)


def dciodvfy_lines(path: Path) -> list[str]:
    assert DCIODVFY is not None
    completed = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (completed.stdout + completed.stderr).splitlines()
    print(f"dciodvfy {path.name}:", *lines, sep="\n  ")
    return lines


def image_part(sc: Dataset, display: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """The radiograph region (below the banner) of the SC's pixels."""
    pixels = sc.pixel_array
    return pixels[pixels.shape[0] - display.shape[0] :]


def colour_pixels(rgb: npt.NDArray[np.uint8]) -> int:
    channels = rgb.astype(np.int16)
    red_green = np.abs(channels[..., 0] - channels[..., 1]) > 8
    green_blue = np.abs(channels[..., 1] - channels[..., 2]) > 8
    return int(np.count_nonzero(red_green | green_blue))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"probability": 0.0}, {"probability": 1.0}, {"probability": 0.2, "cam": None}],
    ids=["positive", "zero", "one", "negative-no-cam"],
)
def test_summary_image_is_valid_secondary_capture(
    source: Dataset, display: npt.NDArray[np.float32], tmp_path: Path, overrides: dict[str, Any]
) -> None:
    result = make_result(**overrides)
    sc = build_summary_image(source, display, result)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == SECONDARY_CAPTURE
    assert (back.PhotometricInterpretation, back.SamplesPerPixel, back.BitsAllocated) == ("RGB", 3, 8)
    assert not back.file_meta.TransferSyntaxUID.is_compressed
    assert back.Columns == display.shape[1] and back.Rows > display.shape[0]
    if DCIODVFY is not None:
        errors = [line for line in dciodvfy_lines(path) if "Error" in line]
        assert errors == []


def test_summary_image_header(source: Dataset, display: npt.NDArray[np.float32]) -> None:
    result = make_result()
    sc = build_summary_image(source, display, result)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID == derive_uid(
        "sc-series", source.StudyInstanceUID, "pneumo-densenet121", "1.2.0"
    )
    assert sc.SOPInstanceUID == derive_uid("sc", source.SOPInstanceUID, "pneumo-densenet121", "1.2.0")
    copied = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID")
    for keyword in (*copied, "StudyDescription"):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.BurnedInAnnotation == "YES"
    assert "PneumoNet 1.2.0" in sc.DerivationDescription
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (equipment,) = sc.ContributingEquipmentSequence
    assert equipment.DeviceUID == result.device_uid
    assert equipment.SoftwareVersions == "1.2.0"
    assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    assert str(sc.DateOfSecondaryCapture) == "20261128"


def test_summary_image_is_deterministic(
    source: Dataset, display: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
    build_summary_image(source, display, make_result()).save_as(first, enforce_file_format=True)
    build_summary_image(source, display, make_result()).save_as(second, enforce_file_format=True)
    assert first.read_bytes() == second.read_bytes()
    other = build_summary_image(source, display, make_result(model_version="2.0.0"))
    assert other.SOPInstanceUID != pydicom.dcmread(first).SOPInstanceUID


def test_heat_map_only_for_positive_unless_asked(source: Dataset, display: npt.NDArray[np.float32]) -> None:
    positive = build_summary_image(source, display, make_result(probability=0.9))
    negative = build_summary_image(source, display, make_result(probability=0.1))
    forced = build_summary_image(source, display, make_result(probability=0.1), overlay_when_negative=True)
    assert colour_pixels(image_part(positive, display)) > 1000
    assert colour_pixels(image_part(negative, display)) == 0
    assert colour_pixels(image_part(forced, display)) > 1000
    # Below the activation floor the radiograph keeps its grey values.
    top_left = image_part(positive, display)[:40, -40:]
    assert colour_pixels(top_left) == 0


@pytest.mark.parametrize(
    ("intended_use", "warned"),
    [
        ("Research use only.", True),
        ("Research use only. NOT FOR DIAGNOSTIC USE.", True),
        ("CE-marked triage aid", False),
    ],
)
def test_banner_text(intended_use: str, warned: bool) -> None:
    lines = banner_lines(make_result(intended_use=intended_use), heat_map_drawn=True)
    text = " ".join(lines)
    assert text.startswith("AI: pneumonia 87.3% (POSITIVE at threshold 50.0%) \u2014 PneumoNet 1.2.0 \u2014 ")
    assert intended_use in text
    assert (NOT_FOR_DIAGNOSTIC_USE in text.upper()) is warned
    assert text.upper().count(NOT_FOR_DIAGNOSTIC_USE) <= 1
    negative = " ".join(banner_lines(make_result(probability=0.1234), heat_map_drawn=False))
    assert "12.3% (NEGATIVE at threshold 50.0%)" in negative


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((128,), dtype=np.float32), "2-D"),
        (np.zeros((128, 128), dtype=np.uint8), "floating"),
        (np.zeros((2048, 128), dtype=np.float32), "sides"),
        (np.zeros((32, 128), dtype=np.float32), "sides"),
        (np.full((128, 128), 1.5, dtype=np.float32), r"\[0, 1\]"),
        (np.full((128, 128), np.nan, dtype=np.float32), "finite"),
        ([[0.0]], "numpy"),
    ],
)
def test_display_image_is_validated(source: Dataset, image: Any, message: str) -> None:
    with pytest.raises(SummaryImageError, match=message):
        build_summary_image(source, image, make_result())


def test_activation_scaling_and_colour_map() -> None:
    assert not scale_activation(np.full((4, 4), 3.0, dtype=np.float32), (8, 8)).any()
    scaled = scale_activation(np.array([[0.0, 2.0]], dtype=np.float32), (4, 8))
    assert scaled.shape == (4, 8) and scaled.min() == 0.0 and scaled.max() == pytest.approx(1.0)
    colours = jet(np.array([0.0, 1.0], dtype=np.float32))
    assert colours[0].argmax() == 2 and colours[1].argmax() == 0  # blue at 0, red at 1


@pytest.mark.parametrize("side", [224, 1024])
def test_banner_fits_the_image(source: Dataset, side: int) -> None:
    """A 224 px summary used to be more than half banner (237 of 461 rows); now at most a third."""
    display = np.linspace(0.0, 1.0, side * side, dtype=np.float32).reshape(side, side)
    sc = build_summary_image(source, display, make_result())
    banner_rows = int(sc.Rows) - side
    assert 0 < banner_rows <= side // 3


def test_heat_map_has_no_hard_edge() -> None:
    """Opacity rises smoothly: a linear activation ramp gives no jump between neighbouring pixels."""
    ramp = np.tile(np.linspace(0.0, 1.0, 512, dtype=np.float32), (4, 1))
    alpha = heat_alpha(ramp)[0]
    assert alpha[0] == 0.0 and alpha[-1] == pytest.approx(0.5)
    assert float(np.max(np.abs(np.diff(alpha)))) < 0.004  # old blend jumped 0 -> 0.15 at 0.5
    blended = blend_heat_map(np.full((4, 512), 0.5, dtype=np.float32), ramp).astype(int)
    assert int(np.max(np.abs(np.diff(blended[0], axis=0)))) <= 3


@pytest.mark.parametrize(
    ("attributes", "syntax", "expected"),
    [
        ({"LossyImageCompression": "01", "LossyImageCompressionRatio": "15",
          "LossyImageCompressionMethod": "ISO_15444_1"}, None, ("01", "15", "ISO_15444_1")),
        ({}, "1.2.840.10008.1.2.4.50", ("01", None, "ISO_10918_1")),
        ({"LossyImageCompression": "00"}, None, None),
        ({}, None, None),
    ],
    ids=["jpeg2000-lossy-attribute", "jpeg-baseline-syntax", "lossless", "unknown"],
)
def test_lossy_compression_is_carried(
    source: Dataset, display: npt.NDArray[np.float32], attributes: dict[str, str], syntax: str | None,
    expected: tuple[str, str | None, str] | None,
) -> None:
    lossy = copy.deepcopy(source)
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        lossy.pop(keyword, None)
    for keyword, value in attributes.items():
        setattr(lossy, keyword, value)
    if syntax is not None:
        lossy.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    sc = build_summary_image(lossy, display, make_result())
    if expected is None:
        assert sc.get("LossyImageCompression") in (None, "00")
        return
    assert sc.LossyImageCompression == expected[0]
    assert (str(sc.LossyImageCompressionRatio) if "LossyImageCompressionRatio" in sc else None) == expected[1]
    assert sc.LossyImageCompressionMethod == expected[2]


@pytest.mark.parametrize("with_heat_map", [True, False])
def test_blend_is_the_reference_formula(with_heat_map: bool) -> None:
    """The in-place, per-channel blend gives exactly the pixels of the plain formula it replaced."""
    rng = np.random.default_rng(7)
    gray = rng.random((96, 130), dtype=np.float32)
    activation = scale_activation(rng.random((7, 7), dtype=np.float32), gray.shape) if with_heat_map else None
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if activation is not None:
        alpha = heat_alpha(activation)[..., None]
        rgb = (1.0 - alpha) * rgb + alpha * jet(activation)
    expected = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    assert np.array_equal(blend_heat_map(gray, activation), expected)
