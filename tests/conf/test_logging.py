"""PHI must never reach an application log line (docs/architecture.md §5)."""

from __future__ import annotations

import io
import json
import logging

import structlog

from conf.logging import configure_logging
from conf.settings import LogSettings


def test_json_lines_without_phi() -> None:
    stream = io.StringIO()
    configure_logging(LogSettings(level="DEBUG", format="json"), stream=stream)
    log = structlog.get_logger("test")
    log.info("stored", patient_name="DOE^JANE", PatientID="MRN-4711", accession_number="ACC9", sop_class_uid="1.2.3")
    logging.getLogger("pynetdicom.test").warning("Patient's Name: DOE^JANE, Patient ID: MRN-4711")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "stored" and lines[0]["sop_class_uid"] == "1.2.3"
    text = stream.getvalue()
    for phi in ("DOE^JANE", "MRN-4711", "ACC9"):
        assert phi not in text
