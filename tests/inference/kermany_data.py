"""The shared Kermany training folder, for the training tests that read real images."""

from __future__ import annotations

import pytest

from inference.training.train import DEFAULT_DATA_ROOT

DATA_ROOT = DEFAULT_DATA_ROOT
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "manifest.csv").is_file(), reason="shared Kermany data folder not present"
)
