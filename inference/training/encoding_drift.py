"""Encoding drift: the same picture in several pixel encodings should get the same probability.

Why: a PACS may store one radiograph as 8 or 16 bits, with or without a VOI window, and the
classifier must not change its mind with the encoding. Each encoding here carries exactly the
same picture (the 8-bit training pixels, scaled exactly onto 12 or 16 bits where stated); the
differences are only in how the gateway has to present it (window, display-ready 8-bit, or the
percentile window). Reported: each encoding's AUC, sensitivity and specificity at the shipped
threshold, and for every pair the mean and maximum absolute difference of the raw probability.

Usage::

    python -m inference.training.encoding_drift [--model DIR] [--limit N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from inference.example_dicom import wrap_radiograph
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from inference.training.evaluation import load_images, open_engine, raw_probabilities, to_jsonable, validation_set
from inference.training.train import DEFAULT_DATA_ROOT, roc_auc, sensitivity_specificity

U8 = npt.NDArray[np.uint8]


def _scaled(pixels: U8, bits: int) -> npt.NDArray[np.uint16]:
    """The 8-bit picture on *bits* bits stored, end points exact (0 -> 0, 255 -> 2**bits - 1)."""
    top = (1 << bits) - 1
    return ((pixels.astype(np.uint32) * top + 127) // 255).astype(np.uint16)


ENCODINGS: dict[str, Callable[[U8, int], Dataset]] = {
    "8bit_window": lambda p, _i: wrap_radiograph(p),
    "8bit_no_window": lambda p, _i: wrap_radiograph(p, window=False),
    "12bit_no_window": lambda p, _i: wrap_radiograph(_scaled(p, 12), bits_stored=12, window=False),
    "16bit_no_window": lambda p, _i: wrap_radiograph(_scaled(p, 16), bits_stored=16, window=False),
    "16bit_window": lambda p, _i: wrap_radiograph(_scaled(p, 16), bits_stored=16),
}


def pairwise_drift(scores: dict[str, npt.NDArray[np.float64]]) -> list[dict[str, Any]]:
    """Mean and maximum |Δp| between every two encodings (pure)."""
    rows = []
    for a, b in combinations(scores, 2):
        diff = np.abs(scores[a] - scores[b])
        rows.append({"a": a, "b": b, "mean_abs": float(diff.mean()), "max_abs": float(diff.max())})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.training.encoding_drift", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--limit", type=int, default=None, help="subsample about this many images (whole patients)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.model)
    val = validation_set(manifest, args.data_root, limit=args.limit)
    images = load_images(args.data_root, val.records)
    threshold = manifest.network_threshold
    scores: dict[str, npt.NDArray[np.float64]] = {}
    per_encoding: dict[str, dict[str, float]] = {}
    with open_engine(manifest, args.threads) as engine:
        for name, make in ENCODINGS.items():
            scores[name] = raw_probabilities(engine, images, make)
            sens, spec = sensitivity_specificity(val.labels, scores[name], threshold)
            per_encoding[name] = {"auc": roc_auc(val.labels, scores[name]), "sensitivity": sens, "specificity": spec}
    report = {
        "model": {"id": manifest.id, "version": manifest.version},
        "split": val.description,
        "n": len(images),
        "threshold_raw": threshold,
        "encodings": per_encoding,
        "drift": pairwise_drift(scores),
    }
    text = json.dumps(to_jsonable(report), indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
