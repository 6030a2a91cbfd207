"""The server-side line plots: pure geometry, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from training import plots


def _coords(plot: plots.LinePlot) -> list[tuple[float, float]]:
    return [tuple(map(float, pair.split(","))) for pair in plot.points.split()]  # type: ignore[misc]


def test_points_span_the_plot_area_left_to_right_and_bottom_to_top():
    plot = plots.line_plot("loss", [(0, 1.0), (10, 0.0), (5, 0.5)])
    assert plot is not None
    xs, ys = zip(*_coords(plot), strict=True)
    # Sorted by step: x grows from the left edge to the right edge.
    assert xs[0] == plot.left
    assert xs[-1] == plot.right
    assert list(xs) == sorted(xs)
    # Values fall 1 -> 0: y grows downwards in SVG, with a 5% margin above and below.
    assert ys[0] < ys[1] < ys[2]
    span = plot.bottom - plot.top
    assert ys[0] == pytest.approx(plot.top + span * 0.05 / 1.1, abs=0.1)
    assert ys[2] == pytest.approx(plot.bottom - span * 0.05 / 1.1, abs=0.1)
    assert (plot.last_step, plot.last_value) == (10, 0.0)
    assert (plot.last_x, plot.last_y) == (xs[-1], ys[-1])
    assert plot.n == 3
    assert (plot.low, plot.high) == (0.0, 1.0)


def test_halfway_step_and_value_land_in_the_middle():
    plot = plots.line_plot("kl", [(0, 0.0), (50, 2.0), (100, 4.0)])
    assert plot is not None
    (x0, y0), (x1, y1), (x2, y2) = _coords(plot)
    assert x1 == pytest.approx((x0 + x2) / 2, abs=0.1)
    assert y1 == pytest.approx((y0 + y2) / 2, abs=0.1)


def test_a_single_point_and_a_constant_series_are_drawn_inside_the_area():
    one = plots.line_plot("reward", [(7, 3.5)])
    assert one is not None
    ((x, y),) = _coords(one)
    assert one.left < x < one.right
    assert one.top < y < one.bottom
    flat = plots.line_plot("accuracy", [(1, 0.5), (2, 0.5), (3, 0.5)])
    assert flat is not None
    assert len({y for _, y in _coords(flat)}) == 1
    assert flat.top < _coords(flat)[0][1] < flat.bottom


def test_non_finite_values_are_left_out_and_nothing_finite_means_no_plot():
    plot = plots.line_plot("loss", [(1, 1.0), (2, math.nan), (3, math.inf), (4, 0.5)])
    assert plot is not None
    assert plot.n == 2
    assert plot.last_step == 4
    assert plots.line_plot("loss", [(1, math.nan)]) is None
    assert plots.line_plot("loss", []) is None


def test_long_series_are_thinned_keeping_both_ends():
    series = [(step, float(step % 7)) for step in range(1, 5001)]
    plot = plots.line_plot("loss", series, max_points=100)
    assert plot is not None
    assert plot.n == 100
    coords = _coords(plot)
    assert coords[0][0] == plot.left
    assert coords[-1][0] == plot.right
    assert plot.last_step == 5000


def test_nice_ticks_are_round_numbers_inside_the_range():
    assert plots.nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert plots.nice_ticks(0, 100, 5) == [0, 20, 40, 60, 80, 100]
    assert plots.nice_ticks(-0.03, 0.12, 5) == [0.0, 0.05, 0.1]
    assert plots.nice_ticks(3, 7, 5) == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError):
        plots.nice_ticks(1, 1)


def test_ticks_sit_on_the_axes_and_step_ticks_are_whole_steps():
    plot = plots.line_plot("loss", [(0, 2.0), (3, 1.0)])
    assert plot is not None
    assert all(t.label.lstrip("-").isdigit() for t in plot.x_ticks)
    assert all(plot.left <= t.at <= plot.right for t in plot.x_ticks)
    assert all(plot.top <= t.at <= plot.bottom for t in plot.y_ticks)
    assert [t.label for t in plot.y_ticks] == ["1", "1.2", "1.4", "1.6", "1.8", "2"]


def test_numbers_are_formatted_short():
    assert plots.format_number(0) == "0"
    assert plots.format_number(0.123456) == "0.123"
    assert plots.format_number(5e-5) == "5.00e-05"
    assert plots.format_number(123456.0) == "1.23e+05"
    assert plots.format_number(-2.0) == "-2"


def test_plots_come_in_the_preferred_order_then_by_name():
    metrics = {
        "zeta": [(1, 1.0)],
        "kl": [(1, 0.1)],
        "loss": [(1, 2.0)],
        "alpha": [(1, 3.0)],
        "empty": [(1, math.nan)],
    }
    assert [p.name for p in plots.line_plots(metrics)] == ["loss", "kl", "alpha", "zeta"]


def test_figures_print_numbers_short_and_other_values_as_text():
    assert plots.format_value(0.81249) == "0.812"
    assert plots.format_value(12) == "12"
    assert plots.format_value(True) == "True"
    assert plots.format_value("n/a") == "n/a"


def test_figures_logged_once_are_not_drawn_beside_curves() -> None:
    curves = {"loss": [(1, 1.0), (2, 0.5)], "eval_accuracy": [(2, 0.8)]}
    assert [p.name for p in plots.line_plots(curves)] == ["loss"]
    # Early in a run every series has one point: those are drawn, or the page shows nothing.
    assert [p.name for p in plots.line_plots({"loss": [(1, 1.0)]})] == ["loss"]
