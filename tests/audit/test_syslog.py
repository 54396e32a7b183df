"""RFC 5424 message formatting and RFC 5425 framing for ITI-20, checked field by field and by an
independent parser of the RFC 5424 ABNF (tests/audit/syslog_receiver.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from audit.syslog import (
    BOM,
    MSGID_IHE,
    SyslogFormatError,
    SyslogHeader,
    frame,
    header_field,
    priority,
    severity_for_outcome,
    syslog_message,
    timestamp,
)
from conf.settings import AuditSyslogSettings
from tests.audit.syslog_receiver import SyslogParseError, parse_message, split_frames

WHEN = dt.datetime(2026, 11, 30, 23, 29, 48, 123456, tzinfo=dt.UTC)
XML = b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage><EventIdentification/></AuditMessage>'


@pytest.mark.parametrize(
    ("outcome", "severity", "pri"),
    [(0, 5, 85), (4, 4, 84), (8, 4, 84), (12, 4, 84)],
)
def test_pri_is_authpriv_notice_for_success_warning_for_failures(outcome: int, severity: int, pri: int) -> None:
    """PS3.15 A.6: facility 10; severity 5 for normal events, 4 where a warning is appropriate."""
    assert severity_for_outcome(outcome) == severity
    assert priority(severity) == pri


@pytest.mark.parametrize(("facility", "severity"), [(24, 0), (-1, 0), (10, 8), (10, -1)])
def test_pri_out_of_range_is_refused(facility: int, severity: int) -> None:
    with pytest.raises(SyslogFormatError):
        priority(severity, facility)


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (WHEN, "2026-11-30T23:29:48.123456Z"),
        (dt.datetime(2026, 12, 1, 1, 29, 48, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))), "2026-11-30T23:29:48.123456Z"),
        (dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "2026-01-02T03:04:05.000000Z"),
    ],
)
def test_timestamp_is_rfc3339_utc_with_zone(when: dt.datetime, expected: str) -> None:
    assert timestamp(when) == expected
    assert dt.datetime.fromisoformat(expected.replace("Z", "+00:00")) == when


def test_naive_timestamp_is_refused() -> None:
    with pytest.raises(SyslogFormatError, match="timezone"):
        timestamp(dt.datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("name", "limit"),
    [("HOSTNAME", 255), ("APP-NAME", 48), ("PROCID", 128), ("MSGID", 32)],
)
def test_header_field_lengths_per_rfc5424_section_6(name: str, limit: int) -> None:
    assert header_field("a" * limit, name, limit) == "a" * limit
    with pytest.raises(SyslogFormatError, match=f"at most {limit}"):
        header_field("a" * (limit + 1), name, limit)


@pytest.mark.parametrize("bad", ["with space", "tab\there", "caf\u00e9", "bell\x07"])
def test_header_fields_are_printable_us_ascii(bad: str) -> None:
    with pytest.raises(SyslogFormatError, match="printable US-ASCII"):
        header_field(bad, "HOSTNAME", 255)


@pytest.mark.parametrize("empty", [None, ""])
def test_unknown_header_field_is_nilvalue(empty: str | None) -> None:
    assert header_field(empty, "PROCID", 128) == "-"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hostname": "h" * 256, "app_name": "a", "procid": "1"},
        {"hostname": "h", "app_name": "a" * 49, "procid": "1"},
        {"hostname": "h", "app_name": "a", "procid": "1" * 129},
        {"hostname": "h", "app_name": "a", "procid": "1", "msgid": "m" * 33},
    ],
)
def test_header_is_validated_when_built(kwargs: dict[str, str]) -> None:
    with pytest.raises(SyslogFormatError):
        SyslogHeader(**kwargs)


def test_message_bytes_exactly() -> None:
    header = SyslogHeader(hostname="gw.example.org", app_name="pneumo-gateway", procid="4242")
    message = syslog_message(header, severity=5, when=WHEN, payload=XML)
    assert message == b"<85>1 2026-11-30T23:29:48.123456Z gw.example.org pneumo-gateway 4242 IHE+RFC-3881 - " + XML


def test_message_parses_as_rfc5424_with_every_header_field() -> None:
    header = SyslogHeader(hostname="gw.example.org", app_name="pneumo-gateway", procid=None)
    parsed = parse_message(syslog_message(header, severity=4, when=WHEN, payload=XML))
    assert (parsed.pri, parsed.facility, parsed.severity, parsed.version) == (84, 10, 4, 1)
    assert parsed.timestamp == WHEN
    assert (parsed.hostname, parsed.app_name, parsed.procid, parsed.msgid) == ("gw.example.org", "pneumo-gateway", "-", MSGID_IHE)
    assert parsed.structured_data == "-"
    assert parsed.msg == XML


@pytest.mark.parametrize(
    ("payload", "bom", "msg"),
    [
        (XML, False, XML),
        (XML, True, BOM + XML),
        (BOM + XML, False, XML),  # IHE ITI-20 form: no BOM, even if the XML came with one
        (BOM + XML, True, BOM + XML),  # never two
    ],
)
def test_utf8_bom_is_optional_and_never_doubled(payload: bytes, bom: bool, msg: bytes) -> None:
    header = SyslogHeader(hostname="h", app_name="a", procid="1")
    assert parse_message(syslog_message(header, severity=5, when=WHEN, payload=payload, bom=bom)).msg == msg


def test_utf8_payload_keeps_its_octets() -> None:
    xml = '<AuditMessage><ParticipantObjectName>Müller^Zoë</ParticipantObjectName></AuditMessage>'.encode()
    header = SyslogHeader(hostname="h", app_name="a", procid="1")
    assert parse_message(syslog_message(header, severity=5, when=WHEN, payload=xml)).msg.decode("utf-8") == xml.decode()


@pytest.mark.parametrize(
    ("message", "framed"),
    [(b"hello", b"5 hello"), ("é".encode(), b"2 \xc3\xa9"), (b"x" * 12345, b"12345 " + b"x" * 12345)],
)
def test_octet_counting_counts_octets(message: bytes, framed: bytes) -> None:
    """RFC 5425 §4.3: MSG-LEN is the number of octets of SYSLOG-MSG, not of characters."""
    assert frame(message) == framed


def test_empty_message_cannot_be_framed() -> None:
    with pytest.raises(SyslogFormatError):
        frame(b"")


def test_frames_split_back_whatever_the_chunking() -> None:
    """Frames of XML with line breaks and digits survive any split of the TCP stream."""
    header = SyslogHeader(hostname="h", app_name="a", procid="1")
    messages = [syslog_message(header, severity=5, when=WHEN, payload=f"<A>\n{i} 12 \n</A>".encode()) for i in range(20)]
    stream = b"".join(frame(m) for m in messages)
    for chunk in (1, 7, 64, len(stream)):
        buffer, got = bytearray(), []
        for start in range(0, len(stream), chunk):
            buffer.extend(stream[start : start + chunk])
            got.extend(split_frames(buffer))
        assert got == messages and not buffer


@pytest.mark.parametrize("stream", [b"abc def", b"007 abcdefg", b" 5 hello"])
def test_receiver_refuses_bad_framing(stream: bytes) -> None:
    with pytest.raises(SyslogParseError):
        split_frames(bytearray(stream))


@pytest.mark.parametrize(
    "values",
    [
        {"enabled": True},
        {"app_name": "two words"},
        {"app_name": "a" * 49},
        {"hostname": "h" * 256},
        {"retry_initial_seconds": 10, "retry_max_seconds": 1},
        {"port": 0},
    ],
)
def test_settings_refuse_what_cannot_work(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AuditSyslogSettings.model_validate(values)


def test_settings_defaults() -> None:
    settings = AuditSyslogSettings()
    assert (settings.enabled, settings.port, settings.app_name, settings.utf8_bom) == (False, 6514, "pneumo-gateway", False)
