"""The training reference of drift monitoring, computed on a model's held-out validation split.

For each monitored quantity — the network's probability and the input statistics of
:mod:`inference.input_stats` — the reference is a binned distribution (interior edges +
fractions, :mod:`inference.reference`) measured through the gateway's own runtime path: every
validation image is wrapped as a CR DICOM (:func:`inference.example_dicom.wrap_radiograph`),
preprocessed by :func:`inference.preprocess.preprocess` and classified by the verified model
package (:mod:`inference.training.evaluation`), exactly as the worker would. Drift monitoring
(:mod:`inference.drift`) then compares the gateway's recent results with it.

Bins: the probability on fixed equal-width bins of the raw (uncalibrated) output (a calibration
refitted later maps them onto the reported scale, so the reference stays valid); each input
statistic on the deciles of its own reference values (de-duplicated: a statistic that is often
exactly 0 gets fewer, wider bins), the usual PSI binning.

:func:`reference_block` is used by the export pipeline (:mod:`inference.training.export`), so
every new model carries its reference; this module's command computes it for an existing package
without retraining::

    python -m inference.training.monitoring [--model DIR] [--data-root DIR] [--limit N] [--write]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from inference.engine import InferenceEngine
from inference.example_dicom import wrap_radiograph
from inference.input_stats import INPUT_FEATURES, input_statistics
from inference.manifest import BUNDLED_MODEL_DIR, MANIFEST_FILE, ModelManifest, load_manifest
from inference.preprocess import preprocess
from inference.reference import PROBABILITY, FeatureReference
from inference.training.evaluation import DEFAULT_DATA_ROOT, load_images, open_engine, validation_set

#: Interior edges of the probability bins (raw network output): ten bins of width 0.1.
PROBABILITY_EDGES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))
#: Quantiles that cut each input statistic's reference into (at most) ten bins.
QUANTILES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))
EDGE_DECIMALS = 6
FRACTION_DECIMALS = 6
COMMAND = "python -m inference.training.monitoring --write"


def measure(
    engine: InferenceEngine,
    images: Sequence[npt.NDArray[np.uint8]],
    make_dataset: Callable[[npt.NDArray[np.uint8], int], Dataset] = lambda pixels, _i: wrap_radiograph(pixels),
    *,
    chunk: int = 16,
) -> tuple[npt.NDArray[np.float64], list[dict[str, float]]]:
    """Raw probability and input statistics of each image, through the runtime's DICOM path."""
    raw = np.empty(len(images), dtype=np.float64)
    stats: list[dict[str, float]] = []
    spec = engine.manifest.preprocessing
    for start in range(0, len(images), chunk):
        tensors = [preprocess(make_dataset(images[i], i), spec).tensor for i in range(start, min(start + chunk, len(images)))]
        stats.extend(input_statistics(t) for t in tensors)
        for offset, prediction in enumerate(engine.predict_batch(tensors)):
            assert prediction.raw_probability is not None
            raw[start + offset] = prediction.raw_probability
    return raw, stats


def quantile_edges(
    values: Sequence[float] | npt.NDArray[np.float64], quantiles: Sequence[float] = QUANTILES
) -> tuple[float, ...]:
    """The de-duplicated, rounded *quantiles* of *values*: interior bin edges (pure)."""
    cut = np.quantile(np.asarray(values, dtype=np.float64), list(quantiles))
    return tuple(sorted({round(float(c), EDGE_DECIMALS) for c in cut}))


def _fractions(x: npt.NDArray[np.float64], edges: Sequence[float]) -> tuple[float, ...]:
    if x.size == 0:
        raise ValueError("values: empty, no reference")
    counts = np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right"), minlength=len(edges) + 1)
    return tuple(round(float(c) / x.size, FRACTION_DECIMALS) for c in counts)


def distribution(
    values: Sequence[float] | npt.NDArray[np.float64], edges: Sequence[float], labels: Sequence[str] | None = None
) -> FeatureReference:
    """*values* binned by *edges* (``edges[i-1] <= x < edges[i]``) as a :class:`FeatureReference`,
    with the fractions per true label when *labels* (aligned with *values*) are given (pure)."""
    x = np.asarray(values, dtype=np.float64)
    by_label: dict[str, tuple[float, ...]] = {}
    if labels is not None:
        if len(labels) != x.size:
            raise ValueError(f"labels: {len(labels)} for {x.size} values")
        names = np.asarray(labels)
        by_label = {str(label): _fractions(x[names == label], edges) for label in sorted(set(labels))}
    return FeatureReference(tuple(float(e) for e in edges), _fractions(x, edges), by_label)


def reference_features(
    raw_probabilities: Sequence[float] | npt.NDArray[np.float64],
    stats: Sequence[Mapping[str, float]],
    labels: Sequence[str] | None = None,
) -> dict[str, FeatureReference]:
    """The reference distributions of the probability and every input statistic (pure); with the
    images' true *labels*, also per label (for a site whose prevalence differs)."""
    if len(raw_probabilities) != len(stats) or not stats:
        raise ValueError(f"raw_probabilities/stats: {len(raw_probabilities)} and {len(stats)}; need equal, non-zero lengths")
    features = {PROBABILITY: distribution(raw_probabilities, PROBABILITY_EDGES, labels)}
    for name in INPUT_FEATURES:
        values = np.asarray([s[name] for s in stats], dtype=np.float64)
        features[name] = distribution(values, quantile_edges(values), labels)
    return features


def reference_block(
    manifest: ModelManifest,
    images: Sequence[npt.NDArray[np.uint8]],
    computed_on: str,
    *,
    labels: Sequence[str] | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """``monitoring.reference`` for *manifest*'s network, measured on *images* (its validation
    data; *labels*: their true labels, for the per-label fractions)."""
    started = time.perf_counter()
    with open_engine(manifest, threads) as engine:
        raw, stats = measure(engine, images)
    features = reference_features(raw, stats, labels)
    counts = {label: sum(1 for x in labels if x == label) for label in sorted(set(labels))} if labels is not None else {}
    return {
        "onnx_sha256": manifest.onnx_sha256,
        "probability_scale": "raw",
        "n": len(images),
        **({"n_by_label": counts} if counts else {}),
        "computed_on": computed_on,
        "method": (
            "each image wrapped as CR DICOM and run through the gateway's preprocessing and this model.onnx "
            "(onnxruntime, CPU); probability: the raw network output in 10 equal-width bins; input statistics "
            "(inference/input_stats.py): bins cut at their own deciles"
        ),
        "features": {name: ref.to_json() for name, ref in features.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "command": COMMAND,
    }


def write_reference(model_dir: Path, reference: Mapping[str, Any]) -> None:
    """Insert/replace ``monitoring.reference`` in ``model.json`` (the ONNX file is untouched)."""
    path = model_dir / MANIFEST_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    monitoring = raw.get("monitoring") if isinstance(raw.get("monitoring"), dict) else {}
    monitoring["reference"] = dict(reference)
    raw["monitoring"] = monitoring
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None,
                        help="a deterministic subsample of whole patients of about N images (default: the whole split)")
    parser.add_argument("--write", action="store_true", help="store the reference in model.json")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.model)
    val = validation_set(manifest, args.data_root, limit=args.limit)
    images = load_images(args.data_root, val.records)
    labels = [manifest.labels[r.label_id] for r in val.records]
    block = reference_block(
        manifest, images, f"the patient-wise validation split ({val.description})", labels=labels, threads=args.threads
    )
    print(json.dumps(block, indent=2))
    if args.write:
        write_reference(args.model, block)
        load_manifest(args.model)  # the package, reference included, must still load
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
