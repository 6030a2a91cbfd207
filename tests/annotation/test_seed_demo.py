"""``manage.py seed_demo``: the demo campaign, its users and their one-time passwords."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from annotation.models import (
    Campaign,
    CampaignStatus,
    Comparison,
    Completion,
    Critique,
    CritiqueMode,
    Membership,
    Prompt,
    Role,
    Slot,
)
from annotation.services.judgments import judgment_submit, slot_lease_next

PASSWORD_LINE = re.compile(r"^  (admin|rater1|rater2|mlstaff)\s+(\S+)\s+\(", re.MULTILINE)


def seed(**options: object) -> dict[str, str]:
    out = io.StringIO()
    call_command("seed_demo", force=True, stdout=out, **options)
    passwords = dict(PASSWORD_LINE.findall(out.getvalue()))
    assert set(passwords) == {"admin", "rater1", "rater2", "mlstaff"}
    return passwords


def demo_counts() -> dict[str, int]:
    campaign = Campaign.objects.get(slug="demo")
    return {
        "prompts": Prompt.objects.filter(campaign=campaign).count(),
        "completions": Completion.objects.filter(prompt__campaign=campaign).count(),
        "comparisons": Comparison.objects.filter(campaign=campaign).count(),
        "slots": Slot.objects.filter(campaign=campaign).count(),
        "critiques": Critique.objects.filter(completion__prompt__campaign=campaign).count(),
        "memberships": Membership.objects.filter(campaign=campaign).count(),
    }


def test_seed_creates_an_active_demo_campaign_from_the_fixture(db):
    seed()
    campaign = Campaign.objects.get(slug="demo")
    assert campaign.status == CampaignStatus.ACTIVE
    assert campaign.overlap == 2
    assert campaign.critique_mode == CritiqueMode.ALWAYS
    assert campaign.aspects
    assert campaign.reason_tags
    assert demo_counts() == {
        "prompts": 12,
        "completions": 36,
        "comparisons": 36,  # all pairs of three candidates
        "slots": 72,
        "critiques": 3,
        "memberships": 4,
    }
    multi_turn = [p for p in Prompt.objects.filter(campaign=campaign) if len(p.messages) > 1]
    assert len(multi_turn) == 3
    assert Prompt.objects.filter(campaign=campaign, split="eval").count() == 2


def test_each_demo_user_gets_a_fresh_random_password_that_works(db):
    passwords = seed()
    users = get_user_model().objects.in_bulk(list(passwords), field_name="username")
    for name, password in passwords.items():
        assert len(password) >= 16
        assert users[name].check_password(password)
        assert users[name].has_usable_password()
    assert len(set(passwords.values())) == 4


def test_roles_and_the_permission_to_create_campaigns(db):
    seed()
    campaign = Campaign.objects.get(slug="demo")
    roles = dict(Membership.objects.filter(campaign=campaign).values_list("user__username", "role"))
    assert roles == {
        "admin": Role.ADMIN,
        "rater1": Role.RATER,
        "rater2": Role.RATER,
        "mlstaff": Role.ML_STAFF,
    }
    users = get_user_model().objects
    assert users.get(username="admin").has_perm("annotation.add_campaign")
    assert not users.get(username="rater1").has_perm("annotation.add_campaign")


def test_running_again_keeps_the_data_and_replaces_every_password(db):
    first = seed()
    counts = demo_counts()
    second = seed()
    assert demo_counts() == counts
    users = get_user_model().objects
    for name in first:
        user = users.get(username=name)
        assert first[name] != second[name]
        assert not user.check_password(first[name])
        assert user.check_password(second[name])


def test_a_demo_rater_can_start_rating_and_sees_critiques_where_there_are_some(db):
    seed()
    campaign = Campaign.objects.get(slug="demo")
    rater = get_user_model().objects.get(username="rater1")
    shown = []
    while (slot := slot_lease_next(rater=rater, campaign=campaign)) is not None:
        shown.append(slot.critique_shown)
        judgment_submit(rater=rater, campaign=campaign, slot_id=slot.pk, choice="a", strength=2)
    assert len(shown) == 36
    # Critique mode is "always", but only 3 of the 36 completions have a critique: the
    # comparisons that include one (2 each) show critiques, the others cannot.
    assert sum(shown) == 6


def test_refuses_to_run_with_debug_off_unless_forced(db, settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="DEBUG"):
        call_command("seed_demo", stdout=io.StringIO())
    assert not Campaign.objects.filter(slug="demo").exists()
    assert not get_user_model().objects.filter(username="admin").exists()
