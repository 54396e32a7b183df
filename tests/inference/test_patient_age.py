"""Patient age from the DICOM header (pure functions, table-tested)."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom.dataset import Dataset

from inference.patient_age import DAYS_PER_YEAR, PatientAge, age_between, parse_age_string, parse_da, patient_age


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("004Y", 4.0, 5.0),
        ("000Y", 0.0, 1.0),
        ("018M", 1.5, 19 / 12),
        ("072M", 6.0, 73 / 12),
        ("030W", 30 * 7 / DAYS_PER_YEAR, 31 * 7 / DAYS_PER_YEAR),
        ("010D", 10 / DAYS_PER_YEAR, 11 / DAYS_PER_YEAR),
        (" 005Y ", 5.0, 6.0),  # padding (AS values are space-padded to even length) is not content
        ("120Y", 120.0, 121.0),
    ],
)
def test_age_strings(value: str, low: float, high: float) -> None:
    age = parse_age_string(value)
    assert age is not None
    assert (age.low, age.high) == pytest.approx((low, high))
    assert age.source == "Patient's Age (0010,1010)"


@pytest.mark.parametrize("value", ["", "4Y", "04Y", "0004Y", "004y", "004", "004X", "4 Y", "-04Y", "00AY", "Y004"])
def test_malformed_age_strings(value: str) -> None:
    assert parse_age_string(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20260115", dt.date(2026, 1, 15)),
        ("2026.01.15", dt.date(2026, 1, 15)),  # ACR-NEMA form
        ("20240229", dt.date(2024, 2, 29)),
        ("20230229", None),  # not a date
        ("2026011", None),
        ("", None),
        ("2026-01-15", None),
        ("yyyymmdd", None),
    ],
)
def test_dates(value: str, expected: dt.date | None) -> None:
    assert parse_da(value) == expected


@pytest.mark.parametrize(
    ("birth", "on", "years"),
    [
        (dt.date(2020, 6, 1), dt.date(2026, 6, 1), 6.0),  # the 6th birthday
        (dt.date(2020, 6, 1), dt.date(2026, 5, 31), 5 + 364 / 365),  # the day before
        (dt.date(2025, 1, 1), dt.date(2025, 1, 1), 0.0),
        (dt.date(2020, 2, 29), dt.date(2021, 3, 1), 1.0),  # leap-day birthday counts on 1 March
        (dt.date(1940, 3, 5), dt.date(2004, 8, 26), 64 + 174 / 365),  # RG1's header
    ],
)
def test_age_between(birth: dt.date, on: dt.date, years: float) -> None:
    assert age_between(birth, on) == pytest.approx(years)


def test_age_between_refuses_a_study_before_birth() -> None:
    assert age_between(dt.date(2026, 1, 2), dt.date(2026, 1, 1)) is None


def _ds(**attrs: str) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"PatientAge": "003Y", "PatientBirthDate": "19400101", "StudyDate": "20260101"}, (3.0, 4.0, "Patient's Age")),
        ({"PatientAge": "3Y", "PatientBirthDate": "20230101", "StudyDate": "20260101"}, (3.0, 3.0, "Study Date")),
        ({"PatientBirthDate": "20230101", "SeriesDate": "20260101"}, (3.0, 3.0, "Series Date")),
        ({"PatientBirthDate": "20230101", "StudyDate": "", "AcquisitionDate": "20260101"}, (3.0, 3.0, "Acquisition Date")),
        ({"PatientBirthDate": "20230101", "ContentDate": "20260101"}, (3.0, 3.0, "Content Date")),
        ({"PatientBirthDate": "20230101", "StudyDate": "garbage", "ContentDate": "20260101"}, (3.0, 3.0, "Content Date")),
    ],
)
def test_patient_age_sources(attrs: dict[str, str], expected: tuple[float, float, str]) -> None:
    age = patient_age(_ds(**attrs))
    assert age is not None
    assert (age.low, age.high) == pytest.approx(expected[:2])
    assert expected[2] in age.source


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"PatientAge": "", "PatientBirthDate": ""},
        {"PatientBirthDate": "20230101"},  # no date of the study
        {"StudyDate": "20260101"},
        {"PatientBirthDate": "20270101", "StudyDate": "20260101"},  # born after the study: do not guess
        {"PatientAge": "old", "PatientBirthDate": "notadate", "StudyDate": "20260101"},
    ],
)
def test_patient_age_unknown(attrs: dict[str, str]) -> None:
    assert patient_age(_ds(**attrs)) is None


@pytest.mark.parametrize(
    ("age", "minimum", "maximum", "inside"),
    [
        (PatientAge(5.0, 6.0, "s"), 1.0, 6.0, True),  # 005Y: the whole year lies in [1, 6)
        (PatientAge(6.0, 7.0, "s"), 1.0, 6.0, False),
        (PatientAge(5.0, 6.0, "s"), 1.0, 5.5, False),  # 005Y might be 5.7: not entirely inside
        (PatientAge(0.9, 1.0, "s"), 1.0, 6.0, False),
        (PatientAge(1.0, 1.0, "s"), 1.0, 6.0, True),  # first birthday
        (PatientAge(6.0, 6.0, "s"), 1.0, 6.0, False),  # sixth birthday
        (PatientAge(64.5, 64.5, "s"), None, None, True),
        (PatientAge(64.5, 64.5, "s"), 18.0, None, True),
        (PatientAge(0.5, 0.5, "s"), None, 6.0, True),
    ],
)
def test_within(age: PatientAge, minimum: float | None, maximum: float | None, inside: bool) -> None:
    assert age.within(minimum, maximum) is inside
