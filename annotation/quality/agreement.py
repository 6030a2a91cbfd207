"""Inter-rater agreement: raw agreement, Cohen's kappa, Krippendorff's alpha, and the
campaign report that bootstraps them over items."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Literal, NamedTuple

import numpy as np

from annotation.quality.stats import (
    Floats,
    check_bootstrap_args,
    draw_counts,
    percentile_interval,
    resample_indices,
)

Level = Literal["nominal", "ordinal", "interval"]
CHOICES = ("a", "b", "tie", "both_bad")


class Rating(NamedTuple):
    item_id: Hashable
    rater_id: Hashable
    value: Hashable  # None: missing


def ordinal_value(choice: str, *, strength: int | None, scale: int) -> int | None:
    """The judgment on a signed scale from -scale to +scale: "a" by strength s is +s, "b" is
    -s, "tie" is 0, "both_bad" is None (it says nothing about which output is better, so
    ordinal statistics leave it out).

    A decisive choice without a strength (scale 0, or the rater skipped it) counts as 1: its
    direction is known, its size is not, and the smallest step keeps it from outweighing
    graded answers. Raises ValueError for an unknown choice or a strength the form forbids.
    """
    if choice not in CHOICES:
        raise ValueError(f"unknown choice {choice!r}")
    if strength is not None and (choice not in ("a", "b") or not 1 <= strength <= scale):
        raise ValueError(f"strength {strength!r} is invalid for {choice!r} on scale {scale}")
    if choice == "both_bad":
        return None
    if choice == "tie":
        return 0
    step = 1 if strength is None else strength
    return step if choice == "a" else -step


def _units(ratings: Iterable[Rating]) -> dict[Hashable, list[Hashable]]:
    """Non-missing values grouped by item, items in order of first appearance."""
    units: dict[Hashable, list[Hashable]] = defaultdict(list)
    for item_id, _rater, value in ratings:
        if value is not None:
            units[item_id].append(value)
    return units


def raw_agreement(ratings: Iterable[Rating]) -> float | None:
    """Pairwise percent agreement: agreeing rater pairs / all rater pairs, pooled over items,
    so an item with m ratings weighs m(m-1)/2 pairs. None when no item has two ratings."""
    agree = pairs = 0
    for values in _units(ratings).values():
        pairs += len(values) * (len(values) - 1) // 2
        agree += sum(c * (c - 1) // 2 for c in Counter(values).values())
    return agree / pairs if pairs else None


def cohens_kappa(pairs: Sequence[tuple[Hashable, Hashable]]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items, (p_o - p_e) / (1 - p_e).

    None when there are no pairs or p_e == 1 (both raters gave one and the same label to
    everything: agreement is perfect but no better than chance, so kappa is undefined)."""
    n = len(pairs)
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(first[label] * second[label] for label in first)  # p_e * n^2, exact
    if n == 0 or chance == n * n:
        return None
    p_o, p_e = sum(a == b for a, b in pairs) / n, chance / (n * n)
    return (p_o - p_e) / (1 - p_e)


class PairKappa(NamedTuple):
    kappa: float | None
    n: int  # items both raters rated


def pairwise_kappas(
    ratings: Iterable[Rating], *, min_common: int = 10
) -> dict[tuple[Hashable, Hashable], PairKappa]:
    """Cohen's kappa for every rater pair with at least ``min_common`` items in common. Keys
    are (rater, other) in order of the raters' first appearance in ``ratings``. A rater who
    rated one item twice raises ValueError (which answer would count is ambiguous)."""
    first_seen: dict[Hashable, int] = {}
    answers: dict[Hashable, dict[Hashable, Hashable]] = defaultdict(dict)
    for item_id, rater_id, value in ratings:
        if value is None:
            continue
        first_seen.setdefault(rater_id, len(first_seen))
        if rater_id in answers[item_id]:
            raise ValueError(f"rater {rater_id!r} rated item {item_id!r} twice")
        answers[item_id][rater_id] = value
    pairs: dict[tuple[Hashable, Hashable], list[tuple[Hashable, Hashable]]] = defaultdict(list)
    for by_rater in answers.values():
        raters = sorted(by_rater, key=first_seen.__getitem__)
        for i, rater in enumerate(raters):
            for other in raters[i + 1 :]:
                pairs[rater, other].append((by_rater[rater], by_rater[other]))
    return {
        key: PairKappa(kappa=cohens_kappa(common), n=len(common))
        for key, common in pairs.items()
        if len(common) >= min_common
    }


def _value_counts(
    units: Sequence[Sequence[Hashable]], *, level: Level
) -> tuple[Floats, Floats | None]:
    """(U, V) counts of each distinct value per unit, and the values as numbers (sorted) for
    the ordinal and interval levels. Those levels need real numbers: TypeError otherwise."""
    keyed: Sequence[Sequence[Hashable]] = units
    numbers = None
    if level != "nominal":
        floats = [[_number(value, level) for value in values] for values in units]
        numbers = np.array(sorted({v for values in floats for v in values}), dtype=float)
        keyed = floats
    # Nominal values are indexed as they come; numbers in ascending order (ordinal needs it).
    index: dict[Hashable, int] = {}
    for values in keyed if numbers is None else [numbers.tolist()]:
        for value in values:
            index.setdefault(value, len(index))
    counts = np.zeros((len(units), len(index)))
    for u, values in enumerate(keyed):
        for value in values:
            counts[u, index[value]] += 1
    return counts, numbers


def _number(value: Hashable, level: Level) -> float:
    if not isinstance(value, Real):
        raise TypeError(f"{level} alpha needs numbers, got {value!r}")
    return float(value)


def _unit_coincidences(counts: Floats) -> Floats:
    """(U, V*V): each unit's contribution to the coincidence matrix, o_ck += n_uc * (n_uk -
    [c == k]) / (m_u - 1). A unit with fewer than two values cannot be paired: zeros."""
    m = counts.sum(axis=1)
    scale = np.divide(1.0, m - 1, out=np.zeros_like(m), where=m >= 2)
    scaled = counts * scale[:, None]
    per_unit = scaled[:, :, None] * counts[:, None, :]
    per_unit -= scaled[:, :, None] * np.eye(counts.shape[1])
    return per_unit.reshape(len(counts), counts.shape[1] ** 2)


def _alpha(o: Floats, numbers: Floats | None, *, level: Level) -> Floats:
    """Krippendorff's alpha = 1 - (n - 1) sum_ck o_ck d_ck / sum_ck n_c n_k d_ck for a stack
    of (R, V, V) coincidence matrices; NaN where there is no variation (alpha undefined)."""
    n_c = o.sum(axis=2)  # (R, V)
    n = n_c.sum(axis=1)  # (R,)
    if level == "nominal":
        delta = (1.0 - np.eye(o.shape[1]))[None]
    elif level == "interval":
        assert numbers is not None
        delta = ((numbers[:, None] - numbers[None, :]) ** 2)[None]
    else:
        # Krippendorff's ordinal metric ranks values by their marginal frequencies:
        # d_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2, written with a running sum.
        cum = np.cumsum(n_c, axis=1)
        delta = (cum[:, None, :] - cum[:, :, None] + (n_c[:, :, None] - n_c[:, None, :]) / 2) ** 2
    observed = (o * delta).sum(axis=(1, 2))
    expected = (n_c[:, :, None] * n_c[:, None, :] * delta).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected > 0, 1.0 - (n - 1) * observed / expected, np.nan)


def krippendorff_alpha(ratings: Iterable[Rating], *, level: Level = "nominal") -> float | None:
    """Krippendorff's alpha by the coincidence matrix (Krippendorff 2011, "Computing
    Krippendorff's Alpha-Reliability"). Any number of raters, missing values allowed; units
    with one value are dropped. "nominal" takes any hashable values; "ordinal" and "interval"
    take numbers (``ordinal_value`` gives them). None when nothing is pairable or all paired
    values are equal (no variation: alpha is undefined)."""
    counts, numbers = _value_counts(list(_units(ratings).values()), level=level)
    o = _unit_coincidences(counts).sum(axis=0).reshape(1, counts.shape[1], counts.shape[1])
    alpha = float(_alpha(o, numbers, level=level)[0])
    return None if math.isnan(alpha) else alpha


class ChoiceRating(NamedTuple):
    item_id: Hashable
    rater_id: Hashable
    choice: str
    strength: int | None = None


@dataclass(frozen=True)
class AgreementReport:
    """Campaign agreement with bootstrap intervals, ready for a template. Raw agreement and
    nominal alpha use the four choices; ordinal alpha uses ``ordinal_value`` (both-bad left
    out). Measured on the multi-rated items only, and resampled over those."""

    n_ratings: int
    n_items: int
    n_raters: int
    n_multi_rated: int  # items with 2+ ratings: the only ones agreement can be measured on
    raw: float | None
    raw_ci: tuple[float, float] | None
    alpha_nominal: float | None
    alpha_nominal_ci: tuple[float, float] | None
    alpha_ordinal: float | None
    alpha_ordinal_ci: tuple[float, float] | None
    confidence: float
    n_resamples: int


def agreement_report(
    judgments: Iterable[ChoiceRating],
    *,
    strength_scale: int,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> AgreementReport:
    """Raw agreement, nominal and ordinal alpha, each with a percentile bootstrap interval
    over items. Vectorised: a resample is a count vector over items and every statistic is
    a sum of per-item tables, so 1000 resamples of 10k items take well under a second. The
    resamples are those ``bootstrap_ci`` draws for the same seed and multi-rated items."""
    check_bootstrap_args(n_resamples, confidence)
    choices: dict[Hashable, list[Hashable]] = defaultdict(list)
    ordinals: dict[Hashable, list[Hashable]] = defaultdict(list)
    raters: set[Hashable] = set()
    n_ratings = 0
    for item_id, rater_id, choice, strength in judgments:
        value = ordinal_value(choice, strength=strength, scale=strength_scale)
        n_ratings += 1
        raters.add(rater_id)
        choices[item_id].append(choice)
        if value is not None:
            ordinals[item_id].append(value)
    multi = [item for item, values in choices.items() if len(values) >= 2]
    nominal, _ = _value_counts([choices[i] for i in multi], level="nominal")
    ordinal, numbers = _value_counts([ordinals.get(i, []) for i in multi], level="ordinal")
    m = nominal.sum(axis=1)
    tables = [
        ((nominal * (nominal - 1)).sum(axis=1) / 2)[:, None],  # agreeing pairs per item
        (m * (m - 1) / 2)[:, None],  # pairs per item
        _unit_coincidences(nominal),
        _unit_coincidences(ordinal),
    ]
    sizes = np.cumsum([t.shape[1] for t in tables])[:-1]
    stacked = np.hstack(tables)  # (items, features): every statistic is linear in these

    def stats(weights: Floats) -> tuple[Floats, Floats, Floats]:
        agree, pairs, o_nom, o_ord = np.split(weights @ stacked, sizes, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = np.where(pairs[:, 0] > 0, agree[:, 0] / pairs[:, 0], np.nan)
        v_nom, v_ord = nominal.shape[1], ordinal.shape[1]
        return (
            raw,
            _alpha(o_nom.reshape(len(weights), v_nom, v_nom), None, level="nominal"),
            _alpha(o_ord.reshape(len(weights), v_ord, v_ord), numbers, level="ordinal"),
        )

    point = [None if math.isnan(s[0]) else float(s[0]) for s in stats(np.ones((1, len(multi))))]
    cis: list[tuple[float, float] | None] = [None, None, None]
    if multi:
        blocks = [
            stats(draw_counts(block, len(multi)))
            for block in resample_indices(len(multi), n_resamples, np.random.default_rng(seed))
        ]
        cis = [
            percentile_interval(
                np.concatenate([b[s] for b in blocks]),
                n_resamples=n_resamples,
                confidence=confidence,
            )
            for s in range(3)
        ]
    return AgreementReport(
        n_ratings=n_ratings,
        n_items=len(choices),
        n_raters=len(raters),
        n_multi_rated=len(multi),
        raw=point[0],
        raw_ci=cis[0],
        alpha_nominal=point[1],
        alpha_nominal_ci=cis[1],
        alpha_ordinal=point[2],
        alpha_ordinal_ci=cis[2],
        confidence=confidence,
        n_resamples=n_resamples,
    )
