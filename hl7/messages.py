"""HL7 v2 messages of the gateway: orders and patient updates in, ACKs and ORU^R01 results out.

Pure functions over text: no sockets, no database. The MLLP listener and sender frame, log and
store; this module only reads and writes messages (docs/architecture.md, "HL7 v2.5.1 over MLLP").

What comes in (:func:`parse_inbound`)
    * ``ORM^O01`` (HL7 v2.3 - v2.5.1, chapter 4 "Order Entry") and ``OMI^O23`` (v2.5, v2.5.1,
      chapter 4, "Imaging Order Message") as IHE RAD TF-2 sends them in Procedure Scheduled
      [RAD-4] and Procedure Updated [RAD-13] (Department System Scheduler/Order Filler -> Image
      Manager). Placer Order Management [RAD-2] / Filler Order Management [RAD-3] run between the
      order placer and the order filler before an Accession Number exists; a message of that kind
      reaching us lacks the accession and is answered AE (below).
    * ``ADT^A08`` / ``ADT^A31`` (update patient information; chapter 3, 3.3.8 / 3.3.31) and
      ``ADT^A40`` (merge patient - patient identifier list; chapter 3, 3.3.40) as in IHE RAD TF-2
      Patient Update [RAD-12].

Where the Accession Number is
    * ``ORM^O01``: OBR-18 "Placer Field 1". IHE Scheduled Workflow (RAD TF-2 4.4 [RAD-4], 4.13
      [RAD-13], HL7 v2.3.1 message semantics) places the Accession Number there, OBR-19 "Placer
      Field 2" holds the Requested Procedure ID and OBR-20 the Scheduled Procedure Step ID; the
      Study Instance UID travels in the IHE-defined ``ZDS`` segment (ZDS-1, an RP whose first
      component is the UID). Conformance statements that implement RAD-4 read OBR-18 the same way
      (e.g. dcm4chee-arc's HL7 conformance statement, AdvaPACS's RAD-4 description).
    * ``OMI^O23``: the IPC segment (HL7 v2.5.1 chapter 4, "Imaging Procedure Control"): IPC-1 Accession
      Identifier (EI), IPC-2 Requested Procedure ID, IPC-3 Study Instance UID, IPC-4 Scheduled
      Procedure Step ID, IPC-5 Modality - the HL7 v2.5.1 option of RAD TF-2 4.4 / 4.13
      (4.4.4.1.2.2 "Message Semantics (HL7 v2.5.1)"); TQ1-7 replaces ORC-7.4 / OBR-27.4 as the
      start date/time there.
    No other place is guessed: no accession, no order (AE, 101, with the field's location).

Validation level and hl7apy
    Inbound, hl7apy reads the MSH (:func:`hl7apy.parser.get_message_info`: encoding characters,
    structure, version) and says which segments the declared version defines; every field we use is
    then read from the segment text with the message's own delimiters and checked explicitly.
    hl7apy is not asked to build the whole message tree: at ``VALIDATION_LEVEL.TOLERANT`` it accepts
    what we accept and checks nothing we rely on, strict parsing rejects real-world messages outright
    (length limits, site segments) and puts the offending *value* in its exception text, and building
    the tree cost ~16 ms per order — most of the listener's time (bench/hl7.py). Values are read
    from the text, not through hl7apy's element tree, because hl7apy keeps values escaped and
    re-escapes when it serialises (``\\X0D\\`` comes back as ``\\E\\X0D\\E\\``): they are split and
    unescaped here (:func:`unescape`, HL7 v2.5.1 2.7 "Use of escape sequences in text fields").
    Our own output (ACK, ORU^R01) is written as text with :func:`escape` and checked in the tests by
    parsing it back with hl7apy at ``VALIDATION_LEVEL.STRICT`` with ``find_groups=True`` and
    ``validate()``.

Errors (:class:`Hl7MessageError`)
    Carry what the ACK needs (HL7 v2.5.1 chapter 2: original-mode acknowledgment, MSA, ERR, table 0357):
    ``ack_code`` AR (rejected: unreadable MSH, wrong encoding characters, unsupported version,
    processing id, message type or event) or AE (understood but wrong or incomplete), the table
    0357 code, the ERR-2 location and the header as far as it could be read. Texts name fields,
    never their values: they end up in logs and in the ACK, and a value may be PHI.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import date, datetime
from enum import IntEnum
from functools import lru_cache
from typing import Final, Literal, TypeAlias

from hl7apy import load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException, UnsupportedVersion
from hl7apy.parser import get_message_info, parse_message

from conf.errors import InvalidInputError

__all__ = [
    "DEFAULT_PROCEDURE",
    "OUTPUT_VERSION",
    "SUPPORTED_MESSAGES",
    "SUPPORTED_VERSIONS",
    "CodedValue",
    "ErrorCode",
    "ErrorLocation",
    "Hl7MessageError",
    "Inbound",
    "MessageHeader",
    "OrderMessage",
    "OruInput",
    "PatientIdentity",
    "PatientMerge",
    "PatientUpdate",
    "build_ack",
    "build_oru",
    "escape",
    "parse_ack",
    "parse_inbound",
    "unescape",
]

#: MSH-12 values we accept inbound (VID.1). The ACK echoes one of them; anything else gets 2.5.1.
SUPPORTED_VERSIONS: Final = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
#: (MSH-9.1, MSH-9.2) pairs we accept inbound.
SUPPORTED_MESSAGES: Final = frozenset({("ORM", "O01"), ("OMI", "O23"), ("ADT", "A08"), ("ADT", "A31"), ("ADT", "A40")})
#: OMI^O23 and its IPC segment exist from HL7 v2.5 on (hl7apy has no OMI_O23 before 2.5 either).
_OMI_VERSIONS: Final = ("2.5", "2.5.1")
#: Version of everything we write.
OUTPUT_VERSION: Final = "2.5.1"

#: The HL7-recommended encoding characters (MSH-1, MSH-2); everything we write uses them.
_FS, _CS, _RS, _ESC, _SS = "|", "^", "~", "\\", "&"
_STANDARD_ENCODING: Final = _CS + _RS + _ESC + _SS

#: HL7 table 0119 "Order Control Codes" (v2.5.1): ORC-1 outside it is answered AE 103.
_ORDER_CONTROL_CODES: Final = frozenset(
    "AF CA CH CN CR DC DE DF DR FU HD HR LI NA NW OC OD OE OF OH OK OP OR PA PR PY RE RF RL RO RP RQ RR RU SC SN SR SS "
    "UA UC UD UF UH UM UN UR UX XO XR XX".split()
)
_ACK_CODES: Final = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
#: MSH-18 (HL7 table 0211) -> Python codec. Unknown or absent: UTF-8, else ISO 8859-1.
_CHARSETS: Final = {
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
}
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
#: C0 controls other than TAB/CR/LF never belong in a text value (0x0B / 0x1C are MLLP framing).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ErrorCode(IntEnum):
    """HL7 table 0357 "Message error condition codes" (v2.5.1), the codes this module uses."""

    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        """The table's description, used as CWE.2 / ELD.4.2."""
        return _ERROR_TEXTS[self]


_ERROR_TEXTS: Final = {
    ErrorCode.SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE_ERROR: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class MessageHeader:
    """What an inbound MSH says (HL7 v2.5.1 chapter 2, MSH), values unescaped, dates as given.

    Applications and facilities are the HD's namespace id (HD.1), or its universal id (HD.2) when
    there is no namespace id. ``version`` is VID.1, ``processing_id`` PT.1, ``timestamp`` TS.1.
    A field that is absent is an empty string.
    """

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_type: str
    trigger_event: str
    control_id: str
    processing_id: str
    version: str
    encoding_characters: str
    timestamp: str


@dataclass(frozen=True)
class PatientIdentity:
    """The patient as PID holds it (HL7 v2.5.1 3.4.2).

    * ``patient_id``: PID-3 CX.1 of the identifier typed MR (CX.5), else of the first identifier.
    * ``issuer``: that identifier's CX.4 assigning authority, namespace id or else universal id.
    * ``name``: PID-5 (the legal name, XPN.7 = L, when several) as a DICOM PN
      ``Family^Given^Middle^Prefix^Suffix`` (PS3.5 6.2.1), trailing empty components dropped;
      ``^``, ``=`` and ``\\`` inside a component become spaces.
    * ``birth_date``: the YYYYMMDD of PID-7 when it is a valid date, else None.
    * ``sex``: PID-8 when M, F or O (HL7 table 0001), else None (U, A, N and unknown values).
    """

    patient_id: str
    issuer: str | None = None
    name: str | None = None
    birth_date: str | None = None
    sex: str | None = None


@dataclass(frozen=True)
class CodedValue:
    """A CE/CWE as (code, coding system, text): the primary triplet, else the alternate one."""

    code: str | None
    system: str | None
    text: str | None


@dataclass(frozen=True)
class OrderMessage:
    """An imaging order from ``ORM^O01`` or ``OMI^O23`` (HL7 v2.5.1 chapter 4; IHE RAD TF-2 RAD-4/13).

    * ``order_control``: ORC-1 (table 0119: NW new, CA cancel, XO change, SC status changed...).
    * ``placer_order_number`` / ``placer_namespace``: ORC-2 EI.1 / EI.2, else OBR-2.
    * ``filler_order_number`` / ``filler_namespace``: ORC-3, else OBR-3.
    * ``accession_number``: ORM OBR-18; OMI IPC-1 EI.1 (``accession_issuer``: IPC-1 EI.2, else EI.3).
    * ``requested_procedure``: OBR-4 Universal Service Identifier.
    * ``requested_procedure_id``: ORM OBR-19; OMI IPC-2. ``scheduled_procedure_step_id``: OBR-20 / IPC-4.
    * ``ordering_provider``: ORC-12, else OBR-16, as a DICOM PN.
    * ``priority``: TQ1-9 CWE.1, else ORC-7.6, else OBR-27.6 (TQ priority, table 0027).
    * ``study_instance_uid``: OMI IPC-3; ORM ZDS-1 (IHE RAD TF-2 ZDS segment).
    * ``scheduled_datetime``: TQ1-7, else ORC-7.4, else OBR-27.4, else OBR-36, as given.
    * ``modality``: OMI IPC-5 CE.1; ORM OBR-24 (Diagnostic Serv Sect ID, as IHE RAD-4 uses it).
    * ``order_status``: ORC-5 (table 0038).

    When the message holds several ORC groups (one per Scheduled Procedure Step in IHE RAD-4), the
    first one is reported; they must all carry the same accession (else AE 207).
    """

    header: MessageHeader
    patient: PatientIdentity
    order_control: str
    placer_order_number: str | None
    placer_namespace: str | None
    filler_order_number: str | None
    accession_number: str
    requested_procedure: CodedValue | None
    ordering_provider: str | None
    priority: str | None
    study_instance_uid: str | None
    scheduled_datetime: str | None
    filler_namespace: str | None = None
    accession_issuer: str | None = None
    requested_procedure_id: str | None = None
    scheduled_procedure_step_id: str | None = None
    modality: str | None = None
    order_status: str | None = None


@dataclass(frozen=True)
class PatientUpdate:
    """``ADT^A08`` / ``ADT^A31``: new demographics for a patient (HL7 v2.5.1 3.3.8 / 3.3.31)."""

    header: MessageHeader
    patient: PatientIdentity


@dataclass(frozen=True)
class PatientMerge:
    """``ADT^A40``: ``prior_patient_id`` (MRG-1) is merged into ``patient`` (PID-3; HL7 v2.5.1 3.3.40)."""

    header: MessageHeader
    patient: PatientIdentity
    prior_patient_id: str
    prior_issuer: str | None


Inbound: TypeAlias = OrderMessage | PatientUpdate | PatientMerge


@dataclass(frozen=True)
class ErrorLocation:
    """Where an error is (HL7 v2.5.1 data type ERL, ERR-2): segment id, its occurrence, field, component."""

    segment_id: str
    segment_sequence: int = 1
    field_position: int | None = None
    field_repetition: int | None = None
    component: int | None = None

    def components(self) -> list[str]:
        """ERL.1 .. ERL.5 as strings (trailing empty ones left out)."""
        parts = [self.segment_id, str(self.segment_sequence)]
        if self.field_position is not None:
            parts.append(str(self.field_position))
            if self.field_repetition is not None or self.component is not None:
                parts.append(str(self.field_repetition or 1))
            if self.component is not None:
                parts.append(str(self.component))
        return parts

    def __str__(self) -> str:
        text = self.segment_id if self.field_position is None else f"{self.segment_id}-{self.field_position}"
        if self.field_position is not None and self.component is not None:
            text += f".{self.component}"
        return text if self.segment_sequence == 1 else f"{text} (segment {self.segment_sequence})"


class Hl7MessageError(InvalidInputError):
    """An inbound message we cannot use; carries what the ACK needs (HL7 v2.5.1 chapter 2, MSA and ERR).

    ``str(error)`` names fields and positions only, never a value from the message (values may be
    PHI). ``header`` is what could be read of the MSH (None when not even that), so that the ACK can
    echo MSH-10 and reverse sender and receiver.
    """

    def __init__(
        self,
        message: str,
        *,
        ack_code: Literal["AE", "AR"],
        hl7_error_code: ErrorCode,
        error_location: ErrorLocation | None = None,
        header: MessageHeader | None = None,
    ) -> None:
        super().__init__(message)
        self.ack_code: Literal["AE", "AR"] = ack_code
        self.hl7_error_code = ErrorCode(hl7_error_code)
        self.error_location = error_location
        self.header = header


# --------------------------------------------------------------------------- escaping


def escape(text: str) -> str:
    """``text`` as an HL7 text value with the standard delimiters (HL7 v2.5.1 chapter 2, escape sequences).

    The escape character first (``\\`` -> ``\\E\\``), then ``|`` ``^`` ``&`` ``~`` (``\\F\\``
    ``\\S\\`` ``\\T\\`` ``\\R\\``); CR and LF as ``\\X0D\\`` / ``\\X0A\\``; other C0 controls are
    dropped. Unlike hl7apy's escaper, a backslash that merely *looks* like an escape sequence is
    escaped too, so any text round-trips through :func:`unescape`.
    """
    text = _CONTROL.sub("", text)
    text = text.replace(_ESC, "\\E\\")
    text = text.replace(_FS, "\\F\\").replace(_CS, "\\S\\").replace(_SS, "\\T\\").replace(_RS, "\\R\\")
    return text.replace("\r", "\\X0D\\").replace("\n", "\\X0A\\")


@dataclass(frozen=True)
class _Delimiters:
    field: str = _FS
    component: str = _CS
    repetition: str = _RS
    escape: str = _ESC
    subcomponent: str = _SS
    codec: str = "utf-8"


_STANDARD = _Delimiters()


def unescape(value: str, delimiters: _Delimiters = _STANDARD) -> str:
    """Resolve HL7 escape sequences in one leaf value (HL7 v2.5.1 chapter 2, "Use of escape sequences in text fields").

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` give the delimiters back, ``\\Xhh..\\`` the bytes (in the
    message's character set), ``\\.br\\`` a line feed; highlighting (``\\H\\ \\N\\``), character
    set switches (``\\C..\\ \\M..\\``), locally defined (``\\Z..\\``) and other formatting sequences
    are dropped. An unterminated escape is kept as text.
    """
    esc = delimiters.escape
    if esc not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char != esc:
            out.append(char)
            i += 1
            continue
        end = value.find(esc, i + 1)
        if end == -1:
            out.append(value[i:])
            break
        out.append(_resolve(value[i + 1 : end], delimiters))
        i = end + 1
    return "".join(out)


def _resolve(sequence: str, d: _Delimiters) -> str:
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape}
    if sequence in simple:
        return simple[sequence]
    if sequence[:1] == "X" and len(sequence) > 1:
        try:
            return bytes.fromhex(sequence[1:]).decode(d.codec, errors="replace")
        except ValueError:
            return ""
    if sequence == ".br":
        return "\n"
    return ""


# --------------------------------------------------------------------------- reading segments


class _Segment:
    """One segment's fields as raw ER7 text, read with the message's delimiters."""

    def __init__(self, segment_id: str, sequence: int, raw: str, delimiters: _Delimiters) -> None:
        self.id = segment_id
        self.sequence = sequence
        self._d = delimiters
        parts = raw.split(delimiters.field)
        if segment_id == "MSH":
            # MSH-1 is the field separator itself, MSH-2 the encoding characters (never split).
            self._fields = {1: delimiters.field, **{n + 1: part for n, part in enumerate(parts) if n >= 1}}
        else:
            self._fields = {n: part for n, part in enumerate(parts) if n >= 1}

    def raw(self, position: int) -> str:
        return self._fields.get(position, "")

    def repetitions(self, position: int) -> list[str]:
        raw = self.raw(position)
        if self.id == "MSH" and position <= 2:
            return [raw]
        return raw.split(self._d.repetition) if raw else []

    def value(self, position: int, component: int = 1, subcomponent: int = 1, repetition: int = 0) -> str:
        """The unescaped, stripped leaf; "" when absent or the HL7 null ``""``."""
        reps = self.repetitions(position)
        if repetition >= len(reps):
            return ""
        return _leaf(reps[repetition], component, subcomponent, self._d)

    def location(self, position: int | None = None, component: int | None = None) -> ErrorLocation:
        return ErrorLocation(self.id, self.sequence, position, None, component)


def _leaf(repetition: str, component: int, subcomponent: int, d: _Delimiters) -> str:
    components = repetition.split(d.component)
    if component > len(components):
        return ""
    subs = components[component - 1].split(d.subcomponent)
    if subcomponent > len(subs):
        return ""
    value = unescape(subs[subcomponent - 1], d).strip()
    return "" if value == '""' else value


def _opt(value: str) -> str | None:
    return value or None


# --------------------------------------------------------------------------- decoding


def _normalise(text: str) -> str:
    """Drop MLLP framing and byte-order marks, accept LF / CRLF as segment terminators, drop blank
    segments and whitespace around segments (as hl7apy strips each segment)."""
    text = text.replace("\x0b", "").replace("\x1c", "").replace("\ufeff", "")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    return "\r".join(line.strip() for line in text.split("\r") if line.strip())


def _declared_charset(text: str) -> str:
    """MSH-18 read naively from the first segment (enough to choose a codec)."""
    if not text.startswith("MSH") or len(text) < 4:
        return ""
    first = text.split("\r", 1)[0].split("\n", 1)[0]
    fields = first.split(text[3])
    return fields[17].split(fields[1][:1] or "^")[0].strip().upper() if len(fields) > 17 and fields[1] else ""


def _decode(raw: bytes | str) -> tuple[str, str, bool]:
    """(text, codec, whether the declared MSH-18 character set failed to decode)."""
    if isinstance(raw, str):
        return raw, "utf-8", False
    latin = raw.lstrip(b"\x0b \t\r\n").decode("iso8859-1")
    codec = _CHARSETS.get(_declared_charset(latin))
    if codec is not None and codec != "ascii":
        try:
            return raw.decode(codec), codec, False
        except UnicodeDecodeError:
            return raw.decode("iso8859-1"), "iso8859-1", True
    try:
        return raw.decode("utf-8"), "utf-8", False
    except UnicodeDecodeError:
        return raw.decode("iso8859-1"), "iso8859-1", False


# --------------------------------------------------------------------------- parse_inbound


def parse_inbound(raw: bytes | str, *, processing_ids: Collection[str] = ("P",)) -> Inbound:
    """Read an ``ORM^O01``, ``OMI^O23``, ``ADT^A08``/``A31`` or ``ADT^A40`` (see the module docstring).

    ``raw`` is one message, with or without MLLP framing, segments ended by CR (LF and CRLF are
    accepted). Bytes are decoded with the MSH-18 character set when declared (table 0211), else as
    UTF-8, else ISO 8859-1. ``processing_ids`` are the MSH-11 values accepted (HL7 v2.5.1
    MSH-11, table 0103: a production system rejects training/debug messages; a test system passes
    ``("T",)`` or ``("P", "T", "D")``).

    Raises :class:`Hl7MessageError` (AR or AE, table 0357 code, ERR-2 location, header).
    """
    text, codec, charset_failed = _decode(raw)
    text = _normalise(text)
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7MessageError(
            "the message does not start with an MSH segment",
            ack_code="AR",
            hl7_error_code=ErrorCode.SEGMENT_SEQUENCE_ERROR,
            error_location=ErrorLocation("MSH"),
        )
    msh_text = text.split("\r", 1)[0]
    try:
        encoding, _structure, _version = get_message_info(text)
        delimiters = _delimiters(encoding, codec)
    except (HL7apyException, ValueError, IndexError):
        raise Hl7MessageError(
            "MSH-1/MSH-2 (field separator and encoding characters) are not valid",
            ack_code="AR",
            hl7_error_code=ErrorCode.DATA_TYPE_ERROR,
            error_location=ErrorLocation("MSH", 1, 2),
            header=_best_effort_header(msh_text),
        ) from None
    msh = _Segment("MSH", 1, msh_text, delimiters)
    header = _header(msh)

    def reject(message: str, code: ErrorCode, location: ErrorLocation) -> Hl7MessageError:
        return Hl7MessageError(message, ack_code="AR", hl7_error_code=code, error_location=location, header=header)

    if charset_failed:
        raise Hl7MessageError(
            "the message is not encoded in the character set MSH-18 declares",
            ack_code="AE",
            hl7_error_code=ErrorCode.DATA_TYPE_ERROR,
            error_location=msh.location(18),
            header=header,
        )
    if not header.control_id:
        raise reject("MSH-10 (Message Control ID) is missing", ErrorCode.REQUIRED_FIELD_MISSING, msh.location(10))
    if not header.version:
        raise reject("MSH-12 (Version ID) is missing", ErrorCode.REQUIRED_FIELD_MISSING, msh.location(12))
    if header.version not in SUPPORTED_VERSIONS:
        raise reject(
            f"MSH-12 (Version ID) is not supported; supported: {', '.join(SUPPORTED_VERSIONS)}",
            ErrorCode.UNSUPPORTED_VERSION_ID,
            msh.location(12),
        )
    if not header.processing_id:
        raise reject("MSH-11 (Processing ID) is missing", ErrorCode.REQUIRED_FIELD_MISSING, msh.location(11))
    if header.processing_id not in processing_ids:
        raise reject(
            f"MSH-11 (Processing ID) is not accepted here; accepted: {', '.join(sorted(processing_ids))}",
            ErrorCode.UNSUPPORTED_PROCESSING_ID,
            msh.location(11),
        )
    if not header.message_type or not header.trigger_event:
        raise reject("MSH-9 (Message Type) is missing or incomplete", ErrorCode.REQUIRED_FIELD_MISSING, msh.location(9))
    supported = ", ".join(f"{t}^{e}" for t, e in sorted(SUPPORTED_MESSAGES))
    if header.message_type not in {t for t, _ in SUPPORTED_MESSAGES}:
        raise reject(
            f"MSH-9.1 (message type) is not supported; supported: {supported}",
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            msh.location(9, 1),
        )
    if (header.message_type, header.trigger_event) not in SUPPORTED_MESSAGES:
        raise reject(
            f"MSH-9.2 (trigger event) is not supported for this message type; supported: {supported}",
            ErrorCode.UNSUPPORTED_EVENT_CODE,
            msh.location(9, 2),
        )
    if header.message_type == "OMI" and header.version not in _OMI_VERSIONS:
        raise reject(
            "OMI^O23 needs HL7 v2.5 or later (MSH-12): the IPC segment does not exist before",
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            msh.location(12),
        )

    segments = _segments(text, header, delimiters)
    body = _Body(segments, header)
    if header.message_type in ("ORM", "OMI"):
        return body.order()
    if header.trigger_event == "A40":
        return body.merge()
    return PatientUpdate(header=header, patient=body.patient())


def _delimiters(encoding: dict[str, str], codec: str) -> _Delimiters:
    """The message's delimiters, after hl7apy's checks (4 distinct characters) and ours."""
    d = _Delimiters(
        field=encoding["FIELD"],
        component=encoding["COMPONENT"],
        repetition=encoding["REPETITION"],
        escape=encoding["ESCAPE"],
        subcomponent=encoding["SUBCOMPONENT"],
        codec=codec,
    )
    chars = [d.field, d.component, d.repetition, d.escape, d.subcomponent]
    if len(set(chars)) != 5 or any(len(c) != 1 or c.isalnum() or c.isspace() or _CONTROL.match(c) for c in chars):
        raise ValueError("invalid delimiters")
    if "TRUNCATION" in encoding:
        raise ValueError("a truncation character belongs to HL7 v2.7 and later")
    return d


def _best_effort_header(msh_text: str) -> MessageHeader | None:
    """A header from an MSH whose encoding characters are broken: first components only, no unescaping."""
    if len(msh_text) < 4:
        return None
    parts = msh_text.split(msh_text[3])
    encoding = parts[1] if len(parts) > 1 else ""
    component = encoding[:1] if encoding[:1] and encoding[:1] != msh_text[3] else "^"

    def field(n: int, comp: int = 1) -> str:
        if n - 1 >= len(parts):
            return ""
        items = parts[n - 1].split(component)
        return items[comp - 1].strip() if comp <= len(items) else ""

    return MessageHeader(
        sending_application=field(3) or field(3, 2),
        sending_facility=field(4) or field(4, 2),
        receiving_application=field(5) or field(5, 2),
        receiving_facility=field(6) or field(6, 2),
        message_type=field(9),
        trigger_event=field(9, 2),
        control_id=field(10),
        processing_id=field(11),
        version=field(12),
        encoding_characters=encoding,
        timestamp=field(7),
    )


def _header(msh: _Segment) -> MessageHeader:
    return MessageHeader(
        sending_application=_hd(msh, 3),
        sending_facility=_hd(msh, 4),
        receiving_application=_hd(msh, 5),
        receiving_facility=_hd(msh, 6),
        message_type=msh.value(9, 1).upper(),
        trigger_event=msh.value(9, 2).upper(),
        control_id=msh.value(10),
        processing_id=msh.value(11).upper(),
        version=msh.value(12),
        encoding_characters=msh.raw(2),
        timestamp=msh.value(7),
    )


def _hd(segment: _Segment, position: int) -> str:
    return segment.value(position, 1) or segment.value(position, 2)


def _segments(text: str, header: MessageHeader, d: _Delimiters) -> list[_Segment]:
    """The message's segments, split with its own delimiters, the ones its version does not define left out.

    hl7apy is not asked to build the whole message tree here: at TOLERANT level it accepts what
    we accept and checks nothing we rely on, and building the tree cost ~16 ms per order (over 60 %
    of the listener's time per message, measured by bench/hl7.py). The MSH is read with hl7apy
    (:func:`hl7apy.parser.get_message_info`); every field we use is checked explicitly."""
    lines = text.split("\r")
    for index, line in enumerate(lines):
        if not _SEGMENT_ID.fullmatch(line[:3]) or (len(line) > 3 and line[3] != d.field):
            raise Hl7MessageError(
                f"segment {index + 1} of the message does not start with a valid segment id",
                ack_code="AE",
                hl7_error_code=ErrorCode.SEGMENT_SEQUENCE_ERROR,
                header=header,
            )
    # A receiver ignores segments it does not expect (HL7 v2 chapter 2, "Message construction
    # rules", receiving side): one the declared version does not define (a TQ1 in a v2.3.1 ORM, a vendor's
    # non-Z segment) is left out instead of failing hl7apy's parse of the whole message.
    kept = [line for line in lines if _known_segment(line[:3], header.version)]
    return _split(kept, d)


@lru_cache(maxsize=512)
def _known_segment(segment_id: str, version: str) -> bool:
    """Whether hl7apy's library for ``version`` defines the segment (Z-segments always count)."""
    if segment_id.startswith("Z"):
        return True
    try:
        load_reference(segment_id, "Segment", version)
    except HL7apyException:
        return False
    return True


def _split(lines: list[str], d: _Delimiters) -> list[_Segment]:
    """Segments with their occurrence numbers (ERL.2 counts per segment id, from 1)."""
    counts: dict[str, int] = {}
    segments: list[_Segment] = []
    for line in lines:
        segment_id = line[:3]
        counts[segment_id] = counts.get(segment_id, 0) + 1
        segments.append(_Segment(segment_id, counts[segment_id], line, d))
    return segments


class _Body:
    """The message's segments with the header, and the extraction rules per message type."""

    def __init__(self, segments: list[_Segment], header: MessageHeader) -> None:
        self.segments = segments
        self.header = header

    def error(self, message: str, code: ErrorCode, location: ErrorLocation | None) -> Hl7MessageError:
        return Hl7MessageError(message, ack_code="AE", hl7_error_code=code, error_location=location, header=self.header)

    def first(self, segment_id: str) -> _Segment | None:
        return next((s for s in self.segments if s.id == segment_id), None)

    # ---- PID (chapter 3, 3.4.2)

    def patient(self) -> PatientIdentity:
        pid = self.first("PID")
        if pid is None:
            raise self.error("the PID segment is missing", ErrorCode.SEGMENT_SEQUENCE_ERROR, ErrorLocation("PID"))
        return self.identity(pid)

    def identity(self, pid: _Segment) -> PatientIdentity:
        identifier = _pick_identifier(pid, 3)
        if identifier is None:
            raise self.error(
                "PID-3 (Patient Identifier List) has no identifier", ErrorCode.REQUIRED_FIELD_MISSING, pid.location(3)
            )
        patient_id, issuer = identifier
        return PatientIdentity(
            patient_id=patient_id,
            issuer=issuer,
            name=_person_name(pid),
            birth_date=_birth_date(pid.value(7)),
            sex=pid.value(8).upper() if pid.value(8).upper() in ("M", "F", "O") else None,
        )

    # ---- ADT^A40 (chapter 3, 3.3.40; MRG 3.4.9)

    def merge(self) -> PatientMerge:
        pids = [s for s in self.segments if s.id == "PID"]
        if len(pids) > 1:
            raise self.error(
                "more than one PID/MRG pair in one ADT^A40 is not supported; send one merge per message",
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                pids[1].location(),
            )
        patient = self.patient()
        mrg = self.first("MRG")
        if mrg is None:
            raise self.error("the MRG segment is missing", ErrorCode.SEGMENT_SEQUENCE_ERROR, ErrorLocation("MRG"))
        prior = _pick_identifier(mrg, 1)
        if prior is None:
            raise self.error(
                "MRG-1 (Prior Patient Identifier List) has no identifier", ErrorCode.REQUIRED_FIELD_MISSING, mrg.location(1)
            )
        return PatientMerge(header=self.header, patient=patient, prior_patient_id=prior[0], prior_issuer=prior[1])

    # ---- ORM^O01 / OMI^O23 (chapter 4)

    def order(self) -> OrderMessage:
        patient = self.patient()
        orders = [self.order_of(group, patient) for group in self.order_groups()]
        for index, other in enumerate(orders[1:], start=2):
            if other.accession_number != orders[0].accession_number:
                raise self.error(
                    "the ORC groups carry different accession numbers; send one requested procedure per message",
                    ErrorCode.APPLICATION_INTERNAL_ERROR,
                    ErrorLocation("ORC", index),
                )
        return orders[0]

    def order_groups(self) -> list[_OrderGroup]:
        groups: list[_OrderGroup] = []
        seen_pid = False
        for segment in self.segments:
            if segment.id == "PID":
                seen_pid = True
            elif segment.id == "ORC":
                if not seen_pid:
                    raise self.error(
                        "an ORC segment comes before the PID segment", ErrorCode.SEGMENT_SEQUENCE_ERROR, segment.location()
                    )
                groups.append(_OrderGroup(segment))
            elif segment.id in ("TQ1", "OBR", "IPC", "ZDS"):
                if not groups:
                    raise self.error(
                        f"an {segment.id} segment comes before any ORC segment",
                        ErrorCode.SEGMENT_SEQUENCE_ERROR,
                        segment.location(),
                    )
                group = groups[-1]
                if segment.id == "IPC":
                    group.ipcs.append(segment)
                elif segment.id == "OBR":
                    if group.obr is not None:
                        raise self.error(
                            "an OBR segment follows another OBR without an ORC",
                            ErrorCode.SEGMENT_SEQUENCE_ERROR,
                            segment.location(),
                        )
                    group.obr = segment
                elif segment.id == "TQ1" and group.tq1 is None:
                    group.tq1 = segment
                elif segment.id == "ZDS" and group.zds is None:
                    group.zds = segment
        if not groups:
            raise self.error("the ORC segment is missing", ErrorCode.SEGMENT_SEQUENCE_ERROR, ErrorLocation("ORC"))
        for index, group in enumerate(groups, start=1):
            if group.obr is None:
                raise self.error(
                    "an ORC segment has no OBR segment", ErrorCode.SEGMENT_SEQUENCE_ERROR, ErrorLocation("OBR", index)
                )
            if self.header.message_type == "OMI" and not group.ipcs:
                raise self.error(
                    "an ORC/OBR group of the OMI^O23 has no IPC segment",
                    ErrorCode.SEGMENT_SEQUENCE_ERROR,
                    ErrorLocation("IPC", index),
                )
        return groups

    def order_of(self, group: _OrderGroup, patient: PatientIdentity) -> OrderMessage:
        orc, obr, tq1 = group.orc, group.obr, group.tq1
        if obr is None:  # order_groups() has checked it
            raise self.error("an ORC segment has no OBR segment", ErrorCode.SEGMENT_SEQUENCE_ERROR, ErrorLocation("OBR"))
        control = orc.value(1).upper()
        if not control:
            raise self.error("ORC-1 (Order Control) is missing", ErrorCode.REQUIRED_FIELD_MISSING, orc.location(1))
        if control not in _ORDER_CONTROL_CODES:
            raise self.error("ORC-1 (Order Control) is not in HL7 table 0119", ErrorCode.TABLE_VALUE_NOT_FOUND, orc.location(1))
        placer = _ei(orc, 2) or _ei(obr, 2)
        filler = _ei(orc, 3) or _ei(obr, 3)
        omi = self.header.message_type == "OMI"
        if omi:
            ipc = group.ipcs[0]
            accession = ipc.value(1, 1)
            if not accession:
                raise self.error("IPC-1 (Accession Identifier) is missing", ErrorCode.REQUIRED_FIELD_MISSING, ipc.location(1, 1))
            for other in group.ipcs[1:]:
                if other.value(1, 1) != accession or other.value(3, 1) != ipc.value(3, 1):
                    raise self.error(
                        "the IPC segments of one order disagree on IPC-1 (Accession Identifier) or IPC-3 (Study Instance UID)",
                        ErrorCode.APPLICATION_INTERNAL_ERROR,
                        other.location(1),
                    )
            accession_issuer = _opt(ipc.value(1, 2) or ipc.value(1, 3))
            requested_procedure_id = _opt(ipc.value(2, 1))
            study_uid = _opt(ipc.value(3, 1))
            step_id = _opt(ipc.value(4, 1))
            modality = _opt(ipc.value(5, 1))
        else:
            accession = obr.value(18)
            if not accession:
                raise self.error(
                    "OBR-18 (Accession Number, IHE Placer Field 1) is missing",
                    ErrorCode.REQUIRED_FIELD_MISSING,
                    obr.location(18),
                )
            accession_issuer = None
            requested_procedure_id = _opt(obr.value(19))
            step_id = _opt(obr.value(20))
            study_uid = _opt(group.zds.value(1, 1)) if group.zds is not None else None
            modality = _opt(obr.value(24))
        priority = (tq1.value(9, 1) if tq1 else "") or orc.value(7, 6) or obr.value(27, 6)
        scheduled = (tq1.value(7, 1) if tq1 else "") or orc.value(7, 4) or obr.value(27, 4) or obr.value(36, 1)
        return OrderMessage(
            header=self.header,
            patient=patient,
            order_control=control,
            placer_order_number=placer[0] if placer else None,
            placer_namespace=placer[1] if placer else None,
            filler_order_number=filler[0] if filler else None,
            accession_number=accession,
            requested_procedure=_coded(obr, 4),
            ordering_provider=_provider_name(orc, 12) or _provider_name(obr, 16),
            priority=_opt(priority.upper()),
            study_instance_uid=study_uid,
            scheduled_datetime=_opt(scheduled),
            filler_namespace=filler[1] if filler else None,
            accession_issuer=accession_issuer,
            requested_procedure_id=requested_procedure_id,
            scheduled_procedure_step_id=step_id,
            modality=modality,
            order_status=_opt(orc.value(5).upper()),
        )


class _OrderGroup:
    """One ORC and what follows it up to the next ORC (ORM ORDER / OMI ORDER group)."""

    def __init__(self, orc: _Segment) -> None:
        self.orc = orc
        self.obr: _Segment | None = None
        self.tq1: _Segment | None = None
        self.zds: _Segment | None = None
        self.ipcs: list[_Segment] = []


def _pick_identifier(segment: _Segment, position: int) -> tuple[str, str | None] | None:
    """(CX.1, CX.4 namespace-or-universal id) of the MR-typed identifier, else of the first one."""
    candidates = []
    for index in range(len(segment.repetitions(position))):
        number = segment.value(position, 1, repetition=index)
        if number:
            issuer = segment.value(position, 4, 1, index) or segment.value(position, 4, 2, index)
            candidates.append((number, _opt(issuer), segment.value(position, 5, repetition=index).upper()))
    if not candidates:
        return None
    chosen = next((c for c in candidates if c[2] == "MR"), candidates[0])
    return chosen[0], chosen[1]


def _ei(segment: _Segment, position: int) -> tuple[str, str | None] | None:
    """(EI.1, EI.2 namespace id or else EI.3 universal id) or None."""
    number = segment.value(position, 1)
    if not number:
        return None
    return number, _opt(segment.value(position, 2) or segment.value(position, 3))


def _coded(segment: _Segment, position: int) -> CodedValue | None:
    for first in (1, 4):
        code, text, system = (segment.value(position, first + k) for k in range(3))
        if code or text:
            return CodedValue(code=_opt(code), system=_opt(system), text=_opt(text))
    return None


def _pn(family: str, given: str, middle: str, prefix: str, suffix: str) -> str | None:
    """A DICOM PN (PS3.5 6.2.1) from its five components; None when all are empty."""
    parts = [re.sub(r"[\^=\\\r\n]", " ", p).strip() for p in (family, given, middle, prefix, suffix)]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts) or None


def _person_name(pid: _Segment) -> str | None:
    """PID-5: the legal (XPN.7 = L) name when several, else the first; XPN order 1,2,3,5,4 -> PN."""
    reps = pid.repetitions(5)
    index = next((i for i in range(len(reps)) if pid.value(5, 7, repetition=i).upper() == "L"), 0)
    return _pn(*(pid.value(5, c, repetition=index) for c in (1, 2, 3, 5, 4)))


def _provider_name(segment: _Segment, position: int) -> str | None:
    """An XCN (family 2, given 3, middle 4, suffix 5, prefix 6) as a DICOM PN."""
    return _pn(*(segment.value(position, c) for c in (2, 3, 4, 6, 5)))


def _birth_date(value: str) -> str | None:
    candidate = value[:8]
    if len(candidate) != 8 or not candidate.isdigit():
        return None
    try:
        date(int(candidate[:4]), int(candidate[4:6]), int(candidate[6:]))
    except ValueError:
        return None
    return candidate


# --------------------------------------------------------------------------- ACK


def build_ack(
    header: MessageHeader | None,
    ack_code: Literal["AA", "AE", "AR"],
    *,
    sending_application: str,
    sending_facility: str,
    control_id: str,
    now: datetime,
    error: Hl7MessageError | None = None,
    text: str | None = None,
) -> str:
    """The original-mode acknowledgment ``ACK^<event>^ACK`` (HL7 v2.5.1 chapter 2: ACK, MSA, ERR).

    * MSH-3/4 ours, MSH-5/6 the sender's MSH-3/4, MSH-7 ``now``, MSH-10 ``control_id``, MSH-11 the
      incoming processing id (P when unknown), MSH-12 the incoming version when we support it,
      else 2.5.1. MSH-9 is ``ACK^<event>^ACK`` (``ACK^<event>`` in v2.3, which has no message
      structure component; ``ACK`` alone when the event is unknown).
    * MSA-1 ``ack_code``, MSA-2 the incoming MSH-10 (empty when unknown), MSA-3 ``text`` (or the
      error's text), at most 80 characters (ST 80; "B" in v2.5, still read by older receivers).
    * With ``error``: ERR - v2.5+: ERR-2 location (ERL), ERR-3 ``<code>^<text>^HL70357``, ERR-4
      severity E, ERR-8 the error text; v2.3/v2.3.1/v2.4: ERR-1 (ELD) ``SEG^seq^field^code&text&HL70357``.

    Segments end with CR; the text is escaped with :func:`escape`.
    """
    if ack_code not in ("AA", "AE", "AR"):
        raise ValueError("ack_code must be AA, AE or AR")
    if error is not None and ack_code == "AA":
        raise ValueError("an AA acknowledgment carries no error")
    version = header.version if header is not None and header.version in SUPPORTED_VERSIONS else OUTPUT_VERSION
    event = header.trigger_event if header is not None else ""
    if not event:
        message_type = "ACK"
    elif version == "2.3":
        message_type = _join_components("ACK", escape(event))
    else:
        message_type = _join_components("ACK", escape(event), "ACK")
    processing = header.processing_id if header is not None and header.processing_id in ("P", "D", "T") else "P"
    msh = _segment(
        "MSH",
        _STANDARD_ENCODING,
        escape(sending_application),
        escape(sending_facility),
        escape(header.sending_application) if header is not None else "",
        escape(header.sending_facility) if header is not None else "",
        _dtm(now, require_zone=False),
        "",
        message_type,
        escape(control_id),
        processing,
        version,
    )
    message_text = text if text is not None else (str(error) if error is not None else None)
    msa = _segment(
        "MSA",
        ack_code,
        escape(header.control_id) if header is not None else "",
        _fit(message_text, 80) if message_text else "",
    )
    segments = [msh, msa]
    if error is not None:
        segments.append(_err_segment(error, version))
    return "\r".join(segments) + "\r"


def _err_segment(error: Hl7MessageError, version: str) -> str:
    code = error.hl7_error_code
    location = error.error_location.components() if error.error_location is not None else []
    if version in ("2.5", "2.5.1"):
        return _segment(
            "ERR",
            "",
            _join_components(*(escape(p) for p in location)),
            _join_components(str(int(code)), escape(code.text), "HL70357"),
            "E",
            "",
            "",
            "",
            _fit(str(error), 250),
        )
    # v2.3 / v2.3.1 / v2.4: ERR-1 Error Code and Location (ELD): segment^sequence^field^code (CE).
    eld = (location + ["", "", ""])[:3] if location else ["", "", ""]
    coded = _SS.join([str(int(code)), escape(code.text), "HL70357"])
    return _segment("ERR", _join_components(*(escape(p) for p in eld), coded))


# --------------------------------------------------------------------------- parse_ack


def parse_ack(raw: bytes | str) -> tuple[str, str | None, str | None]:
    """(MSA-1, MSA-2, error text) of an acknowledgment (HL7 v2.5.1 chapter 2, MSA), for the sender side.

    MSA-1 may be an original-mode code (AA/AE/AR) or an enhanced-mode commit code (CA/CE/CR). The
    text is ERR-8, else MSA-3, else ERR-3.2 / ERR-1 ELD.4.2 (v2.4 and earlier), else None.
    Raises :class:`Hl7MessageError` when the reply is not a readable acknowledgment.
    """
    text, codec, _ = _decode(raw)
    text = _normalise(text)

    def bad(message: str, code: ErrorCode) -> Hl7MessageError:
        return Hl7MessageError(message, ack_code="AR", hl7_error_code=code)

    if not text.startswith("MSH") or len(text) < 8:
        raise bad("the reply does not start with an MSH segment", ErrorCode.SEGMENT_SEQUENCE_ERROR)
    try:
        encoding, _structure, _version = get_message_info(text)
        delimiters = _delimiters(encoding, codec)
    except (HL7apyException, ValueError, IndexError):
        raise bad("the reply's MSH-1/MSH-2 are not valid", ErrorCode.DATA_TYPE_ERROR) from None
    lines = text.split("\r")
    if any(not _SEGMENT_ID.fullmatch(line[:3]) for line in lines):
        raise bad("the reply has a segment without a valid segment id", ErrorCode.SEGMENT_SEQUENCE_ERROR)
    try:
        parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    except UnsupportedVersion:
        pass  # a version hl7apy has no library for: MSA and ERR are read from the text all the same
    except Exception:  # noqa: BLE001 - hl7apy raises many kinds; its texts may quote values
        raise bad("the reply could not be parsed", ErrorCode.DATA_TYPE_ERROR) from None
    segments = _split(lines, delimiters)
    msa = next((s for s in segments if s.id == "MSA"), None)
    if msa is None:
        raise bad("the reply has no MSA segment", ErrorCode.SEGMENT_SEQUENCE_ERROR)
    code = msa.value(1).upper()
    if code not in _ACK_CODES:
        raise bad("MSA-1 (Acknowledgment Code) is not an HL7 table 0008 code", ErrorCode.TABLE_VALUE_NOT_FOUND)
    err = next((s for s in segments if s.id == "ERR"), None)
    candidates = [err.value(8) if err else "", msa.value(3), err.value(3, 2) if err else "", err.value(1, 4, 2) if err else ""]
    return code, _opt(msa.value(2)), next((c for c in candidates if c), None)


# --------------------------------------------------------------------------- ORU^R01

#: OBR-4 when the order gave no procedure: LOINC 18748-4 "Diagnostic imaging study" (the LOINC
#: document-ontology code for an imaging report whose modality and body part are not coded).
DEFAULT_PROCEDURE: Final = CodedValue(code="18748-4", system="LN", text="Diagnostic imaging study")
# OBX-3 codes (the same concepts as the SR, dicom_node/sr.py).
_PNEUMONIA = ("233604007", "Pneumonia", "SCT")
_PRESENT = ("52101004", "Present", "SCT")
_ABSENT = ("272519000", "Absent", "SCT")
_CERTAINTY = ("111012", "Certainty of Finding", "DCM")
_STUDY_UID = ("110180", "Study Instance UID", "DCM")
_PERCENT = ("%", "percent", "UCUM")
# Local codes (coding system "L", HL7 table 0396 "Local general code"): no standard concept fits.
_SUMMARY = ("PNEUMO-AI-SUMMARY", "AI analysis summary", "L")
_SR_REFERENCE = ("PNEUMO-AI-SR", "AI result structured report", "L")


@dataclass(frozen=True, kw_only=True)
class OruInput:
    """Everything an ``ORU^R01`` carries (built by :func:`build_oru`).

    ``created_at`` (aware) is MSH-7, OBR-22 and OBX-19; ``observation_datetime`` (aware, the
    study's acquisition time) is OBR-7 and OBX-14 (OBR-7 falls back to ``created_at``, as it is
    required in a result). ``result_status`` is OBR-25 / OBX-11 (HL7 tables 0123 / 0085): F final,
    C corrected, X no result could be obtained. ``probability`` and ``threshold`` are fractions
    (0..1); the probability is sent as a percentage. ``label`` is PNEUMONIA or NORMAL for F/C and
    None for X. ``reasons`` say why images were not analysed; ``images`` / ``analysed`` count them.
    ``procedure_code`` None means :data:`DEFAULT_PROCEDURE`.
    """

    control_id: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    created_at: datetime
    patient: PatientIdentity
    placer_order_number: str | None
    placer_namespace: str | None
    filler_order_number: str | None
    accession_number: str | None
    procedure_code: str | None
    procedure_system: str | None
    procedure_text: str | None
    ordering_provider: str | None
    study_instance_uid: str | None
    observation_datetime: datetime | None
    result_status: Literal["F", "C", "X"]
    label: Literal["PNEUMONIA", "NORMAL"] | None
    probability: float | None
    threshold: float
    model_name: str
    model_version: str
    intended_use: str
    reasons: tuple[str, ...] = ()
    images: int
    analysed: int
    sr_sop_instance_uids: tuple[str, ...] = ()
    filler_namespace: str | None = None
    processing_id: Literal["P", "D", "T"] = "P"

    def __post_init__(self) -> None:
        if not self.control_id:
            raise ValueError("control_id is required (MSH-10)")
        if self.created_at.tzinfo is None or (self.observation_datetime is not None and self.observation_datetime.tzinfo is None):
            raise ValueError("created_at and observation_datetime must be timezone-aware")
        if not self.patient.patient_id:
            raise ValueError("patient.patient_id is required (PID-3)")
        if not (self.placer_order_number or self.filler_order_number or self.accession_number):
            raise ValueError("one of placer_order_number, filler_order_number, accession_number is required (OBR-2/OBR-3)")
        if self.result_status not in ("F", "C", "X"):
            raise ValueError("result_status must be F, C or X")
        if self.result_status == "X":
            if self.label is not None or self.probability is not None or self.sr_sop_instance_uids:
                raise ValueError("a result that could not be obtained (X) has no label, probability or SR")
        elif self.label not in ("PNEUMONIA", "NORMAL"):
            raise ValueError("a final or corrected result needs label PNEUMONIA or NORMAL")
        for name, value in (("probability", self.probability), ("threshold", self.threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1")
        if not 0 <= self.analysed <= self.images:
            raise ValueError("0 <= analysed <= images is required")


def build_oru(result: OruInput) -> str:
    """An ``ORU^R01^ORU_R01`` v2.5.1 with the AI result (HL7 v2.5.1 7.3.1; OBR 4.5.3; OBX 7.4.2).

    Segments (CR-terminated; text escaped with :func:`escape`)::

        MSH  MSH-9 ORU^R01^ORU_R01, MSH-11 P, MSH-12 2.5.1, MSH-15/16 empty = original
             acknowledgment mode (as IHE profiles use; the receiver answers AA/AE/AR),
             MSH-18 "UNICODE UTF-8" only when the text is not ASCII (encode the message as UTF-8)
        PID  PID-3 id^^^issuer^MR (an OID issuer goes to HD.2 with HD.3 ISO), PID-5 from the PN
             (``^^^^^^U`` when unknown: PID-5 is required), PID-7, PID-8
        ORC  ORC-1 RE, ORC-2 placer, ORC-3 filler, ORC-12 ordering provider
        OBR  OBR-2/3 placer/filler (OBR-3 falls back to the accession number), OBR-4 procedure,
             OBR-7 observation time, OBR-16 ordering provider, OBR-18 Accession Number (the IHE
             reading of Placer Field 1: the IPC segment does not exist in an ORU), OBR-22 result
             time, OBR-24 RAD, OBR-25 status
        OBX  F/C: 1 CE  Pneumonia (SCT 233604007) = Present 52101004 / Absent 272519000, sub-ID 1
                  2 NM  Certainty of Finding (DCM 111012) in % (UCUM), sub-ID 1 (when known)
             X:   1 TX  Pneumonia (SCT 233604007): why it could not be analysed, OBX-11 X (table 0085)
             then TX  summary: model, version, verdict, threshold, counts, reasons, intended use
                  ST  Study Instance UID (DCM 110180) when known
                  RP  one per SR: ``urn:oid:<uid>^<sender>^AP^DICOM`` (tables 0191 / 0291)

    Decisions: the coded finding is OBX-2 ``CE``, not ``CWE``: HL7 v2.5.1 table 0125 has no CWE
    (it arrives in v2.6) and hl7apy's strict v2.5.1 validation follows the table. OBX-7 (reference
    range) and OBX-8 (abnormal flags) stay empty: the score is not a calibrated lab value with a
    normal range and an AI finding should not drive abnormal-result alerting; the threshold is in
    the summary. OBX-11 of the finding (CE/NM, or the TX of an X result) is the message's status;
    the summary, Study Instance UID and SR references are F (C in a correction). Display texts (names, procedure text,
    summary lines) are shortened to hl7apy's v2.5.1 limits (ST 199, TX 65536); identifiers never.
    """
    r = result
    status = r.result_status
    segments = [_oru_msh(r), _oru_pid(r.patient)]
    placer = _join_components(escape(r.placer_order_number), escape(r.placer_namespace or "")) if r.placer_order_number else ""
    filler_number = r.filler_order_number or r.accession_number or ""
    filler_namespace = r.filler_namespace if r.filler_order_number else None
    filler = _join_components(escape(filler_number), escape(filler_namespace or "")) if filler_number else ""
    provider = _xcn(r.ordering_provider)
    segments.append(_segment("ORC", "RE", placer, filler, *[""] * 8, provider))
    procedure = (
        CodedValue(code=r.procedure_code, system=r.procedure_system, text=r.procedure_text)
        if r.procedure_code
        else DEFAULT_PROCEDURE
    )
    observed = r.observation_datetime or r.created_at
    obr = [""] * 26
    obr[1] = "1"
    obr[2] = placer
    obr[3] = filler
    obr[4] = _ce(procedure.code or "", procedure.text or "", procedure.system or "")
    obr[7] = _dtm(observed)
    obr[16] = provider
    obr[18] = escape(r.accession_number or "")
    obr[22] = _dtm(r.created_at)
    obr[24] = "RAD"
    obr[25] = status
    segments.append(_segment("OBR", *obr[1:]))

    # (type, code, sub-id, value, units, OBX-11): the finding carries the result status; the
    # summary and the references are final facts even when the finding could not be obtained.
    observations: list[tuple[str, tuple[str, str, str], str, str, str, str]] = []
    context_status = "F" if status == "X" else status
    if status == "X":
        lines = [f"Not analysed: {reason}" for reason in r.reasons] or ["Not analysed"]
        observations.append(("TX", _PNEUMONIA, "1", _tx(lines), "", status))
    else:
        answer = _PRESENT if r.label == "PNEUMONIA" else _ABSENT
        observations.append(("CE", _PNEUMONIA, "1", _ce(*answer), "", status))
        if r.probability is not None:
            observations.append(("NM", _CERTAINTY, "1", _percent(r.probability), _ce(*_PERCENT), status))
    observations.append(("TX", _SUMMARY, "", _tx(_summary_lines(r)), "", context_status))
    if r.study_instance_uid:
        observations.append(("ST", _STUDY_UID, "", escape(r.study_instance_uid), "", context_status))
    for uid in r.sr_sop_instance_uids:
        pointer = _join_components(escape(f"urn:oid:{uid}"), _fit(r.sending_application, 20), "AP", "DICOM")
        observations.append(("RP", _SR_REFERENCE, "", pointer, "", context_status))
    obx_observed = _dtm(r.observation_datetime) if r.observation_datetime is not None else ""
    for index, (value_type, code, sub_id, value, units, obx_status) in enumerate(observations, start=1):
        obx = [""] * 20
        obx[1] = str(index)
        obx[2] = value_type
        obx[3] = _ce(*code)
        obx[4] = sub_id
        obx[5] = value
        obx[6] = units
        obx[11] = obx_status
        obx[14] = obx_observed
        obx[19] = _dtm(r.created_at)
        segments.append(_segment("OBX", *obx[1:]))
    message = "\r".join(segments) + "\r"
    if not message.isascii():
        segments[0] = _oru_msh(r, charset="UNICODE UTF-8")
        message = "\r".join(segments) + "\r"
    return message


def _oru_msh(r: OruInput, charset: str = "") -> str:
    fields = [
        _STANDARD_ENCODING,
        _fit(r.sending_application, 20),
        _fit(r.sending_facility, 20),
        _fit(r.receiving_application, 20),
        _fit(r.receiving_facility, 20),
        _dtm(r.created_at),
        "",
        "ORU^R01^ORU_R01",
        escape(r.control_id),
        r.processing_id,
        OUTPUT_VERSION,
    ]
    if charset:
        fields += ["", "", "", "", "", charset]
    return _segment("MSH", *fields)


def _oru_pid(patient: PatientIdentity) -> str:
    issuer = patient.issuer or ""
    if _OID.fullmatch(issuer):
        authority = _SS.join(["", escape(issuer), "ISO"])
    else:
        authority = escape(issuer)
    identifier = _join_components(escape(patient.patient_id), "", "", authority, "MR")
    name = _xpn(patient.name) or "^^^^^^U"
    birth_date = _birth_date(patient.birth_date or "") or ""
    sex = patient.sex if patient.sex in ("M", "F", "O") else ""
    return _segment("PID", "1", "", identifier, "", name, "", birth_date, sex or "")


def _pn_parts(pn: str | None) -> list[str]:
    """A DICOM PN's first component group as [family, given, middle, prefix, suffix]."""
    if not pn:
        return []
    return (pn.split("=", 1)[0].split("^") + [""] * 5)[:5]


def _xpn(pn: str | None) -> str:
    """PN family^given^middle^prefix^suffix -> XPN 1 family, 2 given, 3 middle, 4 suffix, 5 prefix."""
    parts = _pn_parts(pn)
    if not any(p.strip() for p in parts):
        return ""
    family, given, middle, prefix, suffix = (_fit(p.strip(), 199) for p in parts)
    return _join_components(family, given, middle, suffix, prefix)


def _xcn(pn: str | None) -> str:
    """PN -> XCN 2 family, 3 given, 4 middle, 5 suffix, 6 prefix (XCN.1, the id, unknown)."""
    parts = _pn_parts(pn)
    if not any(p.strip() for p in parts):
        return ""
    family, given, middle, prefix, suffix = (_fit(p.strip(), 199) for p in parts)
    return _join_components("", family, given, middle, suffix, prefix)


def _ce(code: str, text: str, system: str) -> str:
    return _join_components(escape(code), _fit(text, 199), escape(system))


def _tx(lines: Iterable[str]) -> str:
    """TX lines as repetitions of OBX-5 (OBX-5 may repeat for a multi-part single answer of type TX, CE, FT)."""
    return _RS.join(_fit(line, 65536) for line in lines)


def _percent(fraction: float) -> str:
    """A fraction as a percentage, at most 2 decimals, no trailing zeros (as the FHIR side prints it)."""
    return f"{round(fraction * 100, 2):g}"


def _summary_lines(r: OruInput) -> list[str]:
    subject = f"AI pneumonia classifier {r.model_name} {r.model_version}"
    if r.label == "PNEUMONIA":
        verdict = "pneumonia PRESENT"
    elif r.label == "NORMAL":
        verdict = "pneumonia ABSENT"
    else:
        verdict = "no result"
    numbers = []
    if r.probability is not None:
        numbers.append(f"deciding image probability {_percent(r.probability)} %")
    numbers.append(f"threshold {_percent(r.threshold)} %")
    lines = [f"{subject}: {verdict} ({', '.join(numbers)})"]
    if r.result_status == "C":
        lines.append("Corrected result: replaces the result sent before for this order")
    images = "image" if r.images == 1 else "images"
    lines.append(f"{r.analysed} of {r.images} {images} analysed")
    lines.extend(f"Not analysed: {reason}" for reason in r.reasons)
    lines.append(f"Intended use: {r.intended_use}")
    return lines


# --------------------------------------------------------------------------- writing helpers


def _segment(segment_id: str, *fields: str) -> str:
    """``ID|f1|f2...`` with trailing empty fields left out (MSH: first argument is MSH-2)."""
    items = list(fields)
    while items and not items[-1]:
        items.pop()
    return _FS.join([segment_id, *items])


def _join_components(*parts: str) -> str:
    items = list(parts)
    while items and not items[-1]:
        items.pop()
    return _CS.join(items)


def _fit(text: str | None, limit: int) -> str:
    """``escape(text)`` cut to at most ``limit`` characters without splitting an escape sequence."""
    if not text:
        return ""
    out: list[str] = []
    length = 0
    for char in text:
        piece = escape(char)
        if length + len(piece) > limit:
            break
        out.append(piece)
        length += len(piece)
    return "".join(out)


def _dtm(moment: datetime, *, require_zone: bool = True) -> str:
    """HL7 DTM ``YYYYMMDDHHMMSS+ZZZZ`` (HL7 v2.5.1 data type DTM), seconds precision."""
    if moment.tzinfo is None:
        if require_zone:
            raise ValueError("a timezone-aware datetime is required")
        return moment.strftime("%Y%m%d%H%M%S")
    return moment.strftime("%Y%m%d%H%M%S%z")
