"""Train/serve parity: a training image wrapped as a DICOM CR gets the same probability through
the DICOM pipeline as the raw JPEG/255 tensor the model was trained on. Catches any skew between
``inference.training.data`` and ``inference.preprocess`` (orientation, scaling, resizing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.engine import EngineOptions, InferenceEngine
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from inference.pipeline import classify_dataset

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "kermany-cxr-224" / "train"
IMAGES = [
    "NORMAL/IM-0115-0001.jpeg",
    "NORMAL/IM-0117-0001.jpeg",
    "PNEUMONIA/person1_bacteria_1.jpeg",
    "PNEUMONIA/person1_bacteria_2.jpeg",
]

pytestmark = [
    pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "model.json").is_file(), reason="bundled model not exported"),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"training data not found at {DATA}"),
]


def as_cr(pixels: np.ndarray) -> Dataset:
    """An 8-bit MONOCHROME2 CR chest PA whose VOI window maps stored values linearly to display."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientAge = "003Y"  # the Kermany children are 1-5 years old: inside the model's intended use
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 127.5, 256
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


@pytest.mark.parametrize("name", IMAGES)
def test_dicom_path_matches_training_tensor(name: str) -> None:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{name} not in the data set")
    pixels = np.asarray(Image.open(path).convert("L"))
    with InferenceEngine(load_manifest(BUNDLED_MODEL_DIR), EngineOptions(max_batch=1)) as engine:
        direct = engine.predict(pixels.astype(np.float32) / 255.0)
        outcome = classify_dataset(as_cr(pixels), engine)
    assert outcome.applicable and outcome.prediction is not None
    assert outcome.prediction.probability == pytest.approx(direct.probability, abs=0.02)
    assert outcome.prediction.label == direct.label or abs(direct.probability - direct.threshold) < 0.02
