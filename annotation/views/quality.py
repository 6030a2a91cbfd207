"""The campaign quality page: agreement, rater reliability and bias, the critique experiment.

For the campaign's admins only (``Role.ADMIN``); a campaign the user has no role in is a 404,
one where they hold another role a 403. GET only: the page reads, and computes everything
from the judgments on each request (see ``annotation.reports`` for the cost). ``?since=`` and
``?until=`` (dates, both inclusive) narrow it to the judgments made in between, which is how
a round's figures are read until rounds exist.

The plots are SVG drawn by the template from coordinates computed here: no script, no inline
style (CSP), and rater names go in as autoescaped text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from annotation import permissions, reports
from annotation.models import Role

ADMIN = (Role.ADMIN,)

# Plot geometry, in SVG user units (the CSS scales the whole picture to the page width).
PLOT_WIDTH = 640
LABEL_WIDTH = 150  # room for rater names left of a dot plot
MARGIN = 24
ROW_HEIGHT = 22
SCATTER_SIZE = 320
TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
Z_95 = 1.959964


class QualityWindowForm(forms.Form):
    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, object]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and until < since:
            raise forms.ValidationError("The end date comes before the start date.")
        return data


def _start_of(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (good at small n and near 0 or 1,
    unlike the normal approximation). None for n = 0."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Tick:
    at: float  # coordinate along its axis
    label: str


@dataclass(frozen=True)
class DotRow:
    label: str  # untrusted (a username): the template escapes it
    y: float
    x: float
    low: float
    high: float
    title: str
    suspicious: bool


@dataclass(frozen=True)
class DotPlot:
    """One row per rater: a dot at the rate, whiskers for its 95% interval, and a reference
    line (50% for the left rate, where an unbiased rater sits)."""

    width: int
    height: int
    x0: float  # where 0% is
    x1: float  # where 100% is
    reference_x: float
    axis_y: float
    ticks: tuple[Tick, ...]
    rows: tuple[DotRow, ...]


@dataclass(frozen=True)
class ScatterPoint:
    x: float
    y: float
    title: str
    suspicious: bool


@dataclass(frozen=True)
class ScatterPlot:
    """Gold accuracy (up) against Dawid-Skene reliability (right), one point per rater who
    answered gold items: careful raters sit top right, spammers bottom left."""

    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    points: tuple[ScatterPoint, ...]


def _percent(value: float) -> str:
    return f"{value:.0%}"


def left_rate_plot(report: reports.QualityReport) -> DotPlot | None:
    """Each rater's share of decisive judgments that went to the side shown left, with a
    Wilson 95% interval; None when no rater has a decisive judgment."""
    raters = [r for r in report.raters if r.stats.left_rate is not None and r.stats.decisive_n]
    if not raters:
        return None
    x0, x1 = float(LABEL_WIDTH), float(PLOT_WIDTH - MARGIN)

    def x(rate: float) -> float:
        return round(x0 + rate * (x1 - x0), 1)

    rows = []
    for i, rater in enumerate(raters):
        rate = rater.stats.left_rate
        n = rater.stats.decisive_n
        assert rate is not None  # filtered above
        interval = wilson_interval(rate * n, n) or (rate, rate)
        rows.append(
            DotRow(
                label=rater.username,
                y=float(MARGIN + i * ROW_HEIGHT),
                x=x(rate),
                low=x(interval[0]),
                high=x(interval[1]),
                title=f"{rater.username}: left {rate:.0%} of {n} decisive judgments",
                suspicious=rater.suspicious,
            )
        )
    axis_y = float(MARGIN + len(rows) * ROW_HEIGHT)
    return DotPlot(
        width=PLOT_WIDTH,
        height=int(axis_y + MARGIN),
        x0=x0,
        x1=x1,
        reference_x=x(0.5),
        axis_y=axis_y - ROW_HEIGHT / 2,
        ticks=tuple(Tick(at=x(t), label=_percent(t)) for t in TICKS),
        rows=tuple(rows),
    )


def gold_vs_reliability_plot(report: reports.QualityReport) -> ScatterPlot | None:
    points_in = [
        r for r in report.raters if r.stats.gold_accuracy is not None and r.reliability is not None
    ]
    if not points_in:
        return None
    left, right = float(2 * MARGIN), float(SCATTER_SIZE - MARGIN)
    top, bottom = float(MARGIN), float(SCATTER_SIZE - 2 * MARGIN)

    def x(value: float) -> float:
        return round(left + value * (right - left), 1)

    def y(value: float) -> float:
        return round(bottom - value * (bottom - top), 1)

    points = []
    for rater in points_in:
        accuracy, reliability = rater.stats.gold_accuracy, rater.reliability
        assert accuracy is not None  # filtered above
        assert reliability is not None
        points.append(
            ScatterPoint(
                x=x(reliability),
                y=y(accuracy),
                title=(
                    f"{rater.username}: gold {accuracy:.0%} of {rater.stats.gold_n}, "
                    f"reliability {reliability:.2f}"
                ),
                suspicious=rater.suspicious,
            )
        )
    return ScatterPlot(
        width=SCATTER_SIZE,
        height=SCATTER_SIZE,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        x_ticks=tuple(Tick(at=x(t), label=f"{t:.2f}") for t in TICKS),
        y_ticks=tuple(Tick(at=y(t), label=_percent(t)) for t in TICKS),
        points=tuple(points),
    )


@require_GET
@login_required
def campaign_quality(request: HttpRequest, slug: str) -> HttpResponse:
    campaign = permissions.campaign_for(user=request.user, slug=slug, roles=ADMIN)
    form = QualityWindowForm(request.GET or None)
    since = until = None
    if form.is_valid():
        if form.cleaned_data.get("since"):
            since = _start_of(form.cleaned_data["since"])
        if form.cleaned_data.get("until"):
            until = _start_of(form.cleaned_data["until"] + timedelta(days=1))
    report = reports.campaign_quality_report(campaign=campaign, since=since, until=until)
    return render(
        request,
        "annotation/campaign_quality.html",
        {
            "campaign": campaign,
            "report": report,
            "form": form,
            "left_plot": left_rate_plot(report),
            "gold_plot": gold_vs_reliability_plot(report),
            "tab": "quality",
        },
        status=400 if form.errors else 200,
    )
