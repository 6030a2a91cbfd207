"""Gold items end to end: generating them, mixing them into queues at the campaign's rate,
keeping them indistinguishable, screening new raters on them, and the admin page and API."""

from __future__ import annotations

import json
import random

import pytest
from django.test import Client
from rest_framework.test import APIClient

from annotation.exceptions import InvalidJudgment, ScreeningFailed
from annotation.models import (
    Comparison,
    Completion,
    Judgment,
    RaterScreening,
    Role,
    ScreeningStatus,
    Slot,
    SlotStatus,
    SourceKind,
)
from annotation.services.campaigns import campaign_update
from annotation.services.gold import comparison_set_gold, gold_generate
from annotation.services.items import PairSpec, comparisons_create
from annotation.services.judgments import judgment_submit, slot_lease_next
from annotation.services.tokens import token_issue
from tests.factories import (
    CampaignFactory,
    CompletionFactory,
    MembershipFactory,
    PromptFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

ANSWER = (
    "Put the eggs in a pan and cover them with cold water by about an inch. Bring the water "
    "to a boil over medium heat. Turn off the heat, cover the pan and leave the eggs for ten "
    "minutes. Move them to a bowl of ice water before you peel them."
)


def _campaign(*, prompts: int = 4, **fields):
    """A campaign with ``prompts`` prompts, two long answers each and their comparisons."""
    campaign = CampaignFactory(**fields)
    specs = []
    for i in range(prompts):
        prompt = PromptFactory(
            campaign=campaign, messages=[{"role": "user", "content": f"How do I boil eggs {i}?"}]
        )
        x = CompletionFactory(prompt=prompt, text=ANSWER)
        y = CompletionFactory(prompt=prompt, text=ANSWER.replace("ten", "twelve"))
        specs.append(PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk))
    comparisons_create(campaign=campaign, pairs=specs)
    return campaign


def _rater(campaign):
    rater = UserFactory()
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    return rater


# -- generating ----------------------------------------------------------------------------------


def test_generated_gold_pits_each_original_against_a_corrupted_copy_that_must_lose():
    campaign = _campaign(prompts=4, gold_overlap=7)
    report = gold_generate(campaign=campaign, count=3, kinds=["truncate", "refusal"], seed=1)
    assert report.created == 3
    assert sum(report.by_kind.values()) == 3
    assert set(report.by_kind) <= {"truncate", "refusal"}
    gold = list(Comparison.objects.filter(campaign=campaign).exclude(gold_choice=""))
    assert len(gold) == 3
    for comparison in gold:
        original, copy = comparison.completion_a, comparison.completion_b
        assert comparison.gold_choice == "a"  # the original is canonical A and must win
        assert copy.source.kind == SourceKind.GOLD
        assert copy.prompt_id == original.prompt_id
        assert copy.text != original.text
        assert comparison.gold_kind in {"truncate", "refusal"}
        assert comparison.gold_note
        assert comparison.judgments_wanted == 7
        slots = Slot.objects.filter(comparison=comparison)
        assert slots.count() == 7
        assert all(slot.gold for slot in slots)
    # Ordinary comparisons keep the campaign's overlap and stay out of the gold queue.
    assert not Slot.objects.filter(comparison__gold_choice="", gold=True).exists()


def test_copies_are_never_used_as_originals_and_an_original_is_used_once():
    campaign = _campaign(prompts=2)
    first = gold_generate(campaign=campaign, count=10, kinds=["refusal"], seed=0)
    assert first.created == 4  # two prompts x two answers, each used once
    with pytest.raises(Exception, match="no completions"):
        gold_generate(campaign=campaign, count=1, kinds=["refusal"], seed=0)


def test_a_bad_planted_error_line_is_named_and_nothing_is_written():
    campaign = _campaign(prompts=2)
    before = Completion.objects.count()
    with pytest.raises(InvalidJudgment, match="line 2") as info:
        gold_generate(
            campaign=campaign,
            count=2,
            kinds=["planted_error"],
            planted_errors="boil => freeze\n => nothing",
        )
    assert info.value.field == "planted_errors"
    assert Completion.objects.count() == before
    assert not Comparison.objects.exclude(gold_choice="").exists()


def test_planted_substitution_makes_the_copy_say_the_wrong_thing():
    campaign = _campaign(prompts=1)
    report = gold_generate(
        campaign=campaign, count=1, kinds=["planted_error"], planted_errors="cold => hot"
    )
    assert report.created == 1
    copy = Comparison.objects.exclude(gold_choice="").get().completion_b
    assert "with hot water" in copy.text


def test_the_source_filter_limits_the_originals():
    campaign = _campaign(prompts=3)
    good = Completion.objects.filter(prompt__campaign=campaign).first()
    good.source.name = "good-model"
    good.source.save()
    report = gold_generate(
        campaign=campaign, count=5, kinds=["refusal"], source_name="good-model", seed=3
    )
    originals = set(
        Comparison.objects.exclude(gold_choice="").values_list(
            "completion_a__source__name", flat=True
        )
    )
    assert report.created >= 1
    assert originals == {"good-model"}


# -- serving ---------------------------------------------------------------------------------------


def _lease_kinds(campaign, raters, rng):
    kinds = []
    for rater in raters:
        slot = slot_lease_next(rater=rater, campaign=campaign, rng=rng)
        assert slot is not None
        kinds.append(slot.gold)
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="tie")
    return kinds


def test_without_a_gold_fraction_gold_is_never_served():
    campaign = _campaign(prompts=6, gold_fraction=0.0)
    gold_generate(campaign=campaign, count=3, kinds=["refusal"], seed=2)
    raters = [_rater(campaign) for _ in range(6)]
    assert _lease_kinds(campaign, raters, random.Random(0)) == [False] * 6


def test_gold_is_mixed_in_at_the_campaigns_fraction():
    campaign = _campaign(prompts=30, overlap=1, gold_fraction=0.25, gold_overlap=50)
    gold_generate(campaign=campaign, count=20, kinds=["refusal"], seed=2)
    rng = random.Random(7)
    raters = [_rater(campaign) for _ in range(40)]
    kinds = _lease_kinds(campaign, raters, rng)
    # The same draws, replayed: a lease is gold exactly when its draw fell under the fraction.
    assert 5 <= sum(kinds) <= 16  # 40 leases at 25%: 10 expected
    assert 0 < sum(kinds) < len(kinds)


def test_a_gold_card_shows_nothing_an_ordinary_card_does_not():
    campaign = _campaign(prompts=3, gold_fraction=1.0)
    gold_generate(campaign=campaign, count=1, kinds=["truncate"], seed=4)
    rater = _rater(campaign)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=rater).key}")
    gold_card = api.post(f"/api/campaigns/{campaign.slug}/next/").json()
    assert Slot.objects.get(pk=gold_card["slot"]).gold
    api.post(
        f"/api/campaigns/{campaign.slug}/judgments/",
        {"slot": gold_card["slot"], "choice": "tie"},
        format="json",
    )
    campaign_update(campaign=campaign, gold_fraction=0.0)
    plain_card = api.post(f"/api/campaigns/{campaign.slug}/next/").json()
    assert not Slot.objects.get(pk=plain_card["slot"]).gold

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value[:1]]
        return type(value).__name__

    assert shape(gold_card) == shape(plain_card)
    for word in ("gold", "corrupt", "truncat", "refusal"):
        assert word not in json.dumps(gold_card).lower()

    # And the page: nothing in the HTML of a gold card says gold.
    api.post(
        f"/api/campaigns/{campaign.slug}/judgments/",
        {"slot": plain_card["slot"], "choice": "tie"},
        format="json",
    )
    campaign_update(campaign=campaign, gold_fraction=1.0)
    gold_generate(campaign=campaign, count=1, kinds=["truncate"], seed=5)
    browser = Client()
    browser.force_login(rater)
    page = browser.get(f"/rate/{campaign.slug}/")
    held = Slot.objects.get(rater=rater, status=SlotStatus.LEASED)
    assert held.gold
    html = page.content.decode().lower()
    assert "gold" not in html
    assert "corrupt" not in html


# -- screening -------------------------------------------------------------------------------------


def _answer_gold(campaign, rater, *, right: bool):
    slot = slot_lease_next(rater=rater, campaign=campaign)
    assert slot is not None
    assert slot.gold, "screening serves gold only"
    gold = Comparison.objects.get(pk=slot.comparison_id).gold_choice
    judgment_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, choice=gold if right else "both_bad"
    )


def test_screening_serves_gold_first_and_lets_a_good_rater_through():
    campaign = _campaign(prompts=4, screening_items=2, screening_min_accuracy=0.5)
    gold_generate(campaign=campaign, count=3, kinds=["refusal"], seed=1)
    rater = _rater(campaign)
    _answer_gold(campaign, rater, right=True)
    assert not RaterScreening.objects.exists()
    _answer_gold(campaign, rater, right=False)
    result = RaterScreening.objects.get(rater=rater)
    assert (result.status, result.correct, result.total) == (ScreeningStatus.PASSED, 1, 2)
    # Passed: real work now (gold only at the gold fraction, which is 0 here).
    slot = slot_lease_next(rater=rater, campaign=campaign)
    assert slot is not None
    assert not slot.gold


def test_a_rater_who_fails_screening_gets_no_more_work_anywhere_in_the_campaign():
    campaign = _campaign(prompts=4, screening_items=2, screening_min_accuracy=0.8)
    gold_generate(campaign=campaign, count=3, kinds=["refusal"], seed=1)
    rater = _rater(campaign)
    _answer_gold(campaign, rater, right=True)
    _answer_gold(campaign, rater, right=False)
    assert RaterScreening.objects.get(rater=rater).status == ScreeningStatus.FAILED
    with pytest.raises(ScreeningFailed):
        slot_lease_next(rater=rater, campaign=campaign)
    # The API says so with 403, the page with its own message.
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=rater).key}")
    response = api.post(f"/api/campaigns/{campaign.slug}/next/")
    assert response.status_code == 403
    assert "screening" in response.json()["detail"]
    browser = Client()
    browser.force_login(rater)
    page = browser.get(f"/rate/{campaign.slug}/")
    assert b'data-state="screening_failed"' in page.content
    assert Judgment.objects.filter(rater=rater).count() == 2  # kept


def test_screening_ends_on_what_was_answered_when_the_gold_runs_out():
    campaign = _campaign(prompts=3, screening_items=5, screening_min_accuracy=0.5)
    gold_generate(campaign=campaign, count=1, kinds=["refusal"], seed=1)
    rater = _rater(campaign)
    _answer_gold(campaign, rater, right=True)
    slot = slot_lease_next(rater=rater, campaign=campaign)  # no gold left for them
    assert slot is not None
    assert not slot.gold
    result = RaterScreening.objects.get(rater=rater)
    assert (result.status, result.correct, result.total) == (ScreeningStatus.PASSED, 1, 1)


# -- marking and resizing --------------------------------------------------------------------------


def test_marking_a_comparison_gold_moves_it_to_the_gold_queue_with_gold_overlap_slots():
    campaign = _campaign(prompts=2, overlap=2, gold_overlap=5)
    comparison = Comparison.objects.filter(campaign=campaign).first()
    comparison_set_gold(campaign=campaign, comparison_id=comparison.pk, gold_choice="b")
    slots = Slot.objects.filter(comparison=comparison)
    assert slots.count() == 5
    assert all(s.gold for s in slots)
    assert Comparison.objects.get(pk=comparison.pk).gold_choice == "b"
    with pytest.raises(InvalidJudgment):
        comparison_set_gold(campaign=campaign, comparison_id=comparison.pk, gold_choice="left")
    comparison_set_gold(campaign=campaign, comparison_id=comparison.pk, gold_choice="")
    assert not Slot.objects.filter(comparison=comparison, gold=True).exists()


def test_overlap_and_gold_overlap_resize_only_their_own_comparisons():
    campaign = _campaign(prompts=3, overlap=1, gold_overlap=4)
    gold_generate(campaign=campaign, count=2, kinds=["refusal"], seed=0)

    def slot_counts():
        rows = {}
        for c in Comparison.objects.filter(campaign=campaign):
            rows.setdefault(bool(c.gold_choice), set()).add(c.slots.count())
        return rows

    assert slot_counts() == {False: {1}, True: {4}}
    campaign_update(campaign=campaign, overlap=3)
    assert slot_counts() == {False: {3}, True: {4}}
    campaign_update(campaign=campaign, gold_overlap=2)
    assert slot_counts() == {False: {3}, True: {2}}


# -- page and API ----------------------------------------------------------------------------------


def test_the_gold_page_makes_gold_items_and_escapes_prompt_text():
    campaign = _campaign(prompts=2)
    prompt = campaign.prompts.first()
    prompt.messages = [{"role": "user", "content": "<script>alert(1)</script> eggs?"}]
    prompt.save()
    admin = UserFactory()
    MembershipFactory(campaign=campaign, user=admin, role=Role.ADMIN)
    browser = Client()
    browser.force_login(admin)
    url = f"/campaigns/{campaign.slug}/gold/"
    assert browser.get(url).status_code == 200
    response = browser.post(url, {"count": 4, "kinds": ["refusal"], "seed": 1}, follow=True)
    assert response.status_code == 200
    assert b"Made 4 gold items" in response.content
    assert b"<script>alert(1)</script>" not in response.content
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in response.content
    bad = browser.post(url, {"count": 1, "kinds": ["planted_error"], "planted_errors": "x =>"})
    assert bad.status_code == 400
    assert b"line 1" in bad.content


def test_gold_api_generates_for_admins_and_refuses_raters():
    campaign = _campaign(prompts=2)
    admin, rater = UserFactory(), _rater(campaign)
    MembershipFactory(campaign=campaign, user=admin, role=Role.ADMIN)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=admin).key}")
    response = api.post(
        f"/api/campaigns/{campaign.slug}/gold/", {"count": 2, "kinds": ["refusal"]}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["created"] == 2
    assert response.json()["by_kind"] == {"refusal": 2}
    bad = api.post(f"/api/campaigns/{campaign.slug}/gold/", {"count": 0}, format="json")
    assert bad.status_code == 400
    assert "count" in bad.json()
    comparison = Comparison.objects.filter(campaign=campaign, gold_choice="").first()
    marked = api.post(
        f"/api/campaigns/{campaign.slug}/comparisons/{comparison.pk}/gold/",
        {"gold_choice": "a"},
        format="json",
    )
    assert marked.status_code == 200
    assert marked.json()["gold_choice"] == "a"
    as_rater = APIClient()
    as_rater.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=rater).key}")
    refused = as_rater.post(f"/api/campaigns/{campaign.slug}/gold/", {"count": 1}, format="json")
    assert refused.status_code == 403


# -- critique verdicts -----------------------------------------------------------------------------


def _critiqued_campaign(*, overlap: int = 1):
    from annotation.models import CritiqueMode
    from annotation.services.items import critique_create

    campaign = _campaign(prompts=2, critique_mode=CritiqueMode.ALWAYS, overlap=overlap)
    for comparison in Comparison.objects.filter(campaign=campaign):
        critique_create(
            completion=comparison.completion_a, critic="critic-1", text="Misses a step."
        )
    return campaign


def test_verdicts_on_shown_critiques_are_stored_with_the_judgment():
    from annotation.models import CritiqueVerdict

    campaign = _critiqued_campaign()
    rater = _rater(campaign)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=rater).key}")
    card = api.post(f"/api/campaigns/{campaign.slug}/next/").json()
    critique_ids = [c["id"] for side in ("left", "right") for c in card[side]["critiques"]]
    assert len(critique_ids) == 1
    body = {
        "slot": card["slot"],
        "choice": "left",
        "critique_verdicts": {str(critique_ids[0]): False},
    }
    response = api.post(f"/api/campaigns/{campaign.slug}/judgments/", body, format="json")
    assert response.status_code == 201, response.content
    verdict = CritiqueVerdict.objects.get()
    assert (verdict.critique_id, verdict.valid) == (critique_ids[0], False)
    assert verdict.judgment.slot_id == card["slot"]
    # A replay stores nothing more.
    again = api.post(f"/api/campaigns/{campaign.slug}/judgments/", body, format="json")
    assert again.status_code == 200
    assert CritiqueVerdict.objects.count() == 1


def test_a_verdict_on_a_critique_not_shown_is_refused_and_nothing_is_stored():
    from annotation.models import Critique

    campaign = _critiqued_campaign()
    rater = _rater(campaign)
    slot = slot_lease_next(rater=rater, campaign=campaign)
    other = Critique.objects.exclude(
        completion_id__in=[
            Comparison.objects.get(pk=slot.comparison_id).completion_a_id,
            Comparison.objects.get(pk=slot.comparison_id).completion_b_id,
        ]
    ).first()
    with pytest.raises(InvalidJudgment) as info:
        judgment_submit(
            rater=rater,
            campaign=campaign,
            slot_id=slot.pk,
            choice="a",
            critique_verdicts={other.pk: True},
        )
    assert info.value.field == "critique_verdicts"
    assert not Judgment.objects.exists()


def test_the_rater_page_posts_critique_verdicts():
    from annotation.models import CritiqueVerdict

    campaign = _critiqued_campaign()
    rater = _rater(campaign)
    browser = Client()
    browser.force_login(rater)
    page = browser.get(f"/rate/{campaign.slug}/").content.decode()
    slot = Slot.objects.get(rater=rater, status=SlotStatus.LEASED)
    critique = Comparison.objects.get(pk=slot.comparison_id).completion_a.critiques.get()
    assert f'name="critique-{critique.pk}"' in page
    from annotation.views.rater import lease_token

    response = browser.post(
        f"/rate/{campaign.slug}/submit/",
        {
            "slot_id": slot.pk,
            "lease": lease_token(slot),
            "choice": "left",
            f"critique-{critique.pk}": "valid",
        },
    )
    assert response.status_code in (200, 303)
    assert CritiqueVerdict.objects.get().valid is True


def test_the_quality_report_gives_each_critics_precision_from_the_verdicts():
    from annotation.reports import campaign_quality_report

    campaign = _critiqued_campaign(overlap=2)
    for valid in (True, False):
        rater = _rater(campaign)
        for _ in range(2):
            slot = slot_lease_next(rater=rater, campaign=campaign)
            critique = Comparison.objects.get(pk=slot.comparison_id).completion_a.critiques.get()
            judgment_submit(
                rater=rater,
                campaign=campaign,
                slot_id=slot.pk,
                choice="a",
                critique_verdicts={critique.pk: valid},
            )
    report = campaign_quality_report(campaign=campaign, n_resamples=50)
    (row,) = report.critique_precision
    assert (row.critic, row.verdicts, row.valid, row.precision) == ("critic-1", 4, 2, 0.5)
    admin = UserFactory()
    MembershipFactory(campaign=campaign, user=admin, role=Role.ADMIN)
    browser = Client()
    browser.force_login(admin)
    page = browser.get(f"/campaigns/{campaign.slug}/quality/").content.decode()
    assert "Critique precision" in page
    assert "50%" in page


def test_the_critique_arms_report_accuracy_on_planted_errors_separately():
    from annotation.models import CritiqueMode
    from annotation.reports import _critique_experiment, _Row

    campaign = CampaignFactory(critique_mode=CritiqueMode.EXPERIMENT)

    def row(item, shown, right, kind):
        return _Row(
            item,
            item,
            "a" if right else "b",
            None,
            True,
            shown,
            1000,
            "a",
            kind,
            10,
            12,
            None,
            None,
        )

    rows = [
        # Shown a critique: 3 of 4 planted errors caught; the truncation gold item missed.
        *(row(i, True, i != 3, "planted_error") for i in range(4)),
        row(10, True, False, "truncate"),
        # Hidden: 1 of 4 planted errors; the truncation gold item right.
        *(row(20 + i, False, i == 0, "planted_error") for i in range(4)),
        row(30, False, True, "truncate"),
    ]
    report = _critique_experiment(campaign, rows, n_resamples=200, seed=0)
    assert (report.shown.planted_n, report.shown.planted_accuracy) == (4, 0.75)
    assert (report.hidden.planted_n, report.hidden.planted_accuracy) == (4, 0.25)
    assert report.shown.gold_accuracy == 3 / 5
    assert report.planted_uplift.difference == pytest.approx(0.5)
    assert report.planted_uplift.low <= 0.5 <= report.planted_uplift.high


def test_progress_counts_real_work_only():
    from annotation.selectors import campaign_progress, rater_remaining_count

    campaign = _campaign(prompts=3, overlap=2, gold_overlap=5)
    rater = _rater(campaign)
    before = campaign_progress(campaign=campaign, with_raters=False)
    remaining_before = rater_remaining_count(rater=rater, campaign=campaign)
    gold_generate(campaign=campaign, count=2, kinds=["refusal"], seed=0)
    after = campaign_progress(campaign=campaign, with_raters=False)
    assert (after.comparisons, after.slots, after.open) == (3, 6, 6)
    assert (before.comparisons, before.slots, before.open) == (3, 6, 6)
    assert rater_remaining_count(rater=rater, campaign=campaign) == remaining_before


def test_agreement_is_reported_per_loop_round():
    from annotation.reports import campaign_quality_report

    campaign = _campaign(prompts=4, overlap=2)
    # Round 1: the policy's candidates for two prompts; the other two stay imported (round 0).
    for comparison in Comparison.objects.filter(campaign=campaign).order_by("id")[:2]:
        Completion.objects.filter(pk=comparison.completion_b_id).update(round_number=1)
    round_one = set(
        Comparison.objects.filter(completion_b__round_number=1).values_list("id", flat=True)
    )
    first, second = _rater(campaign), _rater(campaign)
    for rater, agree_in_round_one in ((first, True), (second, False)):
        for _ in range(4):
            slot = slot_lease_next(rater=rater, campaign=campaign)
            in_round_one = slot.comparison_id in round_one
            # Both raters answer "a" on imported comparisons; on round 1 they disagree.
            choice = "a" if (not in_round_one or agree_in_round_one) else "b"
            judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice=choice)
    report = campaign_quality_report(campaign=campaign, n_resamples=50)
    by_round = {r.round_number: r.agreement for r in report.by_round}
    assert set(by_round) == {0, 1}
    assert (by_round[0].n_multi_rated, by_round[0].raw) == (2, 1.0)
    assert (by_round[1].n_multi_rated, by_round[1].raw) == (2, 0.0)
    assert report.agreement.raw == 0.5
    admin = UserFactory()
    MembershipFactory(campaign=campaign, user=admin, role=Role.ADMIN)
    browser = Client()
    browser.force_login(admin)
    assert b"By round" in browser.get(f"/campaigns/{campaign.slug}/quality/").content
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=admin).key}")
    rounds = api.get(f"/api/campaigns/{campaign.slug}/quality/").json()["by_round"]
    assert [(r["round_number"], r["agreement"]["raw"]) for r in rounds] == [(0, 1.0), (1, 0.0)]


def test_a_campaign_set_share_of_comparisons_gets_several_raters():
    campaign = CampaignFactory(overlap=1, agreement_fraction=0.25, agreement_overlap=3)
    specs = []
    for _ in range(200):
        prompt = PromptFactory(campaign=campaign)
        x, y = CompletionFactory(prompt=prompt), CompletionFactory(prompt=prompt)
        specs.append(PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk))
    comparisons_create(campaign=campaign, pairs=specs)
    shared = Comparison.objects.filter(campaign=campaign, agreement_item=True)
    assert 30 <= shared.count() <= 70  # 25% of 200: 50 expected
    for comparison in Comparison.objects.filter(campaign=campaign):
        wanted = 3 if comparison.agreement_item else 1
        assert comparison.judgments_wanted == wanted
        assert comparison.slots.count() == wanted
    # The share is drawn per pair, reproducibly: rebuilding skips, and the flag is stable.
    before = set(shared.values_list("id", flat=True))
    comparisons_create(campaign=campaign, pairs=specs)
    assert set(shared.values_list("id", flat=True)) == before
    # Overlap changes leave the agreement share alone, and agreement_overlap resizes only it.
    campaign_update(campaign=campaign, overlap=2)
    assert {c.slots.count() for c in shared} == {3}
    campaign_update(campaign=campaign, agreement_overlap=4)
    assert {c.slots.count() for c in shared} == {4}
    ordinary = Comparison.objects.filter(campaign=campaign, agreement_item=False)
    assert {c.slots.count() for c in ordinary} == {2}
