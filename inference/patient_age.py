"""The patient's age at the time of the image, from the DICOM header, as pure functions.

Why an interval: Patient's Age (0010,1010) is an Age String (PS3.5 6.2, VR AS) — three digits and a
unit, ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY`` — and means *completed* units: "005Y" is anyone from
their 5th birthday to the day before their 6th. So a stated age is the half-open interval
``[n, n + 1)`` units, in years. An age derived from Patient's Birth Date (0010,0030) and the date of
the study is exact to the day (a zero-width interval). The intended-use rule then accepts an age
only when the *whole* interval lies inside the accepted range, so "005Y" is accepted by
[1, 6) years and "072M" (6 years 0-1 month) is not.

Sources, in order (PS3.3 C.7.2.2 Patient Study module: Patient's Age is "age of the Patient" at
the time of the study, so it is preferred when present and well formed):

1. Patient's Age;
2. Patient's Birth Date and the first well-formed of Study Date, Series Date, Acquisition Date,
   Content Date (the date of the study, else of the image).

Anything malformed is ignored, never guessed: an age that cannot be established is *unknown* and
the caller's policy decides (:mod:`inference.applicability`). No function here logs or returns the
birth date itself — only the derived age, which the caller must not log either.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

#: Days per year used to express day and week ages in years (the Gregorian mean year).
DAYS_PER_YEAR = 365.2425
_AGE_RE = re.compile(r"^(\d{3})([DWMY])$")
#: Units per year (dividing, not multiplying by 1/12, keeps "072M" exactly 6.0).
_UNITS_PER_YEAR = {"D": DAYS_PER_YEAR, "W": DAYS_PER_YEAR / 7.0, "M": 12.0, "Y": 1.0}
REFERENCE_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


@dataclass(frozen=True, slots=True)
class PatientAge:
    """An age in years as ``[low, high)`` (``low == high`` for an exact age) and where it came from.

    ``source`` names the attributes, for the operator-readable reason (never their values).
    """

    low: float
    high: float
    source: str

    def within(self, minimum: float | None, maximum: float | None) -> bool:
        """True when the whole age lies in ``[minimum, maximum)`` (None: no bound on that side)."""
        if minimum is not None and self.low < minimum:
            return False
        if maximum is not None:
            if self.high > maximum or self.low >= maximum:
                return False
        return True


def parse_age_string(value: str) -> PatientAge | None:
    """``"004Y"``, ``"018M"``, ``"030W"``, ``"010D"`` -> the age interval; None when malformed.

    PS3.5 Table 6.2-1 (AS): exactly four characters, three digits then D, W, M or Y. Values such
    as ``"4Y"``, ``"4 Y"``, ``"004y"`` or ``"004"`` are not valid Age Strings and give None.
    """
    match = _AGE_RE.match(value.strip())
    if match is None:
        return None
    count, unit = int(match.group(1)), match.group(2)
    per_year = _UNITS_PER_YEAR[unit]
    return PatientAge(low=count / per_year, high=(count + 1) / per_year, source="Patient's Age (0010,1010)")


def parse_da(value: str) -> dt.date | None:
    """A DICOM DA value ``YYYYMMDD`` (PS3.5 6.2) -> date; None when empty or not a real date.

    The ACR-NEMA form ``YYYY.MM.DD`` is accepted too (PS3.5 6.2 note: still found in old data).
    """
    text = value.strip().replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def age_between(birth: dt.date, on: dt.date) -> float | None:
    """Exact age in years on *on* for someone born on *birth*; None when *on* precedes *birth*.

    Whole years by the calendar (a birthday on 29 February counts on 1 March in common years),
    the rest of the year as a fraction of that year's length.
    """
    if on < birth:
        return None
    years = on.year - birth.year
    if (on.month, on.day) < (birth.month, birth.day):
        years -= 1
    last = _anniversary(birth, birth.year + years)
    following = _anniversary(birth, birth.year + years + 1)
    return years + (on - last).days / (following - last).days


def _anniversary(birth: dt.date, year: int) -> dt.date:
    try:
        return birth.replace(year=year)
    except ValueError:  # 29 February in a common year
        return dt.date(year, 3, 1)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)


def patient_age(ds: Dataset) -> PatientAge | None:
    """The patient's age at the time of *ds*, or None when the header cannot establish it."""
    stated = parse_age_string(_text(ds, "PatientAge"))
    if stated is not None:
        return stated
    birth = parse_da(_text(ds, "PatientBirthDate"))
    if birth is None:
        return None
    for keyword in REFERENCE_DATE_KEYWORDS:
        on = parse_da(_text(ds, keyword))
        if on is None:
            continue
        years = age_between(birth, on)
        if years is None:
            return None  # a birth date after the study: the header is wrong, do not guess
        return PatientAge(low=years, high=years, source=f"Patient's Birth Date and {_LABELS[keyword]}")
    return None


_LABELS = {
    "StudyDate": "Study Date",
    "SeriesDate": "Series Date",
    "AcquisitionDate": "Acquisition Date",
    "ContentDate": "Content Date",
}
