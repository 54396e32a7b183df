"""Training/export tooling: unit tests of the data and metric helpers, and one tiny end-to-end run.

The end-to-end test trains a few steps on a handful of real images from the shared Kermany folder at
a reduced resolution, then exports at the contract's 224x224 shape and checks the ONNX file against
the contract (names, shapes, dtype, opset, probabilities in [0, 1]) and model.json's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from inference.manifest import load_manifest  # noqa: E402
from inference.training.data import (  # noqa: E402
    AugmentConfig,
    DataError,
    Record,
    augment,
    deduplicate,
    patient_key,
    patient_split,
)
from inference.training.efficientnet import EfficientNetB0, EfficientNetConfig  # noqa: E402
from inference.training.export import (  # noqa: E402
    ExportConfig,
    export_model,
    export_onnx,
)
from inference.training.train import (  # noqa: E402
    Stage,
    TrainConfig,
    bootstrap_metrics,
    choose_threshold,
    lr_at,
    roc_auc,
    sensitivity_specificity,
    train,
)
from storage.filestore import sha256_file  # noqa: E402
from tests.inference.kermany_data import DATA_ROOT, needs_data  # noqa: E402


@pytest.mark.parametrize(
    ("name", "label", "expected"),
    [
        ("person1312_bacteria_3317.jpeg", "PNEUMONIA", "P:1312"),
        ("person124_virus_246.jpeg", "PNEUMONIA", "P:124"),
        ("person1_virus_12_1.jpeg", "PNEUMONIA", "P:1"),
        ("IM-0115-0001.jpeg", "NORMAL", "N:115"),
        ("IM-0001-0001-0002.jpeg", "NORMAL", "N:1"),
        ("NORMAL2-IM-0115-0001.jpeg", "NORMAL", "N2:115"),
    ],
)
def test_patient_key(name: str, label: str, expected: str) -> None:
    assert patient_key(name, label) == expected


def test_patient_key_rejects_unknown_names() -> None:
    with pytest.raises(DataError):
        patient_key("scan.png", "NORMAL")


def _rec(path: str, label: int, sha: str, patient: str) -> Record:
    return Record(path=path, label_id=label, sha256=sha, patient=patient)


def test_deduplicate_keeps_first_and_drops_label_conflicts() -> None:
    records = [
        _rec("b.jpeg", 1, "h1", "P:1"),
        _rec("a.jpeg", 1, "h1", "P:1"),
        _rec("c.jpeg", 0, "h2", "N:1"),
        _rec("d.jpeg", 1, "h2", "P:2"),
        _rec("e.jpeg", 0, "h3", "N:2"),
    ]
    kept, report = deduplicate(records)
    assert [r.path for r in kept] == ["a.jpeg", "e.jpeg"]
    assert (report.duplicate_groups, report.removed, report.conflicting_groups) == (2, 3, 1)


def test_patient_split_never_shares_a_patient() -> None:
    records = [_rec(f"p{i}_{j}", 1, f"p{i}_{j}", f"P:{i}") for i in range(40) for j in range(3)]
    records += [_rec(f"n{i}_{j}", 0, f"n{i}_{j}", f"N:{i}") for i in range(20) for j in range(2)]
    split = patient_split(records, 0.2, seed=7)
    train_p = {r.patient for r in split.train}
    val_p = {r.patient for r in split.val}
    assert not train_p & val_p
    assert len(split.train) + len(split.val) == len(records)
    assert {r.label_id for r in split.val} == {0, 1}
    assert patient_split(records, 0.2, seed=7).val == split.val  # deterministic


def test_roc_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60).astype(bool)
    s = np.round(rng.random(60), 1)  # many ties
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert roc_auc(y, s) == pytest.approx(np.mean(pairs))


def test_threshold_rule_reaches_target_sensitivity_with_best_specificity() -> None:
    y = np.array([1] * 20 + [0] * 20, dtype=bool)
    s = np.concatenate([np.linspace(0.3, 1.0, 20), np.linspace(0.0, 0.6, 20)])
    thr = choose_threshold(y, s, 0.95)
    sens, spec = sensitivity_specificity(y, s, thr)
    assert sens >= 0.95
    # Any higher threshold (the next positive score up) would break the sensitivity target.
    higher = np.sort(s[y])[np.sort(s[y]) > thr]
    if higher.size:
        assert sensitivity_specificity(y, s, float(higher[0]))[0] < 0.95
    assert spec == pytest.approx(float((s[~y] < thr).mean()))


def test_bootstrap_interval_contains_point_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200).astype(bool)
    s = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    groups = [f"g{i // 2}" for i in range(200)]
    m = bootstrap_metrics(y, s, groups, threshold=0.5, resamples=200, seed=0)
    assert m.auc.ci95[0] <= m.auc.value <= m.auc.ci95[1]
    assert m.n == 200 and m.n_patients == 100


def test_lr_schedule_warmup_then_cosine() -> None:
    lrs = [lr_at(s, 100, 10, 1e-3, 0.01) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3)
    assert lrs[0] < lrs[5] < lrs[9]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.1)


def test_cam_is_the_per_cell_logit_contribution() -> None:
    torch.manual_seed(0)
    model = EfficientNetB0(EfficientNetConfig()).eval().double()  # float64: no cancellation noise
    x = torch.rand(2, 1, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1280, 7, 7)
        cam = model.cam(feats)
        assert cam.shape == (2, 7, 7)
        bias = model.classifier.bias[0]
        assert torch.allclose(cam.mean(dim=(1, 2)) + bias * (1 - 1 / 49), model(x), atol=1e-9)


@needs_data
@pytest.mark.slow
def test_tiny_training_run_exports_a_contract_conformant_model(tmp_path: Path) -> None:
    config = TrainConfig(
        out_dir=tmp_path / "run",
        data_root=DATA_ROOT,
        stages=(Stage(1, 64), Stage(1, 96)),
        batch_size=4,
        max_images=24,
        max_steps_per_epoch=2,
        bootstrap_resamples=50,
    )
    outcome = train(config)
    assert outcome.best_checkpoint.is_file() and outcome.last_checkpoint.is_file()
    assert outcome.epochs_completed == 2
    assert len(outcome.history) == 2

    # Resuming a finished run trains nothing more and keeps the history.
    again = train(config)
    assert again.epochs_completed == 2

    out_dir = tmp_path / "model"
    # A 4-step network is badly conditioned (tiny BatchNorm variances amplify rounding through 16
    # blocks), so ONNX-vs-PyTorch agreement is checked at 1e-2 here; real exports use 1e-4.
    result = export_model(
        ExportConfig(checkpoint=outcome.best_checkpoint, out_dir=out_dir, tolerance=1e-2)
    )
    onnx_path = out_dir / "model.onnx"
    assert result.onnx_path == onnx_path
    assert result.max_abs_diff_probability < 1e-2

    model = onnx.load(str(onnx_path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(float)"
    assert inp.shape[1:] == [1, 224, 224] and not isinstance(inp.shape[0], int)
    assert [o.name for o in session.get_outputs()] == ["probability", "cam"]
    x = np.random.default_rng(0).random((3, 1, 224, 224), dtype=np.float32)
    prob, cam = session.run(["probability", "cam"], {"image": x})
    assert prob.shape == (3,) and prob.dtype == np.float32
    assert cam.shape == (3, 7, 7) and cam.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))

    manifest = json.loads((out_dir / "model.json").read_text(encoding="utf-8"))
    assert manifest["onnx_sha256"] == sha256_file(onnx_path)
    assert manifest["input"] == {"name": "image", "shape": ["batch", 1, 224, 224], "dtype": "float32"}
    assert manifest["labels"] == ["NORMAL", "PNEUMONIA"]
    assert manifest["positive_label"] == "PNEUMONIA"
    assert 0.0 <= manifest["threshold"] <= 1.0
    assert result.metrics is not None
    assert manifest["metrics"]["n"] == result.metrics.n > 0
    for key in ("auc", "sensitivity", "specificity"):
        assert len(manifest["metrics"][key]["ci95"]) == 2
    assert manifest["training_data"]["doi"] == "10.17632/rscbjbr9sj.2"
    assert (out_dir / "MODEL_CARD.md").read_text(encoding="utf-8").count("CC BY 4.0") >= 1
    assert "## Drift monitoring reference" in (out_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    # The drift monitoring reference is measured at export, on the validation images, and loads.
    reference = manifest["monitoring"]["reference"]
    assert reference["onnx_sha256"] == manifest["onnx_sha256"]
    assert reference["n"] == result.metrics.n
    loaded = load_manifest(out_dir)
    assert loaded.drift_reference is not None
    assert set(loaded.drift_reference.features) == {"probability", "mean", "std", "dark_fraction", "bright_fraction"}

    # The plain function the CLI uses for "ONNX only".
    plain = export_onnx(outcome.best_checkpoint, tmp_path / "plain", tolerance=1e-2)
    assert plain == tmp_path / "plain" / "model.onnx" and plain.stat().st_size > 1_000_000


def test_default_augmentation_adds_no_frame_noise_or_resampling() -> None:
    """The shift transforms are off unless asked for: the defaults stay the shipped model's recipe."""
    config = AugmentConfig()
    assert (config.p_frame, config.p_noise, config.p_lowres) == (0.0, 0.0, 0.0)
    assert "frame" not in config.describe() and "frame" in AugmentConfig.acquisition_shift().describe()


@pytest.mark.parametrize("white", [False, True])
def test_frame_puts_the_whole_chest_inside_a_constant_border(white: bool) -> None:
    images = torch.full((6, 1, 64, 64), 0.5)
    config = AugmentConfig(p_affine=0.0, p_photometric=0.0, p_frame=1.0, frame_scale=(0.7, 0.7),
                           p_white_frame=1.0 if white else 0.0)
    framed = augment(images, config, torch.Generator().manual_seed(0))
    border = 1.0 if white else 0.0
    for image in framed[:, 0]:
        picture = torch.isclose(image, torch.tensor(0.5))
        frame = image == border
        edge = ~(picture | frame)  # bilinear blend along the picture's edge only
        assert abs(float(picture.float().mean()) - 0.7**2) < 0.05  # the whole chest, at 70 % of the side
        assert int(edge.sum()) <= 4 * 64
        assert bool(frame[0].all() or frame[-1].all()) and bool(frame[:, 0].all() or frame[:, -1].all())


def test_noise_and_resampling_change_pixels_within_range() -> None:
    images = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    config = AugmentConfig(p_affine=0.0, p_photometric=0.0, p_noise=1.0, p_lowres=1.0)
    out = augment(images, config, torch.Generator().manual_seed(2))
    assert out.shape == images.shape and not torch.equal(out, images)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
