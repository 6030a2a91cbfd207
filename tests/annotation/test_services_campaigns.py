"""Campaign settings, status, members, and the slot bookkeeping behind the overlap."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Count, Q

from annotation.exceptions import AnnotationError, LeaseLost
from annotation.models import (
    Campaign,
    CampaignStatus,
    Comparison,
    Judgment,
    Membership,
    Role,
    Slot,
    SlotStatus,
)
from annotation.services.campaigns import (
    campaign_create,
    campaign_set_status,
    campaign_update,
    membership_add,
    membership_remove,
)
from annotation.services.items import PairSpec, comparisons_create
from annotation.services.judgments import judgment_submit, slot_lease_next
from tests.conftest import make_campaign
from tests.factories import CompletionFactory, PromptFactory, UserFactory

pytestmark = pytest.mark.django_db


def slot_counts(campaign: Campaign) -> dict[int, tuple[int, int, int]]:
    """comparison id -> (slots, filled, leased)."""
    rows = Comparison.objects.filter(campaign=campaign).annotate(
        n=Count("slots"),
        filled=Count("slots", filter=Q(slots__status=SlotStatus.FILLED)),
        leased=Count("slots", filter=Q(slots__status=SlotStatus.LEASED)),
    )
    return {c.pk: (c.n, c.filled, c.leased) for c in rows}


def judge(rater, campaign) -> Judgment:
    slot = slot_lease_next(rater=rater, campaign=campaign)
    assert slot is not None
    return judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a").judgment


# -- create and edit ----------------------------------------------------------------------------


def test_create_makes_a_draft_whose_creator_is_its_admin():
    creator = UserFactory()

    campaign = campaign_create(
        creator=creator, name="Helpfulness", slug="helpfulness", overlap=3, aspects=[" tone "]
    )

    assert campaign.status == CampaignStatus.DRAFT
    assert campaign.overlap == 3
    assert campaign.aspects == ["tone"]
    assert campaign.flag_options == ["unsafe", "pii", "hallucination"]
    assert campaign.created_by == creator
    assert list(Membership.objects.filter(campaign=campaign).values_list("user", "role")) == [
        (creator.pk, Role.ADMIN)
    ]


def test_create_refuses_a_taken_slug():
    campaign_create(creator=UserFactory(), name="One", slug="same")

    with pytest.raises(AnnotationError, match="slug"):
        campaign_create(creator=UserFactory(), name="Two", slug="same")
    assert Campaign.objects.count() == 1


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"status": "active"}, "unknown campaign fields: status"),
        ({"created_by": None}, "unknown campaign fields"),
        ({"aspects": "tone"}, "aspects must be a list"),
        ({"reason_tags": ["a", " a "]}, "reason_tags has duplicates"),
        ({"flag_options": ["x" * 61]}, "flag_options: each entry"),
    ],
)
def test_create_refuses_bad_fields_naming_them(fields, match):
    with pytest.raises(AnnotationError, match=match):
        campaign_create(creator=UserFactory(), name="X", slug="x", **fields)
    assert not Campaign.objects.exists()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"overlap": 0}, "overlap"),
        ({"overlap": 51}, "overlap"),
        ({"lease_seconds": 5}, "lease_seconds"),
        ({"critique_fraction": 1.5}, "critique_fraction"),
        ({"gold_fraction": -0.1}, "gold_fraction"),
        ({"critique_mode": "sometimes"}, "critique_mode"),
    ],
)
def test_create_refuses_values_the_model_refuses(fields, field):
    with pytest.raises(ValidationError) as error:
        campaign_create(creator=UserFactory(), name="X", slug="x", **fields)
    assert field in error.value.message_dict
    assert not Membership.objects.exists()


def test_changing_the_guidelines_bumps_their_version_and_judgments_record_it():
    campaign = make_campaign(comparisons=2)
    rater = UserFactory()
    before = judge(rater, campaign)

    campaign = campaign_update(campaign=campaign, guidelines="New rules.")
    unchanged = campaign_update(campaign=campaign, guidelines="New rules.", name="Renamed")
    after = judge(rater, unchanged)

    assert (before.guidelines_version, after.guidelines_version) == (1, 2)
    assert unchanged.guidelines_version == 2
    assert Campaign.objects.get(pk=campaign.pk).name == "Renamed"


def test_update_refuses_unknown_fields_and_invalid_values_without_writing():
    campaign = make_campaign(comparisons=2, overlap=2)

    with pytest.raises(AnnotationError):
        campaign_update(campaign=campaign, slug="new-slug")
    with pytest.raises(ValidationError):
        campaign_update(campaign=campaign, overlap=0, name="Half written")

    stored = Campaign.objects.get(pk=campaign.pk)
    assert (stored.overlap, stored.name) == (2, campaign.name)
    assert Slot.objects.filter(campaign=campaign).count() == 4


# -- overlap ------------------------------------------------------------------------------------


def test_raising_the_overlap_adds_open_slots_to_every_comparison():
    campaign = make_campaign(comparisons=3, overlap=1)
    judge(UserFactory(), campaign)

    campaign_update(campaign=campaign, overlap=3)

    assert sorted(slot_counts(campaign).values()) == [(3, 0, 0), (3, 0, 0), (3, 1, 0)]
    assert set(Comparison.objects.filter(campaign=campaign).values_list("judgments_wanted")) == {
        (3,)
    }
    assert Slot.objects.filter(campaign=campaign, status=SlotStatus.OPEN).count() == 8


def test_lowering_the_overlap_keeps_judgments_then_leases_and_drops_open_slots():
    campaign = make_campaign(comparisons=1, overlap=4)
    judged_by, leasing = UserFactory(), UserFactory()
    judge(judged_by, campaign)
    lease = slot_lease_next(rater=leasing, campaign=campaign)

    campaign_update(campaign=campaign, overlap=2)

    assert list(slot_counts(campaign).values()) == [(2, 1, 1)]
    lease.refresh_from_db()
    assert lease.status == SlotStatus.LEASED
    assert judgment_submit(rater=leasing, campaign=campaign, slot_id=lease.pk, choice="b").created


def test_lowering_the_overlap_below_the_live_leases_takes_the_extra_leases_back():
    campaign = make_campaign(comparisons=1, overlap=3)
    raters = [UserFactory() for _ in range(3)]
    leases = [slot_lease_next(rater=r, campaign=campaign) for r in raters]

    campaign_update(campaign=campaign, overlap=1)

    assert list(slot_counts(campaign).values()) == [(1, 0, 1)]
    outcomes = []
    for rater, slot in zip(raters, leases, strict=True):
        try:
            judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")
            outcomes.append("stored")
        except LeaseLost:
            outcomes.append("lost")
    assert sorted(outcomes) == ["lost", "lost", "stored"]


def test_lowering_the_overlap_below_the_judgments_keeps_them_all_and_stops_the_comparison():
    campaign = make_campaign(comparisons=1, overlap=3)
    for _ in range(2):
        judge(UserFactory(), campaign)
    slot_lease_next(rater=UserFactory(), campaign=campaign)

    campaign_update(campaign=campaign, overlap=1)

    assert list(slot_counts(campaign).values()) == [(2, 2, 0)]
    assert Judgment.objects.filter(campaign=campaign).count() == 2
    assert slot_lease_next(rater=UserFactory(), campaign=campaign) is None


def test_raising_after_lowering_numbers_new_slots_after_the_kept_ones():
    """Filled slots keep their index when open ones below them are dropped, so new slots must
    not reuse 0..overlap (that collided with the kept slots before)."""
    campaign = make_campaign(comparisons=1, overlap=3)
    first, second = UserFactory(), UserFactory()
    slot_lease_next(rater=first, campaign=campaign)  # index 0, left leased
    judge(second, campaign)  # index 1, filled
    campaign_update(campaign=campaign, overlap=1)
    # The filled slot is kept (index 1); the lease and the open slot are gone.
    assert list(Slot.objects.filter(campaign=campaign).values_list("index", "status")) == [
        (1, SlotStatus.FILLED)
    ]

    campaign_update(campaign=campaign, overlap=3)

    assert sorted(Slot.objects.filter(campaign=campaign).values_list("index", flat=True)) == [
        1,
        2,
        3,
    ]
    assert list(slot_counts(campaign).values()) == [(3, 1, 0)]


def test_raising_to_less_than_the_judgments_adds_nothing():
    campaign = make_campaign(comparisons=1, overlap=3)
    for _ in range(3):
        judge(UserFactory(), campaign)
    campaign_update(campaign=campaign, overlap=1)

    campaign_update(campaign=campaign, overlap=2)

    assert list(slot_counts(campaign).values()) == [(3, 3, 0)]


def test_comparisons_added_with_a_stale_campaign_get_the_current_overlap():
    campaign = make_campaign(comparisons=1, overlap=1)
    stale = Campaign.objects.get(pk=campaign.pk)
    campaign_update(campaign=campaign, overlap=3)
    prompt = PromptFactory(campaign=campaign)
    x, y = CompletionFactory(prompt=prompt), CompletionFactory(prompt=prompt)

    comparisons_create(
        campaign=stale, pairs=[PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk)]
    )

    assert sorted(n for n, _, _ in slot_counts(campaign).values()) == [3, 3]
    assert Comparison.objects.get(prompt=prompt).judgments_wanted == 3


# -- status -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        (["active"], True),
        (["archived"], True),
        (["active", "paused", "active"], True),
        (["active", "archived"], True),
        (["paused"], False),
        (["active", "draft"], False),
        (["archived", "active"], False),
        (["active", "closed"], False),
    ],
)
def test_status_moves_only_along_the_allowed_transitions(path, allowed):
    campaign = campaign_create(creator=UserFactory(), name="S", slug="s")
    *steps, last = path
    for status in steps:
        campaign = campaign_set_status(campaign=campaign, status=status)

    if allowed:
        assert campaign_set_status(campaign=campaign, status=last).status == last
    else:
        with pytest.raises(AnnotationError):
            campaign_set_status(campaign=campaign, status=last)
    assert Campaign.objects.get(pk=campaign.pk).status == (last if allowed else campaign.status)


# -- members ------------------------------------------------------------------------------------


def test_membership_add_is_idempotent_and_checks_the_role():
    campaign = make_campaign(comparisons=0)
    user = UserFactory()

    first = membership_add(campaign=campaign, user=user, role=Role.RATER)
    again = membership_add(campaign=campaign, user=user, role=Role.RATER)
    membership_add(campaign=campaign, user=user, role=Role.ML_STAFF)

    assert first.pk == again.pk
    assert Membership.objects.filter(campaign=campaign, user=user).count() == 2
    with pytest.raises(AnnotationError):
        membership_add(campaign=campaign, user=user, role="owner")


def test_the_last_admin_cannot_be_removed_but_one_of_two_can():
    creator = UserFactory()
    campaign = campaign_create(creator=creator, name="M", slug="m")
    second = UserFactory()
    membership_add(campaign=campaign, user=second, role=Role.ADMIN)

    membership_remove(campaign=campaign, user=second, role=Role.ADMIN)
    with pytest.raises(AnnotationError, match="at least one admin"):
        membership_remove(campaign=campaign, user=creator, role=Role.ADMIN)

    assert Membership.objects.filter(campaign=campaign, role=Role.ADMIN).count() == 1


def test_removing_a_rater_role_leaves_other_roles():
    campaign = make_campaign(comparisons=0)
    user = UserFactory()
    membership_add(campaign=campaign, user=user, role=Role.RATER)
    membership_add(campaign=campaign, user=user, role=Role.ADMIN)

    membership_remove(campaign=campaign, user=user, role=Role.RATER)

    assert list(Membership.objects.filter(campaign=campaign).values_list("role", flat=True)) == [
        Role.ADMIN
    ]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_admins_removing_each_other_at_once_leave_one_admin():
    for _ in range(5):
        first, second = UserFactory(), UserFactory()
        campaign = campaign_create(creator=first, name="Pair", slug=f"pair-{first.pk}")
        membership_add(campaign=campaign, user=second, role=Role.ADMIN)
        barrier = threading.Barrier(2)

        def remove(user, campaign=campaign, barrier=barrier) -> str:
            try:
                barrier.wait(timeout=30)
                membership_remove(campaign=campaign, user=user, role=Role.ADMIN)
                return "removed"
            except AnnotationError:
                return "refused"
            finally:
                connection.close()

        with ThreadPoolExecutor(2) as pool:
            outcomes = sorted(pool.map(remove, [first, second]))

        assert outcomes == ["refused", "removed"]
        assert Membership.objects.filter(campaign=campaign, role=Role.ADMIN).count() == 1
