"""ONNX export of a trained checkpoint, plus the model manifest (``model.json``) and model card.

The exported graph is the runtime contract every other part of the gateway is written against:

* opset >= 17; one input ``image`` float32 ``[batch, 1, 224, 224]``, pixels in ``[0, 1]``,
  MONOCHROME2 display orientation, squashed to 224x224; normalisation is inside the graph;
* outputs ``probability`` float32 ``[batch]`` (sigmoid of the PNEUMONIA logit, inside the graph)
  and ``cam`` float32 ``[batch, 7, 7]`` (per-cell PNEUMONIA logit contribution
  ``w . F[:, i, j] + b/49``; ``logit = mean(cam) + b * 48/49``).

Why the validation metrics are measured with **onnxruntime on the exported file** (not PyTorch):
the manifest describes the artefact that is deployed, and the threshold must be chosen on the
same numbers the runtime will produce.  Export also checks ONNX against PyTorch (max abs diff)
and fails loudly if they disagree.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.filestore import sha256_file

from .data import IMAGE_SIZE, LABELS, InMemoryDataset, to_float
from .efficientnet import ExportWrapper, count_parameters
from .train import (
    THRESHOLD_RULE,
    Metrics,
    TrainConfig,
    bootstrap_metrics,
    load_checkpoint,
    metrics_from_scores,
    prepare_records,
    roc_auc,
)

MODEL_ID = "pneumo-effnetb0-kermany"
MODEL_NAME = "Pneumo EfficientNet-B0 paediatric CXR pneumonia classifier"
MANUFACTURER = "Pneumo Gateway project"
INPUT_NAME = "image"
OUTPUT_NAMES = ("probability", "cam")
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MAX_ABS_DIFF = 1e-4  # tolerance ONNX vs PyTorch (probability; cam relative to its scale)
INT8_AUC_TOLERANCE = 0.005

DATASET_NAME = (
    "Kermany, Zhang, Goldbaum: Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images "
    "for Classification (chest X-ray part, train split, 224x224)"
)
DATASET_CITATION = (
    "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification. Mendeley Data, V2, 2018. doi:10.17632/rscbjbr9sj.2. Kermany DS et "
    "al. Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning. Cell "
    "172(5):1122-1131, 2018."
)
INTENDED_USE = (
    "Research use only: estimates the probability of pneumonia on paediatric (1-5 years) frontal "
    "chest radiographs to assist, never replace, a clinician's reading; it is not a medical device."
)
#: Who and what the model may be run on, enforced by inference/applicability.py (docs/model.md).
INTENDED_POPULATION: dict[str, Any] = {
    "description": (
        "children aged 1 to 5 years (completed years: from the first birthday to the day before the sixth), "
        "the ages of the training data (Guangzhou Women and Children's Medical Center, Kermany et al. 2018); "
        "never validated on infants, older children or adults"
    ),
    "min_age_years": 1,
    "max_age_years": 6,
    "age_source": (
        "Patient's Age (0010,1010), else Patient's Birth Date (0010,0030) and Study/Series/Acquisition/Content "
        "Date; a stated age (e.g. 005Y) is accepted only when the whole unit lies in [min, max)"
    ),
}
INTENDED_INPUTS: dict[str, Any] = {
    "description": (
        "single-frame frontal (anterior-posterior or postero-anterior) chest radiographs; "
        "the training images were anterior-posterior, 8-bit, 224x224"
    ),
    "modalities": [
        "CR",
        "DX"
    ],
    "body_parts": [
        "CHEST"
    ],
    "view_positions": [
        "AP",
        "PA"
    ],
    "view_codes": [
        {
            "scheme": "SCT",
            "value": "399348003",
            "view": "AP",
            "meaning": "antero-posterior (CID 4010)"
        },
        {
            "scheme": "SRT",
            "value": "R-10206",
            "view": "AP",
            "meaning": "antero-posterior (legacy SNOMED RT)"
        },
        {
            "scheme": "SCT",
            "value": "272479007",
            "view": "PA",
            "meaning": "postero-anterior (CID 4010)"
        },
        {
            "scheme": "SRT",
            "value": "R-10214",
            "view": "PA",
            "meaning": "postero-anterior (legacy SNOMED RT)"
        }
    ],
    "photometric_interpretations": [
        "MONOCHROME1",
        "MONOCHROME2"
    ],
    "min_bits_stored": 8,
    "max_bits_stored": 16
}


@dataclass(frozen=True)
class ExportConfig:
    """What ``export_model`` does.

    ``data_root=None`` uses the checkpoint's own data root to re-create its validation split.
    ``evaluate=False`` skips the validation metrics (and then no threshold can be chosen; used only
    for bundles whose ``threshold`` is supplied). A ``threshold`` supplied *with* ``evaluate`` is
    one chosen by a rule this step cannot run (the operating point under simulated acquisition
    shift, ``evaluate_shift``): the validation metrics are then reported at it, and
    ``threshold_rule`` must say how it was chosen.
    """

    checkpoint: Path
    out_dir: Path
    data_root: Path | None = None
    opset: int = 17
    version: str = "1.0.0"
    evaluate: bool = True
    threshold: float | None = None
    threshold_rule: str | None = None  # required with a supplied threshold when evaluate is True
    quantize_int8: bool = False
    write_model_card: bool = True
    num_threads: int = 2
    tolerance: float = MAX_ABS_DIFF
    #: Measure the drift monitoring reference (``monitoring.reference``, inference/training/monitoring.py)
    #: on the validation split through the runtime's DICOM path; needs ``evaluate``.
    monitoring_reference: bool = True


@dataclass(frozen=True)
class ExportOutcome:
    """Paths written and the checks made."""

    onnx_path: Path
    manifest_path: Path
    model_card_path: Path | None
    max_abs_diff_probability: float
    max_abs_diff_cam: float
    metrics: Metrics | None
    int8_path: Path | None
    int8_note: str
    manifest: dict[str, Any] = field(default_factory=dict)


def export_onnx(
    checkpoint: Path,
    out_dir: Path,
    *,
    opset: int = 17,
    filename: str = ONNX_FILE,
    check_images: torch.Tensor | None = None,
    tolerance: float = MAX_ABS_DIFF,
) -> Path:
    """Export *checkpoint* to ``out_dir/filename`` (checked against PyTorch); return the path.

    Only the ONNX file: ``export_model`` also writes model.json and the model card.
    """
    path, _, _ = export_and_check(
        checkpoint, out_dir, opset=opset, filename=filename, check_images=check_images, tolerance=tolerance
    )
    return path


def export_and_check(
    checkpoint: Path,
    out_dir: Path,
    *,
    opset: int = 17,
    filename: str = ONNX_FILE,
    check_images: torch.Tensor | None = None,
    tolerance: float = MAX_ABS_DIFF,
) -> tuple[Path, float, float]:
    """Export *checkpoint* to ``out_dir/filename`` and check it against PyTorch.

    Uses the TorchScript-based exporter (``dynamo=False``): it produces one self-contained file with
    a plain dynamic batch axis and no external data.  The check runs onnxruntime on batches of 1
    and 3 (random pixels, plus *check_images* if given) and compares both outputs with the PyTorch
    model.  Returns ``(onnx_path, max_abs_diff_probability, max_rel_diff_cam)`` (the cam difference is
    divided by ``max(1, max_cell sum_c |w_c f_c|)``, the scale of float32 rounding in that sum);
    raises ``RuntimeError`` if either exceeds *tolerance* (default ``MAX_ABS_DIFF``; only smoke
    tests of barely trained, ill-conditioned networks need more).
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (contract), got {opset}")
    model, _, _ = load_checkpoint(checkpoint)
    wrapper = ExportWrapper(model).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / filename
    dummy = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / filename
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo but still supported in
            # torch 2.13; we choose it deliberately (see docstring), so its warning is noise here.
            warnings.simplefilter("ignore", DeprecationWarning)
            _legacy_export(wrapper, dummy, tmp_path, opset)
        tmp_path.replace(onnx_path)

    import onnx

    onnx.checker.check_model(str(onnx_path))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(1, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
               torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)]
    if check_images is not None and check_images.shape[0] > 0:
        batches.append(check_images)
    session = make_session(onnx_path)
    diff_p = diff_c = 0.0
    with torch.no_grad():
        for x in batches:
            p_ref, c_ref = wrapper(x)
            p, c = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
            if p.shape != (x.shape[0],) or c.shape != (x.shape[0], 7, 7):
                raise RuntimeError(f"ONNX output shapes {p.shape} {c.shape} break the contract")
            # The cam is an unbounded sum over 1280 channels; float32 rounding grows with the sum
            # of the absolute terms, so that (not the possibly cancelled result) sets the scale.
            feats = model.forward_features(x)
            terms = torch.einsum("bchw,c->bhw", feats.abs(), model.classifier.weight[0].abs())
            scale = max(1.0, float(terms.max()))
            diff_p = max(diff_p, float(np.abs(p - p_ref.numpy()).max()))
            diff_c = max(diff_c, float(np.abs(c - c_ref.numpy()).max()) / scale)
        # Semantics of the cam: logit = mean(cam) + b * (1 - 1/HW).  Exact in real arithmetic;
        # checked in float64 because float32 cancellation over 1280 channels can be large.
        model64 = copy.deepcopy(model).double().eval()
        x64 = batches[-1].double()
        feats = model64.forward_features(x64)
        bias = model64.classifier.bias[0]
        hw = feats.shape[2] * feats.shape[3]
        cam_logit = model64.cam(feats).mean(dim=(1, 2)) + bias * (1.0 - 1.0 / hw)
        gap = float((cam_logit - model64.logits_from_features(feats)).abs().max())
        magnitude = float(torch.einsum("bchw,c->b", feats.abs(), model64.classifier.weight[0].abs()).max())
        if gap > 1e-9 * max(1.0, magnitude):
            raise RuntimeError(f"cam mean differs from the logit by {gap:.3e} (scale {magnitude:.3e})")
    if diff_p > tolerance or diff_c > tolerance:
        raise RuntimeError(
            f"ONNX differs from PyTorch: probability {diff_p:.2e}, cam (relative) {diff_c:.2e}"
        )
    return onnx_path, diff_p, diff_c


def _legacy_export(wrapper: ExportWrapper, dummy: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        wrapper,
        (dummy,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={
            INPUT_NAME: {0: "batch"},
            OUTPUT_NAMES[0]: {0: "batch"},
            OUTPUT_NAMES[1]: {0: "batch"},
        },
        opset_version=opset,
        dynamo=False,
        do_constant_folding=True,
    )


def make_session(onnx_path: Path, num_threads: int = 2) -> Any:
    """An onnxruntime CPU session with a bounded thread count (2-core hosts)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_probabilities(onnx_path: Path, dataset: InMemoryDataset, batch_size: int = 32) -> np.ndarray:
    """Run the exported model over *dataset* (224x224, [0, 1]) and return the probabilities."""
    session = make_session(onnx_path)
    out = []
    for start in range(0, len(dataset), batch_size):
        x = to_float(dataset.images[start : start + batch_size]).numpy()
        (p,) = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})
        out.append(p)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 quantisation (per-channel weights) calibrated on training images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray) -> None:
            self._it = iter([{INPUT_NAME: images[i : i + 8]} for i in range(0, len(images), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(int8_path),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )


def build_manifest(
    *,
    onnx_path: Path,
    version: str,
    threshold: float,
    threshold_rule: str,
    metrics: Metrics | None,
    config: TrainConfig,
    checkpoint: dict[str, Any],
    images_used: int,
    split_description: str,
    dedup_note: str,
    n_parameters: int,
    max_abs_diff: tuple[float, float],
    opset: int,
    int8: dict[str, Any] | None,
    classifier_bias: float,
) -> dict[str, Any]:
    """The ``model.json`` dictionary (contract keys first, extra keys after)."""
    history = checkpoint.get("history", [])
    metrics_json: dict[str, Any]
    if metrics is not None:
        chose = _validation_chose(config.select)
        metrics_json = {
            "split": (
                f"held-out patient-wise validation split of the Kermany train folder (also used to "
                f"pick {chose}, so these estimates are optimistic); computed with onnxruntime on "
                f"this model.onnx"
            ),
            **metrics.to_json(),
        }
    else:
        metrics_json = {"split": "not measured", "n": 0, "n_positive": 0}
    manifest: dict[str, Any] = {
        "schema": 1,
        "id": MODEL_ID,
        "name": MODEL_NAME,
        "version": version,
        "manufacturer": MANUFACTURER,
        "labels": list(LABELS),
        "positive_label": LABELS[1],
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32"},
        "preprocessing": {
            "width": IMAGE_SIZE,
            "height": IMAGE_SIZE,
            "resize": "squash",
            "channels": 1,
            "value_range": [0.0, 1.0],
            "photometric": "MONOCHROME2",
            "normalisation": "inside graph",
        },
        "outputs": {
            "probability": {"name": "probability", "shape": ["batch"], "semantics": "sigmoid"},
            "cam": {
                "name": "cam",
                "shape": ["batch", 7, 7],
                "semantics": "class activation map, PNEUMONIA logit contribution per cell",
                "formula": (
                    "cam[i, j] = sum_c w_c * F[c, i, j] + b / 49, with F the last 1280x7x7 feature "
                    "map and w, b the final linear layer; logit = mean(cam) + b * 48/49"
                ),
                "classifier_bias": classifier_bias,
            },
        },
        "threshold": threshold,
        "threshold_rule": threshold_rule,
        "intended_use": INTENDED_USE,
        "intended_population": INTENDED_POPULATION,
        "intended_inputs": INTENDED_INPUTS,
        "training_data": {
            "name": DATASET_NAME,
            "citation": DATASET_CITATION,
            "doi": "10.17632/rscbjbr9sj.2",
            "licence": "CC BY 4.0",
            "images_used": images_used,
            "split": f"{dedup_note}; {split_description}",
        },
        "metrics": metrics_json,
        "training": {
            "epochs": len(history),
            "best_epoch": int(checkpoint["epoch"]),
            "planned_epochs": None if config.time_budget_s is not None else config.epochs,
            "time_budget_s": config.time_budget_s,
            "schedule": [{"epochs": s.epochs, "resolution": s.resolution} for s in config.stages],
            "seed": config.seed,
            "split_seed": config.seed if config.split_seed is None else config.split_seed,
            "epoch_kept": "last epoch (no selection on validation)" if config.select == "last" else "best validation AUC",
            "device": config.device + (" (bf16 autocast)" if config.bf16 else ""),
            "weight_averaging": f"EMA decay {config.ema_decay} (warmed up)" if config.ema_decay > 0 else "none",
            "distilled_from": len(config.teachers),
            "label_smoothing": config.label_smoothing,
            "resolution": IMAGE_SIZE,
            "torch_version": str(checkpoint.get("torch_version", torch.__version__)),
            "duration_s": round(float(checkpoint.get("elapsed_s", 0.0)), 1),
            "augmentation": config.augmentation.describe(),
            "optimizer": (
                f"AdamW lr {config.lr} weight decay {config.weight_decay} (none on norm/bias), "
                f"batch {config.batch_size}, linear warm-up {config.warmup_epochs} epoch then cosine "
                f"to {config.min_lr_ratio}x"
            ),
            "loss": "binary cross-entropy on one logit, pos_weight = n_normal / n_pneumonia (train)",
            "architecture": (
                f"EfficientNet-B0 (1-channel stem, SE, SiLU, stochastic depth {config.drop_path_rate}, "
                f"dropout {config.dropout}), trained from scratch, {n_parameters} parameters"
            ),
        },
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "onnx_opset": opset,
        "onnx_vs_pytorch_max_diff": {
            "probability_abs": max_abs_diff[0],
            "cam_relative_to_sum_abs_terms": max_abs_diff[1],
        },
        "attribution": (
            "Trained on data from Kermany et al. 2018 (doi:10.17632/rscbjbr9sj.2), licensed CC BY 4.0."
        ),
        "not_a_medical_device": True,
    }
    if int8 is not None:
        manifest["variants"] = {"int8": int8}
    return manifest


def export_model(config: ExportConfig) -> ExportOutcome:
    """Export a checkpoint into a model directory: model.onnx, model.json, MODEL_CARD.md.

    Steps: export + ONNX/PyTorch check; validation probabilities with onnxruntime; threshold by the
    stated rule; cluster-bootstrap CIs; optional int8 variant kept only if its validation AUC is
    within ``INT8_AUC_TOLERANCE`` of fp32; manifest and model card written last (atomically enough:
    model.json is what the runtime looks for, and it is renamed into place).
    """
    torch.set_num_threads(config.num_threads)
    model, train_config, ckpt = load_checkpoint(config.checkpoint)
    if config.data_root is not None:
        train_config = _with_data_root(train_config, config.data_root)
    prepared = prepare_records(train_config)
    val_ds: InMemoryDataset | None = None
    if config.evaluate:
        val_ds = InMemoryDataset.load(train_config.data_root, prepared.split.val)
    check = to_float(val_ds.images[:8]) if val_ds is not None else None
    onnx_path, diff_p, diff_c = export_and_check(
        config.checkpoint,
        config.out_dir,
        opset=config.opset,
        check_images=check,
        tolerance=config.tolerance,
    )

    metrics: Metrics | None = None
    threshold_rule = THRESHOLD_RULE.format(target=train_config.target_sensitivity)
    if val_ds is not None and config.threshold is not None:
        if not config.threshold_rule:
            raise ValueError("threshold_rule: required with a supplied threshold")
        probs = onnx_probabilities(onnx_path, val_ds)
        threshold, threshold_rule = float(config.threshold), config.threshold_rule
        metrics = bootstrap_metrics(
            val_ds.labels.numpy(), probs, val_ds.patients, threshold, train_config.bootstrap_resamples, seed=train_config.seed
        )
    elif val_ds is not None:
        probs = onnx_probabilities(onnx_path, val_ds)
        metrics = metrics_from_scores(val_ds.labels.numpy(), probs, val_ds.patients, train_config)
        threshold = metrics.threshold
    elif config.threshold is not None:
        threshold = float(config.threshold)
        threshold_rule = "supplied by the caller (no validation run at export)"
    else:
        raise ValueError("threshold: required when evaluate is False")

    int8_info: dict[str, Any] | None = None
    int8_path: Path | None = None
    int8_note = "not attempted"
    if config.quantize_int8 and val_ds is not None and metrics is not None:
        int8_path, int8_info, int8_note = _try_int8(onnx_path, config.out_dir, train_config, prepared, val_ds, metrics)

    dedup = prepared.dedup
    dedup_note = (
        f"{dedup.n_in} images in the train folder, de-duplicated by sha256 to {dedup.n_out} "
        f"({dedup.duplicate_groups} groups of byte-identical files, {dedup.removed} copies removed)"
    )
    manifest = build_manifest(
        onnx_path=onnx_path,
        version=config.version,
        threshold=threshold,
        threshold_rule=threshold_rule,
        metrics=metrics,
        config=train_config,
        checkpoint=ckpt,
        images_used=len(prepared.records),
        split_description=prepared.split.description,
        dedup_note=dedup_note,
        n_parameters=count_parameters(model),
        max_abs_diff=(diff_p, diff_c),
        opset=config.opset,
        int8=int8_info,
        classifier_bias=float(model.classifier.bias.detach()[0]),
    )
    if config.quantize_int8:
        manifest["int8_quantisation"] = int8_note
    if config.monitoring_reference and val_ds is not None:
        manifest["monitoring"] = {"reference": _monitoring_reference(manifest, config, val_ds, prepared.split.description)}
    manifest_path = config.out_dir / "model.json"
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)

    card_path: Path | None = None
    if config.write_model_card:
        card_path = config.out_dir / "MODEL_CARD.md"
        card_path.write_text(render_model_card(manifest, ckpt, int8_note), encoding="utf-8")
    return ExportOutcome(
        onnx_path=onnx_path,
        manifest_path=manifest_path,
        model_card_path=card_path,
        max_abs_diff_probability=diff_p,
        max_abs_diff_cam=diff_c,
        metrics=metrics,
        int8_path=int8_path,
        int8_note=int8_note,
        manifest=manifest,
    )


def _monitoring_reference(
    manifest: dict[str, Any], config: ExportConfig, val_ds: InMemoryDataset, split_description: str
) -> dict[str, Any]:
    """The drift reference of the exported network on its validation split (the runtime's path)."""
    # Imported here: the runtime modules (onnxruntime engine, DICOM wrapping) are not needed to export.
    from inference.manifest import parse_manifest
    from inference.training.monitoring import reference_block

    parsed = parse_manifest(manifest, config.out_dir)
    images = [val_ds.images[i, 0].cpu().numpy() for i in range(len(val_ds))]
    labels = [LABELS[r.label_id] for r in val_ds.records]
    return reference_block(
        parsed, images, f"the patient-wise validation split ({split_description})", labels=labels, threads=config.num_threads
    )


def _with_data_root(config: TrainConfig, data_root: Path) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, data_root=data_root)


def _try_int8(
    onnx_path: Path,
    out_dir: Path,
    train_config: TrainConfig,
    prepared: Any,
    val_ds: InMemoryDataset,
    fp32_metrics: Metrics,
) -> tuple[Path | None, dict[str, Any] | None, str]:
    """Quantise, measure validation AUC, keep the file only if within tolerance."""
    rng = np.random.default_rng(train_config.seed)
    calib_records = [prepared.split.train[i] for i in rng.choice(len(prepared.split.train), 64, replace=False)]
    calib = to_float(InMemoryDataset.load(train_config.data_root, calib_records).images).numpy()
    int8_path = out_dir / INT8_FILE
    try:
        quantize_int8(onnx_path, int8_path, calib)
    except Exception as exc:  # quantisation is optional; report, do not fail the export
        int8_path.unlink(missing_ok=True)
        return None, None, f"int8 quantisation failed ({type(exc).__name__}: {exc}); skipped"
    probs = onnx_probabilities(int8_path, val_ds)
    auc = roc_auc(val_ds.labels.numpy(), probs)
    delta = fp32_metrics.auc.value - auc
    if delta > INT8_AUC_TOLERANCE:
        int8_path.unlink(missing_ok=True)
        return None, None, (
            f"int8 (static QDQ, per-channel) validation AUC {auc:.4f} vs fp32 "
            f"{fp32_metrics.auc.value:.4f} (drop {delta:.4f} > {INT8_AUC_TOLERANCE}); not shipped"
        )
    info = {
        "onnx_file": INT8_FILE,
        "onnx_sha256": sha256_file(int8_path),
        "validation_auc": round(auc, 4),
        "note": "static QDQ int8, per-channel weights, calibrated on 64 training images",
    }
    return int8_path, info, f"int8 validation AUC {auc:.4f} (fp32 {fp32_metrics.auc.value:.4f}); shipped"


def _schedule_text(t: dict[str, Any]) -> str:
    stages = ", ".join(
        f"{s['epochs']} epoch{'s' if s['epochs'] != 1 else ''} at {s['resolution']}px" for s in t["schedule"]
    )
    if t.get("time_budget_s") is None:
        return stages
    if len(t["schedule"]) == 1:
        return (
            f"{t['schedule'][0]['resolution']}px throughout, paced by a {t['time_budget_s'] / 60:.1f}-minute "
            "time budget (the cosine learning rate follows the fraction of the budget used)"
        )
    return (
        f"paced by a {t['time_budget_s'] / 60:.0f}-minute time budget — learning rate (cosine) and "
        f"resolution follow the fraction of the budget used, the resolution stages taking the "
        f"time shares of the nominal plan {stages} (weighted by epochs x resolution^2)"
    )


def _plan_text(t: dict[str, Any]) -> str:
    if t.get("time_budget_s") is None:
        return f"planned {t['planned_epochs']}"
    return f"stopped by the {t['time_budget_s'] / 60:.1f}-minute budget; the last may be partial"


def _validation_chose(select: str) -> str:
    """What the validation split chose for a run that kept its *select* epoch ("best" or "last")."""
    return "the threshold" if select == "last" else "the best epoch and the threshold"


def _fmt(est: dict[str, Any]) -> str:
    return f"{est['value']:.3f} (95% CI {est['ci95'][0]:.3f}-{est['ci95'][1]:.3f})"


def render_model_card(manifest: dict[str, Any], checkpoint: dict[str, Any], int8_note: str) -> str:
    """MODEL_CARD.md text, every number taken from the manifest / checkpoint history."""
    m = manifest["metrics"]
    t = manifest["training"]
    td = manifest["training_data"]
    onnx_size = None
    lines = [
        f"# {manifest['name']} — model card",
        "",
        f"`{manifest['id']}` version {manifest['version']}, created {manifest['created']}.",
        "",
        "> **Research use only. Not a cleared medical device.** It has not been evaluated "
        "prospectively or on data from any other hospital. Outputs must not be used to make "
        "clinical decisions without a qualified clinician's own reading of the image.",
        "",
        "## Intended use",
        "",
        manifest["intended_use"],
        "",
        "Input: one frontal (PA/AP) paediatric chest radiograph, converted to one channel in display "
        "orientation (MONOCHROME2, white = dense), squashed to 224x224 without keeping the aspect "
        "ratio, pixel values scaled to [0, 1]. Outputs: `probability` of PNEUMONIA (sigmoid) and "
        "`cam`, a 7x7 class activation map, not normalised: "
        + manifest["outputs"]["cam"]["formula"]
        + ".",
        "",
        "## Training data and attribution",
        "",
        f"{td['citation']} Licence: {td['licence']} (doi:{td['doi']}). Images from the Guangzhou "
        "Women and Children's Medical Center, patients aged 1-5 years.",
        "",
        f"Only the dataset's train folder was used: {td['split']}. The dataset's own test split was "
        "not used at all (it is reserved for independent evaluation).",
        "",
        "## Training procedure",
        "",
        f"- Architecture: {t['architecture']}.",
        f"- Optimiser: {t['optimizer']}.",
        f"- Loss: {t['loss']}.",
        "- Resolution schedule: " + _schedule_text(t) + "; validation always at 224px.",
        f"- Augmentation: {t['augmentation']}.",
        f"- Weight averaging: {t.get('weight_averaging', 'none')}; label smoothing "
        f"{t.get('label_smoothing', 0.0)}; distilled from {t.get('distilled_from', 0)} teacher(s).",
        f"- Epochs run: {t['epochs']} ({_plan_text(t)}); epoch kept: {t['best_epoch']} "
        f"({t.get('epoch_kept', 'best validation AUC')}). Seed {t['seed']}. PyTorch "
        f"{t['torch_version']} on {t.get('device', 'cpu')}, training time {t['duration_s'] / 60:.1f} min.",
        "",
        "Per-epoch validation (PyTorch, 224px):",
        "",
        "| epoch | train res at epoch end | train loss | val AUC |",
        "| --- | --- | --- | --- |",
    ]
    for h in checkpoint.get("history", []):
        lines.append(
            f"| {h['epoch']} | {h['resolution']} | {h['train_loss']:.4f} | {h['val_auc']:.4f} |"
        )
    lines += [
        "",
        "## Validation metrics",
        "",
        f"Split: {m['split']}.",
        "",
    ]
    if "auc" in m:
        lines += [
            f"- n = {m['n']} images ({m['n_positive']} PNEUMONIA, {m['n'] - m['n_positive']} NORMAL) "
            f"from {m.get('n_patients', '?')} patients",
            f"- AUC: {_fmt(m['auc'])}",
            f"- Sensitivity at the threshold: {_fmt(m['sensitivity'])}",
            f"- Specificity at the threshold: {_fmt(m['specificity'])}",
            f"- Threshold: {manifest['threshold']:.6f} — {manifest['threshold_rule']}.",
            f"- Intervals: {m.get('bootstrap', 'bootstrap')}, {m.get('bootstrap_resamples')} resamples.",
            "",
            f"These numbers are optimistic: the same validation split chose "
            f"{_validation_chose('last' if str(t.get('epoch_kept', '')).startswith('last') else 'best')}, "
            "and it comes from the same hospital, period and acquisition process as the "
            "training images. Expect lower specificity (and possibly sensitivity) elsewhere, "
            "including on the dataset's own test split, which is known to differ in class balance "
            "and appearance from its train split.",
            "",
        ]
    reference = manifest.get("monitoring", {}).get("reference")
    if reference:
        lines += [
            "## Drift monitoring reference",
            "",
            f"`model.json` → `monitoring.reference`: the distributions of the probability and of the model "
            f"input's intensity statistics (mean, std, dark and bright fractions) on {reference['n']} images of "
            f"{reference['computed_on']}, measured through the gateway's DICOM path; the gateway compares its "
            "recent results with them (population stability index, docs/model.md \"Model monitoring\").",
            "",
        ]
    lines += [
        "## Limitations",
        "",
        "- Paediatric data only (1-5 years), from a single centre in Guangzhou; not validated on "
        "adults, other age groups, other hospitals, other equipment or other populations.",
        "- Binary NORMAL vs PNEUMONIA only; bacterial and viral pneumonia are merged, and other "
        "findings (effusion, cardiomegaly, tubes and lines, tumours, ...) are neither detected nor "
        "excluded. A NORMAL output does not mean a normal radiograph.",
        "- Trained on images squashed to 224x224 (aspect ratio lost) and stored as JPEG; fine detail "
        "is lost and the runtime must reproduce the same squash.",
        "- Frontal views only; lateral, rotated or flipped images are out of scope.",
        "- The labels come from the dataset (expert grading) and contain some noise; the dataset is "
        "known to carry acquisition and labelling shortcuts a network can exploit.",
        "- The class activation map is coarse (7x7, 32-pixel cells) and shows where the network's "
        "evidence lies, not where pathology is; it is not a segmentation.",
        "- Trained from scratch (no pretrained weights) on about 4,400 images in a short budget.",
        "",
        "## Files",
        "",
        f"- `{manifest['onnx_file']}` — ONNX opset {manifest.get('onnx_opset')}, sha256 "
        f"`{manifest['onnx_sha256']}`; max difference vs PyTorch: probability "
        f"{manifest['onnx_vs_pytorch_max_diff']['probability_abs']:.2e} (absolute), cam "
        f"{manifest['onnx_vs_pytorch_max_diff']['cam_relative_to_sum_abs_terms']:.2e} (relative).",
        "- `model.json` — the manifest the runtime reads.",
        f"- int8 variant: {int8_note}.",
        "",
    ]
    del onnx_size
    return "\n".join(lines)


def build_arg_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m inference.training.export`` (and ``pneumo model export``)."""
    p = argparse.ArgumentParser(
        prog="python -m inference.training.export",
        description="Export a checkpoint to ONNX with model.json and MODEL_CARD.md.",
    )
    p.add_argument("checkpoint", type=Path, help="best.pt written by training")
    p.add_argument("out_dir", type=Path, help="model directory, e.g. inference/models/pneumonia-effnetb0")
    p.add_argument("--data-root", type=Path, default=None, help="override the checkpoint's data root")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--int8", action="store_true", help="also try an int8 variant (kept only if AUC holds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="operating threshold chosen elsewhere (e.g. evaluate_shift's rule); metrics reported at it",
    )
    p.add_argument("--threshold-rule", default=None, help="how --threshold was chosen (goes into model.json)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    t0 = time.perf_counter()
    outcome = export_model(
        ExportConfig(
            checkpoint=args.checkpoint,
            out_dir=args.out_dir,
            data_root=args.data_root,
            opset=args.opset,
            version=args.version,
            quantize_int8=args.int8,
            num_threads=args.threads,
            threshold=args.threshold,
            threshold_rule=args.threshold_rule,
        )
    )
    print(json.dumps(outcome.manifest.get("metrics", {}), indent=2))
    print(
        f"wrote {outcome.onnx_path} ({outcome.onnx_path.stat().st_size / 1e6:.1f} MB), "
        f"{outcome.manifest_path}; ONNX vs PyTorch max abs diff: probability "
        f"{outcome.max_abs_diff_probability:.2e}, cam (relative) {outcome.max_abs_diff_cam:.2e}; "
        f"{outcome.int8_note}; {time.perf_counter() - t0:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
