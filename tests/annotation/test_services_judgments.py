"""Leasing and submitting, one request at a time (SQLite and PostgreSQL).

The races are in test_concurrency.py; here each rule of the services is pinned down with a
clock (``now``) and a seeded ``rng`` where the behaviour depends on them.
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from annotation.exceptions import CampaignNotActive, InvalidJudgment, LeaseLost
from annotation.models import (
    CampaignStatus,
    Comparison,
    CritiqueMode,
    Judgment,
    Slot,
    SlotStatus,
)
from annotation.services.items import critique_create
from annotation.services.judgments import (
    MAX_DECISION_MS,
    MAX_RATIONALE_CHARS,
    canonical_to_side,
    judgment_submit,
    lease_queries,
    side_to_canonical,
    slot_lease_next,
    slot_release,
    slots_reclaim_expired,
)
from tests.conftest import make_campaign
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def lease(rater, campaign, **kwargs) -> Slot:
    slot = slot_lease_next(rater=rater, campaign=campaign, **kwargs)
    assert slot is not None
    return slot


# -- leasing ------------------------------------------------------------------------------------


def test_lease_marks_the_slot_leased_to_the_rater_until_the_lease_time():
    campaign = make_campaign(comparisons=2, lease_seconds=300)
    rater = UserFactory()
    now = timezone.now()

    slot = lease(rater, campaign, now=now)

    slot.refresh_from_db()
    assert slot.status == SlotStatus.LEASED
    assert slot.rater_id == rater.pk
    assert slot.leased_at == now
    assert slot.lease_expires_at == now + timedelta(seconds=300)


def test_asking_again_returns_the_held_lease_renewed_with_the_same_layout():
    campaign = make_campaign(comparisons=5, lease_seconds=300)
    rater = UserFactory()
    now = timezone.now()
    first = lease(rater, campaign, now=now)

    again = lease(rater, campaign, now=now + timedelta(seconds=200), rng=random.Random(1))

    assert again.pk == first.pk
    assert again.left_is_a == first.left_is_a
    assert again.critique_shown == first.critique_shown
    again.refresh_from_db()
    assert again.lease_expires_at == now + timedelta(seconds=500)
    assert Slot.objects.filter(rater=rater, status=SlotStatus.LEASED).count() == 1


def test_lease_serves_higher_priority_first():
    campaign = make_campaign(comparisons=3)
    low, high, mid = Comparison.objects.filter(campaign=campaign).order_by("id")
    for comparison, priority in ((low, 0.1), (high, 5.0), (mid, 1.0)):
        Slot.objects.filter(comparison=comparison).update(priority=priority)

    order = []
    for _ in range(3):
        rater = UserFactory()
        order.append(lease(rater, campaign).comparison_id)

    assert order == [high.pk, mid.pk, low.pk]


def test_lease_takes_an_expired_lease_before_an_open_slot():
    campaign = make_campaign(comparisons=2, lease_seconds=60)
    first, second = UserFactory(), UserFactory()
    now = timezone.now()
    taken = lease(first, campaign, now=now)

    reclaimed = lease(second, campaign, now=now + timedelta(seconds=61))

    assert reclaimed.pk == taken.pk
    assert reclaimed.rater_id == second.pk


def test_lease_returns_none_when_the_rater_has_done_everything():
    campaign = make_campaign(comparisons=2, overlap=2)
    rater = UserFactory()
    for _ in range(2):
        slot = lease(rater, campaign)
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")

    assert slot_lease_next(rater=rater, campaign=campaign) is None
    # The other half of the slots is still there for someone else.
    assert lease(UserFactory(), campaign).status == SlotStatus.LEASED


def test_lease_never_offers_a_comparison_the_rater_already_judged():
    campaign = make_campaign(comparisons=1, overlap=3)
    rater = UserFactory()
    slot = lease(rater, campaign)
    judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")

    assert slot_lease_next(rater=rater, campaign=campaign) is None
    # Not even through an expired lease of someone else on it.
    other = UserFactory()
    lease(other, campaign, now=timezone.now())
    later = timezone.now() + timedelta(days=1)
    assert slot_lease_next(rater=rater, campaign=campaign, now=later) is None


def test_skipped_comparisons_are_passed_over_for_a_new_lease_but_a_held_one_stays():
    campaign = make_campaign(comparisons=2, lease_seconds=60)
    first, second = Comparison.objects.filter(campaign=campaign).order_by("id")
    rater = UserFactory()

    slot = lease(rater, campaign, exclude_comparison_ids=[first.pk])
    again = lease(rater, campaign, exclude_comparison_ids=[second.pk])

    assert slot.comparison_id == second.pk
    assert again.pk == slot.pk
    slot_release(rater=rater, campaign=campaign, slot_id=slot.pk)
    later = timezone.now() + timedelta(minutes=5)
    assert (
        slot_lease_next(
            rater=rater, campaign=campaign, now=later, exclude_comparison_ids=[first.pk, second.pk]
        )
        is None
    )


@pytest.mark.parametrize(
    "status", [CampaignStatus.DRAFT, CampaignStatus.PAUSED, CampaignStatus.ARCHIVED]
)
def test_campaigns_that_are_not_active_hand_out_no_leases(status):
    campaign = make_campaign(comparisons=2, status=status)

    with pytest.raises(CampaignNotActive):
        slot_lease_next(rater=UserFactory(), campaign=campaign)
    assert not Slot.objects.filter(campaign=campaign).exclude(status=SlotStatus.OPEN).exists()


def test_a_paused_campaign_still_accepts_the_submit_of_an_earlier_lease():
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = lease(rater, campaign)
    campaign.status = CampaignStatus.PAUSED
    campaign.save()

    assert judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a").created


def test_an_archived_campaign_refuses_submits():
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = lease(rater, campaign)
    campaign.status = CampaignStatus.ARCHIVED
    campaign.save()

    with pytest.raises(CampaignNotActive):
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")
    assert not Judgment.objects.exists()


# -- expiry, reclaim and release ----------------------------------------------------------------


def test_expired_lease_goes_to_another_rater_and_the_late_submit_is_refused():
    campaign = make_campaign(comparisons=1, lease_seconds=60)
    first, second = UserFactory(), UserFactory()
    now = timezone.now()
    slot = lease(first, campaign, now=now)
    later = now + timedelta(seconds=90)

    assert lease(second, campaign, now=later).pk == slot.pk
    with pytest.raises(LeaseLost):
        judgment_submit(rater=first, campaign=campaign, slot_id=slot.pk, choice="a", now=later)

    result = judgment_submit(rater=second, campaign=campaign, slot_id=slot.pk, choice="b")
    assert result.created
    assert result.judgment.rater_id == second.pk
    assert Judgment.objects.count() == 1


def test_a_live_lease_is_not_taken_by_another_rater():
    campaign = make_campaign(comparisons=1, lease_seconds=60)
    now = timezone.now()
    lease(UserFactory(), campaign, now=now)

    assert (
        slot_lease_next(rater=UserFactory(), campaign=campaign, now=now + timedelta(seconds=59))
        is None
    )


def test_late_submit_is_accepted_while_nobody_took_the_slot():
    campaign = make_campaign(comparisons=1, lease_seconds=60)
    rater = UserFactory()
    now = timezone.now()
    slot = lease(rater, campaign, now=now)

    result = judgment_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", now=now + timedelta(hours=2)
    )

    assert result.created
    slot.refresh_from_db()
    assert slot.status == SlotStatus.FILLED


def test_reclaim_returns_only_expired_leases_to_the_pool():
    campaign = make_campaign(comparisons=3, lease_seconds=60)
    now = timezone.now()
    live = lease(UserFactory(), campaign, now=now)
    old = lease(UserFactory(), campaign, now=now - timedelta(seconds=120))

    assert slots_reclaim_expired(campaign=campaign, now=now) == 1

    old.refresh_from_db()
    live.refresh_from_db()
    assert (old.status, old.rater_id, old.lease_expires_at) == (SlotStatus.OPEN, None, None)
    assert live.status == SlotStatus.LEASED
    assert slots_reclaim_expired(campaign=campaign, now=now) == 0


def test_late_submit_after_reclaim_is_refused():
    campaign = make_campaign(comparisons=1, lease_seconds=60)
    rater = UserFactory()
    now = timezone.now()
    slot = lease(rater, campaign, now=now)
    slots_reclaim_expired(now=now + timedelta(seconds=61))

    with pytest.raises(LeaseLost):
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")


def test_release_puts_the_slot_back_for_the_next_rater():
    campaign = make_campaign(comparisons=1)
    rater, other = UserFactory(), UserFactory()
    slot = lease(rater, campaign)

    assert slot_release(rater=rater, campaign=campaign, slot_id=slot.pk) is True

    assert lease(other, campaign).pk == slot.pk
    assert slot_release(rater=rater, campaign=campaign, slot_id=slot.pk) is False
    with pytest.raises(LeaseLost):
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")


def test_release_does_not_touch_a_filled_slot():
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = lease(rater, campaign)
    judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")

    assert slot_release(rater=rater, campaign=campaign, slot_id=slot.pk) is False
    slot.refresh_from_db()
    assert slot.status == SlotStatus.FILLED


# -- submitting ---------------------------------------------------------------------------------


def test_submit_records_the_answer_and_what_the_rater_saw():
    campaign = make_campaign(comparisons=1, guidelines_version=4)
    rater = UserFactory()
    slot = lease(rater, campaign, rng=random.Random(3))

    result = judgment_submit(
        rater=rater,
        campaign=campaign,
        slot_id=slot.pk,
        choice="b",
        strength=3,
        aspects={"helpfulness": "b", "harmlessness": "tie"},
        reason_tags=["clearer", "clearer", "safer"],
        rationale="B answers the question.",
        flags=["hallucination"],
        decision_ms=4200,
    )

    judgment = Judgment.objects.get(pk=result.judgment.pk)
    assert result.created
    assert judgment.slot_id == slot.pk
    assert judgment.comparison_id == slot.comparison_id
    assert judgment.campaign_id == campaign.pk
    assert (judgment.choice, judgment.strength) == ("b", 3)
    assert judgment.aspects == {"helpfulness": "b", "harmlessness": "tie"}
    assert judgment.reason_tags == ["clearer", "safer"]
    assert judgment.flags == ["hallucination"]
    assert judgment.left_was_a == slot.left_is_a
    assert judgment.critique_shown == slot.critique_shown
    assert judgment.decision_ms == 4200
    assert judgment.guidelines_version == 4


def test_submit_on_someone_elses_slot_is_refused():
    campaign = make_campaign(comparisons=2)
    owner, intruder = UserFactory(), UserFactory()
    slot = lease(owner, campaign)

    with pytest.raises(LeaseLost):
        judgment_submit(rater=intruder, campaign=campaign, slot_id=slot.pk, choice="a")
    assert not Judgment.objects.exists()


def test_submit_on_an_open_slot_without_a_lease_is_refused():
    campaign = make_campaign(comparisons=1)
    slot = Slot.objects.get(campaign=campaign)

    with pytest.raises(LeaseLost):
        judgment_submit(rater=UserFactory(), campaign=campaign, slot_id=slot.pk, choice="a")


def test_submit_through_another_campaign_is_refused():
    campaign, other = make_campaign(comparisons=1), make_campaign(comparisons=1)
    rater = UserFactory()
    slot = lease(rater, campaign)

    with pytest.raises(LeaseLost):
        judgment_submit(rater=rater, campaign=other, slot_id=slot.pk, choice="a")


def test_double_click_returns_the_stored_judgment_unchanged():
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = lease(rater, campaign)
    first = judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")

    second = judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="b")

    assert (first.created, second.created) == (True, False)
    assert second.judgment.pk == first.judgment.pk
    assert second.judgment.choice == "a"
    assert Judgment.objects.count() == 1


def test_repeated_idempotency_key_returns_the_same_judgment():
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = lease(rater, campaign)
    kwargs = {"rater": rater, "campaign": campaign, "slot_id": slot.pk, "choice": "tie"}
    first = judgment_submit(**kwargs, idempotency_key="abc")

    again = judgment_submit(**kwargs, idempotency_key="abc")

    assert again.judgment.pk == first.judgment.pk
    assert not again.created
    assert Judgment.objects.get().idempotency_key == "abc"


def test_an_idempotency_key_used_on_another_slot_is_refused():
    campaign = make_campaign(comparisons=2)
    rater = UserFactory()
    slot = lease(rater, campaign)
    judgment_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", idempotency_key="k"
    )
    second = lease(rater, campaign)

    with pytest.raises(InvalidJudgment) as error:
        judgment_submit(
            rater=rater, campaign=campaign, slot_id=second.pk, choice="a", idempotency_key="k"
        )

    assert error.value.field == "idempotency_key"
    second.refresh_from_db()
    assert second.status == SlotStatus.LEASED
    assert Judgment.objects.count() == 1


def test_the_same_idempotency_key_of_two_raters_does_not_collide():
    campaign = make_campaign(comparisons=1, overlap=2)
    first, second = UserFactory(), UserFactory()
    for rater in (first, second):
        slot = lease(rater, campaign)
        result = judgment_submit(
            rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", idempotency_key="same"
        )
        assert result.created
    assert Judgment.objects.count() == 2


VALIDATION_CASES = [
    # (campaign fields, submit kwargs, field named)
    ({}, {"choice": "c"}, "choice"),
    ({}, {"choice": "A"}, "choice"),
    ({"allow_tie": False}, {"choice": "tie"}, "choice"),
    ({"allow_both_bad": False}, {"choice": "both_bad"}, "choice"),
    ({}, {"choice": "a", "strength": "2"}, "strength"),
    ({}, {"choice": "a", "strength": True}, "strength"),
    ({"strength_scale": 0}, {"choice": "a", "strength": 1}, "strength"),
    ({"strength_scale": 3}, {"choice": "a", "strength": 0}, "strength"),
    ({"strength_scale": 3}, {"choice": "a", "strength": 4}, "strength"),
    ({}, {"choice": "tie", "strength": 1}, "strength"),
    ({}, {"choice": "both_bad", "strength": 2}, "strength"),
    ({}, {"choice": "a", "aspects": ["helpfulness"]}, "aspects"),
    ({}, {"choice": "a", "aspects": {"speed": "a"}}, "aspects"),
    ({}, {"choice": "a", "aspects": {"helpfulness": "left"}}, "aspects"),
    ({}, {"choice": "a", "reason_tags": "clearer"}, "reason_tags"),
    ({}, {"choice": "a", "reason_tags": ["made up"]}, "reason_tags"),
    ({}, {"choice": "a", "flags": [1]}, "flags"),
    ({}, {"choice": "a", "flags": ["boring"]}, "flags"),
    ({}, {"choice": "a", "rationale": 5}, "rationale"),
    ({}, {"choice": "a", "rationale": "x" * (MAX_RATIONALE_CHARS + 1)}, "rationale"),
    ({}, {"choice": "a", "rationale": "nul \x00 byte"}, "rationale"),
    ({"require_rationale": True}, {"choice": "a", "rationale": "   "}, "rationale"),
    ({}, {"choice": "a", "decision_ms": -1}, "decision_ms"),
    ({}, {"choice": "a", "decision_ms": MAX_DECISION_MS + 1}, "decision_ms"),
    ({}, {"choice": "a", "decision_ms": 1.5}, "decision_ms"),
    ({}, {"choice": "a", "idempotency_key": "k" * 65}, "idempotency_key"),
]


@pytest.mark.parametrize(("campaign_fields", "kwargs", "field"), VALIDATION_CASES)
def test_invalid_answers_are_refused_naming_the_field(campaign_fields, kwargs, field):
    campaign = make_campaign(comparisons=1, **campaign_fields)
    rater = UserFactory()
    slot = lease(rater, campaign)

    with pytest.raises(InvalidJudgment) as error:
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, **kwargs)

    assert error.value.field == field
    assert error.value.message
    assert not Judgment.objects.exists()
    slot.refresh_from_db()
    assert slot.status == SlotStatus.LEASED


@pytest.mark.parametrize(
    ("campaign_fields", "kwargs"),
    [
        ({}, {"choice": "tie"}),
        ({}, {"choice": "both_bad"}),
        ({"strength_scale": 5}, {"choice": "b", "strength": 5}),
        ({"strength_scale": 0}, {"choice": "a"}),
        ({"require_rationale": True}, {"choice": "a", "rationale": "because"}),
        ({}, {"choice": "a", "decision_ms": 0, "aspects": {}, "reason_tags": [], "flags": []}),
        ({}, {"choice": "a", "idempotency_key": "k" * 64}),
    ],
)
def test_answers_at_the_edges_of_the_rules_are_accepted(campaign_fields, kwargs):
    campaign = make_campaign(comparisons=1, **campaign_fields)
    rater = UserFactory()
    slot = lease(rater, campaign)

    assert judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, **kwargs).created


# -- left/right and critiques -------------------------------------------------------------------


def _layouts(campaign, *, n: int, rng: random.Random) -> list[tuple[bool, bool]]:
    """(left_is_a, critique_shown) over ``n`` leases of the same comparison (lease, release)."""
    rater = UserFactory()
    seen = []
    for _ in range(n):
        slot = lease(rater, campaign, rng=rng)
        seen.append((slot.left_is_a, slot.critique_shown))
        slot_release(rater=rater, campaign=campaign, slot_id=slot.pk)
    return seen


def test_left_and_right_are_drawn_per_lease_and_both_sides_appear():
    campaign = make_campaign(comparisons=1)

    lefts = [left for left, _ in _layouts(campaign, n=200, rng=random.Random())]

    # Binomial(200, 0.5): outside 60..140 with probability < 1e-8.
    assert 60 <= sum(lefts) <= 140


def test_left_and_right_follow_a_seeded_rng():
    campaign = make_campaign(comparisons=1)

    first = _layouts(campaign, n=30, rng=random.Random(42))
    second = _layouts(campaign, n=30, rng=random.Random(42))

    assert first == second
    assert len(set(first)) > 1


def test_the_side_shown_left_is_recorded_on_the_judgment():
    campaign = make_campaign(comparisons=40, overlap=1)
    rater = UserFactory()
    rng = random.Random(5)
    recorded = []
    for _ in range(40):
        slot = lease(rater, campaign, rng=rng)
        judgment = judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")
        assert judgment.judgment.left_was_a == slot.left_is_a
        recorded.append(judgment.judgment.left_was_a)
    assert set(recorded) == {True, False}


def _with_critique(**fields):
    campaign = make_campaign(comparisons=1, **fields)
    comparison = Comparison.objects.get(campaign=campaign)
    critique_create(completion=comparison.completion_b, critic="critic-1", text="Wrong date.")
    return campaign


def test_critiques_are_never_shown_when_the_mode_is_off():
    campaign = _with_critique(critique_mode=CritiqueMode.OFF)

    assert not any(shown for _, shown in _layouts(campaign, n=20, rng=random.Random(0)))


def test_critiques_are_always_shown_when_the_mode_is_always_and_they_exist():
    campaign = _with_critique(critique_mode=CritiqueMode.ALWAYS)

    assert all(shown for _, shown in _layouts(campaign, n=20, rng=random.Random(0)))


def test_critique_shown_stays_false_when_the_comparison_has_no_critique():
    campaign = make_campaign(comparisons=1, critique_mode=CritiqueMode.ALWAYS)

    assert not any(shown for _, shown in _layouts(campaign, n=10, rng=random.Random(0)))


def test_experiment_mode_shows_critiques_to_the_configured_fraction():
    campaign = _with_critique(critique_mode=CritiqueMode.EXPERIMENT, critique_fraction=0.25)

    shown = [s for _, s in _layouts(campaign, n=200, rng=random.Random(11))]

    # Binomial(200, 0.25) has mean 50 and sd 6.1; 25..75 is four sd either side.
    assert 25 <= sum(shown) <= 75
    assert shown == [s for _, s in _layouts(campaign, n=200, rng=random.Random(11))]


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, False), (1.0, True)])
def test_experiment_mode_at_the_ends_of_the_fraction(fraction, expected):
    campaign = _with_critique(critique_mode=CritiqueMode.EXPERIMENT, critique_fraction=fraction)

    assert {s for _, s in _layouts(campaign, n=20, rng=random.Random(2))} == {expected}


def test_critique_shown_is_recorded_on_the_judgment():
    campaign = _with_critique(critique_mode=CritiqueMode.ALWAYS)
    rater = UserFactory()
    slot = lease(rater, campaign)

    result = judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")

    assert result.judgment.critique_shown is True


# -- query counts -------------------------------------------------------------------------------
# Measured inside the test's transaction, so every atomic block adds a SAVEPOINT and a RELEASE
# (2 queries) that a request outside a transaction pays as BEGIN/COMMIT instead.
#   lease, new slot:     held? + expired queue + open queue + UPDATE            = 4 (+2) = 6
#                        (+1 EXISTS on critiques when the critique mode is not off)
#   lease, held slot:    held? + UPDATE renew                                    = 2 (+2) = 4
#   submit:              SELECT ... FOR UPDATE + INSERT + UPDATE                 = 3 (+2) = 5
#   submit, replay:      SELECT ... FOR UPDATE + SELECT judgment                 = 2 (+2) = 4


def test_lease_query_count_is_constant(django_assert_max_num_queries):
    campaign = make_campaign(comparisons=30, overlap=2)
    rater = UserFactory()
    for _ in range(5):
        slot = lease(rater, campaign)
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")

    with django_assert_max_num_queries(6):
        slot_lease_next(rater=rater, campaign=campaign)
    with django_assert_max_num_queries(4):
        slot_lease_next(rater=rater, campaign=campaign)


def test_lease_with_critiques_adds_one_query(django_assert_max_num_queries):
    campaign = _with_critique(critique_mode=CritiqueMode.ALWAYS)
    rater = UserFactory()

    with django_assert_max_num_queries(7):
        slot_lease_next(rater=rater, campaign=campaign)


def test_submit_query_count(django_assert_max_num_queries):
    campaign = make_campaign(comparisons=3)
    rater = UserFactory()
    slot = lease(rater, campaign)
    kwargs = {"rater": rater, "campaign": campaign, "slot_id": slot.pk, "choice": "a"}

    with django_assert_max_num_queries(5):
        judgment_submit(**kwargs, idempotency_key="q", aspects={"helpfulness": "a"})
    with django_assert_max_num_queries(4):
        judgment_submit(**kwargs, idempotency_key="q")


# -- PostgreSQL: append-only judgments and the leasing plans ------------------------------------


@pytest.mark.postgres
def test_postgres_trigger_rejects_updating_a_judgment():
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = lease(rater, campaign)
    judgment = judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a").judgment

    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        Judgment.objects.filter(pk=judgment.pk).update(choice="b")
    judgment.choice = "b"
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        judgment.save()
    assert Judgment.objects.get(pk=judgment.pk).choice == "a"

    # Removing a whole campaign (and its judgments) stays possible.
    campaign.delete()
    assert not Judgment.objects.exists()


def _explain(query: tuple[str, list]) -> str:
    sql, params = query
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql + " FOR UPDATE SKIP LOCKED", params)
        return "\n".join(row[0] for row in cursor.fetchall())


@pytest.mark.postgres
def test_postgres_leasing_walks_the_partial_indexes_without_sorting():
    """With a few thousand slots (and another campaign beside it), the three candidate queries are
    index scans on the partial queue indexes, read in index order: no Sort node, no
    sequential scan of the slot table."""
    from annotation.models import Completion, Prompt, Source
    from annotation.services.items import comparisons_build

    campaign = make_campaign(comparisons=0, overlap=2, lease_seconds=60)
    make_campaign(comparisons=50, overlap=2)
    prompt = Prompt.objects.create(campaign=campaign, messages=[{"role": "user", "content": "q"}])
    source = Source.objects.create(name="m")
    Completion.objects.bulk_create(
        Completion(prompt=prompt, source=source, text=f"answer {i}") for i in range(60)
    )
    comparisons_build(campaign=campaign)  # 60 * 59 / 2 = 1770 comparisons, 3540 slots
    raters = UserFactory.create_batch(300)
    past = timezone.now() - timedelta(hours=1)
    slot_ids = Slot.objects.filter(campaign=campaign).values_list("id", flat=True)[:300]
    for rater, slot_id in zip(raters, slot_ids, strict=True):
        Slot.objects.filter(pk=slot_id).update(
            status=SlotStatus.LEASED, rater=rater, lease_expires_at=past
        )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE annotation_slot")

    expired, open_slots, gold = lease_queries(
        rater=raters[0], campaign=campaign, now=timezone.now()
    )
    plans = {
        "slot_queue_leased": _explain(expired),
        "slot_queue_open": _explain(open_slots),
        "slot_queue_gold": _explain(gold),
    }

    for index, plan in plans.items():
        assert f"Index Scan using {index}" in plan, plan
        assert "Sort" not in plan, plan
        assert "Seq Scan on annotation_slot " not in plan, plan
    # And the service really takes from them.
    assert lease(UserFactory(), campaign).status == SlotStatus.LEASED


class _FixedRng(random.Random):
    """random() always returns ``value``: pins the left/right draw of a lease."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_submit_refuses_an_answer_mapped_with_a_layout_the_slot_no_longer_has(db):
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = slot_lease_next(rater=rater, campaign=campaign, rng=_FixedRng(0.1))
    assert slot is not None
    assert slot.left_is_a
    # The rater skips and takes the same comparison again, now with the sides swapped; an
    # answer from the old card (mapped with left = A) must not be stored flipped.
    slot_release(rater=rater, campaign=campaign, slot_id=slot.pk)
    again = slot_lease_next(rater=rater, campaign=campaign, rng=_FixedRng(0.9))
    assert again is not None
    assert again.pk == slot.pk
    assert not again.left_is_a
    with pytest.raises(LeaseLost):
        judgment_submit(
            rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", expected_left_is_a=True
        )
    result = judgment_submit(
        rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", expected_left_is_a=False
    )
    assert result.created
    assert result.judgment.left_was_a is False


def test_side_and_canonical_answers_map_both_ways():
    for left_is_a in (True, False):
        for side in ("left", "right", "tie", "both_bad"):
            canonical = side_to_canonical(side, left_is_a=left_is_a)
            assert canonical_to_side(canonical, left_was_a=left_is_a) == side
    assert side_to_canonical("left", left_is_a=False) == "b"
    assert side_to_canonical("right", left_is_a=False) == "a"


@pytest.mark.parametrize("left_is_a", [True, False])
def test_side_answers_are_mapped_with_the_layout_of_the_locked_slot(left_is_a):
    campaign = make_campaign(comparisons=1, aspects=["helpfulness", "harmlessness"])
    rater = UserFactory()
    slot = lease(rater, campaign, rng=_FixedRng(0.1 if left_is_a else 0.9))
    assert slot.left_is_a is left_is_a

    result = judgment_submit(
        rater=rater,
        campaign=campaign,
        slot_id=slot.pk,
        choice="left",
        aspects={"helpfulness": "right", "harmlessness": "tie"},
        side_answers=True,
    )

    winner, loser = ("a", "b") if left_is_a else ("b", "a")
    assert result.judgment.choice == winner
    assert result.judgment.aspects == {"helpfulness": loser, "harmlessness": "tie"}
    assert result.judgment.left_was_a is left_is_a


def test_side_answers_are_checked_after_mapping_and_name_the_field():
    campaign = make_campaign(comparisons=1, allow_tie=False, aspects=["helpfulness"])
    rater = UserFactory()
    slot = lease(rater, campaign)

    with pytest.raises(InvalidJudgment) as tie:
        judgment_submit(
            rater=rater, campaign=campaign, slot_id=slot.pk, choice="tie", side_answers=True
        )
    with pytest.raises(InvalidJudgment) as canonical:
        # Raters answer left / right: a canonical "a" passes through unmapped and is refused.
        judgment_submit(
            rater=rater,
            campaign=campaign,
            slot_id=slot.pk,
            choice="left",
            aspects={"helpfulness": "a"},
            side_answers=True,
        )

    assert tie.value.field == "choice"
    assert canonical.value.field == "aspects"
    assert not Judgment.objects.exists()
    assert Slot.objects.get(pk=slot.pk).status == SlotStatus.LEASED


def test_side_answers_on_a_slot_not_held_are_refused_before_the_form_is_checked():
    campaign = make_campaign(comparisons=1)
    rater, other = UserFactory(), UserFactory()
    slot = lease(other, campaign)

    with pytest.raises(LeaseLost):
        judgment_submit(
            rater=rater, campaign=campaign, slot_id=slot.pk, choice="nonsense", side_answers=True
        )
