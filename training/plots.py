"""Line plots of a run's metrics, drawn on the server as SVG coordinates.

Pure functions (no Django, no database): the selectors hand in ``{name: [(step, value), ...]}``
and the templates draw the result with ``<polyline>``/``<line>``/``<text>``. No script and no
inline style is involved, so the plots live within the Content-Security-Policy, and a metric
name (written by a trainer) only ever reaches the page as autoescaped text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Geometry in SVG user units; the stylesheet scales the picture to the width of its column.
WIDTH = 360
HEIGHT = 200
LEFT = 52  # room for the value labels
RIGHT = 12
TOP = 12
BOTTOM = 28  # room for the step labels
MAX_POINTS = 600  # a polyline longer than this only costs bytes: the picture is 300 px wide

# Names trainers write that people look at first; other names follow alphabetically.
PREFERRED_ORDER = (
    "loss",
    "reward",
    "accuracy",
    "eval_accuracy",
    "eval_loss",
    "kl",
    "win_rate",
    # PPO's names for the same things
    "reward/score",
    "objective/kl",
    "loss/policy",
    "loss/value",
    "learning_rate",
)


@dataclass(frozen=True)
class Tick:
    at: float  # coordinate along its axis
    label: str


@dataclass(frozen=True)
class LinePlot:
    """One metric against the training step."""

    name: str
    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    points: str  # the polyline's "x,y x,y ..."
    last_x: float
    last_y: float
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    n: int  # points plotted
    last_step: int
    last_value: float
    last_label: str  # last_value, formatted
    low: float  # smallest value plotted
    high: float  # largest value plotted


def format_number(value: float) -> str:
    """Short, readable labels: 3 significant figures, scientific notation only where a
    learning rate (1e-05) or a huge loss needs it."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3g}"


def format_value(value: object) -> str:
    """A figure as the pages print it: numbers by ``format_number``, anything else (a trainer
    may write a string) as text, which the template escapes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_number(value)
    return str(value)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values inside ``[low, high]``, about ``count`` of them: the step is 1, 2 or
    5 times a power of ten, the one nearest to an even split (Heckbert, "Nice numbers for
    graph labels", Graphics Gems, 1990). ``low < high`` is required."""
    if not low < high:
        raise ValueError("nice_ticks needs low < high")
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    fraction = raw / power
    multiple = 1 if fraction < 1.5 else 2 if fraction < 3 else 5 if fraction < 7 else 10
    step = multiple * power
    digits = max(0, -math.floor(math.log10(step))) + 1
    ticks = []
    value = math.ceil(low / step - 1e-9) * step
    while value <= high + step * 1e-9:
        # Rounding at the step's precision keeps 0.30000000000000004 off the axis.
        ticks.append(round(value, digits) + 0.0)  # + 0.0 turns -0.0 into 0.0
        value += step
    return ticks


def _finite(series: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """NaN and infinities (a diverged run writes them) cannot be drawn; they are left out,
    and the figures beside the plot still say what the last value was."""
    return [(int(s), float(v)) for s, v in series if math.isfinite(v)]


def _thin(points: list[tuple[int, float]], limit: int) -> list[tuple[int, float]]:
    """At most ``limit`` points, evenly spaced by index, always keeping the first and last."""
    if len(points) <= limit:
        return points
    stride = (len(points) - 1) / (limit - 1)
    return [points[round(i * stride)] for i in range(limit)]


def _span(low: float, high: float) -> tuple[float, float]:
    """A range with room in it: a constant series gets a band around its value."""
    if high > low:
        pad = (high - low) * 0.05
        return low - pad, high + pad
    pad = abs(low) * 0.1 or 1.0
    return low - pad, high + pad


def line_plot(
    name: str,
    series: Sequence[tuple[int, float]],
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
    max_points: int = MAX_POINTS,
) -> LinePlot | None:
    """The plot of ``series`` (``(step, value)`` pairs, any order), or None when it has no
    finite value to draw."""
    points = sorted(_finite(series))
    if not points:
        return None
    points = _thin(points, max(2, max_points))
    left, right = float(LEFT), float(width - RIGHT)
    top, bottom = float(TOP), float(height - BOTTOM)

    first_step, last_step = points[0][0], points[-1][0]
    x_low, x_high = (
        (first_step, last_step) if last_step > first_step else (first_step - 1, last_step + 1)
    )
    values = [v for _, v in points]
    low, high = min(values), max(values)
    y_low, y_high = _span(low, high)

    def x(step: float) -> float:
        return round(left + (step - x_low) / (x_high - x_low) * (right - left), 1)

    def y(value: float) -> float:
        return round(bottom - (value - y_low) / (y_high - y_low) * (bottom - top), 1)

    x_ticks = tuple(
        Tick(at=x(t), label=format_number(t))
        for t in nice_ticks(x_low, x_high, 5)
        if x_low <= t <= x_high and float(t).is_integer()
    )
    y_ticks = tuple(
        Tick(at=y(t), label=format_number(t))
        for t in nice_ticks(y_low, y_high, 5)
        if y_low <= t <= y_high
    )
    last_step_value = points[-1]
    return LinePlot(
        name=name,
        width=width,
        height=height,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        points=" ".join(f"{x(s)},{y(v)}" for s, v in points),
        last_x=x(last_step_value[0]),
        last_y=y(last_step_value[1]),
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        n=len(points),
        last_step=last_step_value[0],
        last_value=last_step_value[1],
        last_label=format_number(last_step_value[1]),
        low=low,
        high=high,
    )


def plot_order(name: str) -> tuple[int, str]:
    """Sort key: the preferred names first, in their order, then the rest by name."""
    try:
        return PREFERRED_ORDER.index(name), name
    except ValueError:
        return len(PREFERRED_ORDER), name


def line_plots(metrics: Mapping[str, Sequence[tuple[int, float]]]) -> list[LinePlot]:
    """A plot per metric name that has something to draw, in ``plot_order``.

    A figure logged once (an end-of-run evaluation) is a number, not a curve: once some series
    has a history, single-point series are left to the results table instead of being drawn
    as lone dots."""
    plots = []
    has_history = any(len(_finite(points)) > 1 for points in metrics.values())
    for name in sorted(metrics, key=plot_order):
        if has_history and len(_finite(metrics[name])) < 2:
            continue
        plot = line_plot(name, metrics[name])
        if plot is not None:
            plots.append(plot)
    return plots
