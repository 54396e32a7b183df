"""PHI must never reach an application log line (docs/architecture.md §5)."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings

import pytest
import structlog
from pydicom import config
from pydicom.valuerep import DA, validate_value

from conf.logging import REDACTED, LibraryFloodLimit, StderrToLog, configure_logging, scrub_text
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


# Issue "Keep every promise under attack and faults", rows 12-13: values from a hostile header
# reached log lines through pydicom's warnings, exception details and raw stderr.
BIRTH_DATE = "05/04/1923"
SWALLOWED = "185059\x08\x00P\x00SH\n\x00ACC7774242"


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    configure_logging(LogSettings(level="DEBUG", format="json"), stream=out)
    return out


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"Invalid value for VR DA: {BIRTH_DATE!r}.", "Invalid value for VR DA"),
        (f"Unable to convert '{BIRTH_DATE}' to 'DA' object", "to 'DA' object"),
        (f"Unable to convert non-conformant value '{SWALLOWED}' to 'TM' object", "to 'TM' object"),
        ("Unable to convert 'O'Brien^Pat' to 'DA' object", "Unable to convert"),  # a quote inside
        ('value of argument "patient_name" is potentially invalid: "Doe Jane"', "value of argument"),
        ("[parameters: ('MRN8675309', b'ACC\\'5551212', 3)]", "3)]"),
        ("Patient's Birth Date: 19230405", ""),
        ("PatientID=MRN8675309", ""),
    ],
)
def test_scrub_text_removes_quoted_and_labelled_values(text: str, kept: str) -> None:
    scrubbed = scrub_text(text)
    for phi in ("1923", "ACC7774242", "O'Brien", "Brien", "Doe Jane", "MRN8675309", "5551212"):
        assert phi not in scrubbed
    assert kept in scrubbed and REDACTED in scrubbed


def test_traceback_keeps_files_and_types_but_not_values(stream: io.StringIO) -> None:
    try:
        DA(BIRTH_DATE)
    except ValueError:
        structlog.get_logger("test").exception("job.crashed")
    [line] = _lines(stream)
    rendered = str(line["exception"])
    assert BIRTH_DATE not in rendered
    assert 'File "' in rendered and "valuerep.py" in rendered and "ValueError: Unable to convert" in rendered


def test_every_field_is_scrubbed(stream: io.StringIO) -> None:
    structlog.get_logger("test").warning(
        "job.failed", error="ValueError", detail=f"Unable to convert '{BIRTH_DATE}' to 'DA' object",
        nested={"why": [f"bad {BIRTH_DATE!r}"]},
    )
    logging.getLogger("pydicom").warning("Invalid value for VR DA: %r.", BIRTH_DATE)
    assert BIRTH_DATE not in stream.getvalue()
    first, second = _lines(stream)
    assert first["error"] == "ValueError" and second["logger"] == "pydicom"


def test_python_warnings_go_through_the_pipeline(stream: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(False)  # pytest's catch_warnings replaced the hook configure set:
        logging.captureWarnings(True)  # install it again, as configure_logging did
        validate_value("DA", BIRTH_DATE, config.WARN)  # pydicom's warn_and_log: a log AND a warning
    logging.captureWarnings(False)
    lines = _lines(stream)
    assert {line["logger"] for line in lines} == {"pydicom", "py.warnings"}
    assert BIRTH_DATE not in stream.getvalue() and "Invalid value for VR DA" in stream.getvalue()


def test_highdicom_chatter_is_off_at_info() -> None:
    configure_logging(LogSettings(level="INFO", format="json"), stream=io.StringIO())
    assert not logging.getLogger("highdicom.base").isEnabledFor(logging.INFO)
    assert logging.getLogger("highdicom.base").isEnabledFor(logging.WARNING)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_library_chatter_is_debug(level: str) -> None:
    """Issue 14, item 5: highdicom's INFO lines ("copy attributes of module ...", several per SR or
    summary image) are DEBUG lines, even when its logger was left at INFO; its warnings stay."""
    out = io.StringIO()
    configure_logging(LogSettings(level=level, format="json"), stream=out)  # type: ignore[arg-type]
    chatty = logging.getLogger("highdicom.base")
    chatty.setLevel(logging.INFO)  # as if something re-enabled it: the demotion still holds
    chatty.info("copy attributes of module General Study")
    chatty.warning("a real highdicom warning")
    logging.getLogger("pynetdicom.acse").warning("a real pynetdicom warning")
    structlog.get_logger("dicom_node.listener").info("dicom.association")
    lines = {line["event"]: line["level"] for line in _lines(out)}
    expected = {"a real highdicom warning": "warning", "a real pynetdicom warning": "warning", "dicom.association": "info"}
    if level == "DEBUG":
        expected["copy attributes of module General Study"] = "debug"
    assert lines == expected


def test_a_library_flood_is_cut_and_counted(stream: io.StringIO) -> None:
    """A peer can make a library warn once per bad value it sends: each library logger gets 20
    lines per 10 s window; the rest are dropped, counted, and the count is said once the window
    is over. Our own lines are never dropped."""
    for n in range(500):
        logging.getLogger("pydicom").warning("Invalid value for VR UI: '1.2.%d'", n)
        logging.getLogger("pynetdicom.utils").warning("Non-conformant value")
    for _ in range(30):
        structlog.get_logger("dicom_node.listener").info("dicom.association")
    by_logger: dict[str, int] = {}
    for line in _lines(stream):
        by_logger[line["logger"]] = by_logger.get(line["logger"], 0) + 1
    assert by_logger == {"pydicom": 20, "pynetdicom.utils": 20, "dicom_node.listener": 30}


def test_the_dropped_count_is_reported_after_the_window() -> None:
    now = [0.0]
    limiter = LibraryFloodLimit(limit=2, window_s=10.0, clock=lambda: now[0])
    out = io.StringIO()
    configure_logging(LogSettings(level="INFO", format="json"), stream=out)
    handler = logging.getLogger().handlers[0]
    handler.filters[:] = [f for f in handler.filters if not isinstance(f, LibraryFloodLimit)] + [limiter]
    library = logging.getLogger("pydicom")
    for _ in range(5):
        library.warning("bad value")
    now[0] = 10.5
    library.warning("bad value")
    events = [line["event"] for line in _lines(out)]
    assert events == ["bad value", "bad value",
                      "logging.suppressed: 3 lines of logger pydicom dropped (more than 2 in 10 s)", "bad value"]


def test_stderr_and_crashes_are_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    """With capture_stderr (the default for a real process) nothing bypasses redaction."""
    real = io.StringIO()
    monkeypatch.setattr(sys, "stderr", real)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    configure_logging(LogSettings(level="INFO", format="json"))
    assert isinstance(sys.stderr, StderrToLog) and sys.stderr.target is real
    print(f"lib: Patient ID MRN8675309\nlib: bad value {BIRTH_DATE!r}", file=sys.stderr)
    sys.stderr.write("partial ")
    sys.stderr.write("line\n")

    def crash() -> None:
        raise ValueError(f"Unable to convert '{BIRTH_DATE}' to 'DA' object")

    worker = threading.Thread(target=crash, name="infer-0")
    worker.start()
    worker.join()
    try:
        crash()
    except ValueError:
        sys.excepthook(*sys.exc_info())  # what the interpreter does with an uncaught exception
    configure_logging(LogSettings(level="INFO", format="json"))  # again: still the real stream
    assert isinstance(sys.stderr, StderrToLog) and sys.stderr.target is real

    text = real.getvalue()
    assert "MRN8675309" not in text and BIRTH_DATE not in text
    lines = _lines(real)
    assert [line["logger"] for line in lines[:3]] == ["stderr"] * 3
    assert lines[2]["event"] == "partial line"
    crashed = {str(line["event"]): line for line in lines[3:]}
    assert crashed["thread_crashed"]["thread_name"] == "infer-0"
    assert "ValueError" in str(crashed["thread_crashed"]["exception"])
    assert 'File "' in str(crashed["uncaught_exception"]["exception"])
