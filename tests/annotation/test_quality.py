"""Agreement, reliability and bias figures against hand-worked and published values.

Pure functions: no database. Every pinned number has its derivation in a comment.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annotation.quality import (
    ChoiceRating,
    FlagThresholds,
    JudgmentRecord,
    Level,
    Rating,
    agreement_report,
    binomial_p_value,
    bootstrap_ci,
    campaign_stats,
    cohens_kappa,
    dawid_skene,
    judgment_weight,
    krippendorff_alpha,
    ordinal_value,
    pairwise_kappas,
    rater_flags,
    rater_stats,
    raw_agreement,
    spearman,
    uplift,
)

CLASSES = ("a", "b", "tie", "both_bad")


def test_quality_imports_neither_django_nor_torch() -> None:
    # Pure functions: benchmarks and scripts use them without Django settings or torch.
    code = "import sys, annotation.quality; print(sorted({'django', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def ratings_from_units(units: Sequence[Sequence[object]]) -> list[Rating]:
    """Unit u's values become ratings of item u by raters 0, 1, 2, ..."""
    return [Rating(u, r, v) for u, values in enumerate(units) for r, v in enumerate(values)]


# --- ordinal scale -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "strength", "scale", "expected"),
    [
        ("a", 3, 3, 3),
        ("a", 1, 3, 1),
        ("b", 2, 3, -2),
        ("a", None, 3, 1),  # strength skipped: the weakest decisive step
        ("b", None, 0, -1),  # campaign without a strength scale
        ("tie", None, 3, 0),
        ("both_bad", None, 3, None),
    ],
)
def test_ordinal_value_maps_choice_and_strength_to_a_signed_scale(
    choice: str, strength: int | None, scale: int, expected: int | None
) -> None:
    assert ordinal_value(choice, strength=strength, scale=scale) == expected


@pytest.mark.parametrize(
    ("choice", "strength", "scale"),
    [("c", None, 3), ("a", 4, 3), ("a", 0, 3), ("a", 1, 0), ("tie", 1, 3)],
)
def test_ordinal_value_rejects_what_the_form_forbids(
    choice: str, strength: int | None, scale: int
) -> None:
    with pytest.raises(ValueError):
        ordinal_value(choice, strength=strength, scale=scale)


# --- raw agreement and kappa ---------------------------------------------------------------


def test_raw_agreement_pools_rater_pairs_over_items() -> None:
    # Item 0: a a a -> 3 pairs, 3 agree. Item 1: a b -> 1 pair, 0 agree. Item 2: one rating,
    # no pair. Item 3: b and a missing value -> one rating. Pooled: 3 / 4.
    ratings = ratings_from_units([["a", "a", "a"], ["a", "b"], ["tie"], ["b", None]])
    assert raw_agreement(ratings) == pytest.approx(0.75)


def test_raw_agreement_is_none_without_a_doubly_rated_item() -> None:
    assert raw_agreement(ratings_from_units([["a"], ["b"]])) is None
    assert raw_agreement([]) is None


def test_cohens_kappa_matches_the_textbook_two_by_two_example() -> None:
    # 50 items: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no. p_o = 35/50 = 0.7; rater 1 says
    # yes 25/50, rater 2 30/50, so p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = 0.2 / 0.5 = 0.4.
    pairs = [("yes", "yes")] * 20 + [("yes", "no")] * 5 + [("no", "yes")] * 10 + [("no", "no")] * 15
    assert cohens_kappa(pairs) == pytest.approx(0.4)


def test_cohens_kappa_is_one_for_perfect_agreement_and_none_when_undefined() -> None:
    assert cohens_kappa([("a", "a"), ("b", "b"), ("a", "a")]) == pytest.approx(1.0)
    # Both raters always say "a": p_o = p_e = 1, kappa is 0/0.
    assert cohens_kappa([("a", "a")] * 5) is None
    assert cohens_kappa([]) is None


labels = st.sampled_from(CLASSES)


@given(st.lists(st.tuples(labels, labels), max_size=40))
def test_cohens_kappa_is_symmetric_and_at_most_one(pairs: list[tuple[str, str]]) -> None:
    kappa = cohens_kappa(pairs)
    swapped = cohens_kappa([(b, a) for a, b in pairs])
    assert (kappa is None) == (swapped is None)
    if kappa is not None and swapped is not None:
        assert kappa == pytest.approx(swapped)
        assert kappa <= 1 + 1e-12


def test_pairwise_kappas_covers_pairs_with_enough_common_items() -> None:
    # Raters 1 and 2 share items 0-3 with the 2x2 table a/a, a/b, b/b, b/b: p_o = 3/4,
    # rater 1 says a 2/4, rater 2 a 1/4: p_e = 1/2 * 1/4 + 1/2 * 3/4 = 1/2, kappa = 1/2.
    # Rater 3 shares only item 0 with each of them.
    ratings = [
        Rating(0, 1, "a"),
        Rating(0, 2, "a"),
        Rating(0, 3, "a"),
        Rating(1, 1, "a"),
        Rating(1, 2, "b"),
        Rating(2, 1, "b"),
        Rating(2, 2, "b"),
        Rating(3, 1, "b"),
        Rating(3, 2, "b"),
    ]
    result = pairwise_kappas(ratings, min_common=2)
    assert list(result) == [(1, 2)]
    assert result[1, 2].n == 4
    assert result[1, 2].kappa == pytest.approx(0.5)
    assert set(pairwise_kappas(ratings, min_common=1)) == {(1, 2), (1, 3), (2, 3)}


def test_pairwise_kappas_refuses_two_answers_by_one_rater_on_one_item() -> None:
    with pytest.raises(ValueError):
        pairwise_kappas([Rating(0, 1, "a"), Rating(0, 1, "b")])


# --- Krippendorff's alpha ------------------------------------------------------------------


def longhand_alpha(units: Sequence[Sequence[int]], level: Level) -> Fraction:
    """Krippendorff (2011), written as literally as possible in exact fractions: the
    coincidence matrix from every ordered pair of values within a unit, then
    alpha = 1 - (n - 1) sum o_ck d_ck / sum n_c n_k d_ck."""
    pairable = [u for u in units if len(u) >= 2]
    values = sorted({v for u in pairable for v in u})
    o = {(c, k): Fraction(0) for c in values for k in values}
    for unit in pairable:
        for i, c in enumerate(unit):
            for j, k in enumerate(unit):
                if i != j:
                    o[c, k] += Fraction(1, len(unit) - 1)
    n_c = {c: sum((o[c, k] for k in values), Fraction(0)) for c in values}
    n = sum(n_c.values(), Fraction(0))

    def delta(c: int, k: int) -> Fraction:
        if level == "nominal":
            return Fraction(c != k)
        if level == "interval":
            return Fraction((c - k) ** 2)
        between = sum((n_c[g] for g in values if min(c, k) <= g <= max(c, k)), Fraction(0))
        distance = between - (n_c[c] + n_c[k]) / 2
        return distance * distance

    observed = sum((o[c, k] * delta(c, k) for c in values for k in values), Fraction(0))
    expected = sum((n_c[c] * n_c[k] * delta(c, k) for c in values for k in values), Fraction(0))
    return 1 - (n - 1) * observed / expected


def test_krippendorff_alpha_matches_a_coincidence_matrix_worked_by_hand() -> None:
    # Units: (1,1), (1,2), (2,2), (1,1,2). Each unit adds 1/(m-1) per ordered pair:
    #   (1,1): o11 += 2            (1,2): o12 += 1, o21 += 1      (2,2): o22 += 2
    #   (1,1,2): o11 += 2/2, o12 += 2/2, o21 += 2/2
    # o = [[3, 2], [2, 2]], n1 = 5, n2 = 4, n = 9.
    # alpha = 1 - (n - 1) (o12 + o21) / (2 n1 n2) = 1 - 8 * 4 / 40 = 0.2 (nominal; with two
    # values interval and ordinal rescale both sums alike and give the same 0.2).
    ratings = ratings_from_units([[1, 1], [1, 2], [2, 2], [1, 1, 2]])
    for level in ("nominal", "ordinal", "interval"):
        assert krippendorff_alpha(ratings, level=level) == pytest.approx(0.2)


def test_krippendorff_alpha_levels_differ_as_worked_by_hand_on_three_values() -> None:
    # Units (1,2), (2,3), (1,3), (3,3): o12 = o21 = o23 = o32 = o13 = o31 = 1, o33 = 2;
    # n1 = 2, n2 = 2, n3 = 4, n = 8, so alpha = 1 - 7 * sum(o d) / sum(n_c n_k d).
    #   nominal:  d = 1 off the diagonal: 1 - 7 * 6 / (2 * (4 + 8 + 8)) = 1 - 42/40 = -0.05
    #   interval: d12 = d23 = 1, d13 = 4: 1 - 7 * 12 / (2 * (4 + 8 + 32)) = 4/88 = 1/22
    #   ordinal:  d12 = (n1 + n2 - (n1 + n2)/2)^2 = 4, d23 = (2 + 4 - 3)^2 = 9,
    #             d13 = (2 + 2 + 4 - 3)^2 = 25: 1 - 7 * 76 / (2 * (16 + 72 + 200)) = 11/144
    units = [[1, 2], [2, 3], [1, 3], [3, 3]]
    ratings = ratings_from_units(units)
    expected: dict[Level, float] = {"nominal": -0.05, "interval": 1 / 22, "ordinal": 11 / 144}
    for level, value in expected.items():
        assert longhand_alpha(units, level) == Fraction(value).limit_denominator(1000)
        assert krippendorff_alpha(ratings, level=level) == pytest.approx(value)


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers
# x 12 units, values 1-5, "." missing. Unit 12 has one value and drops out.
PUBLISHED = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}


@pytest.mark.parametrize(
    ("level", "published"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)]
)
def test_krippendorff_alpha_reproduces_the_published_worked_example(
    level: Level, published: float
) -> None:
    # Coincidence matrix (rows and columns are values 1..5), as in the paper:
    #   7    4/3  1/3  1/3  .      n1 = 9
    #   4/3  10   4/3  1/3  .      n2 = 13
    #   1/3  4/3  8    1/3  .      n3 = 10
    #   1/3  1/3  1/3  4    .      n4 = 5
    #   .    .    .    .    3      n5 = 3,   n = 40
    # Nominal: off-diagonal sum 8, sum_{c!=k} n_c n_k = 40^2 - (81 + 169 + 100 + 25 + 9) = 1216,
    # alpha = 1 - 39 * 8 / 1216 = 113/152 = 0.7434. The other levels come from the longhand
    # fraction computation above; all three round to the published figures.
    ratings = [
        Rating(unit, observer, value)
        for observer, row in PUBLISHED.items()
        for unit, value in enumerate(row)
    ]
    units = [[v for row in PUBLISHED.values() if (v := row[u]) is not None] for u in range(12)]
    exact = longhand_alpha(units, level)
    if level == "nominal":
        assert exact == Fraction(113, 152)
    alpha = krippendorff_alpha(ratings, level=level)
    assert alpha is not None
    assert alpha == pytest.approx(float(exact), abs=1e-12)
    assert round(alpha, 3) == published


def test_krippendorff_alpha_is_one_for_perfect_agreement_and_none_without_variation() -> None:
    perfect = ratings_from_units([["a", "a"], ["b", "b", "b"], ["tie", "tie"], ["a"]])
    assert krippendorff_alpha(perfect) == pytest.approx(1.0)
    assert krippendorff_alpha(ratings_from_units([["a", "a"], ["a", "a"]])) is None
    assert krippendorff_alpha(ratings_from_units([["a"], ["b"]])) is None


def test_krippendorff_alpha_needs_numbers_above_the_nominal_level() -> None:
    with pytest.raises(TypeError):
        krippendorff_alpha(ratings_from_units([["a", "b"]]), level="ordinal")


small_units = st.lists(st.lists(st.integers(1, 4), max_size=4), max_size=12)


@settings(max_examples=60, deadline=None)
@given(small_units)
def test_krippendorff_alpha_is_at_most_one_and_matches_the_longhand(
    units: list[list[int]],
) -> None:
    ratings = ratings_from_units(units)
    levels: tuple[Level, ...] = ("nominal", "ordinal", "interval")
    for level in levels:
        alpha = krippendorff_alpha(ratings, level=level)
        if alpha is not None:
            assert alpha <= 1 + 1e-9
            assert alpha == pytest.approx(float(longhand_alpha(units, level)), abs=1e-9)


# --- bootstrap -----------------------------------------------------------------------------


def synthetic_choices(n_items: int, *, seed: int, raters: int = 3) -> list[ChoiceRating]:
    """Items with a true answer; each rater agrees with it 80% of the time."""
    rng = np.random.default_rng(seed)
    out = []
    for item in range(n_items):
        truth = rng.choice(["a", "b"])
        for rater in range(raters):
            choice = truth if rng.random() < 0.8 else rng.choice(CLASSES)
            strength = int(rng.integers(1, 4)) if choice in ("a", "b") else None
            out.append(ChoiceRating(item, rater, str(choice), strength))
    return out


def raw_over_units(units: Sequence[Sequence[ChoiceRating]]) -> float | None:
    # A unit drawn twice must stay two items: relabel by position, not by item id.
    return raw_agreement(Rating(u, r.rater_id, r.choice) for u, rs in enumerate(units) for r in rs)


def alpha_over_units(units: Sequence[Sequence[ChoiceRating]]) -> float | None:
    return krippendorff_alpha(
        Rating(u, r.rater_id, r.choice) for u, rs in enumerate(units) for r in rs
    )


def by_item(ratings: Sequence[ChoiceRating]) -> list[list[ChoiceRating]]:
    groups: dict[object, list[ChoiceRating]] = {}
    for rating in ratings:
        groups.setdefault(rating.item_id, []).append(rating)
    return list(groups.values())


def test_bootstrap_ci_contains_the_estimate_and_is_fixed_by_the_seed() -> None:
    units = by_item(synthetic_choices(60, seed=1))
    estimate = raw_over_units(units)
    assert estimate is not None
    ci = bootstrap_ci(units, raw_over_units, n_resamples=300, seed=7)
    assert ci is not None
    assert ci[0] <= estimate <= ci[1]
    assert ci == bootstrap_ci(units, raw_over_units, n_resamples=300, seed=7)
    assert ci != bootstrap_ci(units, raw_over_units, n_resamples=300, seed=8)


def test_bootstrap_ci_narrows_with_more_items() -> None:
    def width(n_items: int) -> float:
        ci = bootstrap_ci(
            by_item(synthetic_choices(n_items, seed=2)), raw_over_units, n_resamples=200
        )
        assert ci is not None
        return ci[1] - ci[0]

    assert width(400) < width(25) / 2  # width shrinks like 1/sqrt(n): 4x here


def test_bootstrap_ci_is_none_when_the_statistic_is_mostly_undefined() -> None:
    assert bootstrap_ci([], lambda units: 1.0) is None

    # Defined only when unit 0 is drawn twice or more: P = 1 - 0.9^10 - 10 * 0.1 * 0.9^9 = 0.26
    # per resample, so most resamples have no value.
    def twice(units: Sequence[int]) -> float | None:
        return 1.0 if list(units).count(0) >= 2 else None

    assert bootstrap_ci(list(range(10)), twice, n_resamples=200) is None


def test_agreement_report_point_estimates_match_the_plain_functions() -> None:
    judgments = [*synthetic_choices(80, seed=3), ChoiceRating(999, 0, "a")]
    report = agreement_report(judgments, strength_scale=3, n_resamples=200, seed=0)
    plain = [Rating(j.item_id, j.rater_id, j.choice) for j in judgments]
    ordinal = [
        Rating(j.item_id, j.rater_id, ordinal_value(j.choice, strength=j.strength, scale=3))
        for j in judgments
    ]
    assert (report.n_ratings, report.n_items, report.n_raters, report.n_multi_rated) == (
        241,
        81,
        3,
        80,
    )
    assert report.raw == pytest.approx(raw_agreement(plain))
    assert report.alpha_nominal == pytest.approx(krippendorff_alpha(plain))
    assert report.alpha_ordinal == pytest.approx(krippendorff_alpha(ordinal, level="ordinal"))
    for value, ci in [
        (report.raw, report.raw_ci),
        (report.alpha_nominal, report.alpha_nominal_ci),
        (report.alpha_ordinal, report.alpha_ordinal_ci),
    ]:
        assert value is not None
        assert ci is not None
        assert ci[0] <= value <= ci[1]


@pytest.mark.parametrize(
    ("statistic", "field"), [(raw_over_units, "raw_ci"), (alpha_over_units, "alpha_nominal_ci")]
)
def test_agreement_report_draws_the_same_resamples_as_bootstrap_ci(
    statistic: Callable[[Sequence[Sequence[ChoiceRating]]], float | None], field: str
) -> None:
    judgments = synthetic_choices(50, seed=4)
    report = agreement_report(judgments, strength_scale=3, n_resamples=150, seed=5)
    generic = bootstrap_ci(by_item(judgments), statistic, n_resamples=150, seed=5)
    assert generic is not None
    assert getattr(report, field) == pytest.approx(generic, abs=1e-12)


def test_agreement_report_without_overlap_has_no_figures() -> None:
    report = agreement_report([ChoiceRating(1, 0, "a"), ChoiceRating(2, 0, "b")], strength_scale=0)
    assert report.n_multi_rated == 0
    assert report.raw is report.raw_ci is report.alpha_nominal is report.alpha_ordinal_ci is None


# --- Dawid-Skene ---------------------------------------------------------------------------


def test_dawid_skene_first_round_matches_hand_computation() -> None:
    # Classes x, y; smoothing 1. Item 0: r1 x, r2 x. Item 1: r1 y, r2 y. Item 2: r1 x, r2 y.
    # Majority-vote soft labels: (1, 0), (0, 1), (1/2, 1/2).
    # M-step, soft counts [true][given], then (count + 1) / (row total + 2):
    #   r1: x-row [1 + 1/2, 0] -> [2.5, 1] / 3.5;  y-row [1/2, 1] -> [1.5, 2] / 3.5
    #   r2: x-row [1, 1/2] -> [2, 1.5] / 3.5;      y-row [0, 1 + 1/2] -> [1, 2.5] / 3.5
    #   priors: ([3/2, 3/2] + 1) / (3 + 2) = [1/2, 1/2]
    # E-step, item 0: x ~ 2.5 * 2 = 5, y ~ 1.5 * 1 = 1.5 -> P(x) = 5 / 6.5 = 10/13.
    # Item 2: x ~ 2.5 * 1.5, y ~ 1.5 * 2.5 -> 1/2 each.
    # Reliability r1 = 1/2 * 2.5/3.5 + 1/2 * 2/3.5 = 9/14.
    ratings = [
        Rating(0, "r1", "x"),
        Rating(0, "r2", "x"),
        Rating(1, "r1", "y"),
        Rating(1, "r2", "y"),
        Rating(2, "r1", "x"),
        Rating(2, "r2", "y"),
    ]
    result = dawid_skene(ratings, classes=["x", "y"], max_iter=1, smoothing=1.0)
    assert result.iterations == 1
    assert not result.converged
    assert np.allclose(result.confusion["r1"], [[2.5 / 3.5, 1 / 3.5], [1.5 / 3.5, 2 / 3.5]])
    assert np.allclose(result.confusion["r2"], [[2 / 3.5, 1.5 / 3.5], [1 / 3.5, 2.5 / 3.5]])
    assert result.priors == pytest.approx({"x": 0.5, "y": 0.5})
    assert result.posteriors[0] == pytest.approx((10 / 13, 3 / 13))
    assert result.posteriors[1] == pytest.approx((3 / 13, 10 / 13))  # mirror of item 0
    assert result.posteriors[2] == pytest.approx((0.5, 0.5))
    assert result.reliability["r1"] == pytest.approx(9 / 14)


def test_dawid_skene_converges_to_unanimous_labels() -> None:
    ratings = [Rating(i, r, "ab"[i % 2]) for i in range(20) for r in range(3)]
    result = dawid_skene(ratings, classes=["a", "b"])
    assert result.converged
    assert result.iterations < 200
    for i in range(20):
        assert result.posteriors[i][i % 2] > 0.99
    for rater in range(3):
        assert all(sum(row) == pytest.approx(1.0) for row in result.confusion[rater])


def test_dawid_skene_rejects_labels_outside_the_classes() -> None:
    with pytest.raises(ValueError):
        dawid_skene([Rating(0, 0, "maybe")], classes=CLASSES)
    with pytest.raises(ValueError):
        dawid_skene([], classes=CLASSES)


PRIORS = (0.45, 0.4, 0.1, 0.05)


def synthetic_raters(
    n_items: int, *, seed: int, per_item: int = 5
) -> tuple[list[Rating], dict[str, float], np.ndarray]:
    """Raters of known accuracy; a wrong careful/noisy answer is uniform over the others.
    Returns the ratings, each rater's true accuracy, and the true classes."""
    rng = np.random.default_rng(seed)
    kinds = {"careful": 0.95, "noisy": 0.7}
    raters = [f"careful{i}" for i in range(3)] + [f"noisy{i}" for i in range(3)]
    raters += ["always_a0", "always_a1", "random0", "random1"]
    truth = rng.choice(4, size=n_items, p=PRIORS)
    ratings = []
    for item in range(n_items):
        for rater in rng.choice(raters, size=per_item, replace=False):
            if rater.startswith("always_a"):
                label = 0
            elif rater.startswith("random"):
                label = int(rng.integers(4))
            elif rng.random() < kinds[rater.rstrip("0123456789")]:
                label = int(truth[item])
            else:
                label = int(rng.choice([c for c in range(4) if c != truth[item]]))
            ratings.append(Rating(item, str(rater), CLASSES[label]))
    accuracy = {r: kinds.get(r.rstrip("0123456789"), 0.0) for r in raters}
    for r in raters:
        if r.startswith("always_a"):
            accuracy[r] = PRIORS[0]
        if r.startswith("random"):
            accuracy[r] = 0.25
    return ratings, accuracy, truth


def test_dawid_skene_recovers_rater_quality_and_zeroes_spammers() -> None:
    ratings, accuracy, truth = synthetic_raters(1000, seed=11)
    result = dawid_skene(ratings, classes=CLASSES)
    assert result.converged
    raters = list(accuracy)
    assert spearman([accuracy[r] for r in raters], [result.reliability[r] for r in raters]) >= 0.9
    weights = {r: judgment_weight(result, r) for r in raters}
    for rater, weight in weights.items():
        if rater.startswith(("always_a", "random")):
            assert weight < 0.1, (rater, weight)
        elif rater.startswith("careful"):
            assert weight > 0.8, (rater, weight)
        else:
            assert 0.3 < weight < 0.8, (rater, weight)
    assert result.reliability["careful0"] == pytest.approx(0.95, abs=0.05)
    assert result.priors["a"] == pytest.approx(PRIORS[0], abs=0.05)
    predicted = np.array([np.argmax(result.posteriors[i]) for i in range(len(truth))])
    assert (predicted == truth).mean() > 0.95


def test_judgment_weight_is_one_for_a_perfect_rater_and_zero_for_a_constant_one() -> None:
    ratings = [Rating(i, r, "ab"[i % 2]) for i in range(200) for r in ("p", "q")]
    ratings += [Rating(i, "constant", "a") for i in range(200)]
    result = dawid_skene(ratings, classes=["a", "b"])
    assert judgment_weight(result, "p") == pytest.approx(1.0, abs=0.02)
    assert judgment_weight(result, "constant") == pytest.approx(0.0, abs=0.02)
    with pytest.raises(KeyError):
        judgment_weight(result, "stranger")


def test_dawid_skene_handles_twenty_thousand_ratings() -> None:
    ratings, _, _ = synthetic_raters(4000, seed=12)
    assert len(ratings) == 20_000
    started = time.perf_counter()
    result = dawid_skene(ratings, classes=CLASSES)
    assert len(result.posteriors) == 4000
    # Not a timing assertion, a report: the vectorised EM should take well under a second.
    print(f"dawid_skene 20k ratings: {time.perf_counter() - started:.2f} s")


# --- rater bias figures and flags ----------------------------------------------------------


def test_binomial_p_value_matches_hand_computation() -> None:
    # 9 heads in 10: P(X >= 9) = (C(10,9) + C(10,10)) / 2^10 = 11/1024; two-sided 22/1024.
    assert binomial_p_value(9, 10) == pytest.approx(22 / 1024)
    assert binomial_p_value(1, 10) == pytest.approx(22 / 1024)
    assert binomial_p_value(5, 10) == 1.0
    assert binomial_p_value(0, 0) == 1.0
    # 0 of 3: 2 * 1/8.
    assert binomial_p_value(0, 3) == pytest.approx(0.25)


@given(st.integers(0, 60).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_binomial_p_value_matches_the_exact_sum(case: tuple[int, int]) -> None:
    k, n = case
    tail = min(k, n - k)
    exact = min(Fraction(1), 2 * Fraction(sum(math.comb(n, i) for i in range(tail + 1)), 2**n))
    assert binomial_p_value(k, n) == pytest.approx(float(exact), rel=1e-9)


def record(
    choice: str,
    *,
    left_was_a: bool = True,
    a_longer: bool | None = None,
    decision_ms: int | None = 10_000,
    gold_correct: bool | None = None,
    rater: str = "r",
) -> JudgmentRecord:
    return JudgmentRecord(rater, choice, left_was_a, a_longer, decision_ms, gold_correct)


def test_rater_stats_counts_sides_lengths_and_gold_as_worked_by_hand() -> None:
    records = [
        record("a", left_was_a=True, a_longer=True, decision_ms=4000, gold_correct=True),
        record("b", left_was_a=True, a_longer=False, decision_ms=6000),  # right, longer
        record("b", left_was_a=False, a_longer=None, decision_ms=None),  # left, equal length
        record("tie", decision_ms=1000, gold_correct=False),
        record("both_bad", decision_ms=3000),
        record("a", rater="other"),
    ]
    stats = rater_stats(records)
    r = stats["r"]
    # Decisive: 3, chose left in 2 (a shown left, b shown left). Length known in 2, both longer.
    assert (r.n, r.decisive_n, r.longer_n, r.timed_n, r.gold_n) == (5, 3, 2, 4, 2)
    assert r.left_rate == pytest.approx(2 / 3)
    assert r.left_p == pytest.approx(1.0)  # 2 of 3: P(X <= 1) * 2 = 2 * 4/8
    assert r.longer_rate == 1.0
    assert r.longer_p == pytest.approx(0.5)  # 2 of 2: 2 * 1/4
    assert r.tie_rate == r.both_bad_rate == pytest.approx(0.2)
    assert r.median_decision_ms == 3500.0  # median of 1000, 3000, 4000, 6000
    assert r.gold_accuracy == 0.5
    assert stats["other"].n == 1
    assert campaign_stats(records).n == 6
    empty = campaign_stats([])
    assert empty.left_rate is empty.tie_rate is empty.gold_accuracy is None


def honest_records(n: int, *, seed: int, rater: str = "honest") -> list[JudgmentRecord]:
    rng = np.random.default_rng(seed)
    return [
        record(
            str(rng.choice(["a", "b"], p=[0.5, 0.5])) if rng.random() < 0.9 else "tie",
            left_was_a=bool(rng.random() < 0.5),
            a_longer=bool(rng.random() < 0.5),
            decision_ms=int(rng.integers(8_000, 40_000)),
            gold_correct=bool(rng.random() < 0.85) if i % 5 == 0 else None,
            rater=rater,
        )
        for i in range(n)
    ]


def test_rater_flags_leaves_an_honest_rater_alone() -> None:
    for seed in range(20):
        stats = campaign_stats(honest_records(50, seed=seed))
        assert rater_flags(stats, ds_weight=0.7) == [], seed


def test_rater_flags_catches_an_always_left_rater() -> None:
    # The rater always picks the left side, whatever is there: "a" when A is on the left.
    rng = np.random.default_rng(0)
    records = []
    for _ in range(50):
        left_was_a = bool(rng.random() < 0.5)
        records.append(record("a" if left_was_a else "b", left_was_a=left_was_a))
    flags = rater_flags(campaign_stats(records))
    assert flags == ["chose the left side in 100% of 50 decisive judgments (p < 0.001)"]


def test_rater_flags_waits_for_enough_judgments_before_calling_bias() -> None:
    records = [record("a", left_was_a=True) for _ in range(3)]
    assert rater_flags(campaign_stats(records)) == []


def test_rater_flags_reports_gold_speed_ties_length_and_weight() -> None:
    records = [record("tie", decision_ms=800, gold_correct=i < 4) for i in range(10)] + [
        record("both_bad", decision_ms=800) for _ in range(20)
    ]
    records += [
        record("b", left_was_a=i % 2 == 0, a_longer=False, decision_ms=800) for i in range(40)
    ]
    flags = rater_flags(campaign_stats(records), ds_weight=0.05)
    assert flags == [
        "chose the longer output in 100% of 40 decisive judgments (p < 0.001)",
        "gold accuracy 40% on 10 gold items",
        "median decision time 0.8 s",
        "Dawid-Skene weight 0.05: labels barely better than chance",
    ]
    strict = FlagThresholds(max_tie_or_both_bad=0.4)
    assert "tie or both-bad in 43% of 70 judgments" in rater_flags(
        campaign_stats(records), thresholds=strict
    )


# --- critique experiment and ranks ---------------------------------------------------------


def test_uplift_interval_covers_the_true_difference_on_synthetic_data() -> None:
    # Accuracy 0.80 with critiques vs 0.70 without: the 95% interval should cover +0.10 in
    # about 95% of experiments; require 85% of 40 to leave room for chance.
    covered = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        treated = list(rng.random(300) < 0.8)
        control = list(rng.random(300) < 0.7)
        result = uplift(treated, control, n_resamples=500, seed=seed)
        assert result.low <= result.difference <= result.high
        covered += result.low <= 0.1 <= result.high
    assert covered >= 34


def test_uplift_reports_means_of_decision_times_and_is_fixed_by_the_seed() -> None:
    result = uplift([10.0, 12.0, 14.0], [8.0, 9.0], n_resamples=200, seed=3)
    assert (result.treated_mean, result.control_mean, result.difference) == (12.0, 8.5, 3.5)
    assert (result.n_treated, result.n_control) == (3, 2)
    # Extremes: treated in [10, 14], control in [8, 9], so the difference is in [1, 6].
    assert 1.0 <= result.low <= result.high <= 6.0
    assert result == uplift([10.0, 12.0, 14.0], [8.0, 9.0], n_resamples=200, seed=3)
    with pytest.raises(ValueError):
        uplift([], [1.0])


def test_spearman_uses_average_ranks_for_ties() -> None:
    # x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4); centred: (-1.5, 0, 0, 1.5) and
    # (-1.5, 0.5, -0.5, 1.5): r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1])
