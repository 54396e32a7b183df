"""hl7.messages: inbound ORM/OMI/ADT parsing, ACKs, ORU^R01 results — pure functions, real messages.

The inbound messages are written as the senders write them (IHE RAD TF-2 RAD-4 / RAD-13 ORM^O01
v2.3.1, an ORM^O01 v2.5.1, an OMI^O23 v2.5.1 with IPC, ADT^A08/A31/A40). Everything we write is
parsed back with hl7apy, strictly where hl7apy can (v2.3.1 and later).
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hl7apy.validation import Validator

from hl7.messages import (
    DEFAULT_PROCEDURE,
    CodedValue,
    ErrorCode,
    Hl7MessageError,
    MessageHeader,
    OrderMessage,
    OruInput,
    PatientIdentity,
    PatientMerge,
    PatientUpdate,
    build_ack,
    build_oru,
    escape,
    parse_ack,
    parse_inbound,
    unescape,
)

# The patient's data: none of it may appear in an error text or an ACK.
PHI = ("EVERYMAN", "ADAM", "PHI4711", "19800704", "HOME STREET", "555-555-2004")

ORM_231 = "\r".join(
    [
        "MSH|^~\\&|RIS|RADIOLOGY|PNEUMO|HOSPITAL|20240315101500||ORM^O01|RIS000123|P|2.3.1||||||8859/1",
        "PID|1||998877^^^NATIONAL^NI~PHI4711^^^HOSP^MR||EVERYMAN^ADAM^A^^DR||19800704|M|||2222 HOME STREET^^ANN ARBOR^MI^^USA"
        "||555-555-2004",
        "PV1|1|O|RAD^^^HOSP||||0101^KILDARE^JAMES^^^DR|||RAD",
        "ORC|NW|PO-2024-001^HIS|FO-2024-001^RIS||SC||1^^^20240315110000^^R||20240315101500|||0101^KILDARE^JAMES^^^DR",
        "OBR|1|PO-2024-001^HIS|FO-2024-001^RIS|36554-4^XR Chest Single view^LN||||||||||||0101^KILDARE^JAMES^^^DR"
        "||ACC-2024-001|RP-001|SPS-001||||CR|||1^^^20240315110000^^R",
        "ZDS|1.2.826.0.1.3680043.8.498.1^RIS^Application^DICOM",
    ]
)

ORM_251 = "\r".join(
    [
        "MSH|^~\\&|RIS|RADIOLOGY|PNEUMO|HOSPITAL|20240316075959+0100||ORM^O01^ORM_O01|RIS000777|P|2.5.1|||AL|NE||UNICODE UTF-8",
        "PID|1||PHI4711^^^&1.2.840.99999.1&ISO^MR||EVERYMAN^ADAM^^^^^L~ALIAS^ADAM^^^^^A||198007041230|F",
        "PV1|1|I|W1^101^A",
        "ORC|XO|PO-77^HIS|FO-77^RIS||SC||^^^20240316080000^^A|||||0202^CASEY^BEN^Q^JR^DR",
        "OBR|1|PO-77^HIS|FO-77^RIS|71045^XR CHEST 1 VIEW^C4^RAD-CXR1^Chest \\T\\ ribs^L||||||||||||0202^CASEY^BEN^Q^JR^DR"
        "||ACC-77|RP-77|SPS-77||||DX|||^^^20240316090000^^S|||||||||20240316090000",
    ]
)

OMI_251 = "\r".join(
    [
        "MSH|^~\\&|RIS|RADIOLOGY|PNEUMO|HOSPITAL|20240317070000||OMI^O23^OMI_O23|RIS000888|P|2.5.1",
        "PID|1||PHI4711^^^HOSP^MR||EVERYMAN^ADAM||19800704|U",
        "PV1|1|E",
        "ORC|NW|PO-88^HIS|FO-88^RIS||SC|||||||0303^WELBY^MARCUS",
        "TQ1|1||||||20240317073000||S^Stat^HL70485",
        "OBR|1|PO-88^HIS|FO-88^RIS|36554-4^XR Chest Single view^LN||||||||||||0303^WELBY^MARCUS||||||||CR",
        "IPC|ACC-88^RIS^1.2.3.4.5^ISO|RP-88|1.2.826.0.1.3680043.8.498.88|SPS-88A|CR||||CR_ROOM1",
        "IPC|ACC-88^RIS^1.2.3.4.5^ISO|RP-88|1.2.826.0.1.3680043.8.498.88|SPS-88B|DX",
    ]
)

ADT_A08 = "\r".join(
    [
        "MSH|^~\\&|ADT|HOSPITAL|PNEUMO|HOSPITAL|20240318120000||ADT^A08^ADT_A01|ADT000001|P|2.5",
        "EVN|A08|20240318120000",
        "PID|1||PHI4711^^^HOSP^MR||EVERYMAN^ADAM^B^III^MR||19800704|M",
        "PV1|1|O",
    ]
)

ADT_A31 = "\r".join(
    [
        "MSH|^~\\&|MPI|HOSPITAL|PNEUMO|HOSPITAL|20240318120500||ADT^A31|MPI000002|P|2.4",
        "EVN|A31|20240318120500",
        "PID|1||PHI4711^^^^MR||EVERYMAN^ADAM||19800231|O",
        "PV1|1|N",
    ]
)

ADT_A40 = "\r".join(
    [
        "MSH|^~\\&|MPI|HOSPITAL|PNEUMO|HOSPITAL|20240319090000||ADT^A40^ADT_A39|MPI000003|P|2.5.1",
        "EVN|A40|20240319090000",
        "PID|1||PHI4711^^^HOSP^MR||EVERYMAN^ADAM||19800704|M",
        "MRG|PHI0815^^^HOSP^MR",
    ]
)


def replace_segment(message: str, segment_id: str, new: str | None) -> str:
    """The message with its first ``segment_id`` segment replaced (None: removed)."""
    lines = message.split("\r")
    index = next(i for i, line in enumerate(lines) if line.startswith(segment_id + "|"))
    if new is None:
        del lines[index]
    else:
        lines[index] = new
    return "\r".join(lines)


# --------------------------------------------------------------------------- inbound: what is read

EXPECTED: list[tuple[str, str, type, dict[str, Any]]] = [
    (
        "ORM^O01 v2.3.1 (IHE RAD-4)",
        ORM_231,
        OrderMessage,
        {
            "header": MessageHeader(
                sending_application="RIS",
                sending_facility="RADIOLOGY",
                receiving_application="PNEUMO",
                receiving_facility="HOSPITAL",
                message_type="ORM",
                trigger_event="O01",
                control_id="RIS000123",
                processing_id="P",
                version="2.3.1",
                encoding_characters="^~\\&",
                timestamp="20240315101500",
            ),
            "patient": PatientIdentity("PHI4711", "HOSP", "EVERYMAN^ADAM^A^DR", "19800704", "M"),
            "order_control": "NW",
            "placer_order_number": "PO-2024-001",
            "placer_namespace": "HIS",
            "filler_order_number": "FO-2024-001",
            "filler_namespace": "RIS",
            "accession_number": "ACC-2024-001",
            "accession_issuer": None,
            "requested_procedure": CodedValue("36554-4", "LN", "XR Chest Single view"),
            "requested_procedure_id": "RP-001",
            "scheduled_procedure_step_id": "SPS-001",
            "ordering_provider": "KILDARE^JAMES^^DR",
            "priority": "R",
            "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
            "scheduled_datetime": "20240315110000",
            "modality": "CR",
            "order_status": "SC",
        },
    ),
    (
        "ORM^O01 v2.5.1",
        ORM_251,
        OrderMessage,
        {
            "patient": PatientIdentity("PHI4711", "1.2.840.99999.1", "EVERYMAN^ADAM", "19800704", "F"),
            "order_control": "XO",
            "placer_order_number": "PO-77",
            "filler_order_number": "FO-77",
            "accession_number": "ACC-77",
            # CE.1-3 are all there: the primary triplet wins; the escaped "&" is only in the alternate.
            "requested_procedure": CodedValue("71045", "C4", "XR CHEST 1 VIEW"),
            "ordering_provider": "CASEY^BEN^Q^DR^JR",
            "priority": "A",  # ORC-7.6 before OBR-27.6
            "scheduled_datetime": "20240316080000",  # ORC-7.4 before OBR-27.4 and OBR-36
            "study_instance_uid": None,  # no ZDS
            "modality": "DX",
        },
    ),
    (
        "OMI^O23 v2.5.1 with two IPC",
        OMI_251,
        OrderMessage,
        {
            "patient": PatientIdentity("PHI4711", "HOSP", "EVERYMAN^ADAM", "19800704", None),
            "order_control": "NW",
            "placer_order_number": "PO-88",
            "filler_order_number": "FO-88",
            "accession_number": "ACC-88",
            "accession_issuer": "RIS",
            "requested_procedure": CodedValue("36554-4", "LN", "XR Chest Single view"),
            "requested_procedure_id": "RP-88",
            "scheduled_procedure_step_id": "SPS-88A",
            "study_instance_uid": "1.2.826.0.1.3680043.8.498.88",
            "ordering_provider": "WELBY^MARCUS",
            "priority": "S",  # TQ1-9
            "scheduled_datetime": "20240317073000",  # TQ1-7
            "modality": "CR",
        },
    ),
    (
        "ADT^A08 v2.5",
        ADT_A08,
        PatientUpdate,
        {"patient": PatientIdentity("PHI4711", "HOSP", "EVERYMAN^ADAM^B^MR^III", "19800704", "M")},
    ),
    (
        "ADT^A31 v2.4 (invalid birth date, no issuer)",
        ADT_A31,
        PatientUpdate,
        {"patient": PatientIdentity("PHI4711", None, "EVERYMAN^ADAM", None, "O")},
    ),
    (
        "ADT^A40 v2.5.1",
        ADT_A40,
        PatientMerge,
        {
            "patient": PatientIdentity("PHI4711", "HOSP", "EVERYMAN^ADAM", "19800704", "M"),
            "prior_patient_id": "PHI0815",
            "prior_issuer": "HOSP",
        },
    ),
]


@pytest.mark.parametrize(("name", "message", "kind", "expected"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_fields_are_extracted(name: str, message: str, kind: type, expected: dict[str, Any]) -> None:
    parsed = parse_inbound(message)
    assert type(parsed) is kind
    for field, value in expected.items():
        assert getattr(parsed, field) == value, field


@pytest.mark.parametrize(("name", "message", "kind", "expected"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_framing_line_endings_and_bytes_are_tolerated(name: str, message: str, kind: type, expected: dict[str, Any]) -> None:
    reference = parse_inbound(message)
    assert parse_inbound(message.encode()) == reference
    assert parse_inbound(message.replace("\r", "\n")) == reference
    assert parse_inbound(message.replace("\r", "\r\n") + "\r\n") == reference
    assert parse_inbound(b"\x0b" + message.encode() + b"\r\x1c\r") == reference
    assert parse_inbound(b"\xef\xbb\xbf  " + message.encode() + b"\r\r  \r") == reference  # BOM, blank lines


def test_character_sets() -> None:
    latin1 = ORM_231.replace("EVERYMAN^ADAM", "M\u00dcLLER^J\u00d6RG")
    assert parse_inbound(latin1.encode("iso8859-1")).patient.name == "M\u00dcLLER^J\u00d6RG^A^DR"  # MSH-18 8859/1
    assert parse_inbound(ORM_251.replace("EVERYMAN", "\u00c5NGSTR\u00d6M").encode()).patient.name == "\u00c5NGSTR\u00d6M^ADAM"
    undeclared = OMI_251.replace("EVERYMAN", "GR\u00dcN")
    assert parse_inbound(undeclared.encode("utf-8")).patient.name == "GR\u00dcN^ADAM"
    assert parse_inbound(undeclared.encode("iso8859-1")).patient.name == "GR\u00dcN^ADAM"  # not UTF-8: 8859-1
    with pytest.raises(Hl7MessageError) as caught:  # declared UTF-8, is not
        parse_inbound(ORM_251.replace("EVERYMAN", "GR\u00dcN").encode("iso8859-1"))
    assert (caught.value.ack_code, caught.value.hl7_error_code, str(caught.value.error_location)) == ("AE", 102, "MSH-18")
    assert caught.value.header is not None and caught.value.header.control_id == "RIS000777"


def test_escape_sequences_and_nulls_are_resolved() -> None:
    message = replace_segment(
        ORM_231,
        "OBR",
        'OBR|1|PO\\T\\1^HIS|""|^^^RAD\\F\\CXR^Chest \\T\\ ribs \\X41\\\\.br\\two^L||||||||||||""||ACC\\S\\9|RP-001',
    )
    parsed = parse_inbound(message)
    assert isinstance(parsed, OrderMessage)
    assert parsed.placer_order_number == "PO-2024-001"  # ORC-2 first
    assert parsed.filler_order_number == "FO-2024-001"
    assert parsed.accession_number == "ACC^9"
    assert parsed.requested_procedure == CodedValue("RAD|CXR", "L", "Chest & ribs A\ntwo")
    bare = replace_segment(replace_segment(message, "ORC", "ORC|NW"), "OBR", 'OBR|1|PO\\T\\1^HIS|""|||||||||||||||ACC-1')
    parsed = parse_inbound(bare)
    assert isinstance(parsed, OrderMessage)
    assert (parsed.placer_order_number, parsed.filler_order_number, parsed.requested_procedure) == ("PO&1", None, None)


def test_non_standard_delimiters() -> None:
    message = ORM_231.replace("^", "$").replace("~", "*").replace("|", "!").replace("&", "%")
    parsed = parse_inbound(message)
    assert isinstance(parsed, OrderMessage)
    assert parsed.patient.name == "EVERYMAN^ADAM^A^DR"  # a PN always uses "^"
    assert parsed.header.encoding_characters == "$*\\%"
    assert parsed.accession_number == "ACC-2024-001"


def test_identifier_and_name_choice() -> None:
    pid = "PID|1||X1^^^OTHER^PI~Y2^^^&1.2.3&ISO^MR~Z3^^^HOSP^MR||NICK^N^^^^^N~LEGAL^L^^^^^L||1980|UNKNOWN"
    parsed = parse_inbound(replace_segment(ADT_A08, "PID", pid))
    assert parsed.patient == PatientIdentity("Y2", "1.2.3", "LEGAL^L", None, None)  # first MR; legal name
    pid = "PID|1||^^^HOSP^MR~A1^^^HOSP^PI||ODD\\S\\NAME=IDEO^G"
    assert parse_inbound(replace_segment(ADT_A08, "PID", pid)).patient == PatientIdentity("A1", "HOSP", "ODD NAME IDEO^G")


def test_segments_the_version_does_not_define_are_ignored() -> None:
    # A TQ1 in a v2.3.1 ORM (TQ1 arrives in v2.5) and a vendor's non-Z segment: ignored, not fatal.
    message = ORM_231.replace("\rOBR|", "\rTQ1|1||||||20990101||S\rXYZ|whatever\rOBR|")
    parsed = parse_inbound(message)
    assert isinstance(parsed, OrderMessage)
    assert (parsed.priority, parsed.scheduled_datetime) == ("R", "20240315110000")
    assert parsed == parse_inbound(ORM_231)


def test_processing_ids_are_configurable() -> None:
    training = ADT_A08.replace("|ADT000001|P|", "|ADT000001|T|")
    with pytest.raises(Hl7MessageError) as caught:
        parse_inbound(training)
    assert (caught.value.ack_code, caught.value.hl7_error_code) == ("AR", ErrorCode.UNSUPPORTED_PROCESSING_ID)
    assert isinstance(parse_inbound(training, processing_ids=("P", "T")), PatientUpdate)


# --------------------------------------------------------------------------- inbound: errors

ERRORS: list[tuple[str, str | bytes, str, int, str | None, str | None]] = [
    # (name, message, ack code, table 0357 code, ERR-2 location, echoed MSH-10)
    ("garbage", "hello world, I am not HL7", "AR", 100, "MSH", None),
    ("empty", "", "AR", 100, "MSH", None),
    ("binary", b"\x00\xff\xfe" * 10, "AR", 100, "MSH", None),
    ("not MSH first", "PID|1||PHI4711\r" + ORM_231, "AR", 100, "MSH", None),
    ("duplicate encoding characters", ORM_231.replace("MSH|^~\\&|", "MSH|^^\\&|", 1), "AR", 102, "MSH-2", "RIS000123"),
    ("too few encoding characters", ORM_231.replace("MSH|^~\\&|", "MSH|^~|", 1), "AR", 102, "MSH-2", "RIS000123"),
    ("truncation character before v2.7", ORM_251.replace("MSH|^~\\&|", "MSH|^~\\&#|", 1), "AR", 102, "MSH-2", "RIS000777"),
    ("letters as encoding characters", ORM_231.replace("MSH|^~\\&|", "MSH|abcd|", 1), "AR", 102, "MSH-2", "RIS000123"),
    ("unsupported version", ORM_231.replace("|P|2.3.1|", "|P|2.6|"), "AR", 203, "MSH-12", "RIS000123"),
    ("old version", ORM_231.replace("|P|2.3.1|", "|P|2.2|"), "AR", 203, "MSH-12", "RIS000123"),
    ("no version", ORM_231.replace("|P|2.3.1|", "|P||"), "AR", 101, "MSH-12", "RIS000123"),
    ("no control id", ORM_231.replace("|RIS000123|", "||"), "AR", 101, "MSH-10", None),
    ("debug processing id", ORM_231.replace("|RIS000123|P|", "|RIS000123|D|"), "AR", 202, "MSH-11", "RIS000123"),
    ("unsupported message type", ORM_231.replace("ORM^O01", "ORU^R01"), "AR", 200, "MSH-9.1", "RIS000123"),
    ("unsupported event", ADT_A08.replace("ADT^A08^ADT_A01", "ADT^A01^ADT_A01"), "AR", 201, "MSH-9.2", "ADT000001"),
    ("ORM with the wrong event", ORM_231.replace("ORM^O01", "ORM^O02"), "AR", 201, "MSH-9.2", "RIS000123"),
    ("no message type", ORM_231.replace("ORM^O01", ""), "AR", 101, "MSH-9", "RIS000123"),
    ("OMI before v2.5", OMI_251.replace("|P|2.5.1", "|P|2.3.1"), "AR", 200, "MSH-12", "RIS000888"),
    ("invalid segment id", ORM_231.replace("\rPV1|", "\rP V|"), "AE", 100, None, "RIS000123"),
    ("lower-case segment id", ORM_231.replace("\rPV1|", "\rpv1|"), "AE", 100, None, "RIS000123"),
    ("missing PID", replace_segment(ORM_231, "PID", None), "AE", 100, "PID", "RIS000123"),
    ("missing PID in ADT", replace_segment(ADT_A08, "PID", None), "AE", 100, "PID", "ADT000001"),
    ("missing PID-3", replace_segment(ORM_231, "PID", "PID|1|||EVERYMAN^ADAM||19800704|M"), "AE", 101, "PID-3", "RIS000123"),
    ("PID-3 without id", replace_segment(ADT_A08, "PID", "PID|1||^^^HOSP^MR||EVERYMAN^ADAM"), "AE", 101, "PID-3", "ADT000001"),
    ("missing ORC", replace_segment(ORM_231, "ORC", None), "AE", 100, "OBR", "RIS000123"),
    ("missing ORC and OBR", replace_segment(replace_segment(ORM_231, "ORC", None), "OBR", None), "AE", 100, "ZDS", "RIS000123"),
    ("missing OBR", replace_segment(ORM_231, "OBR", None), "AE", 100, "OBR", "RIS000123"),
    (
        "ORC before PID",
        ORM_231.replace("\rPID|", "\rXXX|").replace("ZDS|", "PID|1||PHI4711\rZDS|"),
        "AE",
        100,
        "ORC",
        "RIS000123",
    ),
    ("missing ORC-1", ORM_231.replace("ORC|NW|", "ORC||"), "AE", 101, "ORC-1", "RIS000123"),
    ("ORC-1 not in table 0119", ORM_231.replace("ORC|NW|", "ORC|ZZ|"), "AE", 103, "ORC-1", "RIS000123"),
    ("missing accession (ORM OBR-18)", ORM_231.replace("|ACC-2024-001|", "||"), "AE", 101, "OBR-18", "RIS000123"),
    ("missing IPC", OMI_251.split("\rIPC|")[0], "AE", 100, "IPC", "RIS000888"),
    (
        "missing accession (OMI IPC-1)",
        OMI_251.replace("IPC|ACC-88^RIS^1.2.3.4.5^ISO|", "IPC||"),
        "AE",
        101,
        "IPC-1.1",
        "RIS000888",
    ),
    (
        "IPC segments disagree",
        OMI_251.replace("ACC-88^RIS^1.2.3.4.5^ISO|RP-88|1.2.826.0.1.3680043.8.498.88|SPS-88B", "ACC-99|RP-88|1.2|SPS-88B"),
        "AE",
        207,
        "IPC-1 (segment 2)",
        "RIS000888",
    ),
    (
        "two procedures in one ORM",
        ORM_231 + "\rORC|NW|PO-2|FO-2\rOBR|1|PO-2|FO-2|X^Y^L||||||||||||||ACC-OTHER",
        "AE",
        207,
        "ORC (segment 2)",
        "RIS000123",
    ),
    ("missing MRG", replace_segment(ADT_A40, "MRG", None), "AE", 100, "MRG", "MPI000003"),
    ("missing MRG-1", replace_segment(ADT_A40, "MRG", "MRG||PHI0815"), "AE", 101, "MRG-1", "MPI000003"),
    ("two merges in one A40", ADT_A40 + "\rPID|1||PHI0001^^^HOSP^MR\rMRG|PHI0002", "AE", 207, "PID (segment 2)", "MPI000003"),
]


@pytest.mark.parametrize(("name", "message", "ack_code", "code", "location", "control_id"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name: str, message: str | bytes, ack_code: str, code: int, location: str | None, control_id: str | None) -> None:
    with pytest.raises(Hl7MessageError) as caught:
        parse_inbound(message)
    error = caught.value
    assert (error.ack_code, error.hl7_error_code) == (ack_code, code)
    assert (str(error.error_location) if error.error_location else None) == location
    assert ((error.header.control_id or None) if error.header else None) == control_id
    # No PHI in the text, nor in the ACK that answers it; the ACK parses back.
    for value in PHI:
        assert value not in str(error)
    ack = build_ack(
        error.header,
        error.ack_code,
        sending_application="PNEUMO",
        sending_facility="HOSPITAL",
        control_id="ACK1",
        now=NOW,
        error=error,
    )
    for value in PHI:
        assert value not in ack
    code_back, control_back, text_back = parse_ack(ack)
    assert (code_back, control_back) == (ack_code, control_id)
    # v2.5+: ERR-8 carries the whole text; before: MSA-3 (ST, at most 80 characters escaped).
    assert text_back is not None and str(error).startswith(text_back) and len(text_back) >= min(len(str(error)), 60)
    parse_message(ack, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)


def test_garbage_never_escapes_as_another_exception() -> None:
    """Whatever the bytes, parse_inbound answers with a parsed message or an Hl7MessageError."""
    import random

    rng = random.Random(20240315)
    alphabet = 'MSHPIDORCOBRIPC|^~\\&\r\n 0123456789ABCxyz"\x0b\x1c'
    seeds = [ORM_231, ORM_251, OMI_251, ADT_A40]
    for _ in range(250):
        seed = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 12)):
            position = rng.randrange(len(seed))
            seed[position] = rng.choice(alphabet)
        try:
            parse_inbound("".join(seed))
        except Hl7MessageError as error:
            assert error.ack_code in ("AE", "AR")


# --------------------------------------------------------------------------- ACK

NOW = datetime(2024, 3, 15, 10, 15, 30, tzinfo=timezone(timedelta(hours=1)))


def strict(message: str, tmp_path: Path) -> list[str]:
    """Parse strictly with groups, validate (raises on an error) and return hl7apy's warnings."""
    parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    report = tmp_path / "hl7apy-report.txt"
    assert Validator.validate(parsed, report_file=str(report)) is True
    return [line for line in report.read_text().splitlines() if line]


def fields(message: str, segment_id: str, occurrence: int = 1) -> list[str]:
    """Raw fields of a segment by HL7 position (index 1 = field 1; for MSH index 1 = MSH-1)."""
    found = [line for line in message.split("\r") if line.startswith(segment_id + "|")][occurrence - 1]
    parts = found.split("|")
    return ["MSH", "|", *parts[1:]] if segment_id == "MSH" else parts


@pytest.mark.parametrize("message", [ORM_231, ORM_251, OMI_251, ADT_A08, ADT_A31, ADT_A40])
def test_ack_aa_round_trip_and_strict_validation(message: str, tmp_path: Path) -> None:
    inbound = parse_inbound(message)
    ack = build_ack(
        inbound.header, "AA", sending_application="PNEUMO", sending_facility="HOSPITAL", control_id="PNEUMO-1", now=NOW
    )
    assert ack.endswith("\r") and "\n" not in ack
    assert parse_ack(ack) == ("AA", inbound.header.control_id, None)
    msh = fields(ack, "MSH")
    assert msh[3:7] == ["PNEUMO", "HOSPITAL", inbound.header.sending_application, inbound.header.sending_facility]
    assert msh[7] == "20240315101530+0100"
    event = inbound.header.trigger_event
    assert msh[9] == f"ACK^{event}^ACK" and msh[10] == "PNEUMO-1" and msh[11] == "P" and msh[12] == inbound.header.version
    assert strict(ack, tmp_path) == []


@pytest.mark.parametrize("version", ["2.3.1", "2.4", "2.5", "2.5.1"])
def test_ack_with_error_per_version(version: str, tmp_path: Path) -> None:
    message = ORM_231.replace("|P|2.3.1|", f"|P|{version}|").replace("|ACC-2024-001|", "||")
    with pytest.raises(Hl7MessageError) as caught:
        parse_inbound(message)
    error = caught.value
    ack = build_ack(
        error.header, "AE", sending_application="PNEUMO", sending_facility="HOSPITAL", control_id="PNEUMO-2", now=NOW, error=error
    )
    assert fields(ack, "MSA")[1:3] == ["AE", "RIS000123"]
    err = fields(ack, "ERR")
    if version in ("2.5", "2.5.1"):
        assert err[2:5] == ["OBR^1^18", "101^Required field missing^HL70357", "E"]
        assert unescape(err[8]) == str(error)
    else:
        assert err[1] == "OBR^1^18^101&Required field missing&HL70357"
    warnings = strict(ack, tmp_path)
    # hl7apy's v2.5.1 table 0396 predates "HL7nnnn" as a coding system name (HL7 v2.5.1 table 0396 has it).
    assert all("HL70357 not in table HL70396" in warning for warning in warnings)


def test_error_locations_in_err_2() -> None:
    with pytest.raises(Hl7MessageError) as caught:
        parse_inbound(OMI_251.replace("IPC|ACC-88^RIS^1.2.3.4.5^ISO|", "IPC||"))
    ack = build_ack(
        caught.value.header, "AE", sending_application="P", sending_facility="H", control_id="C", now=NOW, error=caught.value
    )
    assert fields(ack, "ERR")[2] == "IPC^1^1^1^1"  # segment, sequence, field, repetition, component
    with pytest.raises(Hl7MessageError) as caught:
        parse_inbound(
            OMI_251.replace("ACC-88^RIS^1.2.3.4.5^ISO|RP-88|1.2.826.0.1.3680043.8.498.88|SPS-88B", "X|RP-88|1.2|SPS-88B")
        )
    ack = build_ack(
        caught.value.header, "AE", sending_application="P", sending_facility="H", control_id="C", now=NOW, error=caught.value
    )
    assert fields(ack, "ERR")[2] == "IPC^2^1"


def test_ack_without_header() -> None:
    with pytest.raises(Hl7MessageError) as caught:
        parse_inbound("not hl7")
    ack = build_ack(None, "AR", sending_application="PNEUMO", sending_facility="H", control_id="C9", now=NOW, error=caught.value)
    msh, msa = fields(ack, "MSH"), fields(ack, "MSA")
    assert msh[5:7] == ["", ""] and msh[9] == "ACK" and msh[11] == "P" and msh[12] == "2.5.1"
    assert msa[1:3] == ["AR", ""]
    assert fields(ack, "ERR")[2:4] == ["MSH^1", "100^Segment sequence error^HL70357"]
    assert parse_ack(ack) == ("AR", None, "the message does not start with an MSH segment")


def test_ack_to_unsupported_version_and_v23() -> None:
    with pytest.raises(Hl7MessageError) as caught:
        parse_inbound(ORM_231.replace("|P|2.3.1|", "|P|2.7|"))
    ack = build_ack(
        caught.value.header, "AR", sending_application="P", sending_facility="H", control_id="C", now=NOW, error=caught.value
    )
    assert fields(ack, "MSH")[12] == "2.5.1"
    assert fields(ack, "ERR")[3] == "203^Unsupported version id^HL70357"
    v23 = parse_inbound(ADT_A08.replace("|P|2.5", "|P|2.3"))
    ack = build_ack(
        v23.header, "AA", sending_application="P", sending_facility="H", control_id="C", now=datetime(2024, 1, 2, 3, 4, 5)
    )
    assert fields(ack, "MSH")[9] == "ACK^A08" and fields(ack, "MSH")[7] == "20240102030405"
    parse_message(ack, validation_level=VALIDATION_LEVEL.TOLERANT)


def test_ack_escapes_and_checks() -> None:
    header = dataclasses.replace(parse_inbound(ADT_A08).header, control_id="A|B^C", sending_application="X&Y")
    ack = build_ack(header, "AA", sending_application="P~Q", sending_facility="H\\I", control_id="C|1", now=NOW, text="ok | fine")
    assert parse_ack(ack) == ("AA", "A|B^C", "ok | fine")
    assert fields(ack, "MSH")[3:6] == ["P\\R\\Q", "H\\E\\I", "X\\T\\Y"]
    error = Hl7MessageError("x", ack_code="AE", hl7_error_code=ErrorCode.REQUIRED_FIELD_MISSING)
    with pytest.raises(ValueError):
        build_ack(header, "AA", sending_application="P", sending_facility="H", control_id="C", now=NOW, error=error)


# --------------------------------------------------------------------------- parse_ack

ACKS = [
    ("MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1\rMSA|AA|ORU1", ("AA", "ORU1", None)),
    ("MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1\rMSA|CA|ORU1", ("CA", "ORU1", None)),
    ("MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK|R1|P|2.3\rMSA|CR|ORU1|busy", ("CR", "ORU1", "busy")),
    (
        "MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1\rMSA|AE|ORU1|short\r"
        "ERR||OBR^1^18|101^Required field missing^HL70357|E||||Accession \\T\\ order unknown",
        ("AE", "ORU1", "Accession & order unknown"),
    ),
    (
        "MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01|R1|P|2.4\rMSA|AR|ORU1\rERR|PID^1^3^101&Required field missing&HL70357",
        ("AR", "ORU1", "Required field missing"),
    ),
    (
        "MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1\rMSA|ae\rERR|||207^Application internal error^HL70357",
        ("AE", None, "Application internal error"),
    ),
    ("MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.9\nMSA|AA|ORU1\n", ("AA", "ORU1", None)),
    (b"\x0bMSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1\rMSA|AA|ORU1\r\x1c\r", ("AA", "ORU1", None)),
]


@pytest.mark.parametrize(("raw", "expected"), ACKS)
def test_parse_ack(raw: str | bytes, expected: tuple[str, str | None, str | None]) -> None:
    assert parse_ack(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "garbage",
        b"\xff\xfe",
        "MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1",  # no MSA
        "MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1\rMSA|OK|ORU1",  # not table 0008
        "MSH|^^\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1\rMSA|AA|ORU1",
        "MSH|^~\\&|RIS|H|PNEUMO|H|20240315||ACK^R01^ACK|R1|P|2.5.1\r<html>|AA",
    ],
)
def test_parse_ack_rejects_garbage(raw: str | bytes) -> None:
    with pytest.raises(Hl7MessageError):
        parse_ack(raw)


# --------------------------------------------------------------------------- ORU^R01

CREATED = datetime(2024, 3, 15, 11, 42, 7, tzinfo=UTC)
OBSERVED = datetime(2024, 3, 15, 11, 2, 0, tzinfo=timezone(timedelta(hours=1)))


def oru_input(**changes: Any) -> OruInput:
    values: dict[str, Any] = {
        "control_id": "PNEUMO-ORU-1",
        "sending_application": "PNEUMO",
        "sending_facility": "HOSPITAL",
        "receiving_application": "RIS",
        "receiving_facility": "RADIOLOGY",
        "created_at": CREATED,
        "patient": PatientIdentity("PHI4711", "HOSP", "EVERYMAN^ADAM^A^DR", "19800704", "M"),
        "placer_order_number": "PO-2024-001",
        "placer_namespace": "HIS",
        "filler_order_number": "FO-2024-001",
        "filler_namespace": "RIS",
        "accession_number": "ACC-2024-001",
        "procedure_code": "36554-4",
        "procedure_system": "LN",
        "procedure_text": "XR Chest Single view",
        "ordering_provider": "KILDARE^JAMES^^DR",
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "observation_datetime": OBSERVED,
        "result_status": "F",
        "label": "PNEUMONIA",
        "probability": 0.873,
        "threshold": 0.5,
        "model_name": "pneumo-resnet",
        "model_version": "1.2.0",
        "intended_use": "Research use only: assists, never replaces, a clinician's reading.",
        "reasons": ("not a frontal chest radiograph (1 image)",),
        "images": 3,
        "analysed": 2,
        "sr_sop_instance_uids": ("1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"),
    }
    values.update(changes)
    return OruInput(**values)


#: hl7apy's v2.5.1 table 0396 lacks SCT and UCUM (HL7 added them to the table later; they are the
#: coding systems of the SR's concepts and of "%"). Only these warnings are accepted.
ALLOWED_WARNING = re.compile(r"Warning: Value (SCT|UCUM) not in table HL70396 in element OBX_[36]\.CE_3")

ORU_CASES = {
    "final, pneumonia": {},
    "final, normal": {"label": "NORMAL", "probability": 0.12},
    "final, no probability, no order numbers": {
        "probability": None,
        "placer_order_number": None,
        "filler_order_number": None,
        "sr_sop_instance_uids": (),
    },
    "corrected": {"result_status": "C", "label": "NORMAL", "probability": 0.499},
    "could not be analysed": {
        "result_status": "X",
        "label": None,
        "probability": None,
        "analysed": 0,
        "reasons": ("not a chest radiograph (2 images)", "pixel data unreadable (1 image)"),
        "sr_sop_instance_uids": (),
        "observation_datetime": None,
    },
    "minimal": {
        "patient": PatientIdentity("PHI4711"),
        "placer_order_number": None,
        "placer_namespace": None,
        "filler_order_number": None,
        "procedure_code": None,
        "procedure_system": None,
        "procedure_text": None,
        "ordering_provider": None,
        "study_instance_uid": None,
        "observation_datetime": None,
        "reasons": (),
        "sr_sop_instance_uids": (),
    },
}


@pytest.mark.parametrize("case", ORU_CASES, ids=list(ORU_CASES))
def test_oru_passes_strict_v251_validation(case: str, tmp_path: Path) -> None:
    message = build_oru(oru_input(**ORU_CASES[case]))
    assert message.endswith("\r") and "\n" not in message
    warnings = strict(message, tmp_path)
    assert [w for w in warnings if not ALLOWED_WARNING.fullmatch(w)] == []


def test_oru_final_content() -> None:
    message = build_oru(oru_input())
    msh = fields(message, "MSH")
    assert msh[3:8] == ["PNEUMO", "HOSPITAL", "RIS", "RADIOLOGY", "20240315114207+0000"]
    assert msh[9:13] == ["ORU^R01^ORU_R01", "PNEUMO-ORU-1", "P", "2.5.1"]
    assert len(msh) == 13  # MSH-15/16 empty: original acknowledgment mode; ASCII: no MSH-18
    pid = fields(message, "PID")
    assert pid[3] == "PHI4711^^^HOSP^MR" and pid[5] == "EVERYMAN^ADAM^A^^DR" and pid[7:9] == ["19800704", "M"]
    orc = fields(message, "ORC")
    assert orc[1:4] == ["RE", "PO-2024-001^HIS", "FO-2024-001^RIS"] and orc[12] == "^KILDARE^JAMES^^^DR"
    obr = fields(message, "OBR")
    assert obr[2:5] == ["PO-2024-001^HIS", "FO-2024-001^RIS", "36554-4^XR Chest Single view^LN"]
    assert obr[7] == "20240315110200+0100" and obr[16] == "^KILDARE^JAMES^^^DR" and obr[18] == "ACC-2024-001"
    assert obr[22] == "20240315114207+0000" and obr[24:26] == ["RAD", "F"]
    obx = [fields(message, "OBX", n) for n in range(1, 6)]
    assert [o[1] for o in obx] == ["1", "2", "3", "4", "5"]
    assert obx[0][2:6] == ["CE", "233604007^Pneumonia^SCT", "1", "52101004^Present^SCT"]
    assert obx[1][2:7] == ["NM", "111012^Certainty of Finding^DCM", "1", "87.3", "%^percent^UCUM"]
    assert obx[2][2:4] == ["TX", "PNEUMO-AI-SUMMARY^AI analysis summary^L"]
    assert obx[2][5].split("~") == [
        "AI pneumonia classifier pneumo-resnet 1.2.0: pneumonia PRESENT (deciding image probability 87.3 %, threshold 50 %)",
        "2 of 3 images analysed",
        "Not analysed: not a frontal chest radiograph (1 image)",
        "Intended use: Research use only: assists, never replaces, a clinician's reading.",
    ]
    assert obx[3][2:6] == ["ST", "110180^Study Instance UID^DCM", "", "1.2.826.0.1.3680043.8.498.1"]
    assert obx[4][2:6] == [
        "RP",
        "PNEUMO-AI-SR^AI result structured report^L",
        "",
        "urn:oid:1.2.826.0.1.3680043.8.498.2^PNEUMO^AP^DICOM",
    ]
    assert fields(message, "OBX", 6)[5] == "urn:oid:1.2.826.0.1.3680043.8.498.3^PNEUMO^AP^DICOM"
    for o in obx:
        assert o[11] == "F" and o[14] == "20240315110200+0100" and o[19] == "20240315114207+0000"


def test_oru_statuses() -> None:
    normal = build_oru(oru_input(label="NORMAL", probability=0.12, result_status="C"))
    assert fields(normal, "OBX")[5] == "272519000^Absent^SCT"
    assert fields(normal, "OBR")[25] == "C" and all(fields(normal, "OBX", n)[11] == "C" for n in range(1, 4))
    assert "Corrected result" in fields(normal, "OBX", 3)[5]
    x = build_oru(oru_input(**ORU_CASES["could not be analysed"]))
    assert fields(x, "OBR")[25] == "X" and fields(x, "OBR")[7] == "20240315114207+0000"  # OBR-7 falls back
    first = fields(x, "OBX")
    assert first[2:6] == [
        "TX",
        "233604007^Pneumonia^SCT",
        "1",
        "Not analysed: not a chest radiograph (2 images)~Not analysed: pixel data unreadable (1 image)",
    ]
    assert first[11] == "X" and [fields(x, "OBX", n)[11] for n in (2, 3)] == ["F", "F"]  # summary, study UID
    assert [fields(x, "OBX", n)[2] for n in (1, 2, 3)] == ["TX", "TX", "ST"]
    assert not any(line.startswith(("OBX|4|", "OBX|2|NM", "OBX|1|CE")) for line in x.split("\r"))
    minimal = build_oru(oru_input(**ORU_CASES["minimal"]))
    assert fields(minimal, "PID")[3] == "PHI4711^^^^MR" and fields(minimal, "PID")[5] == "^^^^^^U"
    assert fields(minimal, "OBR")[3] == "ACC-2024-001"  # OBR-3 falls back to the accession number
    assert (
        fields(minimal, "OBR")[4]
        == "18748-4^Diagnostic imaging study^LN"
        == "^".join([DEFAULT_PROCEDURE.code or "", DEFAULT_PROCEDURE.text or "", DEFAULT_PROCEDURE.system or ""])
    )


def test_oru_hostile_text_round_trips(tmp_path: Path) -> None:
    hostile = "a|b^c~d\\e&f \\S\\ \\F\\ \\X0D\\ \\.br\\"
    result = oru_input(
        patient=PatientIdentity("ID|\\1", "HOSP&NS", "Sm|ith&Co~\\E\\^Jo|hn\\S\\^^^Jr&Sr", "19800704", "F"),
        placer_order_number="PO|1^x",
        ordering_provider="Dr|Who^The&Doctor",
        procedure_text=hostile,
        model_name="net|v^2",
        intended_use=hostile,
        reasons=(hostile, "line one\nline two\r\x0bend"),
        control_id="C|1~2",
    )
    message = build_oru(result)
    assert [w for w in strict(message, tmp_path) if not ALLOWED_WARNING.fullmatch(w)] == []
    assert len(message.split("\r")) == 1 + 1 + 1 + 1 + 6 + 1  # MSH PID ORC OBR, 6 OBX, trailing ""
    pid = fields(message, "PID")
    name = pid[5].split("^")
    assert [unescape(part) for part in name] == ["Sm|ith&Co~\\E\\", "Jo|hn\\S\\", "", "Jr&Sr"]
    assert unescape(pid[3].split("^")[0]) == "ID|\\1" and unescape(pid[3].split("^")[3]) == "HOSP&NS"
    assert unescape(fields(message, "MSH")[10]) == "C|1~2"
    assert unescape(fields(message, "OBR")[2].split("^")[0]) == "PO|1^x"
    assert unescape(fields(message, "OBR")[4].split("^")[1]) == hostile
    assert [unescape(p) for p in fields(message, "OBR")[16].split("^")] == ["", "Dr|Who", "The&Doctor"]
    summary = [unescape(line) for line in fields(message, "OBX", 3)[5].split("~")]
    assert summary[0].startswith("AI pneumonia classifier net|v^2 1.2.0:")
    assert summary[2:4] == [f"Not analysed: {hostile}", "Not analysed: line one\nline two\rend"]
    assert summary[4] == f"Intended use: {hostile}"


def test_oru_limits_unicode_and_issuers(tmp_path: Path) -> None:
    long_name = "\u00c5" + "x" * 400 + "^" + "y" * 300
    message = build_oru(oru_input(patient=PatientIdentity("PHI4711", "1.2.840.10008.999.1", long_name), procedure_text="p" * 500))
    assert fields(message, "MSH")[18] == "UNICODE UTF-8"
    assert fields(message, "PID")[3] == "PHI4711^^^&1.2.840.10008.999.1&ISO^MR"
    assert len(fields(message, "PID")[5].split("^")[0]) == 199
    assert [w for w in strict(message, tmp_path) if not ALLOWED_WARNING.fullmatch(w)] == []


@pytest.mark.parametrize(
    "changes",
    [
        {"created_at": datetime(2024, 1, 1)},
        {"observation_datetime": datetime(2024, 1, 1)},
        {"result_status": "X"},  # X with a label
        {"result_status": "P"},
        {"label": None},
        {"probability": 1.5},
        {"threshold": -0.1},
        {"analysed": 4},
        {"control_id": ""},
        {"patient": PatientIdentity("")},
        {"placer_order_number": None, "filler_order_number": None, "accession_number": None},
        {"result_status": "X", "label": None, "probability": None},  # X with SR references
    ],
)
def test_oru_input_is_checked(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        oru_input(**changes)


# --------------------------------------------------------------------------- escaping


@pytest.mark.parametrize(
    "text",
    ["plain", "|^~\\&", "\\F\\ literal", "\\S\\\\T\\", "\\", "\\\\X41\\", "a\rb\nc", "\u00e9\u00e8", "\\.br\\", ""],
)
def test_escape_round_trip(text: str) -> None:
    escaped = escape(text)
    assert not set(escaped) & set("|^~&\r\n")
    assert unescape(escaped) == text


def test_unescape() -> None:
    assert unescape("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f") == "a|b^c&d~e\\f"
    assert unescape("\\X4142\\\\.br\\\\H\\bold\\N\\\\Zlocal\\") == "AB\nbold"
    assert unescape("unterminated \\F") == "unterminated \\F"
