"""The Django admin: every model is there, judgments cannot be touched, and campaign edits go
through the services (slots follow the overlap, the last admin stays)."""

from __future__ import annotations

import json

import pytest
from django.contrib import admin as django_admin
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from annotation import models
from annotation.models import Campaign, CampaignStatus, Judgment, Membership, Role, Slot
from annotation.services.items import critique_create
from annotation.services.judgments import judgment_submit, slot_lease_next
from tests.conftest import make_campaign
from tests.factories import MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db

ALL_MODELS = [
    models.Campaign,
    models.Membership,
    models.Source,
    models.Prompt,
    models.Completion,
    models.Critique,
    models.Comparison,
    models.Slot,
    models.Judgment,
]
READ_ONLY = [
    models.Prompt,
    models.Completion,
    models.Critique,
    models.Comparison,
    models.Slot,
    models.Judgment,
]


@pytest.fixture
def superuser(db):
    return get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests")


@pytest.fixture
def client_as_root(client, superuser):
    client.force_login(superuser)
    return client


def url(model, view: str, *args) -> str:
    return reverse(f"admin:annotation_{model._meta.model_name}_{view}", args=args)


def a_judgment() -> Judgment:
    campaign = make_campaign(comparisons=1)
    rater = UserFactory()
    slot = slot_lease_next(rater=rater, campaign=campaign)
    judgment = judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a")
    critique_create(completion=judgment.judgment.comparison.completion_a, critic="c", text="ok")
    return judgment.judgment


def campaign_form(campaign: Campaign, **overrides) -> dict[str, str]:
    """The change form as the browser posts it, with an empty membership inline."""
    data = {
        "name": campaign.name,
        "description": campaign.description,
        "guidelines": campaign.guidelines,
        "overlap": campaign.overlap,
        "lease_seconds": campaign.lease_seconds,
        "gold_fraction": campaign.gold_fraction,
        "gold_overlap": campaign.gold_overlap,
        "agreement_fraction": campaign.agreement_fraction,
        "agreement_overlap": campaign.agreement_overlap,
        "screening_items": campaign.screening_items,
        "screening_min_accuracy": campaign.screening_min_accuracy,
        "strength_scale": campaign.strength_scale,
        "aspects": json.dumps(campaign.aspects),
        "reason_tags": json.dumps(campaign.reason_tags),
        "flag_options": json.dumps(campaign.flag_options),
        "critique_mode": campaign.critique_mode,
        "critique_fraction": campaign.critique_fraction,
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
    }
    for flag in ("allow_tie", "allow_both_bad", "require_rationale"):
        if getattr(campaign, flag):
            data[flag] = "on"
    data.update({k: str(v) for k, v in overrides.items()})
    return data


def test_every_model_is_registered():
    registered = set(django_admin.site._registry)
    assert set(ALL_MODELS) <= registered


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_every_changelist_and_search_renders(client_as_root, model):
    a_judgment()

    assert client_as_root.get(url(model, "changelist")).status_code == 200
    assert client_as_root.get(url(model, "changelist"), {"q": "x"}).status_code == 200


@pytest.mark.parametrize("model", READ_ONLY, ids=lambda m: m.__name__)
def test_items_queue_and_judgments_are_view_only(client_as_root, model):
    a_judgment()
    obj = model.objects.first()

    page = client_as_root.get(url(model, "change", obj.pk))
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert client_as_root.get(url(model, "add")).status_code == 403
    assert client_as_root.get(url(model, "delete", obj.pk)).status_code == 403
    assert client_as_root.post(url(model, "change", obj.pk), {}).status_code == 403
    changelist = client_as_root.get(url(model, "changelist"))
    assert b"delete_selected" not in changelist.content


def test_a_judgment_cannot_be_deleted_through_the_bulk_action(client_as_root):
    judgment = a_judgment()

    client_as_root.post(
        url(Judgment, "changelist"),
        {"action": "delete_selected", "_selected_action": [judgment.pk], "post": "yes"},
    )

    assert Judgment.objects.filter(pk=judgment.pk).exists()


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_changelist_queries_do_not_grow_with_rows(client_as_root, model):
    a_judgment()
    client_as_root.get(url(model, "changelist"))  # warm caches (content types, session)
    with CaptureQueriesContext(connection) as few:
        client_as_root.get(url(model, "changelist"))
    for _ in range(8):
        a_judgment()

    with CaptureQueriesContext(connection) as many:
        client_as_root.get(url(model, "changelist"))

    assert len(many) <= len(few), [q["sql"] for q in many]


def test_staff_without_permissions_sees_nothing(client):
    staff = UserFactory(is_staff=True)
    client.force_login(staff)

    for model in ALL_MODELS:
        assert client.get(url(model, "changelist")).status_code == 403


def test_campaign_created_in_the_admin_has_its_creator_as_admin(client_as_root, superuser):
    template = Campaign(name="From admin", slug="from-admin", aspects=["tone"])
    data = campaign_form(template, slug="from-admin")

    response = client_as_root.post(url(Campaign, "add"), data)

    assert response.status_code == 302, response.content[:2000]
    campaign = Campaign.objects.get(slug="from-admin")
    assert campaign.status == CampaignStatus.DRAFT
    assert campaign.created_by == superuser
    assert Membership.objects.filter(campaign=campaign, user=superuser, role=Role.ADMIN).exists()


def test_changing_the_overlap_in_the_admin_resizes_the_slots(client_as_root):
    campaign = make_campaign(comparisons=3, overlap=1)

    response = client_as_root.post(
        url(Campaign, "change", campaign.pk), campaign_form(campaign, overlap=3)
    )

    assert response.status_code == 302
    assert Slot.objects.filter(campaign=campaign).count() == 9


def test_changing_the_guidelines_in_the_admin_bumps_their_version(client_as_root):
    campaign = make_campaign(comparisons=1)

    client_as_root.post(
        url(Campaign, "change", campaign.pk), campaign_form(campaign, guidelines="New.")
    )

    assert Campaign.objects.get(pk=campaign.pk).guidelines_version == 2


def test_a_bad_option_list_is_a_form_error_not_a_crash(client_as_root):
    campaign = make_campaign(comparisons=1)
    data = campaign_form(campaign, aspects=json.dumps(["tone", " tone"]))

    response = client_as_root.post(url(Campaign, "change", campaign.pk), data)

    assert response.status_code == 200
    assert b"duplicates" in response.content
    assert Campaign.objects.get(pk=campaign.pk).aspects == campaign.aspects


def test_status_actions_follow_the_allowed_transitions(client_as_root):
    active = make_campaign(comparisons=1)
    draft = make_campaign(comparisons=1, status=CampaignStatus.DRAFT)

    response = client_as_root.post(
        url(Campaign, "changelist"),
        {"action": "pause", "_selected_action": [active.pk, draft.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assert Campaign.objects.get(pk=active.pk).status == CampaignStatus.PAUSED
    assert Campaign.objects.get(pk=draft.pk).status == CampaignStatus.DRAFT
    assert b"cannot become paused" in response.content


def test_members_are_added_and_the_last_admin_is_kept_through_the_inline(client_as_root):
    campaign = make_campaign(comparisons=1)
    only_admin = MembershipFactory(campaign=campaign, role=Role.ADMIN)
    newcomer = UserFactory()
    data = campaign_form(
        campaign,
        **{
            "memberships-TOTAL_FORMS": "2",
            "memberships-INITIAL_FORMS": "1",
            "memberships-0-id": only_admin.pk,
            "memberships-0-campaign": campaign.pk,
            "memberships-0-DELETE": "on",
            "memberships-1-campaign": campaign.pk,
            "memberships-1-user": newcomer.pk,
            "memberships-1-role": Role.RATER,
        },
    )

    response = client_as_root.post(url(Campaign, "change", campaign.pk), data, follow=True)

    assert response.status_code == 200
    assert b"at least one admin" in response.content
    assert Membership.objects.filter(pk=only_admin.pk).exists()
    assert Membership.objects.filter(campaign=campaign, user=newcomer, role=Role.RATER).exists()


def test_deleting_the_last_admin_from_the_membership_list_is_refused(client_as_root):
    campaign = make_campaign(comparisons=1)
    only_admin = MembershipFactory(campaign=campaign, role=Role.ADMIN)

    client_as_root.post(url(Membership, "delete", only_admin.pk), {"post": "yes"}, follow=True)

    assert Membership.objects.filter(pk=only_admin.pk).exists()


def test_reclaim_action_returns_expired_leases(client_as_root):
    campaign = make_campaign(comparisons=2, lease_seconds=60)
    slot = slot_lease_next(rater=UserFactory(), campaign=campaign)
    Slot.objects.filter(pk=slot.pk).update(lease_expires_at=slot.leased_at)

    client_as_root.post(
        url(Campaign, "changelist"),
        {"action": "reclaim_expired_leases", "_selected_action": [campaign.pk]},
    )

    slot.refresh_from_db()
    assert slot.status == "open"


def test_critique_and_long_texts_are_shortened_in_lists(client_as_root):
    judgment = a_judgment()
    completion = judgment.comparison.completion_a
    critique_create(completion=completion, critic="c", text="word " * 100)

    page = client_as_root.get(url(models.Critique, "changelist"))

    assert page.status_code == 200
    assert ("word " * 100).encode() not in page.content
