"""Training data: manifest reading, de-duplication, patient-wise split, in-memory dataset, augmentation.

Source: Kermany D, Zhang K, Goldbaum M (2018), "Labeled Optical Coherence Tomography (OCT) and Chest
X-Ray Images for Classification", Mendeley Data V2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0 — the
paediatric (1-5 y) chest radiographs of Guangzhou Women and Children's Medical Center, train split
only, pre-squashed to 224x224.

Design choices and why:

* **De-duplicate by content hash before splitting.** Byte-identical copies exist; if one copy lands
  in training and another in validation, validation is inflated.  We hash the bytes we actually
  read (and check them against the manifest's sha256) rather than trusting the manifest alone.
* **Split by patient**, stratified by label.  Several radiographs of one child are strongly
  correlated; an image-wise split leaks patient identity into validation.
* **Everything is held in memory as uint8** (about 50 kB per image, ~260 MB for the whole set) and
  augmented batch-wise with tensor ops.  On a 2-core machine, JPEG decoding and per-sample PIL
  transforms in DataLoader workers would compete with the training threads for the same cores.
* **Augmentation is radiograph-appropriate**: small rotations / scaling / translation / shear (patient
  positioning varies a little), brightness / contrast / gamma jitter (exposure and processing vary
  between machines).  **No vertical flip** (never seen in practice) and **no horizontal flip**: a
  frontal CXR has a fixed laterality (heart and gastric bubble on the left, the L/R marker), a flipped
  image is an anatomically implausible one (situs inversus), and the deployed model only ever sees
  correctly oriented images — we prefer not to spend capacity on an impossible domain.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

LABELS: tuple[str, str] = ("NORMAL", "PNEUMONIA")
IMAGE_SIZE = 224

_PNEUMONIA_RE = re.compile(r"^person(\d+)_(?:bacteria|virus)_\d+(?:_\d+)?\.jpe?g$", re.IGNORECASE)
_NORMAL_RE = re.compile(r"^(NORMAL2-)?IM-(\d+)-\d+(?:-\d+)?\.jpe?g$", re.IGNORECASE)


class DataError(ValueError):
    """The training data does not match what the manifest or the naming scheme promises."""


@dataclass(frozen=True)
class Record:
    """One manifest row, with the patient key derived from the file name."""

    path: str  # relative to the data root, e.g. "train/NORMAL/IM-0115-0001.jpeg"
    label_id: int  # 0 = NORMAL, 1 = PNEUMONIA
    sha256: str
    patient: str


def patient_key(filename: str, label: str) -> str:
    """Patient identifier from a Kermany file name.

    PNEUMONIA: ``personN_{bacteria|virus}_M.jpeg`` -> ``P:N``.  NORMAL: ``IM-XXXX-YYYY.jpeg`` ->
    ``N:XXXX`` and ``NORMAL2-IM-XXXX-YYYY.jpeg`` -> ``N2:XXXX`` (a separate numbering namespace:
    the NORMAL2 batch restarts its patient numbers, so the same XXXX is not the same child).
    """
    if label == "PNEUMONIA":
        m = _PNEUMONIA_RE.match(filename)
        if m:
            return f"P:{int(m.group(1))}"
    elif label == "NORMAL":
        m = _NORMAL_RE.match(filename)
        if m:
            return f"{'N2' if m.group(1) else 'N'}:{int(m.group(2))}"
    raise DataError(f"filename {filename!r} (label {label}) does not follow the Kermany naming scheme")


def read_manifest(root: Path, split: str = "train") -> list[Record]:
    """Read ``manifest.csv`` under *root*, keeping rows of *split*, sorted by path (determinism)."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"root: no manifest.csv in {root}")
    records: list[Record] = []
    with manifest.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["split"] != split:
                continue
            label = row["label"]
            if label not in LABELS or int(row["label_id"]) != LABELS.index(label):
                raise DataError(f"manifest row {row['path']!r}: inconsistent label {label!r}")
            records.append(
                Record(
                    path=row["path"],
                    label_id=int(row["label_id"]),
                    sha256=row["sha256"].lower(),
                    patient=patient_key(Path(row["path"]).name, label),
                )
            )
    records.sort(key=lambda r: r.path)
    return records


@dataclass(frozen=True)
class DedupReport:
    """What de-duplication did, for the model card."""

    n_in: int
    n_out: int
    duplicate_groups: int
    removed: int
    conflicting_groups: int  # same bytes, different labels: all copies dropped


def deduplicate(records: Sequence[Record]) -> tuple[list[Record], DedupReport]:
    """Keep one record per sha256 (the first by path).

    A group whose copies disagree on the label is dropped entirely: we cannot know which is right.
    """
    groups: dict[str, list[Record]] = {}
    for r in sorted(records, key=lambda r: r.path):
        groups.setdefault(r.sha256, []).append(r)
    kept: list[Record] = []
    dup_groups = conflicts = removed = 0
    for members in groups.values():
        if len(members) > 1:
            dup_groups += 1
        if len({m.label_id for m in members}) > 1:
            conflicts += 1
            removed += len(members)
            continue
        kept.append(members[0])
        removed += len(members) - 1
    kept.sort(key=lambda r: r.path)
    return kept, DedupReport(len(records), len(kept), dup_groups, removed, conflicts)


@dataclass(frozen=True)
class Split:
    """A patient-wise train/validation split."""

    train: list[Record]
    val: list[Record]
    description: str = field(default="")


def _shuffled_patients(
    records: Sequence[Record], label_id: int, rng: random.Random
) -> tuple[list[str], dict[str, int]]:
    """The patients of one class in *rng*'s order, and each one's image count."""
    by_patient: dict[str, int] = {}
    for r in records:
        if r.label_id == label_id:
            by_patient[r.patient] = by_patient.get(r.patient, 0) + 1
    patients = sorted(by_patient)
    rng.shuffle(patients)
    return patients, by_patient


def patient_split(records: Sequence[Record], val_fraction: float, seed: int) -> Split:
    """Split *records* so that every patient is entirely in train or entirely in validation.

    Stratified by label: within each class, patients are shuffled with *seed* and taken into
    validation until that class's validation image count reaches ``val_fraction`` of its images.
    Deterministic for a given record list, fraction and seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label_id in range(len(LABELS)):
        patients, by_patient = _shuffled_patients(records, label_id, rng)
        target = val_fraction * sum(by_patient.values())
        taken = 0
        for p in patients:
            if taken >= target:
                break
            val_patients.add(p)
            taken += by_patient[p]
    train = [r for r in records if r.patient not in val_patients]
    val = [r for r in records if r.patient in val_patients]
    desc = (
        f"patient-wise, label-stratified split (seed {seed}, {val_fraction:.0%} of each class's "
        f"images to validation): train {len(train)} images / "
        f"{len({r.patient for r in train})} patients, validation {len(val)} images / "
        f"{len({r.patient for r in val})} patients; no patient in both"
    )
    return Split(train=train, val=val, description=desc)


def patient_folds(records: Sequence[Record], k: int, seed: int) -> list[list[Record]]:
    """Partition *records* into *k* folds of whole patients, stratified by label.

    Why: k-fold cross-validation gives every training image an out-of-fold prediction, so the
    recipe is judged (and the operating point chosen) on patients the scoring model never saw,
    with k times the validation data of one split. Within each class, patients are shuffled with
    *seed* and each goes to the fold that holds the fewest images of that class so far, which
    keeps the folds' sizes and prevalences close although patients have 1 to 10+ images.
    """
    if k < 2:
        raise DataError(f"k must be >= 2, got {k}")
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    for label_id in range(len(LABELS)):
        patients, by_patient = _shuffled_patients(records, label_id, rng)
        sizes = [0] * k
        for p in patients:
            fold = min(range(k), key=lambda i: (sizes[i], i))
            fold_of[p] = fold
            sizes[fold] += by_patient[p]
    folds: list[list[Record]] = [[] for _ in range(k)]
    for r in records:
        folds[fold_of[r.patient]].append(r)
    return folds


def fold_split(records: Sequence[Record], k: int, index: int, seed: int) -> Split:
    """Fold *index* of :func:`patient_folds` as validation, the other folds as training."""
    if not 0 <= index < k:
        raise DataError(f"fold index must be in [0, {k}), got {index}")
    folds = patient_folds(records, k, seed)
    val = folds[index]
    train = [r for i, fold in enumerate(folds) if i != index for r in fold]
    train.sort(key=lambda r: r.path)
    desc = (
        f"patient-wise {k}-fold cross-validation (seed {seed}), fold {index}: train {len(train)} "
        f"images / {len({r.patient for r in train})} patients, validation {len(val)} images / "
        f"{len({r.patient for r in val})} patients; no patient in both"
    )
    return Split(train=train, val=val, description=desc)


def load_images(root: Path, records: Sequence[Record], size: int = IMAGE_SIZE) -> Tensor:
    """Decode *records* into a uint8 tensor ``[N, 1, size, size]`` (single channel, as the runtime).

    The bytes are hashed and checked against the manifest.  Images are converted to one channel
    (``L``) exactly as the ONNX contract describes; images not already ``size``x``size`` are
    squashed (aspect ratio not kept) with bilinear resampling.
    """
    out = torch.empty((len(records), 1, size, size), dtype=torch.uint8)
    for i, r in enumerate(records):
        data = (root / r.path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != r.sha256:
            raise DataError(f"{r.path}: sha256 {digest} does not match the manifest ({r.sha256})")
        with Image.open(io.BytesIO(data)) as im:
            gray = im.convert("L")
            if gray.size != (size, size):
                gray = gray.resize((size, size), Image.Resampling.BILINEAR)
            out[i, 0] = torch.from_numpy(np.asarray(gray, dtype=np.uint8).copy())
    return out


def to_float(images_u8: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [0, 1] (divide by 255), the contract's value range."""
    return images_u8.to(torch.float32).div_(255.0)


def resize_batch(images: Tensor, size: int) -> Tensor:
    """Squash a float batch to ``size``x``size`` (antialiased when downscaling)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (each sampled uniformly per image).

    The defaults are the recipe of the shipped model.  The second group (``p_frame`` onwards, off
    by default) simulates the acquisition shifts that ``evaluate_shift`` showed that model failing
    on (EXPERIMENTS.md, experiment 2): a wider field of view or a padded export (a black or white
    frame around a smaller chest: AUC fell to 0.76), detector noise (0.93), and a softer/lower-
    resolution acquisition; :meth:`acquisition_shift` turns it on with wider photometric ranges.
    """

    rotation_deg: float = 7.0
    scale: tuple[float, float] = (0.90, 1.10)
    translate: float = 0.06  # fraction of the image size
    shear_deg: float = 4.0
    brightness: float = 0.08  # additive, in [0, 1] pixel units
    contrast: tuple[float, float] = (0.80, 1.20)
    gamma: tuple[float, float] = (0.80, 1.25)  # sampled log-uniformly
    p_affine: float = 0.9
    p_photometric: float = 0.9
    p_frame: float = 0.0  # zoom out inside a constant frame (black, or white with p_white_frame)
    frame_scale: tuple[float, float] = (0.70, 0.95)  # chest size relative to the image
    p_white_frame: float = 0.25
    p_noise: float = 0.0
    noise_sigma: tuple[float, float] = (0.005, 0.05)  # Gaussian, in [0, 1] pixel units
    p_lowres: float = 0.0  # down- and up-sampling (blur, lower detector resolution)
    lowres_factor: tuple[float, float] = (0.35, 0.8)

    @classmethod
    def acquisition_shift(cls) -> AugmentConfig:
        """The recipe aimed at acquisition shift (EXPERIMENTS.md, experiment 3)."""
        return cls(
            brightness=0.12, contrast=(0.70, 1.35), gamma=(0.65, 1.55), p_frame=0.25, p_noise=0.3, p_lowres=0.2
        )

    def describe(self) -> str:
        """Human-readable summary for the model card / manifest."""
        text = (
            f"random affine (p={self.p_affine}): rotation +-{self.rotation_deg} deg, scale "
            f"{self.scale[0]}-{self.scale[1]}, translation +-{self.translate:.0%}, shear "
            f"+-{self.shear_deg} deg, border padding; photometric (p={self.p_photometric}): "
            f"brightness +-{self.brightness}, contrast x{self.contrast[0]}-{self.contrast[1]}, "
            f"gamma {self.gamma[0]}-{self.gamma[1]}; no horizontal or vertical flip"
        )
        if self.p_frame > 0:
            text += (
                f"; frame (p={self.p_frame}): chest scaled {self.frame_scale[0]}-{self.frame_scale[1]} "
                f"inside a black (or white, p={self.p_white_frame}) border"
            )
        if self.p_noise > 0:
            text += f"; Gaussian noise (p={self.p_noise}) sigma {self.noise_sigma[0]}-{self.noise_sigma[1]}"
        if self.p_lowres > 0:
            text += (
                f"; down/up-sampling (p={self.p_lowres}) by "
                f"{self.lowres_factor[0]}-{self.lowres_factor[1]}"
            )
        return text


def augment(images: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Apply random affine + photometric jitter to a float batch ``[B, 1, H, W]`` in [0, 1].

    Batch-wise (one ``grid_sample`` call per transform) so it costs little next to the network on a
    small CPU.  All randomness comes from *generator* so a resumed run reproduces the same sequence.
    Order: geometry, frame, resolution, photometry, noise — the order in which a real acquisition
    and export would apply them (the detector's noise is on the final pixels).
    """
    b = images.shape[0]
    device = images.device

    # The random numbers are drawn from the CPU *generator* whatever the images' device, so a
    # GPU run follows the same per-image choices as a CPU run of the same seed.
    def uniform(lo: float, hi: float) -> Tensor:
        return (lo + (hi - lo) * torch.rand(b, generator=generator)).to(device)

    def chosen(p: float) -> Tensor:
        return (torch.rand(b, generator=generator) < p).to(device)

    out = images
    apply_affine = chosen(cfg.p_affine)
    if bool(apply_affine.any()):
        rot = torch.deg2rad(uniform(-cfg.rotation_deg, cfg.rotation_deg))
        shear = torch.deg2rad(uniform(-cfg.shear_deg, cfg.shear_deg))
        scale = uniform(*cfg.scale)
        tx = uniform(-cfg.translate, cfg.translate) * 2.0  # normalised coords span 2
        ty = uniform(-cfg.translate, cfg.translate) * 2.0
        # Output->input sampling matrix: inverse of (rotate . shear . scale); identity where skipped.
        cos, sin, tan = torch.cos(rot), torch.sin(rot), torch.tan(shear)
        a11, a12 = cos / scale, (-sin + cos * tan) / scale
        a21, a22 = sin / scale, (cos + sin * tan) / scale
        theta = torch.stack(
            [torch.stack([a11, a12, tx], dim=1), torch.stack([a21, a22, ty], dim=1)], dim=1
        )
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device).expand(b, 2, 3)
        theta = torch.where(apply_affine[:, None, None], theta, identity)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if cfg.p_frame > 0:
        out = _frame(out, chosen(cfg.p_frame), uniform(*cfg.frame_scale), chosen(cfg.p_white_frame), generator)

    if cfg.p_lowres > 0:
        lowres = chosen(cfg.p_lowres)
        factor = float(uniform(*cfg.lowres_factor)[0])  # one factor per batch: one resize call
        if bool(lowres.any()):
            h, w = out.shape[-2:]
            small = resize_batch(out[lowres], max(16, int(round(h * factor))))
            out = out.clone()
            out[lowres] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)

    apply_photo = chosen(cfg.p_photometric)[:, None, None, None]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(*cfg.contrast)[:, None, None, None]
    brightness = uniform(-cfg.brightness, cfg.brightness)[:, None, None, None]
    log_g = uniform(math.log(cfg.gamma[0]), math.log(cfg.gamma[1]))
    gamma = torch.exp(log_g)[:, None, None, None]
    jittered = ((out - mean) * contrast + mean + brightness).clamp(0.0, 1.0)
    jittered = jittered.clamp_min(1e-6).pow(gamma)
    out = torch.where(apply_photo, jittered, out)

    if cfg.p_noise > 0:
        noisy = chosen(cfg.p_noise)[:, None, None, None]
        sigma = uniform(*cfg.noise_sigma)[:, None, None, None]
        noise = _gaussian(out, generator) * sigma
        out = torch.where(noisy, out + noise, out)
    return out.clamp(0.0, 1.0)


def _gaussian(like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise shaped like *like*, on its device, seeded from the CPU *generator*.

    On a GPU a full-size CPU draw and copy would cost more than the network's step, so the CPU
    generator only seeds a device generator there; on the CPU the draw is direct (the shipped
    model's random stream).
    """
    if like.device.type == "cpu":
        return torch.randn(like.shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    device_generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=device_generator, device=like.device)


def _frame(
    images: Tensor, selected: Tensor, scale: Tensor, white: Tensor, generator: torch.Generator
) -> Tensor:
    """Shrink the selected images by *scale* (random position) inside a constant black/white frame."""
    if not bool(selected.any()):
        return images
    b = images.shape[0]
    inv = 1.0 / scale
    # Room left for the shrunken image to move without leaving the frame, in normalised coords.
    room = (1.0 - scale) * inv
    tx = (torch.rand(b, generator=generator).to(images.device) * 2.0 - 1.0) * room
    ty = (torch.rand(b, generator=generator).to(images.device) * 2.0 - 1.0) * room
    zeros = torch.zeros(b, device=images.device)
    theta = torch.stack(
        [torch.stack([inv, zeros, tx], dim=1), torch.stack([zeros, inv, ty], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    shrunk = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(
        torch.ones_like(images), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    fill = white.to(images.dtype)[:, None, None, None]
    framed = shrunk + (1.0 - inside) * fill
    return torch.where(selected[:, None, None, None], framed, images)


class InMemoryDataset(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """Decoded images (uint8) + labels + patient keys, with a deterministic batch iterator."""

    def __init__(self, images_u8: Tensor, records: Sequence[Record]) -> None:
        if images_u8.shape[0] != len(records):
            raise DataError("images_u8 and records differ in length")
        self.images = images_u8
        self.records = list(records)
        self.labels = torch.tensor([r.label_id for r in records], dtype=torch.float32)
        self.patients = [r.patient for r in records]

    @classmethod
    def load(cls, root: Path, records: Sequence[Record]) -> InMemoryDataset:
        """Decode *records* from *root* into memory."""
        return cls(load_images(root, records), records)

    def to(self, device: torch.device | str) -> InMemoryDataset:
        """The same images and labels on *device* (a GPU run keeps the whole set there: ~260 MB)."""
        moved = InMemoryDataset(self.images.to(device), self.records)
        moved.labels = self.labels.to(device)
        return moved

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return to_float(self.images[index]), self.labels[index]

    @property
    def n_positive(self) -> int:
        return int(self.labels.sum().item())

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(float images [B,1,H,W] in [0,1], labels [B])``."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.images.device)
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield to_float(self.images[idx]), self.labels[idx]
