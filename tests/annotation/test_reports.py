"""The campaign quality report, read from real judgments: figures worked out by hand for small
hand-made campaigns, Dawid-Skene telling a spammer from careful raters, the critique
experiment's arms, the created-at window, and a query count that does not grow with the
campaign.

Judgments go through ``judgment_submit`` on a slot leased to the rater (``judge`` below sets
the lease directly, so a test chooses the comparison, the sides and the critique arm)."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from annotation.models import Campaign, Comparison, CritiqueMode, Slot, SlotStatus
from annotation.reports import campaign_quality_report, judgment_weights
from annotation.services.items import PairSpec, comparisons_create
from annotation.services.judgments import judgment_submit
from tests.factories import CampaignFactory, CompletionFactory, PromptFactory, UserFactory

pytestmark = pytest.mark.django_db


def build(
    *,
    n: int,
    overlap: int = 2,
    gold: dict[int, str] | None = None,
    lengths: dict[int, tuple[int, int]] | None = None,
    **fields: object,
) -> tuple[Campaign, list[Comparison]]:
    """A campaign with ``n`` comparisons in creation order; ``gold[i]`` is comparison i's gold
    answer, ``lengths[i]`` the lengths of its A and B texts (A is created first, so it is A)."""
    gold, lengths = gold or {}, lengths or {}
    campaign = CampaignFactory(overlap=overlap, **fields)
    specs = []
    for i in range(n):
        prompt = PromptFactory(campaign=campaign)
        a_len, b_len = lengths.get(i, (12, 12))
        x = CompletionFactory(prompt=prompt, text="x" * a_len)
        y = CompletionFactory(prompt=prompt, text="y" * b_len)
        specs.append(
            PairSpec(
                prompt_id=prompt.pk,
                completion_x=x.pk,
                completion_y=y.pk,
                gold_choice=gold.get(i, ""),
            )
        )
    comparisons_create(campaign=campaign, pairs=specs)
    return campaign, list(Comparison.objects.filter(campaign=campaign).order_by("id"))


def judge(
    rater: object,
    comparison: Comparison,
    choice: str,
    *,
    left_is_a: bool = True,
    critique_shown: bool = False,
    decision_ms: int | None = 5000,
    strength: int | None = None,
) -> None:
    """Lease a free slot of ``comparison`` to ``rater`` with the given layout and arm, and
    submit ``choice`` through the service."""
    now = timezone.now()
    slot = (
        Slot.objects.filter(comparison=comparison, status=SlotStatus.OPEN).order_by("index").first()
    )
    assert slot is not None, "no free slot left on this comparison"
    Slot.objects.filter(pk=slot.pk).update(
        status=SlotStatus.LEASED,
        rater=rater,
        leased_at=now,
        lease_expires_at=now + timedelta(minutes=10),
        left_is_a=left_is_a,
        critique_shown=critique_shown,
    )
    judgment_submit(
        rater=rater,
        campaign=comparison.campaign,
        slot_id=slot.pk,
        choice=choice,
        strength=strength,
        decision_ms=decision_ms,
    )


def rater_named(report, user) -> object:
    return next(r for r in report.raters if r.rater_id == user.pk)


# -- agreement ----------------------------------------------------------------------------------


def test_two_raters_agreeing_on_three_of_four_comparisons_have_raw_agreement_three_quarters():
    campaign, comparisons = build(n=5)
    first, second = UserFactory(), UserFactory()
    for comparison, a, b in zip(
        comparisons, ["a", "a", "b", "tie"], ["a", "a", "b", "b"], strict=False
    ):
        judge(first, comparison, a)
        judge(second, comparison, b)
    judge(first, comparisons[4], "b")  # rated once: no pair, so no agreement to measure

    report = campaign_quality_report(campaign=campaign, n_resamples=200)

    assert report.n_judgments == 9
    assert report.n_raters == 2
    assert report.n_comparisons == 5
    assert report.n_judged_comparisons == 5
    assert report.agreement.n_multi_rated == 4
    assert report.agreement.raw == pytest.approx(0.75)
    # Coincidences: o_aa = 4, o_bb = 2, o_tie,b = o_b,tie = 1; n_a = 4, n_b = 3, n_tie = 1.
    # alpha = 1 - (8 - 1) * 2 / (8^2 - 16 - 9 - 1) = 1 - 14/38 = 12/19.
    assert report.agreement.alpha_nominal == pytest.approx(12 / 19)
    low, high = report.agreement.raw_ci
    assert 0.0 <= low <= 0.75 <= high <= 1.0


def test_cohens_kappa_of_a_rater_pair_with_twelve_comparisons_in_common():
    campaign, comparisons = build(n=12)
    first, second = UserFactory(username="kappa-first"), UserFactory(username="kappa-second")
    for i, comparison in enumerate(comparisons):
        judge(first, comparison, "a" if i < 6 else "b")
        judge(second, comparison, "a" if i < 5 else "b")

    report = campaign_quality_report(campaign=campaign, n_resamples=50)

    # p_o = 11/12; p_e = (6 * 5 + 6 * 7) / 144 = 1/2; kappa = (11/12 - 1/2) / (1/2) = 5/6.
    [pair] = report.kappas
    assert pair.n == 12
    assert pair.kappa == pytest.approx(5 / 6)
    assert {pair.username, pair.other_username} == {"kappa-first", "kappa-second"}


def test_rater_pairs_with_fewer_common_comparisons_than_the_minimum_get_no_kappa():
    campaign, comparisons = build(n=4)
    first, second = UserFactory(), UserFactory()
    for comparison in comparisons:
        judge(first, comparison, "a")
        judge(second, comparison, "a")
    assert campaign_quality_report(campaign=campaign, n_resamples=50).kappas == ()
    report = campaign_quality_report(campaign=campaign, n_resamples=50, kappa_min_common=4)
    assert [p.n for p in report.kappas] == [4]


# -- per-rater figures and flags ----------------------------------------------------------------


def truth(i: int) -> str:
    return "a" if i % 2 == 0 else "b"


def test_an_always_left_rater_is_flagged_for_position_and_a_careful_one_is_not():
    # Two careful raters, so Dawid-Skene can tell which of the two behaviours is the truth.
    campaign, comparisons = build(n=40, overlap=3)
    careful, other_careful, lefty = UserFactory(), UserFactory(), UserFactory()
    for i, comparison in enumerate(comparisons):
        left_is_a = i % 4 < 2  # the careful raters' right answer is left half the time
        judge(careful, comparison, truth(i), left_is_a=left_is_a)
        judge(other_careful, comparison, truth(i), left_is_a=not left_is_a)
        judge(lefty, comparison, "a" if left_is_a else "b", left_is_a=left_is_a)

    report = campaign_quality_report(campaign=campaign, n_resamples=50)

    biased, honest = rater_named(report, lefty), rater_named(report, careful)
    assert biased.stats.left_rate == 1.0
    assert biased.stats.decisive_n == 40
    assert biased.suspicious
    assert "chose the left side in 100% of 40 decisive judgments (p < 0.001)" in biased.flags
    assert honest.stats.left_rate == 0.5
    assert honest.flags == ()
    assert report.n_suspicious == 1
    assert report.overall.left_rate == pytest.approx(80 / 120)  # 20 + 20 + 40 of 120


def test_gold_accuracy_counts_only_gold_comparisons():
    campaign, comparisons = build(n=6, overlap=1, gold={0: "a", 1: "b"})
    rater = UserFactory()
    judge(rater, comparisons[0], "a")  # right
    judge(rater, comparisons[1], "a")  # wrong
    for comparison in comparisons[2:]:
        judge(rater, comparison, "b")

    report = campaign_quality_report(campaign=campaign, n_resamples=50)

    stats = rater_named(report, rater).stats
    assert stats.n == 6
    assert stats.gold_n == 2
    assert stats.gold_accuracy == 0.5
    assert report.n_gold_judgments == 2
    assert report.overall.gold_accuracy == 0.5


def test_longer_output_rate_compares_text_lengths_of_decisive_judgments_on_unequal_pairs():
    lengths = {0: (100, 10), 1: (100, 10), 2: (10, 100), 3: (10, 100), 4: (50, 50), 5: (90, 9)}
    campaign, comparisons = build(n=6, overlap=1, lengths=lengths)
    rater = UserFactory()
    for comparison, choice in zip(comparisons, ["a", "a", "b", "a", "a", "tie"], strict=True):
        judge(rater, comparison, choice)

    stats = rater_named(campaign_quality_report(campaign=campaign, n_resamples=50), rater).stats

    # Longer chosen on 0, 1, 2; shorter on 3; 4 is equally long; 5 is a tie (not decisive).
    assert stats.longer_n == 4
    assert stats.longer_rate == 0.75
    assert stats.tie_rate == pytest.approx(1 / 6)


def test_median_decision_time_and_tie_and_both_bad_rates():
    campaign, comparisons = build(n=4, overlap=1)
    rater = UserFactory()
    for comparison, choice, ms in zip(
        comparisons, ["a", "tie", "both_bad", "both_bad"], [1000, 2000, 4000, 9000], strict=True
    ):
        judge(rater, comparison, choice, decision_ms=ms)
    stats = rater_named(campaign_quality_report(campaign=campaign, n_resamples=50), rater).stats
    assert stats.median_decision_ms == 3000
    assert stats.tie_rate == 0.25
    assert stats.both_bad_rate == 0.5


# -- Dawid-Skene --------------------------------------------------------------------------------


def simulate(*, n: int = 30, seed: int = 1) -> tuple[Campaign, list, object]:
    """Two careful raters who always give the right answer and a spammer who clicks at random,
    on the same ``n`` comparisons."""
    campaign, comparisons = build(n=n, overlap=3)
    careful = [UserFactory(), UserFactory()]
    spammer = UserFactory()
    rng = random.Random(seed)
    for i, comparison in enumerate(comparisons):
        for rater in careful:
            judge(rater, comparison, truth(i), left_is_a=rng.random() < 0.5)
        judge(spammer, comparison, rng.choice(["a", "b", "tie", "both_bad"]))
    return campaign, careful, spammer


def test_dawid_skene_weights_a_spammer_below_careful_raters():
    campaign, careful, spammer = simulate()

    weights = judgment_weights(campaign=campaign)
    report = campaign_quality_report(campaign=campaign, n_resamples=50)

    assert set(weights) == {careful[0].pk, careful[1].pk, spammer.pk}
    assert all(0.0 <= w <= 1.0 for w in weights.values())
    # Careful raters stay below 1: Laplace smoothing over four classes on 30 comparisons.
    assert min(weights[c.pk] for c in careful) > 0.6
    assert weights[spammer.pk] < 0.2
    # The report shows the same weights the export writes, and the spammer's flag says why.
    assert rater_named(report, spammer).weight == pytest.approx(weights[spammer.pk])
    assert any("Dawid-Skene weight" in flag for flag in rater_named(report, spammer).flags)
    assert report.dawid_skene is not None
    assert report.dawid_skene.classes == ("a", "b", "tie", "both_bad")
    confusion = rater_named(report, careful[0]).confusion
    assert list(confusion) == ["a", "b", "tie", "both_bad"]
    assert confusion["a"]["a"] > 0.8
    assert sum(confusion["b"].values()) == pytest.approx(1.0)
    assert rater_named(report, careful[0]).reliability > rater_named(report, spammer).reliability


def test_dawid_skene_uses_only_the_classes_the_campaign_allows():
    campaign, comparisons = build(n=4, allow_tie=False, allow_both_bad=False)
    first, second = UserFactory(), UserFactory()
    for i, comparison in enumerate(comparisons):
        judge(first, comparison, truth(i))
        judge(second, comparison, truth(i))
    report = campaign_quality_report(campaign=campaign, n_resamples=50)
    assert report.dawid_skene.classes == ("a", "b")
    assert list(rater_named(report, first).confusion["a"]) == ["a", "b"]


def test_a_campaign_without_judgments_gives_an_empty_report():
    campaign, _ = build(n=2)
    report = campaign_quality_report(campaign=campaign, n_resamples=50)
    assert report.n_judgments == 0
    assert report.raters == ()
    assert report.dawid_skene is None
    assert report.agreement.raw is None
    assert report.critique is None
    assert judgment_weights(campaign=campaign) == {}


# -- the critique experiment --------------------------------------------------------------------


def test_critique_arms_split_judgments_by_whether_the_critique_was_shown():
    campaign, comparisons = build(
        n=4, gold={0: "a", 1: "b", 2: "a", 3: "b"}, critique_mode=CritiqueMode.EXPERIMENT
    )
    first, second = UserFactory(), UserFactory()
    answers = {0: "a", 1: "b", 2: "a", 3: "b"}
    for i, comparison in enumerate(comparisons):
        shown = i < 2
        ms = 3000 if shown else 6000
        judge(first, comparison, answers[i], critique_shown=shown, decision_ms=ms)
        # Without the critique the second rater misses both planted flaws.
        wrong = {"a": "b", "b": "a"}[answers[i]]
        judge(
            second, comparison, answers[i] if shown else wrong, critique_shown=shown, decision_ms=ms
        )

    experiment = campaign_quality_report(campaign=campaign, n_resamples=500).critique

    assert experiment is not None
    shown, hidden = experiment.shown, experiment.hidden
    assert (shown.n, hidden.n) == (4, 4)
    assert (shown.gold_n, shown.gold_accuracy) == (4, 1.0)
    assert (hidden.gold_n, hidden.gold_accuracy) == (4, 0.5)
    assert (shown.median_decision_ms, hidden.median_decision_ms) == (3000, 6000)
    assert (shown.agreement, shown.agreement_items) == (1.0, 2)
    assert (hidden.agreement, hidden.agreement_items) == (0.0, 2)
    gold = experiment.gold_uplift
    assert gold.difference == pytest.approx(0.5)
    assert (gold.n_treated, gold.n_control) == (4, 4)
    assert gold.low <= 0.5 <= gold.high
    assert experiment.time_uplift.difference == pytest.approx(-3000)
    assert experiment.arms == (shown, hidden)


def test_no_critique_section_without_an_experiment_and_with_one_arm_only():
    campaign, comparisons = build(n=2, critique_mode=CritiqueMode.OFF)
    rater = UserFactory()
    for comparison in comparisons:
        judge(rater, comparison, "a")
    assert campaign_quality_report(campaign=campaign, n_resamples=50).critique is None


def test_experiment_with_gold_in_one_arm_only_has_no_gold_uplift():
    campaign, comparisons = build(n=2, gold={0: "a"}, critique_mode=CritiqueMode.EXPERIMENT)
    rater = UserFactory()
    judge(rater, comparisons[0], "a", critique_shown=True)
    judge(rater, comparisons[1], "a", critique_shown=False)
    experiment = campaign_quality_report(campaign=campaign, n_resamples=50).critique
    assert experiment.gold_uplift is None
    assert experiment.time_uplift is not None


# -- window and cost ----------------------------------------------------------------------------


def test_since_and_until_narrow_the_report_to_judgments_made_in_between():
    campaign, comparisons = build(n=4, overlap=1)
    rater = UserFactory()
    judge(rater, comparisons[0], "a")
    judge(rater, comparisons[1], "a")
    middle = timezone.now()
    judge(rater, comparisons[2], "b")
    judge(rater, comparisons[3], "tie")

    later = campaign_quality_report(campaign=campaign, since=middle, n_resamples=50)
    earlier = campaign_quality_report(campaign=campaign, until=middle, n_resamples=50)

    assert later.n_judgments == earlier.n_judgments == 2
    assert rater_named(later, rater).stats.tie_rate == 0.5
    assert rater_named(earlier, rater).stats.tie_rate == 0.0
    assert (later.since, later.until) == (middle, None)


def queries_for_report(campaign: Campaign) -> int:
    with CaptureQueriesContext(connection) as captured:
        campaign_quality_report(campaign=campaign, n_resamples=20)
    return len(captured.captured_queries)


def test_report_query_count_does_not_grow_with_the_number_of_judgments():
    small, _, _ = simulate(n=3)
    large, _, _ = simulate(n=25)
    assert (
        queries_for_report(small) == queries_for_report(large) <= 4
    )  # judgments, comparison count, usernames, critique verdicts


def test_judgment_weights_is_one_query():
    campaign, _, _ = simulate(n=5)
    with CaptureQueriesContext(connection) as captured:
        judgment_weights(campaign=campaign)
    assert len(captured.captured_queries) == 1
