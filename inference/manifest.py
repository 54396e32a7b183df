"""The model package: ``model.json`` + the ONNX file it names, validated when loaded.

A model directory is the unit of deployment. ``model.json`` (schema 1) is the contract between
training and this runtime: it says what the network expects (input name/shape/dtype), how pixels
must be prepared (:class:`PreprocessingSpec`), what the outputs mean, the operating threshold, and
carries the provenance that ends up in the SR's Contributing Equipment / algorithm identification
(PS3.3 C.7.5.1.1.1; TID 4019) and in the FHIR Device.

Loading is strict about what the runtime needs — every error names the offending key — and
tolerant of keys it does not use, so training can add provenance without a runtime release.
The ONNX file's SHA-256 is checked against the manifest before anything else uses the model: a
model that is not byte-for-byte the one that was validated must never produce clinical output.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from inference.calibration import Calibration
from inference.errors import ModelIntegrityError, ModelPackageError
from inference.intended_use import IntendedUse, parse_intended_use
from inference.reference import DriftReference, parse_reference
from storage.filestore import sha256_file
from storage.uids import derive_uid

MANIFEST_FILE = "model.json"
SUPPORTED_SCHEMA = 1
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


#: The model shipped with the package (trained on the Kermany paediatric CXR training split).
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "pneumonia-effnetb0"


@dataclass(frozen=True, slots=True)
class PreprocessingSpec:
    """How a radiograph becomes the model input (``model.json`` → ``preprocessing``).

    Only what the runtime implements is accepted: a single channel, values in [0, 1], display
    orientation MONOCHROME2 (PS3.3 C.7.6.3.1.2: white = high attenuation), squashed to
    ``height`` x ``width`` without keeping the aspect ratio; normalisation is inside the graph.
    """

    width: int
    height: int
    resize: str = "squash"
    channels: int = 1
    value_range: tuple[float, float] = (0.0, 1.0)
    photometric: str = "MONOCHROME2"
    normalisation: str = "inside graph"


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """One named graph output and what it means (``model.json`` → ``outputs.<key>``)."""

    name: str
    shape: tuple[int | str, ...]
    semantics: str


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """A validated model package. Build it with :func:`load_manifest`."""

    model_dir: Path
    schema: int
    id: str
    name: str
    version: str
    manufacturer: str
    labels: tuple[str, str]
    positive_label: str
    onnx_file: str
    onnx_sha256: str
    input_name: str
    input_shape: tuple[int | str, ...]
    input_dtype: str
    preprocessing: PreprocessingSpec
    probability: OutputSpec
    cam: OutputSpec
    #: The decision threshold on the *reported* (calibrated) probability scale:
    #: ``calibration.apply(raw_threshold)``. Equal to ``raw_threshold`` without calibration.
    threshold: float
    threshold_rule: str
    intended_use: str
    created: str
    #: ``model.json`` → ``threshold``: on the network's own (uncalibrated) sigmoid output;
    #: None (a manifest built in code) means ``threshold`` is already on that scale.
    raw_threshold: float | None = None
    calibration: Calibration = field(default_factory=Calibration)
    intended: IntendedUse = field(default_factory=IntendedUse)
    training_data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    metrics: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    training: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: ``monitoring.reference``: the training reference of drift monitoring (inference/reference.py);
    #: None for a package without one (drift is then reported as "no reference").
    drift_reference: DriftReference | None = None

    @property
    def onnx_path(self) -> Path:
        """Absolute path of the ONNX file (already verified to lie inside ``model_dir``)."""
        return self.model_dir / self.onnx_file

    @property
    def network_threshold(self) -> float:
        """The threshold the raw network probability is compared with (decisions are made here)."""
        return self.threshold if self.raw_threshold is None else self.raw_threshold

    @property
    def negative_label(self) -> str:
        """The label reported when the probability is below the threshold."""
        return self.labels[0] if self.labels[1] == self.positive_label else self.labels[1]

    @property
    def device_uid(self) -> str:
        """Deterministic Device UID of this model (changes whenever id or version changes).

        Used as Contributing Equipment Device UID in the SR (PS3.3 C.7.5.1.1.1) and as the FHIR
        Device identifier, so every result names exactly the model version that made it.
        """
        return derive_uid("device", self.id, self.version)


# --------------------------------------------------------------------------- validation helpers


def _get(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise ModelPackageError(f"{MANIFEST_FILE}: missing required key '{path}{key}'")
    return obj[key]


def _str(obj: Mapping[str, Any], key: str, path: str = "") -> str:
    value = _get(obj, key, path)
    if not isinstance(value, str) or not value.strip():
        raise ModelPackageError(
            f"{MANIFEST_FILE}: '{path}{key}' must be a non-empty string, got {value!r}"
        )
    return value


def _int(obj: Mapping[str, Any], key: str, path: str = "", *, positive: bool = True) -> int:
    value = _get(obj, key, path)
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
        raise ModelPackageError(
            f"{MANIFEST_FILE}: '{path}{key}' must be a positive integer, got {value!r}"
        )
    return value


def _mapping(obj: Mapping[str, Any], key: str, path: str = "") -> Mapping[str, Any]:
    value = _get(obj, key, path)
    if not isinstance(value, dict):
        raise ModelPackageError(f"{MANIFEST_FILE}: '{path}{key}' must be an object")
    return value


def _optional_mapping(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, dict):
        raise ModelPackageError(f"{MANIFEST_FILE}: '{key}' must be an object when present")
    return MappingProxyType(dict(value))


def _shape(obj: Mapping[str, Any], key: str, path: str) -> tuple[int | str, ...]:
    value = _get(obj, key, path)
    if not isinstance(value, list) or not all(
        (isinstance(d, int) and not isinstance(d, bool) and d > 0) or isinstance(d, str)
        for d in value
    ):
        raise ModelPackageError(
            f"{MANIFEST_FILE}: '{path}{key}' must be a list of positive integers or "
            f"symbolic dimension names, got {value!r}"
        )
    return tuple(value)


def _expect(actual: object, expected: object, key: str) -> None:
    if actual != expected:
        raise ModelPackageError(
            f"{MANIFEST_FILE}: '{key}' must be {expected!r} (the only value this runtime "
            f"implements), got {actual!r}"
        )


def _parse_preprocessing(raw: Mapping[str, Any]) -> PreprocessingSpec:
    p = "preprocessing."
    width = _int(raw, "width", p)
    height = _int(raw, "height", p)
    _expect(_str(raw, "resize", p), "squash", p + "resize")
    _expect(_int(raw, "channels", p), 1, p + "channels")
    vr = _get(raw, "value_range", p)
    if not (isinstance(vr, list) and len(vr) == 2 and [float(v) for v in vr] == [0.0, 1.0]):
        raise ModelPackageError(f"{MANIFEST_FILE}: '{p}value_range' must be [0, 1], got {vr!r}")
    _expect(_str(raw, "photometric", p), "MONOCHROME2", p + "photometric")
    return PreprocessingSpec(
        width=width,
        height=height,
        normalisation=str(raw.get("normalisation", "inside graph")),
    )


def _parse_output(outputs: Mapping[str, Any], key: str) -> OutputSpec:
    path = f"outputs.{key}."
    raw = _mapping(outputs, key, "outputs.")
    return OutputSpec(
        name=_str(raw, "name", path),
        shape=_shape(raw, "shape", path),
        semantics=str(raw.get("semantics", "")),
    )


def _parse_calibration(raw: Mapping[str, Any]) -> Calibration:
    """The optional ``calibration`` object (:mod:`inference.calibration`); absent = identity."""
    value = raw.get("calibration")
    if value is None:
        return Calibration()
    if not isinstance(value, dict):
        raise ModelPackageError(f"{MANIFEST_FILE}: 'calibration' must be an object when present")
    temperature = value.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ModelPackageError(f"{MANIFEST_FILE}: 'calibration.temperature' must be a number, got {temperature!r}")
    try:
        return Calibration(
            method=str(value.get("method", "")),
            temperature=float(temperature),
            fitted_on=str(value.get("fitted_on", "")),
        )
    except ValueError as exc:
        raise ModelPackageError(f"{MANIFEST_FILE}: 'calibration': {exc}") from exc


def parse_manifest(raw: Mapping[str, Any], model_dir: Path) -> ModelManifest:
    """Validate a decoded ``model.json`` object; no file access. Raises :class:`ModelPackageError`."""
    if not isinstance(raw, dict):
        raise ModelPackageError(f"{MANIFEST_FILE}: top level must be a JSON object")
    schema = _int(raw, "schema")
    if schema != SUPPORTED_SCHEMA:
        raise ModelPackageError(
            f"{MANIFEST_FILE}: 'schema' {schema} is not supported (expected {SUPPORTED_SCHEMA})"
        )
    labels = _get(raw, "labels", "")
    if not (
        isinstance(labels, list)
        and len(labels) == 2
        and all(isinstance(x, str) and x for x in labels)
        and labels[0] != labels[1]
    ):
        raise ModelPackageError(
            f"{MANIFEST_FILE}: 'labels' must be two distinct non-empty strings, got {labels!r}"
        )
    positive = _str(raw, "positive_label")
    if positive not in labels:
        raise ModelPackageError(
            f"{MANIFEST_FILE}: 'positive_label' {positive!r} is not one of 'labels' {labels!r}"
        )
    onnx_file = _str(raw, "onnx_file")
    if Path(onnx_file).name != onnx_file or onnx_file in (".", ".."):
        raise ModelPackageError(
            f"{MANIFEST_FILE}: 'onnx_file' must be a plain file name inside the model "
            f"directory, got {onnx_file!r}"
        )
    sha = _str(raw, "onnx_sha256").lower()
    if not _SHA256_RE.match(sha):
        raise ModelPackageError(
            f"{MANIFEST_FILE}: 'onnx_sha256' must be 64 hexadecimal digits, got {sha!r}"
        )
    inp = _mapping(raw, "input")
    input_shape = _shape(inp, "shape", "input.")
    input_dtype = _str(inp, "dtype", "input.")
    _expect(input_dtype, "float32", "input.dtype")
    preprocessing = _parse_preprocessing(_mapping(raw, "preprocessing"))
    expected_tail = (1, preprocessing.height, preprocessing.width)
    if len(input_shape) != 4 or tuple(input_shape[1:]) != expected_tail:
        raise ModelPackageError(
            f"{MANIFEST_FILE}: 'input.shape' must be [batch, 1, {preprocessing.height}, "
            f"{preprocessing.width}] to match 'preprocessing', got {list(input_shape)!r}"
        )
    outputs = _mapping(raw, "outputs")
    threshold_raw = _get(raw, "threshold", "")
    if isinstance(threshold_raw, bool) or not isinstance(threshold_raw, (int, float)):
        raise ModelPackageError(
            f"{MANIFEST_FILE}: 'threshold' must be a number, got {threshold_raw!r}"
        )
    threshold = float(threshold_raw)
    if not 0.0 <= threshold <= 1.0:
        raise ModelPackageError(f"{MANIFEST_FILE}: 'threshold' must lie in [0, 1], got {threshold}")
    calibration = _parse_calibration(raw)
    return ModelManifest(
        model_dir=model_dir,
        schema=schema,
        id=_str(raw, "id"),
        name=_str(raw, "name"),
        version=_str(raw, "version"),
        manufacturer=_str(raw, "manufacturer"),
        labels=(labels[0], labels[1]),
        positive_label=positive,
        onnx_file=onnx_file,
        onnx_sha256=sha,
        input_name=_str(inp, "name", "input."),
        input_shape=input_shape,
        input_dtype=input_dtype,
        preprocessing=preprocessing,
        probability=_parse_output(outputs, "probability"),
        cam=_parse_output(outputs, "cam"),
        threshold=calibration.apply(threshold),
        raw_threshold=threshold,
        calibration=calibration,
        intended=parse_intended_use(raw),
        threshold_rule=str(raw.get("threshold_rule", "")),
        intended_use=_str(raw, "intended_use"),
        created=str(raw.get("created", "")),
        training_data=_optional_mapping(raw, "training_data"),
        metrics=_optional_mapping(raw, "metrics"),
        training=_optional_mapping(raw, "training"),
        drift_reference=parse_reference(raw, sha),
    )


def load_manifest(model_dir: str | Path, *, verify_integrity: bool = True) -> ModelManifest:
    """Read, validate and (by default) integrity-check the model package in *model_dir*.

    Raises :class:`ModelPackageError` for a missing/invalid manifest or ONNX file and
    :class:`ModelIntegrityError` when the ONNX file's SHA-256 differs from ``onnx_sha256``.
    """
    directory = Path(model_dir).resolve()
    manifest_path = directory / MANIFEST_FILE
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelPackageError(f"no {MANIFEST_FILE} in model directory {directory}") from exc
    except OSError as exc:
        raise ModelPackageError(f"cannot read {manifest_path}: {exc.strerror}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelPackageError(f"{MANIFEST_FILE} is not valid JSON: {exc}") from exc
    manifest = parse_manifest(raw, directory)
    if not manifest.onnx_path.is_file():
        raise ModelPackageError(
            f"{MANIFEST_FILE}: 'onnx_file' {manifest.onnx_file!r} does not exist in {directory}"
        )
    if verify_integrity:
        actual = sha256_file(manifest.onnx_path)
        if actual != manifest.onnx_sha256:
            raise ModelIntegrityError(
                f"{manifest.onnx_file}: SHA-256 {actual} does not match 'onnx_sha256' "
                f"{manifest.onnx_sha256}; refusing to load model {manifest.id} {manifest.version}"
            )
    return manifest
