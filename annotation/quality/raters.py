"""Per-rater bias and diligence figures, and the flags an admin sees next to a rater."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from annotation.quality.stats import binomial_p_value


class JudgmentRecord(NamedTuple):
    rater_id: Hashable
    choice: str
    left_was_a: bool  # canonical A was shown on the left
    a_longer: bool | None  # A's text is longer than B's; None when equally long
    decision_ms: int | None
    gold_correct: bool | None  # None: not a gold item


@dataclass(frozen=True)
class RaterStats:
    """Bias and diligence figures for one rater (or a whole campaign). Rates are None when
    their denominator is 0; p-values are exact two-sided binomial tests against 1/2."""

    n: int
    decisive_n: int  # "a" or "b"
    left_rate: float | None  # share of decisive judgments choosing the left side
    left_p: float
    longer_n: int  # decisive judgments on pairs of unequal length
    longer_rate: float | None  # share of those choosing the longer output
    longer_p: float
    tie_rate: float | None
    both_bad_rate: float | None
    timed_n: int
    median_decision_ms: float | None
    gold_n: int
    gold_accuracy: float | None


def campaign_stats(records: Iterable[JudgmentRecord]) -> RaterStats:
    """``RaterStats`` over all the records, whoever made them."""
    n = decisive = left = longer_n = longer = ties = both_bad = gold_n = gold_right = 0
    times: list[int] = []
    for record in records:
        n += 1
        ties += record.choice == "tie"
        both_bad += record.choice == "both_bad"
        if record.decision_ms is not None:
            times.append(record.decision_ms)
        if record.gold_correct is not None:
            gold_n += 1
            gold_right += record.gold_correct
        if record.choice in ("a", "b"):
            chose_a = record.choice == "a"
            decisive += 1
            left += chose_a == record.left_was_a
            if record.a_longer is not None:
                longer_n += 1
                longer += chose_a == record.a_longer
    return RaterStats(
        n=n,
        decisive_n=decisive,
        left_rate=left / decisive if decisive else None,
        left_p=binomial_p_value(left, decisive),
        longer_n=longer_n,
        longer_rate=longer / longer_n if longer_n else None,
        longer_p=binomial_p_value(longer, longer_n),
        tie_rate=ties / n if n else None,
        both_bad_rate=both_bad / n if n else None,
        timed_n=len(times),
        median_decision_ms=float(np.median(times)) if times else None,
        gold_n=gold_n,
        gold_accuracy=gold_right / gold_n if gold_n else None,
    )


def rater_stats(records: Iterable[JudgmentRecord]) -> dict[Hashable, RaterStats]:
    """``RaterStats`` per rater, raters in order of first appearance."""
    by_rater: dict[Hashable, list[JudgmentRecord]] = defaultdict(list)
    for record in records:
        by_rater[record.rater_id].append(record)
    return {rater: campaign_stats(rs) for rater, rs in by_rater.items()}


@dataclass(frozen=True)
class FlagThresholds:
    # Bias tests need enough decisive judgments and a strict level: every rater of a campaign
    # is tested twice, so at 0.05 a hundred honest raters would draw about ten accusations.
    min_decisive: int = 30
    significance: float = 0.001
    # Position carries no information (sides are randomised), so any clear lean is bias.
    min_side_share: float = 0.65
    # Longer answers are often genuinely better, so only an extreme lean is suspicious.
    min_longer_share: float = 0.85
    min_gold: int = 5
    min_gold_accuracy: float = 0.6  # clicking a or b at random scores about 0.5
    min_timed: int = 10
    min_median_ms: float = 2000.0  # reading two answers takes longer than this
    min_judgments: int = 20
    max_tie_or_both_bad: float = 0.6
    min_ds_weight: float = 0.2


def _lean_flag(
    rate: float | None,
    n: int,
    p: float,
    names: tuple[str, str],
    min_share: float,
    t: FlagThresholds,
) -> str:
    """A flag for leaning to one of two options (``names``: rate's option first), or ""."""
    if rate is None or n < t.min_decisive or p >= t.significance:
        return ""
    share, name = (rate, names[0]) if rate >= 0.5 else (1 - rate, names[1])
    if share < min_share:
        return ""
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return f"chose the {name} in {share:.0%} of {n} decisive judgments ({p_text})"


def rater_flags(
    stats: RaterStats,
    *,
    ds_weight: float | None = None,
    thresholds: FlagThresholds = FlagThresholds(),
) -> list[str]:
    """Human-readable reasons to look at this rater's work; empty when nothing stands out.
    ``ds_weight`` is the rater's ``judgment_weight`` from Dawid-Skene, when known."""
    t = thresholds
    flags = [
        _lean_flag(rate, n, p, names, min_share, t)
        for rate, n, p, names, min_share in (
            (
                stats.left_rate,
                stats.decisive_n,
                stats.left_p,
                ("left side", "right side"),
                t.min_side_share,
            ),
            (
                stats.longer_rate,
                stats.longer_n,
                stats.longer_p,
                ("longer output", "shorter output"),
                t.min_longer_share,
            ),
        )
    ]
    flags = [flag for flag in flags if flag]
    accuracy = stats.gold_accuracy
    if accuracy is not None and stats.gold_n >= t.min_gold and accuracy < t.min_gold_accuracy:
        flags.append(f"gold accuracy {accuracy:.0%} on {stats.gold_n} gold items")
    median = stats.median_decision_ms
    if median is not None and stats.timed_n >= t.min_timed and median < t.min_median_ms:
        flags.append(f"median decision time {median / 1000:.1f} s")
    share = (stats.tie_rate or 0.0) + (stats.both_bad_rate or 0.0)
    if stats.n >= t.min_judgments and share > t.max_tie_or_both_bad:
        flags.append(f"tie or both-bad in {share:.0%} of {stats.n} judgments")
    if ds_weight is not None and ds_weight < t.min_ds_weight:
        flags.append(f"Dawid-Skene weight {ds_weight:.2f}: labels barely better than chance")
    return flags
