"""Campaign quality report: judgments read from the database, turned into numbers by the pure
functions in ``annotation.quality``.

Selectors (reads only), shared by the admin page, the API and the export:

- ``campaign_quality_report``: agreement with bootstrap intervals, pairwise kappas,
  Dawid-Skene reliability and weights, per-rater bias figures and flags, and the critique
  experiment's arms, optionally within a ``created_at`` window.
- ``judgment_weights``: each rater's Dawid-Skene weight, for the ``weight`` of an export line.

Cost: a fixed number of queries whatever the campaign's size (one ``values_list`` over the
judgments, joined to their comparison for the gold answer and to both completions for their
lengths, computed in SQL so no text is loaded; one for the raters' names; one count; one
grouping the critique verdicts), then
O(judgments) work and memory in Python: one small tuple per judgment, plus what the statistics
build from it (Dawid-Skene's EM and the bootstrap are vectorised over numpy arrays). That is
fine for an admin page and an export of up to a few hundred thousand judgments (30,000
judgments: about 0.6 s and a 50 MB peak on SQLite here, a third of it reading the rows); it
is not for a page that raters load.

Rounds (issue 4) do not exist yet; until they do, "per round" figures come from the
``since`` / ``until`` window (judgments created in [since, until)).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from statistics import median
from typing import NamedTuple, cast

from django.db.models import Count, Q, QuerySet
from django.db.models.functions import Length

from annotation import quality
from annotation.models import Campaign, Comparison, CritiqueMode, CritiqueVerdict, Judgment
from annotation.quality import (
    AgreementReport,
    ChoiceRating,
    DawidSkeneResult,
    FlagThresholds,
    JudgmentRecord,
    RaterStats,
    Rating,
    Uplift,
)

TOP_KAPPA_PAIRS = 10
KAPPA_MIN_COMMON = 10
DEFAULT_THRESHOLDS = FlagThresholds()


class _Row(NamedTuple):
    """One judgment as the report reads it: no text, only what the statistics use."""

    comparison_id: int
    rater_id: int
    choice: str
    strength: int | None
    left_was_a: bool
    critique_shown: bool
    decision_ms: int | None
    gold_choice: str
    gold_kind: str  # how a generated gold item was made; "" for marked gold and non-gold
    a_length: int
    b_length: int
    a_round: int | None  # the loop round that generated each completion (None: imported)
    b_round: int | None

    @property
    def round_number(self) -> int:
        """The comparison's round: the later of its completions' rounds, 0 for imported."""
        return max(self.a_round or 0, self.b_round or 0)


@dataclass(frozen=True)
class KappaPair:
    rater_id: int
    username: str
    other_id: int
    other_username: str
    kappa: float | None  # None: undefined (both raters gave one and the same label throughout)
    n: int  # comparisons both rated


@dataclass(frozen=True)
class DawidSkeneSummary:
    classes: tuple[str, ...]
    priors: dict[str, float]  # estimated share of each true class
    iterations: int
    converged: bool


@dataclass(frozen=True)
class RaterQuality:
    rater_id: int
    username: str  # untrusted text: templates autoescape it
    stats: RaterStats
    reliability: float | None  # Dawid-Skene P(label == true class)
    weight: float | None  # Dawid-Skene ``judgment_weight``, in [0, 1]
    # confusion[true class][the rater's answer] = P(answer | true class); classes in order.
    confusion: dict[str, dict[str, float]] | None
    flags: tuple[str, ...]

    @property
    def suspicious(self) -> bool:
        return bool(self.flags)


@dataclass(frozen=True)
class CritiqueArm:
    """Figures of one arm of the critique experiment (critique shown, or not)."""

    shown: bool
    n: int
    gold_n: int
    gold_accuracy: float | None
    planted_n: int  # gold items with a planted error (the flaws a critique should point at)
    planted_accuracy: float | None
    timed_n: int
    median_decision_ms: float | None
    agreement: float | None  # raw agreement between raters of this arm on the same comparison
    agreement_items: int  # comparisons with two or more judgments in this arm


@dataclass(frozen=True)
class CritiqueExperiment:
    """The CriticGPT measurement: treated = critique shown, control = not shown."""

    shown: CritiqueArm
    hidden: CritiqueArm
    gold_uplift: Uplift | None  # gold accuracy, shown - hidden; None: an arm has no gold
    planted_uplift: Uplift | None  # the same on gold items with a planted error
    time_uplift: Uplift | None  # mean decision ms, shown - hidden; None: an arm has no times

    @property
    def arms(self) -> tuple[CritiqueArm, CritiqueArm]:
        return self.shown, self.hidden


@dataclass(frozen=True)
class RoundAgreement:
    """Agreement on the comparisons of one loop round (completions generated in that round;
    0 = imported), with its own bootstrap intervals."""

    round_number: int
    agreement: AgreementReport


@dataclass(frozen=True)
class CriticPrecision:
    """How often raters who were shown a critic's critiques called them valid (they point at
    a real problem): the critique precision of that critic, as CriticGPT measured it."""

    critic: str
    verdicts: int
    valid: int

    @property
    def precision(self) -> float | None:
        return self.valid / self.verdicts if self.verdicts else None


@dataclass(frozen=True)
class QualityReport:
    campaign_id: int
    since: datetime | None
    until: datetime | None
    n_judgments: int
    n_comparisons: int  # in the campaign, judged or not
    n_judged_comparisons: int
    n_raters: int
    n_gold_judgments: int
    agreement: AgreementReport
    by_round: tuple[RoundAgreement, ...]  # one per round with judgments; empty with one round
    kappas: tuple[KappaPair, ...]  # the pairs with most comparisons in common, most first
    dawid_skene: DawidSkeneSummary | None  # None: no judgments
    raters: tuple[RaterQuality, ...]  # most judgments first
    overall: RaterStats  # the same figures over every judgment of the campaign
    critique: CritiqueExperiment | None  # None: no experiment and not both arms seen
    critique_precision: tuple[CriticPrecision, ...]  # per critic, most verdicts first
    n_resamples: int
    seed: int

    @property
    def n_suspicious(self) -> int:
        return sum(rater.suspicious for rater in self.raters)


def _judgments(
    *, campaign: Campaign, since: datetime | None, until: datetime | None
) -> QuerySet[Judgment]:
    judgments = Judgment.objects.filter(campaign=campaign)
    if since is not None:
        judgments = judgments.filter(created_at__gte=since)
    if until is not None:
        judgments = judgments.filter(created_at__lt=until)
    return judgments.order_by()


def _rows(judgments: QuerySet[Judgment]) -> list[_Row]:
    """One query. The completions' lengths are computed by the database: only two integers per
    judgment come back, never the texts (which may be long)."""
    values = judgments.order_by("id").values_list(
        "comparison_id",
        "rater_id",
        "choice",
        "strength",
        "left_was_a",
        "critique_shown",
        "decision_ms",
        "comparison__gold_choice",
        "comparison__gold_kind",
        Length("comparison__completion_a__text"),
        Length("comparison__completion_b__text"),
        "comparison__completion_a__round_number",
        "comparison__completion_b__round_number",
    )
    return [_Row(*row) for row in values.iterator(chunk_size=10_000)]


def _classes(campaign: Campaign, seen: Iterable[str]) -> tuple[str, ...]:
    """Dawid-Skene's classes: a and b, tie and both-bad when the campaign allows them, and any
    choice seen in the data (the form may have changed after judgments were made)."""
    present = set(seen)
    allowed = {"a", "b"}
    if campaign.allow_tie:
        allowed.add("tie")
    if campaign.allow_both_bad:
        allowed.add("both_bad")
    return tuple(c for c in quality.CHOICES if c in allowed | present)


def _dawid_skene(
    campaign: Campaign, ratings: Sequence[tuple[int, int, str]]
) -> DawidSkeneResult | None:
    if not ratings:
        return None
    return quality.dawid_skene(
        (Rating(item, rater, choice) for item, rater, choice in ratings),
        classes=_classes(campaign, {choice for _, _, choice in ratings}),
    )


def _record(row: _Row) -> JudgmentRecord:
    return JudgmentRecord(
        rater_id=row.rater_id,
        choice=row.choice,
        left_was_a=row.left_was_a,
        a_longer=None if row.a_length == row.b_length else row.a_length > row.b_length,
        decision_ms=row.decision_ms,
        gold_correct=row.choice == row.gold_choice if row.gold_choice else None,
    )


def _arm(rows: Sequence[_Row], *, shown: bool) -> CritiqueArm:
    gold = [row.choice == row.gold_choice for row in rows if row.gold_choice]
    planted = _planted(rows)
    times = [row.decision_ms for row in rows if row.decision_ms is not None]
    per_item: dict[int, int] = defaultdict(int)
    for row in rows:
        per_item[row.comparison_id] += 1
    return CritiqueArm(
        shown=shown,
        n=len(rows),
        gold_n=len(gold),
        gold_accuracy=sum(gold) / len(gold) if gold else None,
        planted_n=len(planted),
        planted_accuracy=sum(planted) / len(planted) if planted else None,
        timed_n=len(times),
        median_decision_ms=float(median(times)) if times else None,
        agreement=quality.raw_agreement(
            Rating(row.comparison_id, row.rater_id, row.choice) for row in rows
        ),
        agreement_items=sum(1 for count in per_item.values() if count >= 2),
    )


def _planted(rows: Sequence[_Row]) -> list[bool]:
    """Right or wrong on the gold items with a planted error: what a critique that finds the
    flaw should help with (CriticGPT's measurement)."""
    return [row.choice == row.gold_choice for row in rows if row.gold_kind == "planted_error"]


def _uplift(
    treated: Sequence[float | bool], control: Sequence[float | bool], *, n_resamples: int, seed: int
) -> Uplift | None:
    if not (treated and control):
        return None
    return quality.uplift(treated, control, n_resamples=n_resamples, seed=seed)


def _critique_experiment(
    campaign: Campaign, rows: Sequence[_Row], *, n_resamples: int, seed: int
) -> CritiqueExperiment | None:
    shown = [row for row in rows if row.critique_shown]
    hidden = [row for row in rows if not row.critique_shown]
    if campaign.critique_mode != CritiqueMode.EXPERIMENT and not (shown and hidden):
        return None

    def gold(arm: list[_Row]) -> list[bool]:
        return [row.choice == row.gold_choice for row in arm if row.gold_choice]

    def times(arm: list[_Row]) -> list[float]:
        return [float(row.decision_ms) for row in arm if row.decision_ms is not None]

    return CritiqueExperiment(
        shown=_arm(shown, shown=True),
        hidden=_arm(hidden, shown=False),
        gold_uplift=_uplift(gold(shown), gold(hidden), n_resamples=n_resamples, seed=seed),
        planted_uplift=_uplift(
            _planted(shown), _planted(hidden), n_resamples=n_resamples, seed=seed
        ),
        time_uplift=_uplift(times(shown), times(hidden), n_resamples=n_resamples, seed=seed),
    )


def _agreement(rows: Sequence[_Row], *, scale: int, n_resamples: int, seed: int) -> AgreementReport:
    return quality.agreement_report(
        (
            ChoiceRating(
                row.comparison_id,
                row.rater_id,
                row.choice,
                row.strength if row.choice in ("a", "b") else None,
            )
            for row in rows
        ),
        strength_scale=scale,
        n_resamples=n_resamples,
        seed=seed,
    )


def _critique_precision(judgments: QuerySet[Judgment]) -> tuple[CriticPrecision, ...]:
    """One grouped query over the raters' verdicts on the critiques they were shown."""
    rows = (
        CritiqueVerdict.objects.filter(judgment__in=judgments.values("id"))
        .values("critique__critic")
        .annotate(n=Count("id"), valid=Count("id", filter=Q(valid=True)))
        .order_by("-n", "critique__critic")
    )
    return tuple(
        CriticPrecision(critic=row["critique__critic"], verdicts=row["n"], valid=row["valid"])
        for row in rows
    )


def _kappas(
    rows: Sequence[_Row], names: dict[int, str], *, top: int, min_common: int
) -> tuple[KappaPair, ...]:
    pairs = quality.pairwise_kappas(
        (Rating(row.comparison_id, row.rater_id, row.choice) for row in rows),
        min_common=min_common,
    )
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1].n)[:top]
    return tuple(
        KappaPair(
            rater_id=cast(int, rater),
            username=names.get(cast(int, rater), ""),
            other_id=cast(int, other),
            other_username=names.get(cast(int, other), ""),
            kappa=pair.kappa,
            n=pair.n,
        )
        for (rater, other), pair in ranked
    )


def _usernames(judgments: QuerySet[Judgment]) -> dict[int, str]:
    return dict(judgments.values_list("rater_id", "rater__username").distinct())


def campaign_quality_report(
    *,
    campaign: Campaign,
    since: datetime | None = None,
    until: datetime | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    top_kappa_pairs: int = TOP_KAPPA_PAIRS,
    kappa_min_common: int = KAPPA_MIN_COMMON,
    thresholds: FlagThresholds = DEFAULT_THRESHOLDS,
) -> QualityReport:
    """Every quality figure of ``campaign`` over its judgments created in [since, until).

    Four queries (the last groups the critique verdicts), whatever the number of judgments;
    O(judgments) time and memory in Python (see the module docstring). Agreement is measured on comparisons with two or more
    judgments only, and bootstrapped over those comparisons; Dawid-Skene runs over every
    judgment. A rater's Dawid-Skene weight only raises a flag once they have made
    ``thresholds.min_judgments`` judgments: with fewer, the EM's smoothing alone keeps the
    weight low. The same ``seed`` gives the same intervals.
    """
    judgments = _judgments(campaign=campaign, since=since, until=until)
    rows = _rows(judgments)
    names = _usernames(judgments)
    n_comparisons = Comparison.objects.filter(campaign=campaign).count()

    # Strength is only meaningful for a decisive choice; a scale shrunk after judgments were
    # made must not make older strengths invalid.
    scale = max([campaign.strength_scale, *(row.strength or 0 for row in rows)])
    agreement = _agreement(rows, scale=scale, n_resamples=n_resamples, seed=seed)
    rounds = sorted({row.round_number for row in rows})
    by_round = (
        tuple(
            RoundAgreement(
                round_number=number,
                agreement=_agreement(
                    [row for row in rows if row.round_number == number],
                    scale=scale,
                    n_resamples=n_resamples,
                    seed=seed,
                ),
            )
            for number in rounds
        )
        if len(rounds) > 1
        else ()
    )

    ds = _dawid_skene(campaign, [(row.comparison_id, row.rater_id, row.choice) for row in rows])
    per_rater = quality.rater_stats(_record(row) for row in rows)
    raters = []
    for rater_id, stats in per_rater.items():
        rid = cast(int, rater_id)  # the ids fed in are rater ids
        weight = reliability = confusion = None
        if ds is not None:
            weight = quality.judgment_weight(ds, rid)
            reliability = ds.reliability[rid]
            classes = [str(c) for c in ds.classes]
            confusion = {
                true: dict(zip(classes, row, strict=True))
                for true, row in zip(classes, ds.confusion[rid], strict=True)
            }
        flag_weight = weight if stats.n >= thresholds.min_judgments else None
        raters.append(
            RaterQuality(
                rater_id=rid,
                username=names.get(rid, ""),
                stats=stats,
                reliability=reliability,
                weight=weight,
                confusion=confusion,
                flags=tuple(
                    quality.rater_flags(stats, ds_weight=flag_weight, thresholds=thresholds)
                ),
            )
        )
    raters.sort(key=lambda r: (-r.stats.n, r.username, r.rater_id))
    return QualityReport(
        campaign_id=campaign.pk,
        since=since,
        until=until,
        n_judgments=len(rows),
        n_comparisons=n_comparisons,
        n_judged_comparisons=agreement.n_items,
        n_raters=len(per_rater),
        n_gold_judgments=sum(1 for row in rows if row.gold_choice),
        agreement=agreement,
        by_round=by_round,
        kappas=_kappas(rows, names, top=top_kappa_pairs, min_common=kappa_min_common),
        dawid_skene=None
        if ds is None
        else DawidSkeneSummary(
            classes=tuple(str(c) for c in ds.classes),
            priors={str(c): p for c, p in ds.priors.items()},
            iterations=ds.iterations,
            converged=ds.converged,
        ),
        raters=tuple(raters),
        overall=quality.campaign_stats(_record(row) for row in rows),
        critique=_critique_experiment(campaign, rows, n_resamples=n_resamples, seed=seed),
        critique_precision=_critique_precision(judgments),
        n_resamples=n_resamples,
        seed=seed,
    )


def judgment_weights(*, campaign: Campaign) -> dict[int, float]:
    """Each rater's Dawid-Skene ``judgment_weight`` in [0, 1], by rater id, over all of the
    campaign's judgments: what the export writes as ``weight`` on every line of that rater.

    One query (comparison, rater, choice per judgment) and O(judgments) memory while the EM
    runs, released before the export streams; the export itself stays flat. A rater missing
    from the answer (their first judgment arrived after this ran) has, for Dawid-Skene, no
    evidence: a uniform confusion matrix, whose weight is 0."""
    ratings = list(
        Judgment.objects.filter(campaign=campaign)
        .order_by("id")
        .values_list("comparison_id", "rater_id", "choice")
        .iterator(chunk_size=10_000)
    )
    ds = _dawid_skene(campaign, ratings)
    if ds is None:
        return {}
    return {cast(int, r): quality.judgment_weight(ds, r) for r in ds.reliability}
