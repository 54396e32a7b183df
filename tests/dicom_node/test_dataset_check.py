"""Table tests of :func:`dicom_node.dataset_check.check_dataset`, the structural walk of a whole
received Part 10 file (PS3.5 §7, 7.5, A.4).

Refused: one row per kind of malformation the fuzz test (``test_fuzz.py`` / ``pdu_fuzz.py``)
produces, applied at a fixed place of a real file. Accepted: a real file in every transfer syntax
pydicom-data has, tags out of order or repeated (parseable; reported by the fuzz test, not
refused), and every sample file pydicom reads except the deliberately broken ones listed.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.dataset_check import check_dataset
from dicom_node.errors import CannotUnderstandError, StoreError
from tests.conftest import sample

CANNOT_UNDERSTAND = 0xC210
UNDEFINED = 0xFFFFFFFF
PIXEL_HEADER = b"\xe0\x7f\x10\x00O"  # explicit VR OB/OW: pixel values may hold the tag bytes

#: One valid file per transfer syntax in pydicom-data / pydicom's test files.
VALID_BY_SYNTAX = {
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",
    "1.2.840.10008.1.2.1": "CT_small.dcm",
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",
    "1.2.840.10008.1.2.4.50": "SC_rgb_jpeg_dcmtk.dcm",
    "1.2.840.10008.1.2.4.51": "JPEG-lossy.dcm",
    "1.2.840.10008.1.2.4.70": "JPEG-LL.dcm",
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_16.dcm",
    "1.2.840.10008.1.2.4.90": "emri_small_jpeg_2k_lossless.dcm",
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",
}

#: Sample files pydicom reads (leniently) that are deliberately broken, and why they are refused.
KNOWN_BROKEN = {
    "emri_small_jpeg_2k_lossless_too_short.dcm": "encapsulated Pixel Data cut before its delimiter",
    "MR_truncated.dcm": "Pixel Data length past the end of the file",
    "rtplan_truncated.dcm": "an element length past the end of the file",
    "SC_rgb_jpeg.dcm": "data set in Implicit VR under an Explicit VR transfer syntax",
    "badVR.dcm": "Number of Frames is not an integer",
    "DICOMDIR-nooffset": "an item longer than what its sequence has left",
    "meta_missing_tsyntax.dcm": "no Transfer Syntax UID in the File Meta",
    "nested_priv_SQ.dcm": "Pixel Data without an Image Pixel module (0xA900)",
}


# -- helpers ------------------------------------------------------------------------------------


def _check(path: Path, header_from: Path | None = None) -> None:
    """Run the check on *path* with the header pydicom reads from *header_from* (the unbroken
    original: ingest refuses a header pydicom cannot read before the walk runs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = pydicom.dcmread(header_from or path, stop_before_pixels=True)
    with path.open("rb") as fp:
        check_dataset(fp, header)


def _split(path: Path) -> tuple[bytes, bytes]:
    """(preamble + 'DICM' + File Meta, data set) of an Explicit VR LE Part 10 file."""
    raw = path.read_bytes()
    start = 144 + struct.unpack_from("<L", raw, 140)[0]
    return raw[:start], raw[start:]


def _explicit(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + b"\0\0" + struct.pack("<L", size) + value
    return head + struct.pack("<H", size) + value


def _item(body: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body) if length is None else length) + body


ITEM_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQUENCE_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
REF = _explicit(0x00081150, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0")
#: An undefined-length item holding (0008,1150) in Implicit VR LE: the content of an undefined-length UN.
IMPLICIT_ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + b"\x08\x00\x50\x11\x04\x00\x00\x001.2\0"
NESTED = _explicit(0x00081140, b"SQ", _item(REF, UNDEFINED) + ITEM_DELIMITER + SEQUENCE_DELIMITER, UNDEFINED)


def _at(data: bytes, tag: int, vr: bytes) -> int:
    """Offset of the (unique) explicit VR LE header of *tag* with *vr* in *data*."""
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    assert data.count(needle) == 1, f"{tag:08X} {vr!r}"
    return data.index(needle)


def _before_pixels(data: bytes, payload: bytes) -> bytes:
    at = data.index(PIXEL_HEADER)
    return data[:at] + payload + data[at:]


def _set_u16(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + struct.pack("<H", value) + data[at + 2 :]


def _set_u32(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + struct.pack("<L", value) + data[at + 4 :]


def _ct_pixel_length_at(data: bytes) -> int:
    return data.index(PIXEL_HEADER) + 8


# Each mutation of CT_small's data set (Explicit VR LE), named after the fuzz mutation kind.
Mutate = Callable[[bytes], bytes]
CT_MUTATIONS: dict[str, Mutate] = {
    # truncate: in an element header, in a value before Pixel Data, in Pixel Data, at its header
    "truncate/in-header": lambda d: d[: _at(d, 0x00200032, b"DS") + 5],
    "truncate/in-value-0020,0032": lambda d: d[: _at(d, 0x00200032, b"DS") + 12],
    "truncate/in-pixel-data": lambda d: d[:-5000],
    "truncate/at-pixel-value": lambda d: d[: _ct_pixel_length_at(d) + 4],
    "truncate/empty-data-set": lambda d: d[:0] + b"\x08\x00",
    # element-length: a short-VR length +2 / 0xFFFF, a long-VR length undefined on OB
    "element-length/+2": lambda d: _set_u16(d, _at(d, 0x00080060, b"CS") + 6, 4),
    "element-length/0xFFFF": lambda d: _set_u16(d, _at(d, 0x00200037, b"DS") + 6, 0xFFFF),
    "element-length/undefined-on-LT": lambda d: _set_u16(d, _at(d, 0x00204000, b"LT") + 6, 0x8000),
    # open-sequence: undefined-length SQ (and item) never closed, before and after Pixel Data
    "open-sequence/before-pixels": lambda d: _before_pixels(
        d, _explicit(0x00400275, b"SQ", _item(REF, UNDEFINED), UNDEFINED)
    ),
    "open-sequence/defined-items": lambda d: _before_pixels(d, _explicit(0x00400275, b"SQ", _item(REF) * 2, UNDEFINED)),
    "open-sequence/after-pixels": lambda d: d + _explicit(0xFFFAFFFA, b"SQ", _item(REF), UNDEFINED),
    "open-item/in-closed-sequence": lambda d: _before_pixels(
        d, _explicit(0x00400275, b"SQ", _item(REF, UNDEFINED) + SEQUENCE_DELIMITER, UNDEFINED)
    ),
    # pixel-length: eats into the end of the file, or huge
    "pixel-length/+2": lambda d: _set_u32(d, _ct_pixel_length_at(d), struct.unpack_from("<L", d, _ct_pixel_length_at(d))[0] + 2),
    "pixel-length/0xFFFFFFF0": lambda d: _set_u32(d, _ct_pixel_length_at(d), 0xFFFFFFF0),
    "pixel-length/undefined-native": lambda d: _set_u32(d, _ct_pixel_length_at(d), UNDEFINED),
    # header-flips / vr-corrupt: a VR no longer known, or one with the other header form
    "header-flips/vr-byte": lambda d: d[: _at(d, 0x00080060, b"CS") + 4] + b"CR" + d[_at(d, 0x00080060, b"CS") + 6 :],
    "vr-corrupt/SS-to-UN": lambda d: d[: _at(d, 0x00211016, b"SS") + 4] + b"UN" + d[_at(d, 0x00211016, b"SS") + 6 :],
    "vr-corrupt/XX": lambda d: d[: _at(d, 0x00200013, b"IS") + 4] + b"XX" + d[_at(d, 0x00200013, b"IS") + 6 :],
    "vr-corrupt/NUL": lambda d: d[: _at(d, 0x00200013, b"IS") + 4] + b"\0\0" + d[_at(d, 0x00200013, b"IS") + 6 :],
    # garbage-tail: bytes after Pixel Data that are not complete elements
    "garbage-tail/1": lambda d: d + b"\x5a",
    "garbage-tail/7": lambda d: d + b"\x01\x02\x03\x04\x05\x06\x07",
    "garbage-tail/8": lambda d: d + b"\x11\x22\x33\x44\x9cX\x00\x00",
    "garbage-tail/100": lambda d: d + bytes(range(7, 107)),
    # structure: delimiters where none may be, items that do not fit
    "stray-item-delimiter": lambda d: _before_pixels(d, ITEM_DELIMITER),
    "stray-sequence-delimiter": lambda d: d + SEQUENCE_DELIMITER,
    "delimiter-in-defined-sequence": lambda d: _before_pixels(d, _explicit(0x00400275, b"SQ", _item(REF) + SEQUENCE_DELIMITER)),
    "item-overruns-sequence": lambda d: _before_pixels(
        d, _explicit(0x00400275, b"SQ", _item(REF, len(REF) + 8) + _explicit(0x00080060, b"CS", b"CT"))
    ),
    "item-not-filled": lambda d: _before_pixels(d, _explicit(0x00400275, b"SQ", _item(REF + b"\x08\x00\x60\x00"))),
    "non-item-in-sequence": lambda d: _before_pixels(d, _explicit(0x00400275, b"SQ", REF)),
    "element-overruns-item": lambda d: _before_pixels(
        d, _explicit(0x00400275, b"SQ", _item(_explicit(0x00081150, b"UI", b"1.2\0", 40)))
    ),
    "unclosed-un-sequence": lambda d: _before_pixels(
        d, _explicit(0x00091010, b"UN", IMPLICIT_ITEM, UNDEFINED)
    ),
}

#: Parseable encodings that are not conformant or unusual but valid: accepted.
CT_ACCEPTED: dict[str, Mutate] = {
    "tag-order/swapped": lambda d: _swap_first_two_after(d, 0x00200032),
    "duplicate/element": lambda d: _before_pixels(d, _explicit(0x00204000, b"LT", b"twice ")),
    "closed-undefined-sequence": lambda d: _before_pixels(
        d, _explicit(0x00400275, b"SQ", _item(REF, UNDEFINED) + ITEM_DELIMITER + _item(REF) + SEQUENCE_DELIMITER, UNDEFINED)
    ),
    "nested-sequences": lambda d: _before_pixels(
        d, _explicit(0x00400275, b"SQ", _item(NESTED + REF))
    ),
    "empty-sequence": lambda d: _before_pixels(d, _explicit(0x00400275, b"SQ", b"")),
    "un-holding-implicit-sequence": lambda d: _before_pixels(
        d,
        _explicit(
            0x00091010,
            b"UN",
            IMPLICIT_ITEM
            + ITEM_DELIMITER
            + SEQUENCE_DELIMITER,
            UNDEFINED,
        ),
    ),
    "trailing-padding-element": lambda d: d + _explicit(0xFFFCFFFC, b"OB", bytes(16)),
    "native-pixel-data-longer-than-needed": lambda d: _longer_pixels(d),
}


def _swap_first_two_after(data: bytes, tag: int) -> bytes:
    a = _at(data, tag, b"DS")
    a_len = struct.unpack_from("<H", data, a + 6)[0]
    b = a + 8 + a_len
    b_len = struct.unpack_from("<H", data, b + 6)[0]
    end = b + 8 + b_len
    return data[:a] + data[b:end] + data[a:b] + data[end:]


def _longer_pixels(data: bytes) -> bytes:
    at = _ct_pixel_length_at(data)
    end = at + 4 + struct.unpack_from("<L", data, at)[0]  # CT_small has an element after Pixel Data
    return _set_u32(data[:end] + bytes(4) + data[end:], at, end - at - 4 + 4)


# -- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CT_MUTATIONS))
def test_malformed_data_sets_are_refused(tmp_path: Path, name: str) -> None:
    original = sample("CT_small.dcm")
    meta, data = _split(original)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(meta + CT_MUTATIONS[name](data))
    with pytest.raises(CannotUnderstandError) as caught:
        _check(broken, header_from=original)
    assert caught.value.status == CANNOT_UNDERSTAND
    assert "1.2.840.10008.5.1.4.1.1.2" not in str(caught.value), "messages name elements, never values"


@pytest.mark.parametrize("name", sorted(CT_ACCEPTED))
def test_parseable_encodings_are_accepted(tmp_path: Path, name: str) -> None:
    original = sample("CT_small.dcm")
    meta, data = _split(original)
    path = tmp_path / "ok.dcm"
    path.write_bytes(meta + CT_ACCEPTED[name](data))
    _check(path, header_from=original)


def _file_meta_cases(raw: bytes) -> dict[str, bytes]:
    group_length = struct.unpack_from("<L", raw, 140)[0]
    return {
        "no-DICM-prefix": raw[:128] + b"DICN" + raw[132:],
        "shorter-than-preamble": raw[:100],
        "group-length-past-the-end": raw[:140] + struct.pack("<L", len(raw)) + raw[144:],
        "group-length-too-short": raw[:140] + struct.pack("<L", group_length - 6) + raw[144:],
        "group-length-too-long": raw[:140] + struct.pack("<L", group_length + 8) + raw[144:],
        "meta-element-unknown-vr": raw[:148] + b"QQ" + raw[150:],
    }


@pytest.mark.parametrize("name", sorted(_file_meta_cases(bytes(140) + struct.pack("<L", 100) + bytes(100))))
def test_broken_file_meta_is_refused(tmp_path: Path, name: str) -> None:
    original = sample("CT_small.dcm")
    path = tmp_path / "meta.dcm"
    path.write_bytes(_file_meta_cases(original.read_bytes())[name])
    with pytest.raises(CannotUnderstandError):
        _check(path, header_from=original)


def _other_syntax_cases() -> dict[str, tuple[str, Callable[[bytes], bytes]]]:
    return {
        "implicit/truncated-in-header": ("MR_small_implicit.dcm", lambda r: r[: len(r) - 8196]),
        "implicit/garbage-tail": ("MR_small_implicit.dcm", lambda r: r + b"\x01\x02\x03"),
        "big-endian/truncated": ("MR_small_bigendian.dcm", lambda r: r[:-1]),
        "big-endian/garbage-tail": ("MR_small_bigendian.dcm", lambda r: r + bytes(5)),
        "deflated/truncated-stream": ("image_dfl.dcm", lambda r: r[:-400]),
        "deflated/bytes-after-stream": ("image_dfl.dcm", lambda r: r + b"garbage!"),
        "deflated/not-deflate": ("image_dfl.dcm", lambda r: _deflated_body(r, b"\xff" * 64)),
        "deflated/inflates-to-garbage-tail": (
            "image_dfl.dcm",
            lambda r: _deflated_body(r, _deflate(_inflate(r) + b"\x01\x02\x03")),
        ),
        "encapsulated/no-delimiter": ("SC_rgb_jpeg_dcmtk.dcm", lambda r: r[:-8]),
        "encapsulated/wrong-item-tag": (
            "SC_rgb_jpeg_dcmtk.dcm",
            lambda r: r[: r.index(PIXEL_HEADER) + 12] + b"\xfe\xff\x00\xe1" + r[r.index(PIXEL_HEADER) + 16 :],
        ),
        "encapsulated/defined-length": (
            "SC_rgb_jpeg_dcmtk.dcm",
            lambda r: _set_u32(r, r.index(PIXEL_HEADER) + 8, len(r) - r.index(PIXEL_HEADER) - 12),
        ),
        "encapsulated/offset-table-not-multiple-of-4": (
            "SC_rgb_jpeg_dcmtk.dcm",
            lambda r: _set_u32(r, r.index(PIXEL_HEADER) + 16, 2),
        ),
    }


def _inflate(raw: bytes) -> bytes:
    start = 144 + struct.unpack_from("<L", raw, 140)[0]
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw[start:])


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _deflated_body(raw: bytes, body: bytes) -> bytes:
    start = 144 + struct.unpack_from("<L", raw, 140)[0]
    return raw[:start] + body


@pytest.mark.parametrize("name", sorted(_other_syntax_cases()))
def test_malformed_data_sets_in_other_syntaxes_are_refused(tmp_path: Path, name: str) -> None:
    source, mutate = _other_syntax_cases()[name]
    original = sample(source)
    path = tmp_path / "broken.dcm"
    path.write_bytes(mutate(original.read_bytes()))
    with pytest.raises(CannotUnderstandError):
        _check(path, header_from=original)


# -- accepted -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("syntax", "name"), sorted(VALID_BY_SYNTAX.items()))
def test_valid_files_in_every_transfer_syntax_pass(syntax: str, name: str) -> None:
    path = sample(name)
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    _check(path)


def test_radiograph_passes() -> None:
    _check(sample("RG1_UNCR.dcm"))


def test_a_valid_deflated_data_set_without_a_gzip_trailer_passes(tmp_path: Path) -> None:
    original = sample("image_dfl.dcm")
    path = tmp_path / "dfl.dcm"
    raw = original.read_bytes()
    path.write_bytes(_deflated_body(raw, _deflate(_inflate(raw))))
    _check(path, header_from=original)


def _sample_files() -> list[Path]:
    directories = {Path(str(get_testdata_file("CT_small.dcm"))).parent, Path(str(get_testdata_file("RG1_UNCR.dcm"))).parent}
    return sorted(p for d in directories for p in d.iterdir() if p.is_file() and p.suffix not in {".py", ".pyc", ".json"})


def test_every_sample_file_pydicom_reads_passes_unless_deliberately_broken() -> None:
    refused: dict[str, str] = {}
    for path in _sample_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dataset = pydicom.dcmread(path)
                for _ in dataset:
                    pass
            except Exception:  # noqa: BLE001, S112 - only files pydicom itself reads are compared
                continue
        try:
            _check(path)
        except StoreError as exc:
            refused[path.name] = str(exc)
    assert set(refused) <= set(KNOWN_BROKEN), {k: v for k, v in refused.items() if k not in KNOWN_BROKEN}
