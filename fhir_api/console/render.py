"""Jinja2 templates of the console: one environment, autoescaped, compiled once per process."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse

from storage.study_results import POSITIVE_LABEL


def _when(value: dt.datetime | None) -> str:
    """An instant as operators read it: UTC, to the second (the page says the zone once)."""
    if value is None:
        return "—"
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def _dicom_date(value: str | None) -> str:
    if not value or len(value) != 8 or not value.isdigit():
        return value or "—"
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def _person_name(value: str | None) -> str:
    """A DICOM PN (``Family^Given^Middle``) as ``Family, Given Middle``."""
    if not value:
        return "—"
    parts = [p for p in value.split("=")[0].split("^")]
    family, given = parts[0], " ".join(p for p in parts[1:3] if p)
    return f"{family}, {given}" if given else family


class Templates:
    """Renders ``templates/<name>`` with the console's filters and the common context."""

    def __init__(self) -> None:
        self.env = Environment(
            loader=PackageLoader("fhir_api.console", "templates"),
            autoescape=select_autoescape(["html", "svg"], default=True),
            undefined=StrictUndefined,  # a misspelt name fails the test, not the page silently
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals["positive_label"] = POSITIVE_LABEL
        self.env.filters.update(when=_when, age=_age, percent=_percent, dicom_date=_dicom_date, person=_person_name)
        for name in self.env.list_templates(extensions=["html"]):
            self.env.get_template(name)  # compiled now: the first user of a page does not wait for it (nor a typo hide)

    def page(self, name: str, context: Mapping[str, Any], *, status_code: int = 200) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status_code)
