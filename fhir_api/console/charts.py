"""Charts as data for server-rendered SVG: pure geometry, no JavaScript, no external library.

An SVG drawn on the server needs no script (the Content-Security-Policy allows none inline) and
no download; each chart is also rendered as a table for screen readers (the template's job).
The functions here turn series into bars and polylines in a fixed view box; the template only
places them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

WIDTH: Final = 1000
HEIGHT: Final = 180
_PAD_TOP: Final = 8
_PAD_BOTTOM: Final = 20


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # the <title> of the bar: what a hover (or a screen reader) tells
    series: int = 0  # which series (CSS class), for stacked or grouped bars


@dataclass(frozen=True)
class BarChart:
    bars: tuple[Bar, ...]
    maximum: float
    width: int = WIDTH
    height: int = HEIGHT


def bar_chart(values: Sequence[float], labels: Sequence[str], *, series: Sequence[int] | None = None) -> BarChart:
    """One bar per value, heights scaled to the largest (a chart of zeros stays flat)."""
    count = len(values)
    if count == 0:
        return BarChart((), 0.0)
    maximum = max(max(values), 0.0)
    plot = HEIGHT - _PAD_TOP - _PAD_BOTTOM
    slot = WIDTH / count
    gap = min(2.0, slot * 0.2)
    bars = []
    for index, value in enumerate(values):
        height = 0.0 if maximum <= 0 else plot * max(value, 0.0) / maximum
        bars.append(Bar(
            x=round(index * slot + gap / 2, 2), y=round(_PAD_TOP + plot - height, 2), width=round(slot - gap, 2),
            height=round(height, 2), label=labels[index], series=series[index] if series is not None else 0,
        ))
    return BarChart(tuple(bars), maximum)


def grouped_bar_chart(groups: Sequence[Sequence[float]], labels: Sequence[str], names: Sequence[str]) -> BarChart:
    """Bars side by side per slot: ``groups[slot][series]`` (e.g. received/analysed/delivered per minute)."""
    flat: list[float] = []
    flat_labels: list[str] = []
    flat_series: list[int] = []
    for slot, values in enumerate(groups):
        for series, value in enumerate(values):
            flat.append(value)
            flat_labels.append(f"{labels[slot]}: {names[series]} {value:g}")
            flat_series.append(series)
    return bar_chart(flat, flat_labels, series=flat_series)


@dataclass(frozen=True)
class Line:
    points: str  # "x,y x,y ..." for <polyline points>
    threshold_y: float | None  # a horizontal rule (an alert threshold), in view-box units
    maximum: float
    width: int = WIDTH
    height: int = HEIGHT


def line_chart(values: Sequence[float], *, threshold: float | None = None) -> Line:
    """A polyline through *values* (evenly spaced), scaled so the threshold, if any, is visible."""
    top = max([*values, threshold or 0.0, 1e-9])
    plot = HEIGHT - _PAD_TOP - _PAD_BOTTOM
    step = WIDTH / max(len(values) - 1, 1)

    def y_of(value: float) -> float:
        return round(_PAD_TOP + plot - plot * max(value, 0.0) / top, 2)

    points = " ".join(f"{round(i * step, 2)},{y_of(v)}" for i, v in enumerate(values))
    return Line(points, None if threshold is None else y_of(threshold), top)
