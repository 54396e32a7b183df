"""Cheap structural check of a whole received Part 10 file, on the hot C-STORE path.

A C-STORE Success (PS3.4 B.2.3) promises that we hold what the sender declared. pydicom reads
the header leniently and only up to Pixel Data, so a length that overruns its container, an
unknown VR, a sequence or item never closed, broken encapsulated Pixel Data or bytes trailing
the last element would otherwise be stored and acknowledged. This module walks the **whole**
file once — File Meta Information (PS3.10 7.1), then the data set in its transfer syntax — and
refuses anything that cannot be parsed as encoded (docs/dicom-conformance.md, "What we refuse").

What is checked (PS3.5 §7):

- preamble and ``DICM`` prefix, then File Meta group 0002 in Explicit VR Little Endian; when its
  group length (0002,0000) is present, the meta elements end exactly where it says;
- data element encoding (§7.1): every explicit VR is one of the VRs of PS3.5 6.2 with the header
  form it prescribes (§7.1.2: 2-byte length, or 2 reserved bytes and a 4-byte length); every
  defined length fits within its container (file, sequence, item); undefined length only on SQ,
  on UN (its value is then an Implicit VR Little Endian sequence, PS3.5 6.2.2) and on
  encapsulated Pixel Data;
- nesting (§7.5): items (FFFE,E000) inside sequences; an undefined-length sequence or item closes
  with its delimiter (FFFE,E0DD) / (FFFE,E00D) before the end of its container; a defined-length
  sequence or item holds exactly complete items / elements; no delimiter where none can be;
- encapsulated Pixel Data (PS3.5 A.4): a Basic Offset Table item whose length is a multiple of 4,
  fragment items, a Sequence Delimitation Item, and at least one fragment per frame;
- native Pixel Data holds at least Rows x Columns x Samples per Pixel x Bits Allocated x Number of
  Frames (PS3.5 8.1.1; longer is accepted as trailing padding);
- the walk ends exactly at the end of the file: trailing bytes that are not complete elements are
  refused.

Tags out of ascending order or repeated (PS3.5 7.1) are *not* refused: they parse, and real
senders produce them. Delimiter items with a non-zero length field are tolerated as pydicom does.

Only element and item headers are read: values are skipped by their length, Pixel Data is never
loaded. The file is memory-mapped, so a 7 MB radiograph costs the same handful of page touches as
a 40 kB CT slice. Deflated data sets (PS3.5 A.5) are one deflate stream in which element offsets
mean nothing: they are inflated first, up to :data:`MAX_INFLATED_BYTES`.

Outcomes, mapped to PS3.4 B.2.3 statuses by the caller's exception types:

- Image Pixel module attributes missing while pixel data is present, or an Image Pixel module
  (Rows, Bits Allocated) without pixel data: :class:`SopClassMismatchError` (0xA900);
- anything that cannot be parsed or decoded as declared: :class:`CannotUnderstandError` (0xC210).
  Messages name the element (tag, byte offset) and what is wrong — never a value.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Final

from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from dicom_node.errors import CannotUnderstandError, SopClassMismatchError

#: Top-level pixel data elements (PS3.3 C.7.6.3, C.7.6.24): Pixel Data, Float / Double Float Pixel Data.
PIXEL_DATA_TAGS: Final = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
#: A deflated data set inflating past this is refused rather than held in memory.
MAX_INFLATED_BYTES: Final = 1 << 30
#: Deepest sequence nesting walked; real data sets stay in single digits.
MAX_DEPTH: Final = 64

_PIXEL_DATA: Final = 0x7FE00010
_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITER: Final = 0xFFFEE00D
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_PREAMBLE: Final = 128
_META_START: Final = _PREAMBLE + 4
_TRANSFER_SYNTAX_TAG: Final = 0x00020010
#: Explicit VRs with 2 reserved bytes and a 32-bit length (PS3.5 7.1.2, Table 7.1-1).
_LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
#: Explicit VRs with a 16-bit length (PS3.5 7.1.2, Table 7.1-2).
_SHORT_VRS: Final = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS",
     b"ST", b"TM", b"UI", b"UL", b"US"}
)
_ENCAPSULATED_VRS: Final = frozenset({b"OB", b"OW", b"UN"})
_IMPLICIT_VR_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_VR_BE: Final = "1.2.840.10008.1.2.2"


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class _Encoding:
    """Byte order and VR form of one data set (or of the Implicit VR LE inside a UN, PS3.5 6.2.2)."""

    implicit: bool
    tag: struct.Struct  # group, element
    tag_length: struct.Struct  # group, element, 32-bit length (implicit headers and items)
    short_length: struct.Struct  # 16-bit length
    long_length: struct.Struct  # 32-bit length


def _encoding(implicit: bool, little: bool) -> _Encoding:
    e = "<" if little else ">"
    return _Encoding(implicit, struct.Struct(f"{e}HH"), struct.Struct(f"{e}HHL"), struct.Struct(f"{e}H"), struct.Struct(f"{e}L"))


_EXPLICIT_LE: Final = _encoding(implicit=False, little=True)
_IMPLICIT_LE: Final = _encoding(implicit=True, little=True)
_EXPLICIT_BE: Final = _encoding(implicit=False, little=False)


@dataclass(frozen=True)
class _Syntax:
    encoding: _Encoding
    deflated: bool
    #: True / False for a known transfer syntax; None for one we do not know (Pixel Data is then
    #: walked as encapsulated when it has undefined length, as native otherwise).
    encapsulated: bool | None


def _syntax(uid: str) -> _Syntax:
    """How the data set after the File Meta is encoded (PS3.5 10: every transfer syntax but
    Implicit VR LE and Explicit VR BE is Explicit VR Little Endian)."""
    if uid == _IMPLICIT_VR_LE:
        return _Syntax(_IMPLICIT_LE, deflated=False, encapsulated=False)
    if uid == _EXPLICIT_VR_BE:
        return _Syntax(_EXPLICIT_BE, deflated=False, encapsulated=False)
    known = UID(uid)
    if not known.is_transfer_syntax:
        return _Syntax(_EXPLICIT_LE, deflated=False, encapsulated=None)
    return _Syntax(_EXPLICIT_LE, deflated=known.is_deflated, encapsulated=known.is_encapsulated)


def check_dataset(fp: BinaryIO, header: Dataset) -> None:
    """Refuse a received Part 10 file that cannot be parsed as encoded; return if it can.

    *fp* is the received file, open for binary reading (its position does not matter; it is
    memory-mapped); *header* is the data set pydicom read from it (``stop_before_pixels``), used
    for the Image Pixel module. Raises :class:`CannotUnderstandError` or
    :class:`SopClassMismatchError`; an ``OSError`` is our own I/O failing.
    """
    size = os.fstat(fp.fileno()).st_size
    if size < _META_START:
        raise CannotUnderstandError("not a DICOM Part 10 file: shorter than the preamble and 'DICM' prefix (PS3.10 7.1)")
    with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _check(buf, size, header)


def _check(buf: mmap.mmap, size: int, header: Dataset) -> None:
    if buf[_PREAMBLE:_META_START] != b"DICM":
        raise CannotUnderstandError("not a DICOM Part 10 file: no 'DICM' prefix after the preamble (PS3.10 7.1)")
    meta_end, transfer_syntax = _walk_meta(buf, size)
    syntax = _syntax(transfer_syntax)
    if syntax.deflated:
        data = _inflate(buf[meta_end:size])
        walker = _Walker(data, syntax, header)
        walker.walk(0, len(data))
    else:
        walker = _Walker(buf, syntax, header)
        walker.walk(meta_end, size)
    if not walker.pixel_data_seen and _declares_image_pixels(header):
        raise SopClassMismatchError("Image Pixel module present but no Pixel Data (truncated data set?)")


def _walk_meta(buf: mmap.mmap, size: int) -> tuple[int, str]:
    """Walk File Meta group 0002 (Explicit VR Little Endian, PS3.10 7.1); return where the data
    set starts and its Transfer Syntax UID."""
    pos = _META_START
    meta_end: int | None = None
    transfer_syntax: str | None = None
    while pos < (limit := size if meta_end is None else meta_end):
        if limit - pos < 8:
            raise CannotUnderstandError(f"File Meta Information ends inside an element header at offset {pos}")
        group, element = _EXPLICIT_LE.tag.unpack_from(buf, pos)
        if group != 0x0002:
            if meta_end is not None:
                raise CannotUnderstandError(
                    f"element {_tag(group << 16 | element)} inside the File Meta Information group length (PS3.10 7.1)"
                )
            break
        vr = buf[pos + 4 : pos + 6]
        if vr in _SHORT_VRS:
            (length,) = _EXPLICIT_LE.short_length.unpack_from(buf, pos + 6)
            value = pos + 8
        elif vr in _LONG_VRS and vr != b"SQ":
            if limit - pos < 12:
                raise CannotUnderstandError(f"File Meta Information ends inside an element header at offset {pos}")
            (length,) = _EXPLICIT_LE.long_length.unpack_from(buf, pos + 8)
            value = pos + 12
        else:
            raise CannotUnderstandError(
                f"File Meta element {_tag(group << 16 | element)} at offset {pos} is not Explicit VR Little Endian (PS3.10 7.1)"
            )
        if length > limit - value:
            raise CannotUnderstandError(
                f"File Meta element {_tag(group << 16 | element)} at offset {pos} runs past the end of the File Meta Information"
            )
        if element == 0x0000 and pos == _META_START:
            if vr != b"UL" or length != 4:
                raise CannotUnderstandError("File Meta Information Group Length is not a 4-byte UL (PS3.10 7.1)")
            (group_length,) = _EXPLICIT_LE.long_length.unpack_from(buf, value)
            meta_end = value + 4 + group_length
            if meta_end > size:
                raise CannotUnderstandError("File Meta Information Group Length runs past the end of the file")
        elif element == 0x0010:
            transfer_syntax = bytes(buf[value : value + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value + length
    if transfer_syntax is None:
        raise CannotUnderstandError("File Meta Information has no Transfer Syntax UID (0002,0010)")
    return pos, transfer_syntax


def _inflate(deflated: bytes) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5: raw deflate, RFC 1951),
    refusing a truncated stream, bytes after it, or one inflating past :data:`MAX_INFLATED_BYTES`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(deflated, MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise CannotUnderstandError("deflated data set is not a valid deflate stream (PS3.5 A.5)") from exc
    if inflater.unconsumed_tail:
        raise CannotUnderstandError(f"deflated data set inflates past {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        raise CannotUnderstandError("deflated data set ends before its deflate stream does (truncated; PS3.5 A.5)")
    rest = inflater.unused_data
    # Tolerated after the stream: zero padding to an even length, and the 8-byte gzip trailer
    # (CRC-32, size; RFC 1952 2.3) some writers leave — pydicom's own image_dfl.dcm has one.
    gzip_trailer = struct.pack("<LL", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    if rest.strip(b"\x00") and rest != gzip_trailer:
        raise CannotUnderstandError("bytes after the end of the deflated data set's deflate stream (PS3.5 A.5)")
    return data


class _Walker:
    """One walk over a data set's element and item headers (PS3.5 7.1, 7.5, A.4)."""

    def __init__(self, buf: mmap.mmap | bytes, syntax: _Syntax, header: Dataset) -> None:
        self._buf = buf
        self._syntax = syntax
        self._header = header
        self.pixel_data_seen = False

    def walk(self, start: int, end: int) -> None:
        """Walk the top-level data set from *start*; it must end exactly at *end*."""
        self._dataset(start, end, self._syntax.encoding, closes_with_delimiter=False, depth=0)

    # -- data sets and items -------------------------------------------------------------------

    def _dataset(self, pos: int, end: int, enc: _Encoding, *, closes_with_delimiter: bool, depth: int) -> int:
        """Walk the elements of a data set or item from *pos* up to *end* (its container's end).

        An undefined-length item (*closes_with_delimiter*) returns just after its Item
        Delimitation Item; anything else must fill its container exactly (PS3.5 7.5.1)."""
        buf = self._buf
        while pos < end:
            if end - pos < 8:
                raise CannotUnderstandError(
                    f"{end - pos} byte(s) at offset {pos} are not a complete element header "
                    f"({'trailing the data set' if depth == 0 else 'at the end of an item'}; PS3.5 7.1)"
                )
            group, element, length = enc.tag_length.unpack_from(buf, pos)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_DELIMITER and closes_with_delimiter:
                    return pos + 8
                raise CannotUnderstandError(f"unexpected {_tag(tag)} at offset {pos} among data elements (PS3.5 7.5)")
            header_at = pos
            vr: bytes | None = None
            if enc.implicit:
                pos += 8
            else:
                vr = buf[pos + 4 : pos + 6]
                if vr in _SHORT_VRS:
                    (length,) = enc.short_length.unpack_from(buf, pos + 6)
                    pos += 8
                elif vr in _LONG_VRS:
                    if end - pos < 12:
                        raise CannotUnderstandError(
                            f"element {_tag(tag)} at offset {pos}: header cut by the end of its container"
                        )
                    (length,) = enc.long_length.unpack_from(buf, pos + 8)
                    pos += 12
                else:
                    raise CannotUnderstandError(f"element {_tag(tag)} at offset {pos} has no valid VR (PS3.5 6.2, 7.1.2)")
            if length == _UNDEFINED:
                pos = self._undefined(tag, vr, header_at, pos, end, enc, depth)
                continue
            if length > end - pos:
                raise CannotUnderstandError(
                    f"element {_tag(tag)} at offset {header_at} declares {length} bytes; "
                    f"only {end - pos} remain in its {'data set' if depth == 0 else 'item'} (PS3.5 7.1)"
                )
            if vr == b"SQ" or (vr is None and _dictionary_vr(tag) == "SQ"):
                self._sequence(pos, pos + length, enc, defined=True, depth=depth + 1)
            elif depth == 0 and tag in PIXEL_DATA_TAGS:
                self._native_pixel_data(tag, length, header_at)
            pos += length
        if closes_with_delimiter:
            raise CannotUnderstandError(
                f"undefined-length item not closed by an Item Delimitation Item before offset {end} (PS3.5 7.5.2)"
            )
        return pos

    def _undefined(self, tag: int, vr: bytes | None, header_at: int, pos: int, end: int, enc: _Encoding, depth: int) -> int:
        """Walk an undefined-length value: encapsulated Pixel Data, a sequence, or UN holding an
        Implicit VR LE sequence (PS3.5 6.2.2, 7.5, A.4); anything else is refused."""
        if tag == _PIXEL_DATA and (vr is None or vr in _ENCAPSULATED_VRS):
            # Implicit VR: refused at top level (an implicit syntax is native); nested, it is the
            # content of a UN that held encapsulated pixel data (PS3.5 6.2.2).
            return self._encapsulated_pixel_data(header_at, pos, end, enc, top=depth == 0)
        if tag in PIXEL_DATA_TAGS:
            raise CannotUnderstandError(
                f"pixel data {_tag(tag)} at offset {header_at} has undefined length but is not encapsulated OB/OW (PS3.5 A.4)"
            )
        if vr == b"SQ" or vr is None:
            return self._sequence(pos, end, enc, defined=False, depth=depth + 1)
        if vr == b"UN":
            return self._sequence(pos, end, _IMPLICIT_LE, defined=False, depth=depth + 1)
        raise CannotUnderstandError(
            f"element {_tag(tag)} at offset {header_at}: undefined length is not allowed for VR {vr.decode('ascii', 'replace')} "
            "(PS3.5 7.1.2)"
        )

    def _sequence(self, pos: int, end: int, enc: _Encoding, *, defined: bool, depth: int) -> int:
        """Walk a sequence's items (PS3.5 7.5). A defined-length one ends exactly at *end*; an
        undefined-length one at its Sequence Delimitation Item, which must come before *end*."""
        if depth > MAX_DEPTH:
            raise CannotUnderstandError(f"sequences nested deeper than {MAX_DEPTH} levels at offset {pos}")
        buf = self._buf
        start = pos
        while True:
            if defined and pos == end:
                return pos
            if end - pos < 8:
                if defined:
                    raise CannotUnderstandError(f"sequence at offset {start}: its length does not hold whole items (PS3.5 7.5.1)")
                raise CannotUnderstandError(
                    f"undefined-length sequence at offset {start} not closed by a Sequence Delimitation Item (PS3.5 7.5.2)"
                )
            group, element, length = enc.tag_length.unpack_from(buf, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_DELIMITER and not defined:
                return pos + 8
            if tag != _ITEM:
                raise CannotUnderstandError(f"{_tag(tag)} at offset {pos} where a sequence item was expected (PS3.5 7.5)")
            pos += 8
            if length == _UNDEFINED:
                pos = self._dataset(pos, end, enc, closes_with_delimiter=True, depth=depth)
            elif length > end - pos:
                raise CannotUnderstandError(
                    f"item at offset {pos - 8} declares {length} bytes; only {end - pos} remain in its sequence (PS3.5 7.5)"
                )
            else:
                pos = self._dataset(pos, pos + length, enc, closes_with_delimiter=False, depth=depth)

    # -- pixel data ----------------------------------------------------------------------------

    def _encapsulated_pixel_data(self, header_at: int, pos: int, end: int, enc: _Encoding, *, top: bool) -> int:
        """Walk encapsulated Pixel Data items (PS3.5 A.4): Basic Offset Table, fragments,
        Sequence Delimitation Item; at top level, at least one fragment per frame."""
        if top:
            self.pixel_data_seen = True
            if self._syntax.encapsulated is False:
                raise CannotUnderstandError(
                    "native Pixel Data with undefined length (PS3.5 A.4 is for encapsulated transfer syntaxes)"
                )
        buf = self._buf
        fragments = -1  # the first item is the Basic Offset Table
        while True:
            if end - pos < 8:
                raise CannotUnderstandError(
                    f"encapsulated Pixel Data at offset {header_at} ends before its Sequence Delimitation Item (PS3.5 A.4)"
                )
            group, element, length = enc.tag_length.unpack_from(buf, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_DELIMITER:
                break
            if tag != _ITEM:
                raise CannotUnderstandError(f"{_tag(tag)} at offset {pos - 8} among encapsulated Pixel Data items (PS3.5 A.4)")
            if length == _UNDEFINED or length > end - pos:
                raise CannotUnderstandError(
                    f"encapsulated Pixel Data item at offset {pos - 8} runs past the end of the data set (PS3.5 A.4)"
                )
            if fragments < 0 and length % 4:
                raise CannotUnderstandError("Basic Offset Table length is not a multiple of 4 (PS3.5 A.4)")
            fragments += 1
            pos += length
        if top:
            frames = _frames(self._header)
            if max(fragments, 0) < max(frames, 1):
                raise CannotUnderstandError(
                    f"encapsulated Pixel Data has {max(fragments, 0)} fragment(s) for {frames} frame(s) (PS3.5 A.4)"
                )
        return pos

    def _native_pixel_data(self, tag: int, length: int, header_at: int) -> None:
        """Top-level native pixel data (PS3.5 8.1.1) holds what the Image Pixel module declares."""
        self.pixel_data_seen = True
        if tag == _PIXEL_DATA and self._syntax.encapsulated:
            raise CannotUnderstandError(
                f"Pixel Data at offset {header_at} has a defined length in an encapsulated transfer syntax (PS3.5 A.4)"
            )
        expected = _expected_length(self._header)
        if length < expected:
            raise CannotUnderstandError(
                f"Pixel Data holds {length} bytes; Rows x Columns x Samples x Bits Allocated x Frames needs {expected}"
            )


def _dictionary_vr(tag: int) -> str | None:
    """The VR the data dictionary gives *tag* (Implicit VR, PS3.5 7.1.3), or None if unknown."""
    return dictionary_VR(tag) if dictionary_has_tag(tag) else None


def _declares_image_pixels(header: Dataset) -> bool:
    """The Image Pixel module (PS3.3 C.7.6.3) is there: Rows and Bits Allocated. Rows alone is
    not enough — MR Spectroscopy has Rows and Columns and no Pixel Data."""
    return "Rows" in header and "BitsAllocated" in header


def _frames(header: Dataset) -> int:
    try:
        return int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise CannotUnderstandError("Number of Frames is not an integer") from exc


def _expected_length(header: Dataset) -> int:
    """Bytes native pixel data needs (PS3.5 8.1.1, 8.2: bit-packed for Bits Allocated 1,
    YBR_FULL_422 subsampled), computed by pydicom from the Image Pixel module."""
    missing = [k for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated") if header.get(k) in (None, "")]
    if missing:
        raise SopClassMismatchError(f"Pixel Data present but Image Pixel module lacks {', '.join(missing)}")
    if "PhotometricInterpretation" not in header:
        raise SopClassMismatchError("Pixel Data present but Image Pixel module lacks PhotometricInterpretation")
    _frames(header)
    try:
        return int(get_expected_length(header, unit="bytes"))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CannotUnderstandError(f"Image Pixel module cannot be used: {exc.__class__.__name__}") from exc
