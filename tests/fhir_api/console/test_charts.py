"""Chart geometry (fhir_api.console.charts): bars and lines inside the view box, scaled to the data."""

from __future__ import annotations

import pytest

from fhir_api.console.charts import HEIGHT, WIDTH, BarChart, bar_chart, grouped_bar_chart, line_chart

PAD_TOP, PAD_BOTTOM = 8, 20
PLOT = HEIGHT - PAD_TOP - PAD_BOTTOM
BASELINE = HEIGHT - PAD_BOTTOM


def _inside(chart: BarChart) -> None:
    for bar in chart.bars:
        assert 0 <= bar.x and bar.x + bar.width <= WIDTH + 0.01, bar
        assert PAD_TOP - 0.01 <= bar.y and bar.y + bar.height <= BASELINE + 0.01, bar
        assert bar.width > 0 and bar.height >= 0, bar
        assert bar.y + bar.height == pytest.approx(BASELINE, abs=0.02), bar  # every bar stands on the axis


@pytest.mark.parametrize(
    ("values", "heights"),
    [
        ([0, 0, 0], [0, 0, 0]),
        ([5], [PLOT]),
        ([1, 2, 4], [PLOT / 4, PLOT / 2, PLOT]),
        ([3, 0, 3], [PLOT, 0, PLOT]),
        ([-2, 4], [0, PLOT]),  # a negative count draws nothing, never below the axis
        ([-1, -5], [0, 0]),
        ([0.5, 0.25], [PLOT, PLOT / 2]),
    ],
)
def test_bar_heights_are_proportional_to_the_largest(values: list[float], heights: list[float]) -> None:
    chart = bar_chart(values, [f"v{i}" for i in range(len(values))])
    assert [b.height for b in chart.bars] == pytest.approx(heights, abs=0.01)
    assert chart.maximum == max(max(values), 0.0)
    _inside(chart)


def test_all_zeros_stay_flat() -> None:
    chart = bar_chart([0.0] * 60, [""] * 60)
    assert len(chart.bars) == 60
    assert all(b.height == 0 and b.y == BASELINE for b in chart.bars)
    _inside(chart)


def test_no_values_no_bars() -> None:
    assert bar_chart([], []) == BarChart((), 0.0)


@pytest.mark.parametrize("count", [1, 2, 7, 60, 240, 1000])
def test_bars_fill_the_width_in_order_without_overlapping(count: int) -> None:
    chart = bar_chart([float(i % 5) for i in range(count)], [str(i) for i in range(count)])
    _inside(chart)
    xs = [b.x for b in chart.bars]
    assert xs == sorted(xs)
    for left, right in zip(chart.bars, chart.bars[1:], strict=False):
        assert left.x + left.width <= right.x + 0.02
    assert chart.bars[-1].x + chart.bars[-1].width == pytest.approx(WIDTH - (chart.bars[0].x), abs=0.05)
    assert (chart.width, chart.height) == (WIDTH, HEIGHT)


def test_labels_and_series_are_carried() -> None:
    chart = bar_chart([1, 2, 3], ["a: 1", "b: 2", "c: 3"], series=[2, 0, 1])
    assert [(b.label, b.series) for b in chart.bars] == [("a: 1", 2), ("b: 2", 0), ("c: 3", 1)]
    assert [b.series for b in bar_chart([1, 2], ["x", "y"]).bars] == [0, 0]


def test_grouped_bars_side_by_side_per_slot() -> None:
    names = ("received", "analysed", "delivered")
    groups = [(4, 2, 0), (0, 0, 0), (8, 8, 1)]
    chart = grouped_bar_chart(groups, ["10:00", "10:01", "10:02"], names)
    assert len(chart.bars) == 9
    assert [b.series for b in chart.bars] == [0, 1, 2] * 3
    assert chart.bars[0].label == "10:00: received 4"
    assert chart.bars[5].label == "10:01: delivered 0"
    assert chart.bars[8].label == "10:02: delivered 1"
    assert chart.maximum == 8
    assert [b.height for b in chart.bars] == pytest.approx([PLOT / 2, PLOT / 4, 0, 0, 0, 0, PLOT, PLOT, PLOT / 8], abs=0.01)
    _inside(chart)


def test_grouped_all_zero_minutes_stay_flat() -> None:
    chart = grouped_bar_chart([(0, 0, 0, 0)] * 60, [f"{m:02d}" for m in range(60)], ("a", "b", "c", "d"))
    assert len(chart.bars) == 240 and all(b.height == 0 for b in chart.bars)
    _inside(chart)


def _points(points: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",") for p in points.split())]


@pytest.mark.parametrize(
    ("values", "threshold", "expected_y", "threshold_y"),
    [
        ([0, 0, 0], None, [BASELINE] * 3, None),
        ([0, 0], 0.2, [BASELINE] * 2, PAD_TOP),  # nothing drifted: the line is flat, the rule on top
        ([0.1, 0.2], 0.2, [BASELINE - PLOT / 2, PAD_TOP], PAD_TOP),
        ([0.4, 0.1], 0.2, [PAD_TOP, BASELINE - PLOT / 4], BASELINE - PLOT / 2),  # scaled to the data above the rule
        ([1, 2, 4], None, [BASELINE - PLOT / 4, BASELINE - PLOT / 2, PAD_TOP], None),
        ([-1, 1], None, [BASELINE, PAD_TOP], None),
    ],
)
def test_line_chart_geometry(values: list[float], threshold: float | None, expected_y: list[float],
                             threshold_y: float | None) -> None:
    line = line_chart(values, threshold=threshold)
    points = _points(line.points)
    assert [y for _, y in points] == pytest.approx(expected_y, abs=0.01)
    xs = [x for x, _ in points]
    assert xs[0] == 0 and xs[-1] == pytest.approx(WIDTH) and xs == sorted(xs)
    assert all(PAD_TOP - 0.01 <= y <= BASELINE + 0.01 for _, y in points)
    if threshold_y is None:
        assert line.threshold_y is None
    else:
        assert line.threshold_y == pytest.approx(threshold_y, abs=0.01)
    assert (line.width, line.height) == (WIDTH, HEIGHT)


def test_line_of_one_point_and_of_none() -> None:
    assert _points(line_chart([0.3]).points) == [(0.0, PAD_TOP)]
    empty = line_chart([], threshold=0.25)
    assert empty.points == "" and empty.threshold_y == PAD_TOP and empty.maximum == 0.25
