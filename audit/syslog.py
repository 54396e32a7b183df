"""RFC 5424 syslog messages for IHE ATNA Record Audit Event (ITI-20), and their RFC 5425 frames.

An audit record leaves the gateway as one syslog message (DICOM PS3.15 A.6 "Audit Trail Message
Transmission Profile - SYSLOG-TLS"; IHE ITI TF-2 §3.20.4.1.2)::

    <85>1 2026-11-30T23:29:48.123456Z gw.example.org pneumo-gateway 4242 IHE+RFC-3881 - <?xml ...

* **PRI** = facility 10 (security/authorization) × 8 + severity: 5 (notice, "normal but
  significant") for a successful event, 4 (warning) for a failed one (EventOutcomeIndicator 4, 8
  or 12) — PS3.15 A.6 allows both; most repositories show the warning ones first.
* **VERSION** 1; **TIMESTAMP** RFC 3339 in UTC with microseconds (RFC 5424 §6.2.3): the time the
  record was written to the audit log, so a record forwarded late, after an outage of the
  repository, still carries its own time.
* **HOSTNAME**, **APP-NAME**, **PROCID**: 1..255, 1..48 and 1..128 printable US-ASCII characters
  (RFC 5424 §6.2.4-6.2.6); ``-`` (NILVALUE) when unknown.
* **MSGID** ``IHE+RFC-3881`` (ITI TF-2 §3.20.4.1.2; PS3.15 A.6 also allows ``DICOM+RFC3881``).
* **STRUCTURED-DATA** ``-``: none is generated.
* **MSG** the DICOM PS3.15 A.5 XML audit message in UTF-8 (:func:`audit.dicom_xml.audit_message`).
  RFC 5424 §6.4 marks UTF-8 MSG with a byte order mark; IHE's ITI-20 sends the XML without one
  (the XML declaration names the encoding), so the BOM is optional (``audit.syslog.utf8_bom``).

:func:`frame` wraps a message for the wire with RFC 5425 §4.3 octet counting
(``MSG-LEN SP SYSLOG-MSG``), which is safe for an XML payload with line breaks.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from conf.errors import InvalidInputError

#: RFC 5424 §6.2.1 facility 10: security/authorization messages (PS3.15 A.6).
FACILITY_AUTHPRIV = 10
#: RFC 5424 §6.2.1 severities used: 5 notice, 4 warning.
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
#: ITI TF-2 §3.20.4.1.2.
MSGID_IHE = "IHE+RFC-3881"
NILVALUE = "-"
BOM = b"\xef\xbb\xbf"
#: RFC 5424 §6 field limits (octets of PRINTUSASCII).
MAX_HOSTNAME = 255
MAX_APP_NAME = 48
MAX_PROCID = 128
MAX_MSGID = 32
#: PS3.15 A.6: receivers must take messages of at least this size; longer ones may be truncated.
GUARANTEED_MESSAGE_OCTETS = 32768


class SyslogFormatError(InvalidInputError, ValueError):
    """A header field that RFC 5424 does not allow (length or characters)."""


def priority(severity: int, facility: int = FACILITY_AUTHPRIV) -> int:
    """RFC 5424 §6.2.1: PRIVAL = facility × 8 + severity (0..191)."""
    if not 0 <= facility <= 23 or not 0 <= severity <= 7:
        raise SyslogFormatError(f"facility {facility} / severity {severity} out of range")
    return facility * 8 + severity


def severity_for_outcome(outcome: int) -> int:
    """Notice for EventOutcomeIndicator 0 (success), warning for 4/8/12 (failures) (PS3.15 A.6)."""
    return SEVERITY_NOTICE if outcome == 0 else SEVERITY_WARNING


def timestamp(when: dt.datetime) -> str:
    """RFC 5424 §6.2.3 TIMESTAMP (RFC 3339 with TIME-SECFRAC of 6 digits), in UTC (``Z``)."""
    if when.tzinfo is None:
        raise SyslogFormatError("timestamp: a timezone-aware datetime is required (RFC 5424 §6.2.3 needs a zone)")
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def header_field(value: str | None, name: str, limit: int) -> str:
    """*value* checked as RFC 5424 ``NILVALUE / 1*limit PRINTUSASCII``; None and "" become ``-``."""
    if value is None or value == "":
        return NILVALUE
    if len(value) > limit:
        raise SyslogFormatError(f"{name}: at most {limit} characters (RFC 5424 §6), got {len(value)}")
    if not all(33 <= ord(c) <= 126 for c in value):
        raise SyslogFormatError(f"{name}: only printable US-ASCII without spaces (RFC 5424 §6)")
    return value


@dataclass(frozen=True)
class SyslogHeader:
    """The per-sender part of the header, validated once when built."""

    hostname: str | None
    app_name: str | None
    procid: str | None
    msgid: str = MSGID_IHE

    def __post_init__(self) -> None:
        for value, name, limit in (
            (self.hostname, "HOSTNAME", MAX_HOSTNAME),
            (self.app_name, "APP-NAME", MAX_APP_NAME),
            (self.procid, "PROCID", MAX_PROCID),
            (self.msgid, "MSGID", MAX_MSGID),
        ):
            header_field(value, name, limit)

    def render(self) -> str:
        return " ".join(
            (
                header_field(self.hostname, "HOSTNAME", MAX_HOSTNAME),
                header_field(self.app_name, "APP-NAME", MAX_APP_NAME),
                header_field(self.procid, "PROCID", MAX_PROCID),
                header_field(self.msgid, "MSGID", MAX_MSGID),
            )
        )


def syslog_message(
    header: SyslogHeader, *, severity: int, when: dt.datetime, payload: bytes, bom: bool = False
) -> bytes:
    """One RFC 5424 SYSLOG-MSG: ``HEADER SP STRUCTURED-DATA SP MSG`` with no structured data.

    *payload* is the UTF-8 XML audit message; with *bom* it is preceded by the UTF-8 byte order
    mark (RFC 5424 §6.4 MSG-UTF8), unless it already starts with one.
    """
    head = f"<{priority(severity)}>1 {timestamp(when)} {header.render()} {NILVALUE} ".encode("ascii")
    if payload.startswith(BOM):
        payload = payload if bom else payload[len(BOM):]
    elif bom:
        payload = BOM + payload
    return head + payload


def frame(message: bytes) -> bytes:
    """RFC 5425 §4.3 octet-counted frame: ``MSG-LEN SP SYSLOG-MSG`` (MSG-LEN in octets, no leading zero)."""
    if not message:
        raise SyslogFormatError("an empty syslog message cannot be framed")
    return str(len(message)).encode("ascii") + b" " + message
