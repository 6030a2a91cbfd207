"""The simulated-rater benchmark's statistics part (benchmarks/quality_sim.py, (a) and (b)):
Dawid-Skene recovers the raters' quality and the flags catch the junk raters.

Seeded simulation, pure functions only: no database, no torch. 1,200 comparisons with 3
raters each give every one of the 11 raters about 330 labels.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

import pytest

from benchmarks.quality_sim import (
    QualityReport,
    Rater,
    comparisons,
    quality_seed,
    quality_summary,
    short_flag,
    true_reward,
)

MIX = (3, 3, 2, 2, 1)  # careful, noisy, always-left, spammer, length-biased
SEEDS = range(5)


@pytest.fixture(scope="module")
def reports() -> list[QualityReport]:
    return [quality_seed(seed, MIX, items=1200, overlap=3, gold_fraction=0.1)[2] for seed in SEEDS]


def kinds(report: QualityReport, kind: str) -> list[dict[str, Any]]:
    return [r for r in report.rows if r["kind"] == kind]


def test_the_task_and_the_raters_behave_as_designed() -> None:
    assert true_reward("blue sky blue dark sea") == 1
    items = comparisons(200, random.Random(0))
    assert all(true_reward(c.a) != true_reward(c.b) for c in items)
    rng = random.Random(1)
    left = Rater("l", "left", 0.5, 1000)
    assert {left.choose(c, True, rng) for c in items} == {"a"}
    assert {left.choose(c, False, rng) for c in items} == {"b"}
    longer = Rater("x", "longer", 0.5, 1000)
    assert all(
        longer.choose(c, True, rng) == ("a" if c.a_longer else "b")
        for c in items
        if c.a_longer is not None
    )
    careful = Rater("c", "careful", 0.9, 1000)
    right = sum(careful.choose(c, rng.random() < 0.5, rng) == c.truth for c in items)
    assert 0.82 <= right / len(items) <= 0.97


def test_dawid_skene_ranks_the_raters_by_accuracy(reports: list[QualityReport]) -> None:
    rho = [r.spearman_reliability for r in reports]
    assert min(rho) >= 0.9, rho
    summary = quality_summary(reports)
    weight = {k: v["weight"] for k, v in summary["raters"].items()}
    careful = [weight[f"careful-{i}"] for i in (1, 2, 3)]
    noisy = [weight[f"noisy-{i}"] for i in (1, 2, 3)]
    junk = [w for k, w in weight.items() if not k.startswith(("careful", "noisy"))]
    # Mean training weights over the seeds keep the three tiers apart.
    assert min(careful) > max(noisy) > max(junk)
    assert statistics.mean(junk) < 0.1


def test_flags_catch_biased_raters_and_spare_careful_ones(reports: list[QualityReport]) -> None:
    for report in reports:
        for row in kinds(report, "careful"):
            assert row["flags"] == [], row
        for kind, flag in (("left", "left"), ("longer", "longer")):
            for row in kinds(report, kind):
                assert flag in [short_flag(f) for f in row["flags"]], row
        fast_spammer = next(r for r in kinds(report, "spammer") if r["median_s"] < 2)
        assert "fast" in [short_flag(f) for f in fast_spammer["flags"]]
    # A uniform spammer can get lucky: in seed 2 the slow one is right 56% of the time and
    # Dawid-Skene gives it weight 0.33, above the 0.2 flag line. Every other one is caught.
    spammers = [bool(r["flags"]) for report in reports for r in kinds(report, "spammer")]
    assert sum(spammers) >= len(spammers) - 1
