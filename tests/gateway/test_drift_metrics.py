"""``/metrics``'s registry carries the model drift gauges of the model package this process loads."""

from __future__ import annotations

from pathlib import Path

from conf.settings import Settings
from gateway.app import metrics_registry, runtime_for
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest


def test_the_metrics_registry_has_the_drift_collector_of_the_loaded_model(tmp_path: Path) -> None:
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    settings = Settings(data_dir=tmp_path / "var", monitoring={"drift_psi_alert": 0.2})
    with runtime_for(settings) as runtime:
        registry = metrics_registry(runtime)
        key = {"model": manifest.id, "version": manifest.version}
        assert registry.get_sample_value("pneumo_model_drift_reference", key) == 1.0
        assert registry.get_sample_value("pneumo_model_drift_window_samples", key) == 0.0
        assert registry.get_sample_value("pneumo_model_drift_alert", {**key, "feature": "any"}) == 0.0
        assert registry.get_sample_value("pneumo_model_drift_threshold") == 0.2
