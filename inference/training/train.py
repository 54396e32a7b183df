"""Training loop for the bundled pneumonia classifier (``pneumo model train``).

What it does and why:

* **AdamW + linear warm-up + cosine decay**, stepped per batch, over a fixed number of steps known
  up front, so a resumed run continues on the very same learning-rate curve.
* **Progressive resizing** (``stages``): early epochs at a lower resolution (much cheaper on a CPU),
  the last epochs at 224, the resolution of the ONNX contract, at a low learning rate.
* **Class imbalance** (about 3:1 PNEUMONIA:NORMAL) is handled with ``pos_weight = n_neg / n_pos``
  in the BCE loss, so both classes weigh equally in the gradient.
* **Determinism**: every epoch reseeds the global RNG (dropout, stochastic depth) and its own
  shuffle/augmentation generator from ``(seed, epoch)``, so an interrupted run resumed from its
  checkpoint follows the same sequence as an uninterrupted one (up to floating-point ordering).
* **Checkpoint every epoch** (``last.pt``, written atomically) and keep the checkpoint with the best
  validation AUC at 224 (``best.pt``).
* **Operating threshold chosen on validation** with the rule ``sensitivity >= 0.95, then the highest
  specificity``: missing pneumonia costs more than an extra look at a normal film.
* **Metrics with 95 % bootstrap confidence intervals** (1000 resamples), resampling *patients*
  (a cluster bootstrap), since images of one child are not independent.
* **GPU runs** (``--device cuda --bf16``) keep data, augmentation and network on the device, with
  the same per-image random choices as the CPU path; **weight averaging** (``--ema-decay``),
  **keeping the last epoch** (``--select last``, so that validation chooses nothing),
  **cross-validation folds** inside the training part of the split (``--folds/--fold``), and
  **distillation** from teacher checkpoints (``--teacher``) serve the campaign driver
  (:mod:`inference.training.campaign`) and the model 1.1.0 recipe (EXPERIMENTS.md, 5–6).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch.nn import functional as F

from .data import (
    IMAGE_SIZE,
    AugmentConfig,
    DedupReport,
    InMemoryDataset,
    Record,
    Split,
    augment,
    deduplicate,
    fold_split,
    patient_split,
    read_manifest,
    resize_batch,
    to_float,
)
from .efficientnet import EfficientNetB0, EfficientNetConfig
from .pixel_shifts import PIXEL_SHIFTS

DEFAULT_DATA_ROOT = Path("/work/shared/data/kermany-cxr-224")
THRESHOLD_RULE = (
    "highest threshold on the patient-wise validation split whose sensitivity is >= {target:.2f} "
    "(i.e. maximum specificity subject to sensitivity >= {target:.2f}); PNEUMONIA if probability >= "
    "threshold"
)


# --------------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """``epochs`` consecutive epochs trained at ``resolution`` x ``resolution``."""

    epochs: int
    resolution: int


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.  Stored in each checkpoint.

    ``max_images`` / ``max_steps_per_epoch`` exist for smoke tests; leave them ``None`` for a real
    run.  ``out_dir`` receives ``last.pt``, ``best.pt``, ``history.jsonl`` and ``outcome.json``.
    """

    out_dir: Path
    data_root: Path = DEFAULT_DATA_ROOT
    stages: tuple[Stage, ...] = (Stage(9, 160), Stage(2, 192), Stage(1, 224))
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    val_fraction: float = 0.15
    seed: int = 20260317
    # The patient split (and the cross-validation folds) use split_seed when set, else seed: models
    # of several seeds then share one held-out validation split.
    split_seed: int | None = None
    num_threads: int = 2
    channels_last: bool = True
    eval_resolution: int = IMAGE_SIZE
    eval_batch_size: int = 32
    dropout: float = 0.2
    drop_path_rate: float = 0.2
    label_smoothing: float = 0.0
    target_sensitivity: float = 0.95
    bootstrap_resamples: int = 1000
    precise_bn_images: int = 384
    resume: bool = True
    max_images: int | None = None
    max_steps_per_epoch: int | None = None
    time_budget_s: float | None = None
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    # Where and how to compute. "cuda" keeps the whole data set, augmentation and model on the GPU;
    # bf16 autocast there. The CPU path is the shipped model's, unchanged.
    device: str = "cpu"
    bf16: bool = False
    # Exponential moving average of the weights (per step; 0 = off). The average is what is
    # validated, checkpointed and exported: it is usually smoother and more robust than the last
    # iterate, at no training cost.
    ema_decay: float = 0.0
    # "best": keep the epoch with the best validation AUC (the shipped model's rule); "last": keep
    # the final epoch, so that the validation set chooses nothing (cross-validation, final models
    # whose validation split must stay untouched).
    select: str = "best"
    # folds > 0: cross-validation inside the training part of the split — fold `fold` validates,
    # the other folds train; the held-out validation split is not read at all.
    folds: int = 0
    fold: int = 0
    # Knowledge distillation: checkpoints whose mean probability (eval mode, on the same augmented
    # batch) is a soft target with weight distill_weight next to the labels.
    teachers: tuple[str, ...] = ()
    distill_weight: float = 0.5
    # Score the validation set under the pixel shifts of inference.training.pixel_shifts too and
    # write them to val_scores.npz (cross-validation's out-of-fold predictions).
    score_shifts: bool = False

    @property
    def epochs(self) -> int:
        """Planned epochs (fixed-step mode; in time-budget mode the run stops on the clock)."""
        return sum(s.epochs for s in self.stages)

    def resolution_for_progress(self, progress: float) -> int:
        """Resolution at *progress* in [0, 1] of a time-budgeted run.

        Each stage gets a share of the *time* proportional to ``epochs * resolution**2`` (the
        cost of its epochs), so the stage mix matches the fixed schedule's on a steady machine.
        """
        costs = [s.epochs * s.resolution**2 for s in self.stages]
        total = float(sum(costs))
        cumulative = 0.0
        for s, c in zip(self.stages, costs, strict=True):
            cumulative += c / total
            if progress < cumulative:
                return s.resolution
        return self.stages[-1].resolution

    def resolution_for_epoch(self, epoch: int) -> int:
        """Resolution of 0-based *epoch* under the progressive-resizing stages."""
        seen = 0
        for s in self.stages:
            seen += s.epochs
            if epoch < seen:
                return s.resolution
        return self.stages[-1].resolution

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["data_root"] = str(self.data_root)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["out_dir"] = Path(d["out_dir"])
        d["data_root"] = Path(d["data_root"])
        d["stages"] = tuple(Stage(**s) for s in d["stages"])
        d["teachers"] = tuple(d.get("teachers", ()))
        aug = dict(d["augmentation"])
        for k in ("scale", "contrast", "gamma", "frame_scale", "noise_sigma", "lowres_factor"):
            if k in aug:
                aug[k] = tuple(aug[k])
        d["augmentation"] = AugmentConfig(**aug)
        return cls(**d)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % bootstrap percentile interval."""

    value: float
    ci95: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {"value": round(self.value, 4), "ci95": [round(self.ci95[0], 4), round(self.ci95[1], 4)]}


@dataclass(frozen=True)
class Metrics:
    """Validation metrics at an operating threshold."""

    n: int
    n_positive: int
    n_patients: int
    threshold: float
    auc: Estimate
    sensitivity: Estimate
    specificity: Estimate
    bootstrap_resamples: int

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "n_positive": self.n_positive,
            "n_patients": self.n_patients,
            "threshold": self.threshold,
            "auc": self.auc.to_json(),
            "sensitivity": self.sensitivity.to_json(),
            "specificity": self.specificity.to_json(),
            "bootstrap_resamples": self.bootstrap_resamples,
            "bootstrap": "cluster (patient) bootstrap, percentile 95% interval",
        }


@dataclass(frozen=True)
class TrainOutcome:
    """What ``train`` produced."""

    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int  # 1-based
    best_val_auc: float
    threshold: float
    threshold_rule: str
    metrics: Metrics
    epochs_completed: int
    duration_s: float
    history: list[dict[str, Any]]


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Returns NaN when one class is absent (AUC is undefined).
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average ranks over ties.
    i = 0
    while i < sorted_scores.size:
        j = i
        while j + 1 < sorted_scores.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity when ``score >= threshold`` is called positive."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    sens = float((pred & labels).sum() / n_pos) if n_pos else float("nan")
    spec = float((~pred & ~labels).sum() / n_neg) if n_neg else float("nan")
    return sens, spec


def choose_threshold(labels: np.ndarray, scores: np.ndarray, target_sensitivity: float = 0.95) -> float:
    """Highest threshold whose sensitivity is still >= *target_sensitivity*.

    Sensitivity only falls as the threshold rises, so the highest qualifying threshold is the one
    with the best specificity.  Candidates are the observed positive scores; the result is one of
    them, so ``score >= threshold`` reproduces the measured sensitivity exactly.
    """
    labels = np.asarray(labels).astype(bool)
    pos = np.sort(np.asarray(scores, dtype=np.float64)[labels])[::-1]
    if pos.size == 0:
        raise ValueError("labels: no positive case, cannot choose a sensitivity-based threshold")
    needed = math.ceil(target_sensitivity * pos.size - 1e-9)
    needed = min(max(needed, 1), pos.size)
    return float(pos[needed - 1])


def bootstrap_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: Sequence[str],
    threshold: float,
    resamples: int = 1000,
    seed: int = 0,
) -> Metrics:
    """AUC, sensitivity, specificity with 95 % percentile intervals from a patient-cluster bootstrap.

    Each resample draws patients with replacement and takes all their images, which respects the
    correlation between images of one child (an image-level bootstrap would give intervals that
    are too narrow).  The threshold is held fixed.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(uniq.size)]
    rng = np.random.default_rng(seed)
    aucs, senss, specs = [], [], []
    for _ in range(resamples):
        picked = rng.integers(0, uniq.size, size=uniq.size)
        idx = np.concatenate([members[g] for g in picked])
        y, s = labels[idx], scores[idx]
        auc = roc_auc(y, s)
        sens, spec = sensitivity_specificity(y, s, threshold)
        aucs.append(auc)
        senss.append(sens)
        specs.append(spec)

    def ci(values: list[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        if arr.size == 0:
            return (float("nan"), float("nan"))
        return (float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5)))

    sens, spec = sensitivity_specificity(labels, scores, threshold)
    return Metrics(
        n=int(labels.size),
        n_positive=int(labels.sum()),
        n_patients=int(uniq.size),
        threshold=float(threshold),
        auc=Estimate(roc_auc(labels, scores), ci(aucs)),
        sensitivity=Estimate(sens, ci(senss)),
        specificity=Estimate(spec, ci(specs)),
        bootstrap_resamples=resamples,
    )


# --------------------------------------------------------------------------------------------------
# Data preparation shared with export
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """The de-duplicated, split records (images not loaded)."""

    records: list[Record]
    dedup: DedupReport
    split: Split


def prepare_records(config: TrainConfig) -> PreparedData:
    """Read the manifest, de-duplicate and split by patient — deterministic for a config.

    ``export`` calls this again with the checkpoint's config to re-create the exact validation set.
    """
    records, report = deduplicate(read_manifest(config.data_root))
    if config.max_images is not None:
        # Smoke-test mode: a label-balanced, path-ordered subset of whole patients is not needed;
        # take the first images of each class (still split by patient below).
        per_class = max(1, config.max_images // 2)
        records = [r for r in records if r.label_id == 0][:per_class] + [
            r for r in records if r.label_id == 1
        ][:per_class]
    split_seed = config.seed if config.split_seed is None else config.split_seed
    split = patient_split(records, config.val_fraction, split_seed)
    if config.folds > 0:
        split = fold_split(split.train, config.folds, config.fold, split_seed)
    overlap = {r.patient for r in split.train} & {r.patient for r in split.val}
    if overlap:  # cannot happen by construction; checked because leakage would be silent
        raise RuntimeError(f"patient leakage between train and validation: {sorted(overlap)[:5]}")
    return PreparedData(records=records, dedup=report, split=split)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float) -> float:
    """Linear warm-up to *base_lr*, then cosine decay to ``min_ratio * base_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_at_progress(
    step: int, progress: float, warmup_steps: int, base_lr: float, min_ratio: float
) -> float:
    """Time-budget mode: step-based linear warm-up times a cosine over the elapsed-time fraction."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * warm * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def predict(
    model: EfficientNetB0,
    dataset: InMemoryDataset,
    resolution: int,
    batch_size: int,
    channels_last: bool,
) -> np.ndarray:
    """Sigmoid probabilities for *dataset* in eval mode (no augmentation)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for images, _ in dataset.batches(batch_size, shuffle=False):
        images = resize_batch(images.to(device), resolution)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out.append(torch.sigmoid(model(images).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def precise_bn(
    model: EfficientNetB0,
    dataset: InMemoryDataset,
    resolution: int,
    n_images: int,
    batch_size: int,
    channels_last: bool,
    seed: int,
) -> None:
    """Re-estimate every BatchNorm's running mean/variance at *resolution* ("precise BN").

    Why: running averages lag a network whose weights move quickly, and statistics gathered at
    a lower training resolution do not match the 224-pixel evaluation/export resolution.  A pass
    over a fixed, seeded subset of un-augmented *training* images (cumulative average, other
    modules in eval mode so stochastic depth and dropout stay off) gives the exact statistics of
    the current weights at the deployed resolution.  Validation images are never used here.
    """
    if n_images <= 0:
        return
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
        m.train()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=gen)[: min(n_images, len(dataset))]
    device = next(model.parameters()).device
    for start in range(0, idx.numel(), batch_size):
        batch = dataset.images[idx[start : start + batch_size].to(dataset.images.device)]
        images = resize_batch(to_float(batch).to(device), resolution)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        model(images)
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    model.eval()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and BatchNorm parameters (standard; decaying them only hurts)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file and rename, so a kill mid-write never leaves a corrupt checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}Z] {msg}", flush=True)


def build_model(config: TrainConfig) -> EfficientNetB0:
    """The network for *config* (also used by export to rebuild from a checkpoint)."""
    return EfficientNetB0(
        EfficientNetConfig(dropout=config.dropout, drop_path_rate=config.drop_path_rate)
    )


def train(config: TrainConfig) -> TrainOutcome:
    """Train (or resume) according to *config*; return where the best checkpoint is and its metrics.

    Resumes from ``out_dir/last.pt`` when ``config.resume`` is true and the file exists (the stored
    config must match, except ``resume``), so ``pneumo model train`` can simply be re-run after an
    interruption.

    With ``config.time_budget_s`` set, the run is paced by the clock instead of a step count: the
    cosine learning rate and the progressive-resizing stage follow the fraction of the budget used
    (training *and* validation time), and training stops when the budget is spent (the last epoch
    may be partial; it is still validated and checkpointed).  Why: on a shared 2-core machine the
    throughput varies several-fold with other people's load, and a fixed schedule would either
    finish early or miss its deadline with the learning rate still high.  Seeds stay fixed, but the
    exact step at which the resolution changes then depends on the machine's speed.
    """
    torch.set_num_threads(config.num_threads)
    device = torch.device(config.device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        # On a GPU, speed over bit-exact reruns: cuDNN picks its fastest kernels per shape.
        torch.backends.cudnn.benchmark = True
    config.out_dir.mkdir(parents=True, exist_ok=True)
    last_path = config.out_dir / "last.pt"
    best_path = config.out_dir / "best.pt"
    history_path = config.out_dir / "history.jsonl"

    prepared = prepare_records(config)
    _log(
        f"dedup: {prepared.dedup.n_in} -> {prepared.dedup.n_out} images "
        f"({prepared.dedup.duplicate_groups} duplicate groups, {prepared.dedup.removed} removed, "
        f"{prepared.dedup.conflicting_groups} label conflicts)"
    )
    _log(prepared.split.description)
    t_load = time.perf_counter()
    train_ds = InMemoryDataset.load(config.data_root, prepared.split.train)
    val_ds = InMemoryDataset.load(config.data_root, prepared.split.val)
    _log(f"decoded {len(train_ds) + len(val_ds)} images in {time.perf_counter() - t_load:.1f}s")

    n_pos = train_ds.n_positive
    n_neg = len(train_ds) - n_pos
    pos_weight = torch.tensor(n_neg / max(1, n_pos), dtype=torch.float32, device=device)

    steps_per_epoch = len(train_ds) // config.batch_size
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    steps_per_epoch = max(1, steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))

    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)

    start_epoch = 0
    best_auc = -1.0
    best_epoch = 0
    elapsed_before = 0.0
    history: list[dict[str, Any]] = []
    ema_state: dict[str, Any] | None = None
    if config.resume and last_path.is_file():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        stored = TrainConfig.from_json(ckpt["config"])
        if dataclasses.replace(stored, resume=config.resume) != config:
            raise ValueError(
                f"config: {last_path} was written by a different configuration; use another "
                "out_dir or resume=False"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"])
        best_auc = float(ckpt["best_auc"])
        best_epoch = int(ckpt["best_epoch"])
        elapsed_before = float(ckpt["elapsed_s"])
        history = list(ckpt["history"])
        ema_state = ckpt.get("ema")
        _log(f"resumed from {last_path} after epoch {start_epoch} (best AUC {best_auc:.4f})")
    else:
        # Pixel statistics of the training images, for the in-graph normalisation.
        flat = train_ds.images.to(torch.float32).div_(255.0)
        mean, std = float(flat.mean()), float(flat.std())
        del flat
        model.set_input_stats(mean, std)
        _log(f"input stats: mean {mean:.4f} std {std:.4f}; pos_weight {pos_weight.item():.4f}")

    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits memory_format
    model = model.to(device)
    train_ds, val_ds = train_ds.to(device), val_ds.to(device)
    # The optimizer was built (and possibly restored) on the CPU parameters; move its state too.
    optimizer.load_state_dict(optimizer.state_dict())
    ema = WeightEma(model, config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    teachers = [load_checkpoint(Path(t))[0].to(device) for t in config.teachers]
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)

    t0 = time.perf_counter()
    budget = config.time_budget_s

    def progress_now() -> float:
        assert budget is not None
        return (elapsed_before + (time.perf_counter() - t0)) / budget

    budget_spent = budget is not None and elapsed_before >= budget
    epoch = start_epoch
    while not budget_spent and (budget is not None or epoch < config.epochs):
        resolution = config.resolution_for_epoch(epoch)
        torch.manual_seed(config.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        model.train()
        t_epoch = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for step_in_epoch, (images, labels) in enumerate(
            train_ds.batches(config.batch_size, shuffle=True, generator=gen, drop_last=True)
        ):
            if step_in_epoch >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + step_in_epoch
            if budget is not None:
                progress = progress_now()
                if progress >= 1.0:
                    budget_spent = True
                    break
                resolution = config.resolution_for_progress(progress)
                lr = lr_at_progress(step, progress, warmup_steps, config.lr, config.min_lr_ratio)
            else:
                lr = lr_at(step, total_steps, warmup_steps, config.lr, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = augment(resize_batch(images, resolution), config.augmentation, gen)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if config.label_smoothing > 0:
                targets = labels * (1 - config.label_smoothing) + 0.5 * config.label_smoothing
            with autocast:
                logits = model(images).float()
                soft = _teacher_probabilities(teachers, images)
            loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
            if soft is not None:
                # The teachers' probabilities are on the pos_weight-balanced scale already.
                soft_loss = F.binary_cross_entropy_with_logits(logits, soft)
                loss = (1.0 - config.distill_weight) * loss + config.distill_weight * soft_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model)
            loss_sum += loss.detach() * labels.shape[0]
            seen += labels.shape[0]
            if step_in_epoch % 20 == 0:
                pct = f" budget {progress_now():.1%}" if budget is not None else ""
                of = "" if budget is not None else f"/{config.epochs}"
                _log(
                    f"epoch {epoch + 1}{of} step {step_in_epoch}/{steps_per_epoch} "
                    f"res {resolution} lr {lr:.2e} loss {loss.item():.4f}{pct}"
                )
        train_time = time.perf_counter() - t_epoch
        if seen == 0:  # budget ran out before this epoch trained anything
            break

        t_eval = time.perf_counter()
        evaluated = model if ema is None else ema.module
        precise_bn(
            evaluated,
            train_ds,
            config.eval_resolution,
            config.precise_bn_images,
            config.eval_batch_size,
            config.channels_last,
            config.seed,
        )
        probs = predict(evaluated, val_ds, config.eval_resolution, config.eval_batch_size, config.channels_last)
        labels_np = val_ds.labels.cpu().numpy()
        auc = roc_auc(labels_np, probs)
        thr = choose_threshold(labels_np, probs, config.target_sensitivity)
        sens, spec = sensitivity_specificity(labels_np, probs, thr)
        eval_time = time.perf_counter() - t_eval
        entry = {
            "epoch": epoch + 1,
            "resolution": resolution,
            "train_loss": float(loss_sum) / max(1, seen),
            "val_auc": auc,
            "val_threshold": thr,
            "val_sensitivity": sens,
            "val_specificity": spec,
            "lr_end": lr,
            "train_s": round(train_time, 1),
            "eval_s": round(eval_time, 1),
            "train_images_per_s": round(seen / train_time, 2),
            "train_images": seen,
        }
        if budget is not None:
            entry["budget_used"] = round(progress_now(), 4)
        history.append(entry)
        with history_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        _log(
            f"epoch {epoch + 1} done: loss {entry['train_loss']:.4f} val AUC {auc:.4f} "
            f"(sens {sens:.3f} / spec {spec:.3f} @ {thr:.3f}) train {train_time:.0f}s "
            f"({entry['train_images_per_s']} img/s) eval {eval_time:.0f}s"
        )

        elapsed = elapsed_before + (time.perf_counter() - t0)
        state = {
            "config": config.to_json(),
            "model": _cpu_state(evaluated),
            "epoch": epoch + 1,
            "val_auc": auc,
            "history": history,
            "elapsed_s": elapsed,
            "torch_version": torch.__version__,
        }
        # "Best" only among epochs evaluated at the export resolution (always, with the default
        # eval_resolution=224); ties go to the later (lower-LR) epoch.
        if config.select == "last" or (not math.isnan(auc) and auc >= best_auc):
            best_auc, best_epoch = auc, epoch + 1
            _atomic_save(state, best_path)
            kept = "last epoch" if config.select == "last" else "new best"
            _log(f"{kept} checkpoint (epoch {best_epoch}, AUC {best_auc:.4f})")
        resume_state = {"optimizer": optimizer.state_dict(), "best_auc": best_auc, "best_epoch": best_epoch}
        if ema is not None:
            resume_state["ema"] = ema.state_dict()
            resume_state["model"] = _cpu_state(model)  # training resumes from the raw weights
        _atomic_save({**state, **resume_state}, last_path)
        if budget is not None and progress_now() >= 1.0:
            budget_spent = True
        epoch += 1

    duration = elapsed_before + (time.perf_counter() - t0)
    if not best_path.is_file():
        raise RuntimeError(f"time_budget_s: no epoch completed, so there is no {best_path}")
    metrics = evaluate_checkpoint(best_path, val_ds=val_ds, device=device)
    if config.score_shifts:
        write_val_scores(best_path, val_ds, config.out_dir / "val_scores.npz", device)
    outcome = TrainOutcome(
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        best_epoch=best_epoch,
        best_val_auc=best_auc,
        threshold=metrics.threshold,
        threshold_rule=THRESHOLD_RULE.format(target=config.target_sensitivity),
        metrics=metrics,
        epochs_completed=len(history),
        duration_s=duration,
        history=history,
    )
    (config.out_dir / "outcome.json").write_text(
        json.dumps(
            {
                "best_checkpoint": str(best_path),
                "best_epoch": best_epoch,
                "best_val_auc": best_auc,
                "threshold_rule": outcome.threshold_rule,
                "metrics": metrics.to_json(),
                "duration_s": duration,
                "epochs_completed": outcome.epochs_completed,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    _log(f"finished: best epoch {best_epoch} AUC {best_auc:.4f}; {duration:.0f}s")
    return outcome


ModelT = TypeVar("ModelT", bound=torch.nn.Module)


class WeightEma(Generic[ModelT]):
    """Exponential moving average of a model's parameters, with a warm-up of the decay.

    The decay used at update *n* is ``min(decay, (1 + n) / (10 + n))``: early averages forget the
    random initialisation quickly, so a short (clock-paced) run is not dragged back towards it —
    with a fixed 0.998, a 700-step run would still hold a quarter of its initial weights. Buffers
    are not averaged: :func:`precise_bn` re-estimates the BatchNorm statistics of the average
    before every evaluation.
    """

    def __init__(self, model: ModelT, decay: float) -> None:
        self.module: ModelT = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged: list[torch.Tensor] = list(self.module.parameters())
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


@torch.no_grad()
def _teacher_probabilities(teachers: Sequence[EfficientNetB0], images: torch.Tensor) -> torch.Tensor | None:
    """Mean probability of the *teachers* (eval mode) on *images*; ``None`` without teachers."""
    if not teachers:
        return None
    return torch.stack([torch.sigmoid(t(images).float()) for t in teachers]).mean(dim=0)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict on the CPU (a checkpoint must load on a machine without the training GPU)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_checkpoint(path: Path) -> tuple[EfficientNetB0, TrainConfig, dict[str, Any]]:
    """Rebuild the model (eval mode, contiguous, float32) and its config from a checkpoint.

    Half-precision weights (a checkpoint slimmed for transport) are widened on load.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig.from_json(ckpt["config"])
    model = build_model(config)
    model.load_state_dict(ckpt["model"])
    model = model.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]  # torch's stub omits memory_format
    return model, config, ckpt


def validation_dataset(config: TrainConfig) -> InMemoryDataset:
    """Re-create (deterministically) and decode the validation split of *config*."""
    prepared = prepare_records(config)
    return InMemoryDataset.load(config.data_root, prepared.split.val)


def evaluate_checkpoint(
    path: Path, val_ds: InMemoryDataset | None = None, device: torch.device | str = "cpu"
) -> Metrics:
    """Validation metrics of a checkpoint with PyTorch: threshold by the rule, bootstrap CIs."""
    model, config, _ = load_checkpoint(path)
    torch.set_num_threads(config.num_threads)
    ds = val_ds if val_ds is not None else validation_dataset(config)
    probs = predict(model.to(device), ds, config.eval_resolution, config.eval_batch_size, channels_last=False)
    return metrics_from_scores(ds.labels.cpu().numpy(), probs, ds.patients, config)


def write_val_scores(path: Path, val_ds: InMemoryDataset, out: Path, device: torch.device | str = "cpu") -> None:
    """Probabilities of checkpoint *path* on *val_ds* under every pixel shift, saved as ``.npz``.

    For a cross-validation fold these are out-of-fold predictions: pooled over the folds they judge
    the recipe on patients no scoring model saw, and choose its operating point under shift
    (``evaluate_shift.shift_threshold``). Arrays: ``paths``, ``patients``, ``labels``, and one
    ``score_<condition>`` per shift of :data:`~inference.training.pixel_shifts.PIXEL_SHIFTS`.
    """
    model, config, _ = load_checkpoint(path)
    model = model.to(device)
    clean_u8 = val_ds.images.cpu().numpy()[:, 0]
    arrays: dict[str, np.ndarray] = {
        "paths": np.array([r.path for r in val_ds.records]),
        "patients": np.array(val_ds.patients),
        "labels": val_ds.labels.cpu().numpy().astype(np.int64),
    }
    for shift in PIXEL_SHIFTS:
        try:
            shifted = np.stack([shift.apply(img, i) for i, img in enumerate(clean_u8)])[:, None]
        except OSError as exc:  # e.g. a Pillow without FreeType cannot draw the burned-in text
            _log(f"shift {shift.name} skipped on this machine: {exc}")
            continue
        ds = InMemoryDataset(torch.from_numpy(np.ascontiguousarray(shifted)), val_ds.records)
        arrays[f"score_{shift.name}"] = predict(
            model, ds, config.eval_resolution, config.eval_batch_size, channels_last=False
        )
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub wants one array type
    os.replace(tmp, out)


def metrics_from_scores(
    labels: np.ndarray, probs: np.ndarray, patients: Sequence[str], config: TrainConfig
) -> Metrics:
    """Choose the threshold by the stated rule and bootstrap the metrics (seeded by the config)."""
    threshold = choose_threshold(labels, probs, config.target_sensitivity)
    return bootstrap_metrics(
        labels, probs, patients, threshold, config.bootstrap_resamples, seed=config.seed
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse_stages(text: str) -> tuple[Stage, ...]:
    """``"11x160,3x192,2x224"`` -> stages."""
    stages = []
    for part in text.split(","):
        epochs, res = part.lower().split("x")
        stages.append(Stage(int(epochs), int(res)))
    return tuple(stages)


def build_arg_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m inference.training.train`` (and ``pneumo model train``)."""
    d = TrainConfig(out_dir=Path("."))
    p = argparse.ArgumentParser(
        prog="python -m inference.training.train",
        description="Train the EfficientNet-B0 pneumonia classifier (resumes from OUT_DIR/last.pt).",
    )
    p.add_argument("--out-dir", type=Path, required=True, help="checkpoints and logs go here")
    p.add_argument("--data-root", type=Path, default=d.data_root, help="folder with manifest.csv")
    p.add_argument(
        "--stages",
        type=_parse_stages,
        default=d.stages,
        help="progressive resizing, EPOCHSxRES[,EPOCHSxRES...] (default 9x160,2x192,1x224)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--split-seed", type=int, default=None, help="seed of the patient split (default: --seed)")
    p.add_argument("--threads", type=int, default=d.num_threads)
    p.add_argument("--target-sensitivity", type=float, default=d.target_sensitivity)
    p.add_argument(
        "--augmentation",
        choices=["baseline", "shift"],
        default="baseline",
        help="baseline: the shipped model's recipe; shift: also frames, noise, down-sampling, wider photometry",
    )
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        help="targets pulled towards 0.5 by this fraction (0 = off)",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="pace the run by the clock: LR and resolution follow the used fraction of this budget",
    )
    p.add_argument(
        "--frame-p", type=float, default=None, help="share of images framed (shift recipe: 0.25)"
    )
    p.add_argument(
        "--noise-p", type=float, default=None, help="share of images with Gaussian noise (shift recipe: 0.3)"
    )
    p.add_argument(
        "--white-frame-p",
        type=float,
        default=None,
        help="share of the framed images whose frame is white instead of black (shift recipe: 0.25)",
    )
    p.add_argument("--device", default=d.device, help="cpu (default) or cuda[:N]")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA of the weights per step (0 = off)")
    p.add_argument(
        "--select",
        choices=["best", "last"],
        default=d.select,
        help="keep the best-validation epoch, or the last one (validation then chooses nothing)",
    )
    p.add_argument("--folds", type=int, default=d.folds, help="cross-validation: number of patient folds")
    p.add_argument("--fold", type=int, default=d.fold, help="cross-validation: the validation fold (0-based)")
    p.add_argument(
        "--teacher", type=Path, action="append", default=[], help="distil from this checkpoint (repeatable)"
    )
    p.add_argument("--distill-weight", type=float, default=d.distill_weight)
    p.add_argument(
        "--score-shifts",
        action="store_true",
        help="also write the validation set's probabilities under the pixel shifts (val_scores.npz)",
    )
    p.add_argument("--max-images", type=int, default=None, help="smoke tests only")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="smoke tests only")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    augmentation = AugmentConfig.acquisition_shift() if args.augmentation == "shift" else AugmentConfig()
    overrides = {"p_frame": args.frame_p, "p_noise": args.noise_p, "p_white_frame": args.white_frame_p}
    augmentation = dataclasses.replace(augmentation, **{k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(
        out_dir=args.out_dir,
        data_root=args.data_root,
        stages=args.stages,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        val_fraction=args.val_fraction,
        seed=args.seed,
        split_seed=args.split_seed,
        num_threads=args.threads,
        target_sensitivity=args.target_sensitivity,
        label_smoothing=args.label_smoothing,
        augmentation=augmentation,
        resume=not args.no_resume,
        max_images=args.max_images,
        max_steps_per_epoch=args.max_steps_per_epoch,
        time_budget_s=None if args.time_budget is None else args.time_budget * 60.0,
        device=args.device,
        bf16=args.bf16,
        ema_decay=args.ema_decay,
        select=args.select,
        folds=args.folds,
        fold=args.fold,
        teachers=tuple(str(t) for t in args.teacher),
        distill_weight=args.distill_weight,
        score_shifts=args.score_shifts,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    outcome = train(config_from_args(args))
    m = outcome.metrics
    print(
        f"best epoch {outcome.best_epoch}: AUC {m.auc.value:.4f} {m.auc.ci95}, "
        f"sensitivity {m.sensitivity.value:.3f} {m.sensitivity.ci95}, "
        f"specificity {m.specificity.value:.3f} {m.specificity.ci95} at threshold {m.threshold:.4f}; "
        f"checkpoint {outcome.best_checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
