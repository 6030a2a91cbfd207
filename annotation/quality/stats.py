"""Resampling and test statistics shared by the quality figures: the bootstrap, the
critique-experiment uplift, the exact binomial test and Spearman's rank correlation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")
Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

# Resampled indices are drawn in blocks of about this many cells to bound memory.
_BLOCK_CELLS = 1_000_000


def resample_indices(n_units: int, n_resamples: int, rng: np.random.Generator) -> Iterator[Ints]:
    """Blocks of (rows, n_units) resampled unit indices, n_resamples rows in all. Every
    bootstrap here draws through this, so one seed gives the same resamples on each path."""
    rows = max(1, _BLOCK_CELLS // max(n_units, 1))
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n_units, size=(min(rows, n_resamples - start), n_units))


def draw_counts(indices: Ints, n_units: int) -> Floats:
    """(rows, n_units) indices -> (rows, n_units) how often each unit was drawn."""
    rows = indices.shape[0]
    flat = (np.arange(rows)[:, None] * n_units + indices).ravel()
    return np.bincount(flat, minlength=rows * n_units).reshape(rows, n_units).astype(float)


def percentile_interval(
    estimates: Floats, *, n_resamples: int, confidence: float
) -> tuple[float, float] | None:
    """The central ``confidence`` interval of the estimates, NaNs (undefined) left out."""
    estimates = estimates[~np.isnan(estimates)]
    # When most resamples have no value, an interval would describe only the lucky ones.
    if estimates.size == 0 or 2 * estimates.size < n_resamples:
        return None
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return float(low), float(high)


def check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError("need n_resamples >= 1 and 0 < confidence < 1")


def bootstrap_ci(
    units: Sequence[T],
    statistic: Callable[[Sequence[T]], float | None],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic`` over ``units``, the same for a seed.

    Resample units (items), never single ratings: ratings of one item are correlated, and
    agreement lives between ratings of the same item, so shuffling ratings would break up
    the very pairs being measured and understate the uncertainty. A unit drawn twice is two
    units: a statistic that groups by item id must keep the copies apart. Resamples where
    the statistic is None or NaN are skipped; None when units is empty or fewer than half
    the resamples have a value."""
    check_bootstrap_args(n_resamples, confidence)
    if not units:
        return None
    estimates = [
        statistic([units[i] for i in row])
        for block in resample_indices(len(units), n_resamples, np.random.default_rng(seed))
        for row in block
    ]
    values = np.array([np.nan if e is None else e for e in estimates], dtype=float)
    return percentile_interval(values, n_resamples=n_resamples, confidence=confidence)


@dataclass(frozen=True)
class Uplift:
    treated_mean: float
    control_mean: float
    difference: float  # treated - control
    low: float
    high: float
    n_treated: int
    n_control: int


def uplift(
    treated: Sequence[float | bool],
    control: Sequence[float | bool],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Uplift:
    """Difference of means (treated - control) with a percentile bootstrap interval, each arm
    resampled on its own: the arms are independent samples of different sizes. Booleans
    give accuracies, numbers give e.g. decision times. An empty arm raises ValueError."""
    check_bootstrap_args(n_resamples, confidence)
    arms = np.asarray(treated, dtype=float), np.asarray(control, dtype=float)
    if not (arms[0].size and arms[1].size):
        raise ValueError("both arms need at least one value")
    rng = np.random.default_rng(seed)
    means = [
        np.concatenate(
            [arm[block].mean(axis=1) for block in resample_indices(arm.size, n_resamples, rng)]
        )
        for arm in arms
    ]
    interval = percentile_interval(
        means[0] - means[1], n_resamples=n_resamples, confidence=confidence
    )
    assert interval is not None  # every resample of a non-empty arm has a mean
    return Uplift(
        treated_mean=float(arms[0].mean()),
        control_mean=float(arms[1].mean()),
        difference=float(arms[0].mean() - arms[1].mean()),
        low=interval[0],
        high=interval[1],
        n_treated=int(arms[0].size),
        n_control=int(arms[1].size),
    )


def binomial_p_value(successes: int, trials: int) -> float:
    """Exact two-sided binomial test against 1/2: the chance that a fair coin splits
    ``trials`` at least as unevenly as successes : (trials - successes). 1.0 for no trials."""
    if not 0 <= successes <= trials:
        raise ValueError("need 0 <= successes <= trials")
    tail = min(successes, trials - successes)
    if 2 * tail == trials:
        return 1.0
    # log P(X = i) for i <= tail via C(n, i + 1) = C(n, i) (n - i) / (i + 1), in logs so a
    # large n neither overflows nor underflows before the sum.
    i = np.arange(tail)
    log_pmf = np.concatenate(([0.0], np.cumsum(np.log((trials - i) / (i + 1)))))
    log_pmf -= trials * math.log(2)
    top = float(log_pmf.max())
    return min(1.0, 2 * math.exp(top) * float(np.exp(log_pmf - top).sum()))


def _average_ranks(values: Sequence[float]) -> Floats:
    """Ranks 1..n, ties sharing the average of the ranks they span."""
    array = np.asarray(values, dtype=float)
    order = np.argsort(array, kind="stable")
    starts = np.concatenate(([0], np.flatnonzero(np.diff(array[order])) + 1))
    ends = np.append(starts[1:], array.size)
    ranks = np.empty(array.size)
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's r of average ranks). NaN when either side has
    no variation or fewer than two values; ValueError when the lengths differ."""
    if len(x) != len(y):
        raise ValueError("x and y need the same length")
    if len(x) < 2:
        return math.nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denominator if denominator else math.nan
