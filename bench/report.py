"""How every benchmark hands over its figures: one JSON line on stdout, and the same document
indented in the file given with ``--json`` (``bench/results/`` keeps the runs docs/benchmarks.md
quotes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(document: dict[str, Any], json_path: Path | None) -> None:
    print(json.dumps(document))
    if json_path is not None:
        json_path.write_text(json.dumps(document, indent=2))
