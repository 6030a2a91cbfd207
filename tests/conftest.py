"""Shared fixtures: users with roles, and a campaign with comparisons ready to rate."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from django.db import connection

from annotation.models import Campaign, Role
from annotation.services.items import PairSpec, comparisons_create
from tests.factories import (
    CampaignFactory,
    CompletionFactory,
    MembershipFactory,
    PromptFactory,
    UserFactory,
)


def make_campaign(*, comparisons: int = 3, overlap: int = 1, **fields: object) -> Campaign:
    """An active campaign with ``comparisons`` comparisons (one prompt and two completions
    each) and their slots."""
    campaign = CampaignFactory(overlap=overlap, **fields)
    specs = []
    for _ in range(comparisons):
        prompt = PromptFactory(campaign=campaign)
        x = CompletionFactory(prompt=prompt)
        y = CompletionFactory(prompt=prompt)
        specs.append(PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk))
    comparisons_create(campaign=campaign, pairs=specs)
    return campaign


@dataclass
class World:
    """Two campaigns, each with its own rater, admin and ML staff member."""

    campaign: Campaign
    other_campaign: Campaign
    rater: object
    admin: object
    ml_staff: object
    other_rater: object
    other_admin: object
    outsider: object


@pytest.fixture
def campaign(db) -> Campaign:
    return make_campaign()


@pytest.fixture
def world(db) -> World:
    campaign = make_campaign(comparisons=3)
    other = make_campaign(comparisons=2)
    rater, admin, ml = UserFactory(), UserFactory(), UserFactory()
    other_rater, other_admin, outsider = UserFactory(), UserFactory(), UserFactory()
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    MembershipFactory(campaign=campaign, user=admin, role=Role.ADMIN)
    MembershipFactory(campaign=campaign, user=ml, role=Role.ML_STAFF)
    MembershipFactory(campaign=other, user=other_rater, role=Role.RATER)
    MembershipFactory(campaign=other, user=other_admin, role=Role.ADMIN)
    return World(campaign, other, rater, admin, ml, other_rater, other_admin, outsider)


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Throttle counters live in the cache: every test starts from none."""
    from django.core.cache import cache

    cache.clear()


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``postgres`` need real row locks; skip them on SQLite."""
    from django.conf import settings

    if "postgresql" in settings.DATABASES["default"]["ENGINE"]:
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL); SQLite has no row locks")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)
