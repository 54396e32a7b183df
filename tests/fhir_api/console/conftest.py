"""Shared helpers of the console's HTTP tests: an in-process gateway on real sockets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import make_settings


@contextlib.contextmanager
def running_gateway(tmp_path: Path, sections: dict[str, Any], **dicom: Any) -> Iterator[Any]:
    """An in-process gateway (DICOM and HTTP listeners on free ports) with *sections* (``fhir``
    merged over a free loopback port) and ``[dicom]`` keys *dicom*; stopped afterwards."""
    from gateway.app import Gateway, open_runtime

    sections = {**sections, "fhir": {"port": 0, "bind": "127.0.0.1", **sections.get("fhir", {})}}
    runtime = open_runtime(make_settings(tmp_path, None, sections, **dicom))
    gateway = Gateway(runtime)
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()
        runtime.close()
