"""The training reference of drift monitoring: binned distributions stored in the model package.

``model.json`` → ``monitoring.reference`` (written by :mod:`inference.training.monitoring`, by
code, on the model's held-out validation split run through the gateway's own DICOM path)::

    "monitoring": {"reference": {
        "onnx_sha256": "<the network it was measured on>",
        "probability_scale": "raw",
        "n": 780, "computed_on": "...", "command": "...",
        "features": {
            "probability": {"edges": [0.1, ..., 0.9], "fractions": [...],
                            "by_label": {"NORMAL": [...], "PNEUMONIA": [...]}},
            "mean": {"edges": [...], "fractions": [...]}, ...}}}

``edges`` are the *interior* cut points, strictly increasing; bin i holds
``edges[i-1] <= x < edges[i]`` with open ends, so ``len(fractions) == len(edges) + 1`` and
every value has a bin. ``by_label`` (optional) holds the fractions among each true label's
images: the probability's distribution depends on the case mix (the validation split is 74 %
pneumonia; a clinic's intake is not), and :meth:`FeatureReference.at_prevalence` gives the
reference for the site's expected prevalence. The probability reference is on the network's own (uncalibrated) output:
a monotone calibration maps bins onto bins, so :meth:`FeatureReference.mapped` gives the same
reference on the reported scale, and refitting the calibration never invalidates it.

``onnx_sha256`` must be the package's own: a reference measured on another network would make
every drift verdict wrong without anyone noticing, so such a package is refused (the ONNX file's
hash is verified on load; ``model.json`` states which network the reference belongs to).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from inference.errors import ModelPackageError

PROBABILITY = "probability"
_PATH = "model.json: 'monitoring.reference"
#: Fractions of one reference must add up to 1 within this (they are rounded when stored).
_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True, slots=True)
class FeatureReference:
    """One monitored quantity's reference distribution: interior bin edges and bin fractions."""

    edges: tuple[float, ...]
    fractions: tuple[float, ...]
    #: The fractions among the reference images of each label (ground truth), when measured:
    #: what :meth:`at_prevalence` mixes for a site whose case mix differs from the validation split's.
    by_label: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if len(self.fractions) != len(self.edges) + 1:
            raise ValueError(f"fractions: {len(self.fractions)} bins for {len(self.edges)} edges; expected edges + 1")
        if any(not math.isfinite(e) for e in self.edges) or any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges: must be finite and strictly increasing")
        for name, fractions in (("fractions", self.fractions), *((f"by_label.{k}", v) for k, v in self.by_label.items())):
            if len(fractions) != len(self.fractions):
                raise ValueError(f"{name}: {len(fractions)} bins, expected {len(self.fractions)}")
            if any(not math.isfinite(f) or f < 0 for f in fractions):
                raise ValueError(f"{name}: must be finite and non-negative")
            if abs(sum(fractions) - 1.0) > _SUM_TOLERANCE:
                raise ValueError(f"{name}: sum to {sum(fractions):.6f}, not 1")

    def mapped(self, transform: Callable[[float], float]) -> FeatureReference:
        """The same bins with edges mapped by a strictly increasing *transform*."""
        return FeatureReference(tuple(transform(e) for e in self.edges), self.fractions, self.by_label)

    def at_prevalence(self, positive: str, negative: str, prevalence: float) -> FeatureReference:
        """The distribution expected where a share *prevalence* of the images are *positive*: the
        mixture of the per-label fractions. Raises ``ValueError`` when they were not measured."""
        if positive not in self.by_label or negative not in self.by_label:
            raise ValueError(f"by_label: no fractions for {positive!r} and {negative!r}")
        if not 0.0 <= prevalence <= 1.0:
            raise ValueError(f"prevalence: must lie in [0, 1], got {prevalence}")
        mixed = tuple(
            (1.0 - prevalence) * n + prevalence * p
            for n, p in zip(self.by_label[negative], self.by_label[positive], strict=True)
        )
        return FeatureReference(self.edges, mixed, self.by_label)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"edges": list(self.edges), "fractions": list(self.fractions)}
        if self.by_label:
            out["by_label"] = {k: list(v) for k, v in self.by_label.items()}
        return out


@dataclass(frozen=True, slots=True)
class DriftReference:
    """The package's reference distributions (``features`` by name) and where they came from."""

    onnx_sha256: str
    features: Mapping[str, FeatureReference]
    n: int
    computed_on: str = ""
    probability_scale: str = "raw"


def _fail(key: str, message: str) -> ModelPackageError:
    return ModelPackageError(f"{_PATH}{key}' {message}")


def _numbers(value: object, key: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _fail(key, f"must be a list of numbers, got {value!r}")
    return tuple(float(v) for v in value)


def parse_reference(raw: Mapping[str, Any], onnx_sha256: str) -> DriftReference | None:
    """``monitoring.reference`` of a decoded ``model.json``; None when the package has none (an
    older package: drift is then reported as "no reference"). Raises :class:`ModelPackageError`
    naming the key for a malformed reference or one measured on another ONNX file."""
    monitoring = raw.get("monitoring")
    if monitoring is None:
        return None
    if not isinstance(monitoring, dict):
        raise ModelPackageError("model.json: 'monitoring' must be an object when present")
    ref = monitoring.get("reference")
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise _fail("", "must be an object")
    sha = ref.get("onnx_sha256")
    if not isinstance(sha, str) or sha.lower() != onnx_sha256:
        raise _fail(".onnx_sha256", f"{sha!r} is not this package's onnx_sha256: the reference was measured on another network")
    scale = ref.get("probability_scale", "raw")
    if scale not in ("raw", "reported"):
        raise _fail(".probability_scale", f"must be 'raw' or 'reported', got {scale!r}")
    n = ref.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise _fail(".n", f"must be a positive integer, got {n!r}")
    features_raw = ref.get("features")
    if not isinstance(features_raw, dict) or not features_raw:
        raise _fail(".features", "must be a non-empty object")
    features: dict[str, FeatureReference] = {}
    for name, entry in features_raw.items():
        key = f".features.{name}"
        if not isinstance(entry, dict):
            raise _fail(key, "must be an object")
        by_label_raw = entry.get("by_label", {})
        if not isinstance(by_label_raw, dict):
            raise _fail(key + ".by_label", "must be an object when present")
        by_label = {str(k): _numbers(v, f"{key}.by_label.{k}") for k, v in by_label_raw.items()}
        try:
            features[name] = FeatureReference(
                _numbers(entry.get("edges"), key + ".edges"),
                _numbers(entry.get("fractions"), key + ".fractions"),
                MappingProxyType(by_label),
            )
        except ValueError as exc:
            raise _fail(key, str(exc)) from exc
    return DriftReference(
        onnx_sha256=sha.lower(),
        features=MappingProxyType(features),
        n=n,
        computed_on=str(ref.get("computed_on", "")),
        probability_scale=scale,
    )
