"""Shared by the post-training evaluations (calibrate, evaluate_shift): the validation split and
running the shipped ONNX model on DICOM data sets through the real runtime path.

Why through DICOM: the figures must describe what the gateway does, so every image is wrapped as
a CR DICOM (:func:`inference.example_dicom.wrap_radiograph`), decoded and preprocessed by
:func:`inference.preprocess.preprocess` — the worker's code — and classified by
:class:`~inference.engine.InferenceEngine` on the verified model package. Only the applicability
check is skipped (the evaluation is about the network, and the wrapped images are in scope).

The validation split is re-created exactly as training made it (``inference.training.data``:
de-duplicate by sha256, patient-wise label-stratified split with the seed and fraction recorded in
``model.json``), so no training image leaks into these figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from inference.engine import EngineOptions, InferenceEngine
from inference.example_dicom import load_grayscale
from inference.manifest import ModelManifest
from inference.preprocess import preprocess
from inference.training.data import Record, deduplicate, patient_split, read_manifest

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "kermany-cxr-224"
VAL_FRACTION = 0.15


@dataclass(frozen=True)
class ValidationSet:
    """The validation records and their labels/patients (arrays aligned with ``records``)."""

    records: list[Record]
    labels: npt.NDArray[np.int64]
    patients: list[str]
    description: str


def validation_set(manifest: ModelManifest, data_root: Path, *, limit: int | None = None, seed: int = 0) -> ValidationSet:
    """The patient-wise validation split of *manifest*'s training run.

    The split's seed is ``training.split_seed`` (a model trained with one seed on another seed's
    split records both), else ``training.seed``: re-creating the split from the training seed
    alone would validate such a model partly on its own training images.

    ``limit``: keep a random subset of whole patients (drawn with *seed*) of about that many
    images, for a quicker run; None keeps all.
    """
    split_seed = int(manifest.training.get("split_seed", manifest.training.get("seed", 20260317)))
    records, _ = deduplicate(read_manifest(data_root))
    split = patient_split(records, VAL_FRACTION, split_seed)
    val = split.val
    description = split.description
    if limit is not None and limit < len(val):
        patients = sorted({r.patient for r in val})
        rng = np.random.default_rng(seed)
        rng.shuffle(patients)
        keep: set[str] = set()
        count = 0
        by_patient = {p: sum(1 for r in val if r.patient == p) for p in patients}
        for p in patients:
            if count >= limit:
                break
            keep.add(p)
            count += by_patient[p]
        val = [r for r in val if r.patient in keep]
        description += f"; subsample of {len(val)} images / {len(keep)} patients (seed {seed})"
    return ValidationSet(
        records=val,
        labels=np.asarray([r.label_id for r in val], dtype=np.int64),
        patients=[r.patient for r in val],
        description=description,
    )


def open_engine(manifest: ModelManifest, threads: int) -> InferenceEngine:
    """An engine for offline evaluation: CPU, batches of 16 collected without waiting."""
    return InferenceEngine(
        manifest,
        EngineOptions(intra_op_threads=threads, allow_cuda=False, max_batch=16, max_wait_ms=0.0),
    )


def raw_probabilities(
    engine: InferenceEngine,
    images: Sequence[npt.NDArray[np.uint8]],
    make_dataset: Callable[[npt.NDArray[np.uint8], int], Dataset],
    *,
    chunk: int = 16,
) -> npt.NDArray[np.float64]:
    """The network's raw (uncalibrated) probability for each image, wrapped by *make_dataset*.

    ``make_dataset(pixels, index)`` returns the DICOM data set to classify (the index seeds any
    randomness, so a run is reproducible). Encoding, decoding and preprocessing are the runtime's.
    """
    out = np.empty(len(images), dtype=np.float64)
    spec = engine.manifest.preprocessing
    for start in range(0, len(images), chunk):
        tensors = [preprocess(make_dataset(images[i], i), spec).tensor for i in range(start, min(start + chunk, len(images)))]
        for offset, prediction in enumerate(engine.predict_batch(tensors)):
            assert prediction.raw_probability is not None
            out[start + offset] = prediction.raw_probability
    return out


def load_images(data_root: Path, records: Sequence[Record]) -> list[npt.NDArray[np.uint8]]:
    """The 8-bit grayscale pixels of *records* (PIL ``L``, as training read them)."""
    return [load_grayscale(data_root / r.path) for r in records]


def to_jsonable(value: Any) -> Any:
    """Round floats for the JSON reports (4 decimals), recursively."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value
