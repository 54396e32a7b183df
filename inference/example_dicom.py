"""Wrap a grayscale radiograph (e.g. one Kermany training JPEG) as a CR DICOM of a child.

Why it exists: the README walk-through needs an image *inside* the model's intended use (a frontal
chest radiograph of a child aged 1-5 years). The pydicom sample radiograph (RG1) is an adult's,
which the gateway rightly refuses. This tool makes a realistic example from the public training
data (Kermany et al. 2018, CC BY 4.0) with **synthetic** demographics, and keeps the licence
attribution inside the file (Image Comments, Derivation Description, De-identification Method) so
a copy that travels keeps it too. The evaluation scripts use the same wrapper, so they go through
exactly the DICOM path a PACS's image would.

The file is a CR Image (PS3.3 A.2): Patient, General Study, General Series, CR Series (Body Part
Examined CHEST, View Position AP — the Kermany images are anterior-posterior), General Equipment,
General Image, Image Pixel (MONOCHROME2), CR Image, VOI LUT (a window that maps the stored values
linearly onto the display range, as the training images were displayed) and SOP Common.

Usage::

    python -m inference.example_dicom SOURCE.jpeg OUT.dcm [--age 003Y] [--sex F]
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
KERMANY_ATTRIBUTION = (
    "Image from Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest "
    "X-Ray Images for Classification. Mendeley Data, V2, 2018. doi:10.17632/rscbjbr9sj.2. "
    "Licence CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Resized to 224x224 and "
    "wrapped as DICOM by Pneumo Gateway; demographics are synthetic."
)
#: Synthetic, obviously non-real demographics (PS3.3 C.7.1.1 Patient module, all type 2).
EXAMPLE_PATIENT_NAME = "EXAMPLE^PAEDIATRIC^CXR"
EXAMPLE_PATIENT_ID = "PNEUMO-EXAMPLE-0001"


def _age_years(age: str) -> int:
    """Whole years of a Patient's Age string for the synthetic birth date (``003Y`` -> 3)."""
    value, unit = int(age[:3]), age[3:]
    return {"Y": value, "M": value // 12, "W": value // 52, "D": value // 365}[unit]


def wrap_radiograph(
    pixels: npt.NDArray[np.integer],
    *,
    bits_stored: int = 8,
    patient_age: str | None = "003Y",
    patient_sex: str = "O",
    study_date: dt.date = dt.date(2026, 1, 15),
    view_position: str = "AP",
    window: bool = True,
    comments: str = KERMANY_ATTRIBUTION,
) -> Dataset:
    """A CR DICOM data set (Explicit VR Little Endian, uncompressed) holding *pixels*.

    *pixels*: a 2-D array of MONOCHROME2 stored values in ``[0, 2**bits_stored)`` (white = dense).
    ``bits_stored`` 8 gives 8-bit pixels; up to 16 gives 16-bit allocated pixels.
    ``window``: write a VOI window mapping the stored range linearly onto the display (False leaves
    the viewer — and the gateway's percentile window — to choose). ``patient_age`` None leaves
    Patient's Age and Birth Date empty (age unknown). New UIDs every call.
    """
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be a 2-D grayscale image, got shape {pixels.shape}")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must lie in [1, 16], got {bits_stored}")
    top = (1 << bits_stored) - 1
    if int(pixels.min()) < 0 or int(pixels.max()) > top:
        raise ValueError(f"pixel values must lie in [0, {top}] for {bits_stored} bits stored")
    allocated = 8 if bits_stored <= 8 else 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = dt.date.today().strftime("%Y%m%d")
    # Patient (synthetic; the image itself comes from a de-identified public data set).
    ds.PatientName = EXAMPLE_PATIENT_NAME
    ds.PatientID = EXAMPLE_PATIENT_ID
    ds.PatientSex = patient_sex
    if patient_age is None:
        ds.PatientAge, ds.PatientBirthDate = "", ""
    else:
        ds.PatientAge = patient_age
        years = _age_years(patient_age)
        birth = study_date.replace(year=study_date.year - years) - dt.timedelta(days=30)
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Kermany et al. 2018 public data set; synthetic demographics"
    # General Study / Series / Equipment / Image.
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "EXAMPLE0001", "", "1"
    ds.StudyDescription = "XR CHEST 1 VIEW (example)"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CR", 1, 1
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", view_position, ""
    ds.Manufacturer = "Pneumo Gateway example generator"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "Kermany et al. 2018 chest X-ray (CC BY 4.0), resized to 224x224"
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = comments
    # Image Pixel (PS3.3 C.7.6.3).
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits_stored, bits_stored - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = (top + 1) / 2.0, float(top + 1)
    dtype = np.uint8 if allocated == 8 else np.dtype("<u2")
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    return ds


def load_grayscale(path: Path) -> npt.NDArray[np.uint8]:
    """A JPEG/PNG as 8-bit grayscale (the conversion training used: PIL ``L``)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="grayscale image (e.g. a Kermany training JPEG)")
    parser.add_argument("out", type=Path, help="DICOM file to write")
    parser.add_argument("--age", default="003Y", help="Patient's Age (AS, e.g. 003Y, 018M); default 003Y")
    parser.add_argument("--sex", default="O", choices=["M", "F", "O"], help="Patient's Sex; default O")
    args = parser.parse_args(argv)
    ds = wrap_radiograph(load_grayscale(args.source), patient_age=args.age, patient_sex=args.sex)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(args.out, enforce_file_format=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
