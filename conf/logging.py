"""structlog set up once per process, with the stdlib loggers (pynetdicom, uvicorn, SQLAlchemy)
routed through the same pipeline, and a redaction step so that PHI never reaches a log line.

Audit records are not logs (docs/architecture.md §6.8): patient and study identifiers belong in the audit
trail, which is access-controlled; application logs are shipped to places that are not.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from conf.settings import LogSettings

REDACTED = "[redacted]"

#: Event-dict keys whose values are PHI or may carry it (DICOM attribute keywords and ours).
PHI_KEYS: frozenset[str] = frozenset(
    k.lower()
    for k in (
        "patient_name", "patient_id", "patient_birth_date", "birth_date", "patient_sex",
        "accession_number", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "AccessionNumber", "OtherPatientIDs", "PatientAddress", "ReferringPhysicianName",
        "PatientMotherBirthName", "PatientTelephoneNumbers", "mrn", "dataset",
    )
)

# pynetdicom logs DIMSE messages and whole identifiers at DEBUG; its INFO lines can include
# "Patient Name" / "Patient ID" text when a peer's dataset is echoed. Scrub those patterns.
_PHI_TEXT = re.compile(
    r"(?i)(patient'?s?\s*(name|id|birth\s*date)|\(0010,[0-9a-f]{4}\)|accession\s*number)"
    r"[^\n]*"
)


def redact_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop the values of PHI keys and scrub PHI-looking text from messages."""
    event_dict.pop("color_message", None)  # uvicorn's ANSI duplicate of "event"
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = REDACTED
    message = event_dict.get("event")
    if isinstance(message, str) and _PHI_TEXT.search(message):
        event_dict["event"] = _PHI_TEXT.sub(REDACTED, message)
    return event_dict


def configure_logging(settings: LogSettings, *, stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger. Call once, from the composition root."""
    stream = stream if stream is not None else sys.stderr
    use_json = settings.format == "json" or (
        settings.format == "auto" and not getattr(stream, "isatty", lambda: False)()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        redact_phi,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # filter_by_level first: a debug call on the C-STORE path must cost nothing at INFO.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # pynetdicom is chatty at INFO (one line per PDU exchange); keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(settings.level)))
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
