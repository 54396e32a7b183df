"""structlog set up once per process, with the stdlib loggers (pynetdicom, uvicorn, SQLAlchemy)
routed through the same pipeline, and a redaction step so that PHI never reaches a log line.

Audit records are not logs (docs/architecture.md §6.8): patient and study identifiers belong in the audit
trail, which is access-controlled; application logs are shipped to places that are not.

Everything a process writes goes through the one redacting pipeline, not only our own log calls:

* **Python warnings** (``logging.captureWarnings``): pydicom warns about every non-conformant
  value it reads *with the value* (``Invalid value for VR DA: '05/04/1923'``); the default
  ``warnings.showwarning`` would print that straight to stderr.
* **Exception text**: pydicom and highdicom put values into exception messages (``Unable to
  convert '05/04/1923' to 'DA' object``), which reach log lines as ``detail``/``error`` fields and
  rendered tracebacks. Redaction runs on every string field, and again after the traceback is
  rendered.
* **Raw stderr** (``capture_stderr``, the default for a real process): ``sys.stderr`` is replaced
  by a stream that turns each line into a log record, and uncaught exceptions (main thread and
  worker threads) are logged with their traceback instead of printed. Tracebacks stay useful —
  files, lines, functions and exception types are kept — while quoted literals, where libraries
  put values, are redacted. Native code writing to file descriptor 2 directly (ONNX Runtime's
  C++ logger) is not intercepted; none of it sees DICOM data.

Text redaction is deny-by-default for values: a quoted literal (``'...'``, ``"..."``, ``b'...'``)
is replaced wholesale, since a library quoting a value is exactly how PHI leaks; DICOM VR names,
lower-case snake_case names (our settings keys and arguments) and the file paths of traceback lines
are kept. Text after a PHI label ("Patient's Name", "PatientID",
"(0010,0020)", "Accession Number") is removed to the end of the line.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
import types
from collections.abc import Callable, MutableMapping
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
# "Patient Name" / "Patient ID" text when a peer's dataset is echoed; highdicom warns about
# 'argument "patient_name"'. Scrub from the label to the end of the line.
_PHI_TEXT = re.compile(
    r"(?i)(patient[\s_']*s?[\s_]*(name|id\b|birth[\s_]*date|sex\b)|\(0010,[0-9a-f]{4}\)|"
    r"accession[\s_]*(number|no\b)|\(0008,0050\))[^\n]*"
)
# A quoted literal (Python repr or a library's f-string); it may span lines, as pydicom quotes raw
# values without escaping them. The path of a traceback line is matched first so that it is kept.
_QUOTED = re.compile(r"""(?P<path>File "[^"\n]*")|b?(?P<q>['"])(?P<body>(?:\\.|(?!(?P=q))[^\\])*)(?P=q)""")
# pydicom's DA/DT/TM constructors quote the raw value unescaped, so it may itself hold a quote.
_UNCONVERTIBLE = re.compile(r"(Unable to convert (?:non-conformant value )?)'.*?'( to '[A-Z]{2}' object)", re.DOTALL)
#: Quoted words that are kept: DICOM Value Representations (PS3.5 §6.2), never patient data.
_SAFE_LITERALS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    "US UT UV".split()
)
#: Quoted snake_case names are ours (settings keys, arguments: 'onnx_sha256'), never patient data.
_SAFE_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")
_STDERR_LOGGER = "stderr"
#: Libraries whose INFO lines are chatter to an operator: highdicom logs "copy attributes of
#: module ..." several times for every SR and summary image it builds, pynetdicom a line per PDU
#: exchange. Their INFO (and lower) records are demoted to DEBUG; their warnings stay warnings.
CHATTY_LIBRARIES: tuple[str, ...] = ("highdicom", "pynetdicom")


def _is_chatty(logger_name: str) -> bool:
    return any(logger_name == name or logger_name.startswith(name + ".") for name in CHATTY_LIBRARIES)


class DemoteLibraryChatter(logging.Filter):
    """Handler filter: a chatty library's record below WARNING becomes a DEBUG record, dropped
    unless the process logs at DEBUG — whatever level the library's own logger was left at."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and _is_chatty(record.name):
            if self.level > logging.DEBUG:
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


#: Our own packages: their lines are never rate-limited (each one is written on purpose).
OWN_PACKAGES: tuple[str, ...] = ("conf", "storage", "audit", "dicom_node", "fhir_api", "hl7", "inference", "gateway")


class LibraryFloodLimit(logging.Filter):
    """Handler filter: at most *limit* records per library logger in any *window_s* window.

    A library warns once per bad value it meets, and a peer controls the values: one crafted
    A-ASSOCIATE-RQ with a thousand malformed UIDs made pydicom and pynetdicom write ~7,000 lines a
    second, which slowed the listener enough to stop answering other peers in time. Beyond the
    limit a library's records are dropped and counted; the first of its records after the window
    brings one ``logging.suppressed`` line with the count. Our own loggers are never limited.
    """

    def __init__(self, limit: int = 20, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # logger -> (window start, passed, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if any(name == own or name.startswith(own + ".") for own in OWN_PACKAGES):
            return True
        now = self._clock()
        with self._lock:
            start, passed, dropped = self._windows.get(name, (now, 0, 0))
            if now - start >= self.window_s:
                start, passed, report, dropped = now, 0, dropped, 0
            else:
                report = 0
            allowed = passed < self.limit
            self._windows[name] = (start, passed + allowed, dropped + (not allowed))
        if report:
            logging.getLogger(__name__).warning(
                "logging.suppressed: %d lines of logger %s dropped (more than %d in %.0f s)",
                report, name, self.limit, self.window_s,
            )
        return allowed


def scrub_text(text: str) -> str:
    """*text* with PHI-labelled text and quoted literals replaced by ``[redacted]``."""
    text = _UNCONVERTIBLE.sub(rf"\1'{REDACTED}'\2", text)
    text = _PHI_TEXT.sub(REDACTED, text)

    def _literal(match: re.Match[str]) -> str:
        body = match.group("body")
        if match.group("path") or body == REDACTED or body in _SAFE_LITERALS or _SAFE_NAME.fullmatch(body):
            return match.group(0)
        quote = match.group("q")
        return f"{quote}{REDACTED}{quote}"

    return _QUOTED.sub(_literal, text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, tuple):
        return tuple(_scrub(item) for item in value)
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    return value


def redact_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop the values of PHI keys and scrub every string field.

    Every field, not only the message: exception text (``detail``, ``error``, a rendered
    ``exception``) is where libraries put the values they choke on.
    """
    event_dict.pop("color_message", None)  # uvicorn's ANSI duplicate of "event"
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = REDACTED
        elif key not in ("timestamp", "level", "logger", "_record", "_from_structlog"):
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


class StderrToLog(io.TextIOBase):
    """A ``sys.stderr`` replacement: each written line becomes a WARNING record of the logger
    ``stderr``, so a library's ``print(..., file=sys.stderr)`` is redacted like any log line.

    *target* is the real stream; the log handler writes there. A write made while a line is
    being logged (a handler error reported by :mod:`logging`) goes to *target* scrubbed, so the
    stream can never recurse into itself.
    """

    def __init__(self, target: Any) -> None:
        super().__init__()
        self.target = target
        self._buffer = ""
        self._lock = threading.Lock()
        self._busy = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.target, "encoding", "utf-8") or "utf-8")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        """The real descriptor, for code that needs one (faulthandler, subprocess)."""
        return int(self.target.fileno())

    def write(self, text: str) -> int:
        if getattr(self._busy, "active", False):
            self.target.write(scrub_text(text))
            return len(text)
        with self._lock:
            self._buffer += text
            *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            line, self._buffer = self._buffer, ""
        if line:
            self._emit(line)

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        self._busy.active = True
        try:
            logging.getLogger(_STDERR_LOGGER).warning(line.rstrip())
        finally:
            self._busy.active = False


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None
) -> None:
    """``sys.excepthook``: the crash, with its traceback, as one redacted log record."""
    logging.getLogger("pneumo.crash").critical("uncaught_exception", exc_info=(exc_type, exc, tb))


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: a thread that died of an exception, logged like a crash."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    logging.getLogger("pneumo.crash").critical("thread_crashed", exc_info=exc_info, extra={"thread_name": name})


def configure_logging(settings: LogSettings, *, stream: Any = None, capture_stderr: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger. Call once, from the composition root.

    *stream*: where log lines go (default: the process's real stderr). *capture_stderr*
    (default: True when logging to the real stderr) routes ``sys.stderr`` writes and uncaught
    exceptions through the pipeline (see the module docstring). Python warnings are always
    captured.
    """
    if capture_stderr is None:
        capture_stderr = stream is None
    if stream is None:
        stream = sys.stderr.target if isinstance(sys.stderr, StderrToLog) else sys.stderr
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
            redact_phi,  # again: the rendered traceback ends with the exception's message
            renderer,
        ],
    )
    level = logging.getLevelName(settings.level)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(DemoteLibraryChatter(level))
    handler.addFilter(LibraryFloodLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # pynetdicom is chatty at INFO (one line per PDU exchange) and dumps whole messages at DEBUG;
    # keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, level))
    # highdicom's INFO lines (every module it copies) reach DEBUG output only, demoted to DEBUG by
    # DemoteLibraryChatter; at INFO and above they are not even made. Its warnings still come through.
    logging.getLogger("highdicom").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    if capture_stderr:
        sys.stderr = StderrToLog(stream)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_crash
